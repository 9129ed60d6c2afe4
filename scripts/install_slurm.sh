#!/usr/bin/env bash
# Install a single-node SLURM (slurmctld, slurmd, client tools) and munge from Debian/Ubuntu
# packages, for tests/test_slurm.py. Idempotent: does nothing when the binaries are there.
# Needs root (or sudo) and apt-get; the packages' attempt to start services under a policy
# that forbids it is harmless: the tests start their own daemons in a scratch directory.
set -euo pipefail
BINARIES=(slurmctld slurmd sbatch srun squeue scontrol scancel sinfo munged)
missing=0
for b in "${BINARIES[@]}"; do
  command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 0 ]; then
  echo "slurm and munge already installed"
  exit 0
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_slurm.sh: run as root or install sudo" >&2; exit 1; }
  SUDO=(sudo -E)
fi
command -v apt-get >/dev/null 2>&1 || {
  echo "install_slurm.sh: no apt-get; install slurmctld, slurmd, slurm-client and munge with your package manager" >&2
  exit 1
}
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "installed: $(PATH="$PATH:/usr/sbin" slurmctld -V)"
