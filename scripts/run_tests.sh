#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_slurm.sh  # the SLURM launcher is tested against a real local cluster
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
python -m pytest -q -p no:cacheprovider tests "$@"
