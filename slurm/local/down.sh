#!/usr/bin/env bash
# Stop the local cluster of slurm/local/up.sh: cancel its jobs, stop its own daemons by pid.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=$(realpath -m "${1:-$here/../../runs/slurm-local}")
export SLURM_CONF="$state/slurm.conf"
[ -f "$SLURM_CONF" ] || { echo "down.sh: no cluster under $state" >&2; exit 0; }
scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
for daemon in slurmd slurmctld; do
  pidfile="$state/$daemon.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$pidfile"
done
echo "stopped the local cluster under $state"
