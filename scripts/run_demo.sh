#!/usr/bin/env bash
# The main job, end to end on the bundled data (the README's first command):
# install, write calibration/validation shards from the bundled Shakespeare excerpt,
# train a small GPT on it (~1 min; no pretrained LM can be downloaded offline), then prune it
# in stages on 2 CPU ranks (torchrun + FSDP2), show the per-layer table and the perplexity
# before and after. Rerunning resumes from the mask checkpoint (use --restart to redo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=1
CONFIG=${CONFIG:-configs/demo.yaml}
RUN=runs/demo
[ -f $RUN/calib/metadata.json ] || python -m gradprobe_dist make-shards --bundled train --out $RUN/calib --seq-len 128 --samples-per-shard 256
[ -f $RUN/valid/metadata.json ] || python -m gradprobe_dist make-shards --bundled valid --out $RUN/valid --seq-len 128 --samples-per-shard 64
[ -f $RUN/model.safetensors ] || python -m gradprobe_dist train --config "$CONFIG" data.micro_batch_size=16 --steps 300 --out $RUN/model.safetensors
bash launch/torchrun.sh prune --config "$CONFIG" --eval "$@"
echo "== the mask checkpoint, read back: python -m gradprobe_dist inspect $RUN/masks"
python -m gradprobe_dist inspect $RUN/masks
