#!/usr/bin/env bash
# Start a throw-away single-node Kubernetes v1.20.2 inside a private network namespace:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd, kubelet, kube-proxy.
#
# Usage: e2e/scripts/cluster-up.sh         (tear down with e2e/scripts/cluster-down.sh)
# Env:   SHARDMESH_E2E_DIR   state dir (default /tmp/shardmesh-e2e)
#        SHARDMESH_E2E_NETNS network namespace (default shardmesh-e2e)
#        SHARDMESH_WAIT      seconds to wait for each component (default 120)
#        SHARDMESH_E2E_SERVICE_CIDR  ClusterIP range (default 10.254.128.0/20: room for the
#                            operator benchmark's 1,000 routing Services, e2e/bench/run.sh)
#
# All daemons are children of a supervisor (e2e/scripts/supervisor.py, a child subreaper) that
# runs inside the namespace, so they are reaped even where PID 1 does not reap. PIDs are in
# $SHARDMESH_E2E_DIR/pids, logs in $SHARDMESH_E2E_DIR/logs. Use the cluster from inside the netns:
#   nsenter --net=/run/netns/shardmesh-e2e kubectl --kubeconfig /tmp/shardmesh-e2e/kubeconfig get nodes
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/lib.sh"

WAIT=${SHARDMESH_WAIT:-120}
SERVICE_CIDR=${SHARDMESH_E2E_SERVICE_CIDR:-$SERVICE_CIDR}
DIR=$E2E_DIR
P=$DIR/pki
LOGS=$DIR/logs

step() { log "$1 ($(elapsed_since "$T0")s)"; }

# ---------------------------------------------------------------------------------------------
# Inner part: runs under the supervisor, inside the netns. Starts the daemons and returns.
# ---------------------------------------------------------------------------------------------
inner() {
  BIN=$1
  T0=$(now_s)
  cd "$DIR"

  # --- PKI: CA, apiserver serving cert, service-account keypair, admin token ---
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$P/ca.key" -out "$P/ca.crt" -days 7 \
    -subj /CN=shardmesh-e2e-ca 2>/dev/null
  local svc_ip
  svc_ip=$(echo "$SERVICE_CIDR" | awk -F'[./]' '{print $1"."$2"."$3"."$4+1}')
  cat >"$P/apiserver.cnf" <<EOF
[req]
distinguished_name = dn
[dn]
[ext]
subjectAltName = IP:127.0.0.1,IP:$NODE_IP,IP:$svc_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage = serverAuth
keyUsage = digitalSignature,keyEncipherment
EOF
  openssl req -newkey rsa:2048 -nodes -keyout "$P/apiserver.key" -out "$P/apiserver.csr" \
    -subj /CN=kube-apiserver 2>/dev/null
  openssl x509 -req -in "$P/apiserver.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial \
    -out "$P/apiserver.crt" -days 7 -extfile "$P/apiserver.cnf" -extensions ext 2>/dev/null
  openssl genrsa -out "$P/sa.key" 2048 2>/dev/null
  openssl rsa -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
  local token
  token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  echo "$token,admin,admin,system:masters" >"$P/tokens.csv"
  chmod 600 "$P"/*.key "$P/tokens.csv"
  cat >"$KUBECONFIG_FILE.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: shardmesh-e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 "$P/ca.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: shardmesh-e2e
  context: {cluster: shardmesh-e2e, user: admin, namespace: default}
current-context: shardmesh-e2e
EOF
  chmod 600 "$KUBECONFIG_FILE.tmp"
  mv "$KUBECONFIG_FILE.tmp" "$KUBECONFIG_FILE"
  local KC=$KUBECONFIG_FILE
  step "pki ready"

  # --- etcd ---
  start_daemon etcd etcd --name shardmesh-e2e --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "shardmesh-e2e=http://127.0.0.1:$((ETCD_PORT + 1))" --unsafe-no-fsync
  wait_for "etcd /health on 127.0.0.1:$ETCD_PORT" "$WAIT" "$LOGS/etcd.log" etcd -- \
    curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  step "etcd healthy"

  # --- kube-apiserver ---
  start_daemon apiserver "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=0.0.0.0 --advertise-address="$NODE_IP" --secure-port="$API_PORT" --insecure-port=0 \
    --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" --requestheader-client-ca-file="$P/ca.crt" --token-auth-file="$P/tokens.csv" \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range="$SERVICE_CIDR" --authorization-mode=Node,RBAC --allow-privileged=true \
    --enable-priority-and-fairness=false --kubelet-preferred-address-types=InternalIP,Hostname \
    --cert-dir="$DIR/apiserver-certs" --event-ttl=30m
  wait_for "kube-apiserver /readyz on 127.0.0.1:$API_PORT" "$WAIT" "$LOGS/apiserver.log" apiserver -- \
    curl -sf --cacert "$P/ca.crt" -H "Authorization: Bearer $token" "https://127.0.0.1:$API_PORT/readyz"
  step "kube-apiserver ready"

  # --- controller-manager + scheduler (no serving ports) ---
  start_daemon kcm "$BIN/kube-controller-manager" --kubeconfig="$KC" \
    --authentication-kubeconfig="$KC" --authorization-kubeconfig="$KC" \
    --bind-address=127.0.0.1 --secure-port=0 --port=0 --leader-elect=false --controllers='*' \
    --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
    --use-service-account-credentials=true --service-cluster-ip-range="$SERVICE_CIDR"
  start_daemon scheduler "$BIN/kube-scheduler" --kubeconfig="$KC" \
    --authentication-kubeconfig="$KC" --authorization-kubeconfig="$KC" \
    --bind-address=127.0.0.1 --secure-port=0 --port=0 --leader-elect=false

  # --- containerd: private root/state/socket, netns under its state dir, local pause image ---
  mkdir -p "$DIR/kubelet"
  node_runtime_config "$DIR" "$CTR_SOCK" "$BRIDGE" "$POD_CIDR"
  start_daemon containerd containerd --config "$DIR/ctr/config.toml"

  # images built while containerd starts
  local bb=/bin/busybox applets=(sh sleep ls cat echo wget nc ip ps httpd hostname env id mkdir
    printf test true false grep sed awk head tail date kill nslookup)
  local args=(--file "$bb:/bin/busybox")
  for a in "${applets[@]}"; do args+=(--symlink "busybox:/bin/$a"); done
  python3 "$HERE/mkimage.py" --tag shardmesh.local/pause:1 --out "$DIR/img/pause.tar" \
    --file "$bb:/bin/busybox" --symlink busybox:/bin/sleep --entrypoint /bin/sleep --cmd 2147483647 \
    >/dev/null
  python3 "$HERE/mkimage.py" --tag shardmesh.local/busybox:1 --out "$DIR/img/busybox.tar" \
    "${args[@]}" --cmd sh >/dev/null

  wait_for "kube-controller-manager (default ServiceAccount created)" "$WAIT" "$LOGS/kcm.log" kcm -- \
    kubectl --kubeconfig "$KC" get serviceaccount default -n default
  step "controller-manager + scheduler running"
  wait_for "containerd socket $CTR_SOCK" "$WAIT" "$LOGS/containerd.log" containerd -- \
    ctr --address "$CTR_SOCK" version
  ctr_k8s image import "$DIR/img/pause.tar" >/dev/null
  ctr_k8s image import "$DIR/img/busybox.tar" >/dev/null
  step "containerd ready; images shardmesh.local/pause:1, shardmesh.local/busybox:1 imported"

  # --- kubelet: pods under a cgroup root of their own, so teardown can find them ---
  save_host_sysctls
  make_cgroup_root "$E2E_NS"
  start_kubelet kubelet "$BIN" "$KC" "$CTR_SOCK" "$DIR" "$NODE_NAME" "$NODE_IP" "$E2E_NS"
  wait_for "node $NODE_NAME Ready" "$WAIT" "$LOGS/kubelet.log" kubelet -- \
    bash -c "kubectl --kubeconfig '$KC' get node '$NODE_NAME' --no-headers | grep -q ' Ready'"
  step "node $NODE_NAME Ready"

  # --- kube-proxy (iptables, inside the netns only) ---
  start_kube_proxy kube-proxy "$BIN" "$KC" "$NODE_NAME" "$POD_CIDR"
  wait_for "kube-proxy programming the kubernetes Service ($svc_ip)" "$WAIT" "$LOGS/kube-proxy.log" kube-proxy -- \
    bash -c "iptables -w -t nat -S KUBE-SERVICES | grep -q 'default/kubernetes:https cluster IP'"
  step "kube-proxy ready"
}

save_host_sysctls() {
  [ -f "$DIR/host-sysctls" ] && return 0
  local s
  for s in "${HOST_SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done >"$DIR/host-sysctls.tmp"
  mv "$DIR/host-sysctls.tmp" "$DIR/host-sysctls"
}

if [ "${1:-}" = --inner ]; then
  inner "$2"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Outer part: on the host.
# ---------------------------------------------------------------------------------------------
require_root
T0=$(now_s)
for c in etcd containerd ctr runc nsenter ip iptables openssl curl kubectl python3 bc; do
  command -v "$c" >/dev/null || die "$c not found: run e2e/scripts/lib.sh's install_build_deps (e2e/test.sh does)"
done
[ -x /bin/busybox ] || die "/bin/busybox missing: apt-get install busybox-static"
[ -x /usr/lib/cni/bridge ] || die "CNI plugins missing: apt-get install containernetworking-plugins"
BIN=$("$HERE/build-k8s.sh")

if [ -e "$DIR/pids" ] || [ -e "/run/netns/$E2E_NS" ]; then
  log "leftovers of an earlier cluster found; tearing them down first"
  "$HERE/cluster-down.sh"
fi
owns_state_dir || die "$DIR exists and was not made by cluster-up.sh (no $E2E_MARKER); refusing to delete it"
rm -rf "$DIR"
mkdir -p "$DIR"/{pki,logs,pids,img}
touch "$DIR/$E2E_MARKER"
touch "$DIR/started"

log "creating network namespace $E2E_NS (node IP $NODE_IP)"
for path in "${HOST_PATHS[@]}"; do [ -e "$path" ] || echo "$path"; done >"$DIR/created-paths"
ip netns add "$E2E_NS"
ip -n "$E2E_NS" link set lo up
ip -n "$E2E_NS" addr add "$NODE_IP/32" dev lo
ip -n "$E2E_NS" route add "$SERVICE_CIDR" dev lo
in_ns sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1

log "starting the cluster in $DIR (logs: $LOGS)"
setsid nsenter --net="/run/netns/$E2E_NS" python3 "$HERE/supervisor.py" \
  --rc-file "$DIR/up.rc" --pid-file "$DIR/pids/supervisor" --log "$LOGS/supervisor.log" \
  -- bash "$HERE/cluster-up.sh" --inner "$BIN" </dev/null &
# The supervisor outlives this script by design; it writes the start script's exit code.
if ! wait_for "the cluster start script (supervisor)" 600 "$LOGS/supervisor.log" - -- test -s "$DIR/up.rc"; then
  die "cluster start did not finish; tear down with e2e/scripts/cluster-down.sh"
fi
rc=$(cat "$DIR/up.rc")
[ "$rc" = 0 ] || die "cluster start failed (exit $rc); logs in $LOGS; tear down with e2e/scripts/cluster-down.sh"
log "cluster up in $(elapsed_since "$T0")s"
echo "KUBECONFIG=$KUBECONFIG_FILE"
echo "use: nsenter --net=/run/netns/$E2E_NS kubectl --kubeconfig $KUBECONFIG_FILE get nodes"
