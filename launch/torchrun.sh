#!/usr/bin/env bash
# One node, N processes: `launch/torchrun.sh <subcommand> --config configs/X.yaml [key=value ...]`
# N defaults to the number of GPUs, or 2 CPU ranks without one (override with NPROC=...).
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# One thread per rank: on small CPU machines more threads per process are slower, not faster.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc_per_node="$NPROC" --local-ranks-filter="${LOG_RANKS:-0}" \
  -m gradprobe_dist "$@"
