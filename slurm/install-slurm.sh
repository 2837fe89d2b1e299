#!/usr/bin/env bash
# Install a local Slurm (Debian/Ubuntu slurm-wlm + munge) for slurm/local-cluster.sh and the tests.
# Idempotent: does nothing when slurmctld, slurmd, munged and sbatch are already on PATH.
# Usage: slurm/install-slurm.sh            (as root, or with sudo available)
set -euo pipefail

have_all() {
    local cmd
    for cmd in slurmctld slurmd sbatch srun squeue scontrol sinfo munged; do
        command -v "$cmd" >/dev/null 2>&1 || return 1
    done
}

if have_all; then
    echo "slurm already installed: $(slurmd -V)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm.sh: apt-get not found; install slurm-wlm and munge with your package manager" >&2
    exit 1
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
fi

start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
# Wait for other apt users (shared machines, CI images) instead of failing on the lock.
"${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
"${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends slurm-wlm munge
if ! have_all; then
    echo "install-slurm.sh: slurm installed but some commands are missing from PATH" >&2
    exit 1
fi
echo "installed $(slurmd -V) in $(( $(date +%s) - start )) s"
