#!/usr/bin/env bash
# Install a one-node SLURM (slurm-wlm) and munge for tests/test_slurm.py.
# Idempotent: does nothing when the binaries are already present. Quiet: prints one line.
# Needs root (CI containers run as root); without it, says so and exits non-zero, and the
# SLURM test then skips itself.
set -euo pipefail

need=(sbatch slurmctld slurmd munged)
missing=0
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || missing=1; done
if [[ $missing == 0 ]]; then
    echo "install_slurm: slurm-wlm and munge already installed"
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    echo "install_slurm: need root for apt-get (missing: slurm-wlm/munge)" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: no apt-get here (not Debian/Ubuntu): install slurm-wlm and munge by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# One apt-get update, then the install; show apt's output only when something failed.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "install_slurm: apt-get failed" >&2
    exit 1
fi
rm -f "$log"
echo "install_slurm: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm) and munge"
