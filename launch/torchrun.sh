#!/usr/bin/env bash
# One node, N processes: `launch/torchrun.sh <subcommand> --config configs/X.yaml [key=value ...]`
# N defaults to the number of GPUs, or 2 CPU ranks without one (override with NPROC=...).
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# One thread per rank: on small CPU machines more threads per process are slower, not faster.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# glibc hands blocks of 1 MiB or more back to the kernel when freed, instead of keeping them
# per thread arena: measured on the SmolLM2 main job, peak RSS per FSDP2 rank 1636 MiB
# instead of 2336 (bench/results/main_memory_malloc.md)
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-1048576} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1048576}
exec torchrun --standalone --nproc_per_node="$NPROC" --local-ranks-filter="${LOG_RANKS:-0}" \
  -m gradprobe_dist "$@"
