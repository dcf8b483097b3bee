#!/usr/bin/env bash
# Stop the local cluster of slurm/local/up.sh: cancel its jobs, stop its own daemons by pid;
# with several nodes, remove the namespaces, links and bridge that up.sh made.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=$(realpath -m "${1:-$here/../../runs/slurm-local}")
export SLURM_CONF="$state/slurm.conf"
[ -f "$SLURM_CONF" ] || { echo "down.sh: no cluster under $state" >&2; exit 0; }
scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
for pidfile in "$state"/slurmd.pid "$state"/slurmd-n*.pid "$state"/slurmctld.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$pidfile"
done
# A cluster of several nodes (TELEPATHY_SLURM_NODES): its namespaces, veth pairs and bridge, by
# their names (they carry the port), also when its daemons died first.
port=$(sed -n 's/^SlurmctldPort=//p' "$SLURM_CONF")
if [ -n "$port" ] && [ "$(id -u)" -eq 0 ]; then
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^tp${port}n[0-9]+$"); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^tpv${port}n[0-9]+$"); do
    ip link del "$link" 2>/dev/null
  done
  ip link show "tpb$port" >/dev/null 2>&1 && ip link del "tpb$port"
fi
echo "stopped the local cluster under $state"
