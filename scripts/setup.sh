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
# The project's own bytecode, written now: where PYTHONDONTWRITEBYTECODE is set (as here), every
# process would otherwise compile the ~60 modules it imports from source (about 0.06 s each
# time, a few hundred times in `make test`). Up-to-date files are skipped; a stale one is only
# recompiled in memory.
compile_own() { .venv/bin/python -m compileall -q -j 0 telepathy tests bench >/dev/null; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  compile_own
  exit 0
fi
echo "setup: creating .venv with the pinned packages of requirements.lock" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
torch_pin="torch==$(grep -i '^torch==' requirements.lock | cut -d= -f3)"
uv_pin="uv==$(grep -i '^uv==' requirements.lock | cut -d= -f3)"

# uv (pinned in requirements.lock) installs the same pins in about 20 s where pip takes about 65;
# it is told pip's own configuration (indexes, find-links, constraints, certificate), so both
# draw from the same places. Any failure falls back to pip, which needs nothing else.
uv_install() {
  .venv/bin/python -m pip install -q -c requirements.lock "$uv_pin" || return 1
  local args=() line key value item
  while IFS= read -r line; do
    key=${line%%=*}; key=${key#*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
    value=${value//\\n/ }  # pip prints a multi-line value with its newlines as \n
    case "$key" in
      index-url) args+=(--index-url "$value") ;;
      extra-index-url) for item in $value; do args+=(--extra-index-url "$item"); done ;;
      find-links) for item in $value; do args+=(--find-links "$item"); done ;;
      constraint) for item in $value; do args+=(--constraint "$item"); done ;;
      no-index) case "$value" in 1|[Tt]rue|yes|on) args+=(--no-index) ;; esac ;;
      cert) export SSL_CERT_FILE="$value" ;;
    esac
  done < <(.venv/bin/python -m pip config list 2>/dev/null)
  # pip weighs every index's versions; uv's default stops at the first index that has the name.
  local uv=(.venv/bin/uv pip install -q --python .venv/bin/python --index-strategy unsafe-best-match
            "${args[@]}")
  "${uv[@]}" --compile-bytecode -c requirements.lock -r requirements.lock "$torch_pin" &&
    "${uv[@]}" -c requirements.lock --no-deps -e ".[dev]"
}

if ! uv_install; then
  echo "setup: uv could not install the pins; installing with pip instead" >&2
  # torch first and exactly: anything else that asks for torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -c requirements.lock "$torch_pin"
  .venv/bin/python -m pip install -q -c requirements.lock -r requirements.lock
  .venv/bin/python -m pip install -q -c requirements.lock --no-deps -e ".[dev]"
fi
compile_own
echo "$key" > "$stamp"
