#!/usr/bin/env bash
# Stop added node N (e2e/scripts/node-add.sh) abruptly, as a machine that loses power: its link
# to the cluster goes down first (packets to its node IP and pods are dropped, not refused),
# then its kubelet, kube-proxy, containerd, shims and every container process are killed with
# SIGKILL. Nothing is cleaned up and the Node object stays: the control plane notices the node
# only through its missing heartbeats, as with a real machine. Its state stays for
# e2e/scripts/cluster-down.sh.
#
# Usage: e2e/scripts/node-stop.sh N
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/lib.sh"
require_root
N=${1:-}
[[ $N =~ ^[1-9]$ ]] || die "usage: e2e/scripts/node-stop.sh N (an added node, 1-9)"
[ -d "$(node_dir "$N")" ] || die "node $N was not added (no $(node_dir "$N"))"

ip -n "$E2E_NS" link set "$(node_link "$N")" down
for round in 1 2 3 4 5; do
  mapfile -t pids < <(node_pids "$N")
  [ ${#pids[@]} -eq 0 ] && break
  [ "$round" = 1 ] && log "node $N: killing ${#pids[@]} processes (kubelet, kube-proxy, containerd, shims, containers)"
  kill -KILL "${pids[@]}" 2>/dev/null || true
  sleep 0.2
done
mapfile -t pids < <(node_pids "$N")
[ ${#pids[@]} -eq 0 ] || die "node $N: processes survive SIGKILL: ${pids[*]}"
log "node $N ($(node_name "$N")) stopped"
