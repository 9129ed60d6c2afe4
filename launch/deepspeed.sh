#!/usr/bin/env bash
# One node, N processes under DeepSpeed's launcher (for parallel=zero3; any mode works):
#   bash launch/deepspeed.sh prune --config configs/smollm2.yaml parallel=zero3
# N defaults to the number of GPUs, or 2 CPU ranks without one (override with NPROC=...).
# Without a GPU, DeepSpeed runs on its CPU accelerator (gloo). Port: MASTER_PORT (29500).
# --no_local_rank: the launcher would otherwise insert --local_rank=N before the subcommand;
# each rank reads LOCAL_RANK from the environment instead.
set -euo pipefail
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" = 0 ]; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  NPROC=${NPROC:-2}
fi
NPROC=${NPROC:-$GPUS}
# One thread per rank: on small CPU machines more threads per process are slower, not faster.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module gradprobe_dist "$@"
