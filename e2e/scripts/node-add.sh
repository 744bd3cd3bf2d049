#!/usr/bin/env bash
# Add kubelet node N (1-9) to the running e2e cluster (e2e/scripts/cluster-up.sh), so that
# scenarios can spread pods over machines, drain one and lose one. The node is a machine of its
# own as far as Kubernetes can tell: its own network namespace (joined to the cluster's by a
# veth pair, routes both ways for its node IP and pod range), its own containerd (a kubelet
# garbage-collects the CRI containers it does not know, so nodes cannot share one), CNI bridge
# and pod range, kubelet, kube-proxy, cgroup root and state dir. The images of the cluster
# (pause, busybox and, once e2e/scripts/build-images.sh has run, the release images) are
# imported into its containerd. e2e/scripts/cluster-down.sh tears it down with the cluster;
# e2e/scripts/node-stop.sh stops it abruptly, as a machine that fails.
#
# Usage: e2e/scripts/node-add.sh N
# Layout (lib.sh): node name shardmesh-e2e-node-N, netns $SHARDMESH_E2E_NETNS-nN, node IP
# 10.254.0.(10+N), pods 10.254.(64+N).0/24, state $SHARDMESH_E2E_DIR/nodes/N, logs
# {containerd,kubelet,kube-proxy,supervisor}-nN.log in $SHARDMESH_E2E_DIR/logs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/lib.sh"

WAIT=${SHARDMESH_WAIT:-120}
LOGS=$E2E_DIR/logs

# Inner part: runs under the node's supervisor, inside the node's netns. Starts its daemons.
inner() {
  local n=$1 bin=$2
  local dir name ip cidr sock kc t0
  dir=$(node_dir "$n") name=$(node_name "$n") ip=$(node_ip "$n") cidr=$(node_pod_cidr "$n")
  sock=$(node_ctr_sock "$n") kc=$dir/kubeconfig t0=$(now_s)
  cd "$dir"

  node_runtime_config "$dir" "$sock" "shardmesh-br$n" "$cidr"
  start_daemon "containerd-n$n" containerd --config "$dir/ctr/config.toml"
  wait_for "containerd socket $sock" "$WAIT" "$LOGS/containerd-n$n.log" "containerd-n$n" -- \
    ctr --address "$sock" version
  ctr --address "$sock" -n k8s.io images import "$E2E_DIR/img/pause.tar" >/dev/null
  ctr --address "$sock" -n k8s.io images import "$E2E_DIR/img/busybox.tar" >/dev/null
  if [ -f "$E2E_DIR/images/images.txt" ]; then
    import_images "$sock" "$E2E_DIR/images"
  fi
  log "node $n: containerd ready, images imported ($(elapsed_since "$t0")s)"

  make_cgroup_root "$(node_ns "$n")"
  start_kubelet "kubelet-n$n" "$bin" "$kc" "$sock" "$dir" "$name" "$ip" "$(node_ns "$n")"
  wait_for "node $name Ready" "$WAIT" "$LOGS/kubelet-n$n.log" "kubelet-n$n" -- \
    bash -c "kubectl --kubeconfig '$kc' get node '$name' --no-headers | grep -q ' Ready'"
  log "node $n: $name Ready ($(elapsed_since "$t0")s)"

  start_kube_proxy "kube-proxy-n$n" "$bin" "$kc" "$name" "$cidr"
  wait_for "node $n's kube-proxy programming the kubernetes Service" "$WAIT" "$LOGS/kube-proxy-n$n.log" "kube-proxy-n$n" -- \
    bash -c "iptables -w -t nat -S KUBE-SERVICES | grep -q 'default/kubernetes:https cluster IP'"
  log "node $n: kube-proxy ready ($(elapsed_since "$t0")s)"
}

if [ "${1:-}" = --inner ]; then
  inner "$2" "$3"
  exit 0
fi

require_root
N=${1:-}
[[ $N =~ ^[1-9]$ ]] || die "usage: e2e/scripts/node-add.sh N (N = 1-9; the first node is the cluster's own)"
[ -f "$KUBECONFIG_FILE" ] && [ -e "/run/netns/$E2E_NS" ] \
  || die "no e2e cluster in $E2E_DIR: start it first with e2e/scripts/cluster-up.sh"
T0=$(now_s)
NS=$(node_ns "$N")
DIR=$(node_dir "$N")
LINK=$(node_link "$N")
IP=$(node_ip "$N")
CIDR=$(node_pod_cidr "$N")
[ -e "$DIR" ] || [ -e "/run/netns/$NS" ] && die "node $N exists already ($DIR or netns $NS); tear the cluster down first"
BIN=$("$HERE/build-k8s.sh")

mkdir -p "$DIR/kubelet"
# The API server as seen from another machine: the cluster's node IP, not its loopback.
sed "s#server: https://127.0.0.1:$API_PORT#server: https://$NODE_IP:$API_PORT#" "$KUBECONFIG_FILE" >"$DIR/kubeconfig"
chmod 600 "$DIR/kubeconfig"
grep -q "https://$NODE_IP:$API_PORT" "$DIR/kubeconfig" || die "node kubeconfig: server address not replaced"

log "node $N: network namespace $NS, node IP $IP, pods $CIDR"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$E2E_NS" link add "$LINK" type veth peer name uplink netns "$NS"
ip -n "$E2E_NS" link set "$LINK" up
ip -n "$NS" link set uplink up
ip -n "$NS" addr add "$IP/32" dev uplink
# Node -> cluster: everything (API server, other nodes, other pod ranges) through the first node,
# which forwards; cluster -> node: its IP and pod range through the link.
ip -n "$NS" route add "$NODE_IP/32" dev uplink
ip -n "$NS" route add default via "$NODE_IP" dev uplink
ip -n "$E2E_NS" route add "$IP/32" dev "$LINK"
ip -n "$E2E_NS" route add "$CIDR" via "$IP" dev "$LINK"
nsenter --net="/run/netns/$NS" sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1

setsid nsenter --net="/run/netns/$NS" python3 "$HERE/supervisor.py" \
  --rc-file "$DIR/up.rc" --pid-file "$E2E_DIR/pids/supervisor-n$N" --log "$LOGS/supervisor-n$N.log" \
  -- bash "$HERE/node-add.sh" --inner "$N" "$BIN" </dev/null &
if ! wait_for "node $N's start script (supervisor)" 600 "$LOGS/supervisor-n$N.log" - -- test -s "$DIR/up.rc"; then
  die "node $N did not start; tear down with e2e/scripts/cluster-down.sh"
fi
rc=$(cat "$DIR/up.rc")
[ "$rc" = 0 ] || die "node $N failed to start (exit $rc); logs in $LOGS/*-n$N.log; tear down with e2e/scripts/cluster-down.sh"
log "node $N ($(node_name "$N")) up in $(elapsed_since "$T0")s"
