#!/usr/bin/env bash
# One-time (idempotent) set-up: Debian packages for the local SLURM cluster, then .venv/ at the
# repo root with the exact versions of requirements.lock. Re-running is a no-op once done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(slurmctld slurmd slurm-client tmux)
missing=()
for cmd in slurmctld slurmd sbatch tmux; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${missing[*]}; install as root: apt-get install ${APT_PACKAGES[*]}" >&2
    exit 1
  fi
  echo "setup: installing Debian packages ${APT_PACKAGES[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
key=$(cat requirements.lock setup.cfg setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
stamp=.venv/.telepathy-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
echo "setup: creating .venv with the pinned packages of requirements.lock" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and exactly: anything else that asks for torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q -c requirements.lock "torch==$(grep -i '^torch==' requirements.lock | cut -d= -f3)"
.venv/bin/python -m pip install -q -c requirements.lock -r requirements.lock
.venv/bin/python -m pip install -q -c requirements.lock --no-deps -e ".[dev]"
echo "$key" > "$stamp"
