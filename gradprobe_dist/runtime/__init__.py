"""The process around the algorithm: joining the process group (torchrun, SLURM, one process)
and rank-aware logging."""
