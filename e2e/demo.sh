#!/usr/bin/env bash
# Demo: a local single-node Kubernetes (private network namespace) with shardmesh installed and a
# ShardedService `orders` (3 shards x 2 replicas of the demo app, each pod with the injected
# sidecar); sends keyed requests first straight to its routing Service (some land on the wrong
# shard: 421), then through a client pod's sidecar, which routes each key to the shard that owns it,
# and shows which pod/shard answered each key. The cluster stays up afterwards.
#
# Usage: e2e/demo.sh [up] [--no-build]   set up (re-uses a running demo cluster), run the requests
#                                        (--no-build: use the binaries already in target/debug)
#        e2e/demo.sh down                tear everything down
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/scripts/lib.sh"

MANIFEST=$HERE/manifests/demo-shardedservice.yaml
DEMO_NS=demo
SVC=orders
KEYS=(alice bob carol dave erin frank grace heidi ivan judy mallory niaj olivia peggy rupert sybil)

BUILD=1
for arg in "${@:-up}"; do
  case $arg in
    down) exec "$HERE/scripts/cluster-down.sh" ;;
    up) ;;
    --no-build) BUILD=0 ;;
    *) die "usage: e2e/demo.sh [up] [--no-build] | e2e/demo.sh down" ;;
  esac
done
require_root
cd "$REPO_ROOT"
T0=$(now_s)
trap 'log "demo setup failed; logs in $E2E_DIR/logs; tear down with: e2e/demo.sh down"' ERR

install_build_deps
"$HERE/scripts/build-k8s.sh" >/dev/null
HELM=$("$HERE/scripts/install-helm.sh")
if [ "$BUILD" = 1 ]; then
  log "building the workspace binaries"
  cargo build --workspace --bins --locked
fi

if [ -e "/run/netns/$E2E_NS" ] && kc get --raw /readyz --request-timeout=5s >/dev/null 2>&1; then
  log "re-using the running cluster (KUBECONFIG=$KUBECONFIG_FILE)"
else
  "$HERE/scripts/cluster-up.sh"
fi
"$HERE/scripts/build-images.sh"
log "installing the shardmesh chart"
in_ns "$HELM" --kubeconfig "$KUBECONFIG_FILE" upgrade --install shardmesh "$REPO_ROOT/charts/shardmesh" \
  -n shardmesh-system --create-namespace --wait --timeout 5m --set image.tag=dev
log "applying $MANIFEST"
kc apply -f "$MANIFEST"
log "waiting for ShardedService $SVC to be Ready (up to 300s)"
if ! kc wait -n "$DEMO_NS" --for=condition=Ready "shardedservice/$SVC" --timeout=300s; then
  kc get -n "$DEMO_NS" shardedservice "$SVC" -o yaml >&2 || true
  kc get -n "$DEMO_NS" pods -o wide >&2 || true
  die "ShardedService $SVC did not become Ready"
fi
kc get -n "$DEMO_NS" shardedservice "$SVC"
kc get -n "$DEMO_NS" pods -o wide

CIP=$(kc get -n "$DEMO_NS" service "$SVC" -o jsonpath='{.spec.clusterIP}')
PORT=$(kc get -n "$DEMO_NS" service "$SVC" -o jsonpath='{.spec.ports[0].port}')
{ [ -n "$CIP" ] && [ -n "$PORT" ]; } || die "routing Service $DEMO_NS/$SVC has no ClusterIP/port"

# send_keys TITLE BASE_URL [CURL_ARGS...]: PUT each key, print who answered; sets ok/bad/err.
send_keys() {
  local title=$1 base=$2 key code pod shard note tmp
  shift 2
  echo
  echo "$title"
  printf '  %-9s %-6s %-22s %-6s %s\n' KEY STATUS "ANSWERED BY" SHARD "NOTE"
  ok=0 bad=0 err=0
  tmp=$(mktemp -d)
  for key in "${KEYS[@]}"; do
    code=$(in_ns curl -s -o "$tmp/body" -D "$tmp/headers" -w '%{http_code}' --max-time 10 \
      -X PUT -H "x-shard-key: $key" --data "order of $key" "$@" "$base/kv/$key" 2>/dev/null || true)
    code=${code:-000}
    pod=$(awk -F': ' 'tolower($1) == "x-demo-pod" {print $2}' "$tmp/headers" 2>/dev/null | tr -d '\r')
    shard=$(awk -F': ' 'tolower($1) == "x-demo-shard" {print $2}' "$tmp/headers" 2>/dev/null | tr -d '\r')
    case $code in
      200 | 201) ok=$((ok + 1)); note="stored on its own shard" ;;
      421) bad=$((bad + 1)); note="misdirected: $(sed -n 's/.*belongs to \(shard [0-9]*\).*/key belongs to \1/p' "$tmp/body")" ;;
      *) err=$((err + 1)); note="error: $(head -c 120 "$tmp/body" 2>/dev/null | tr '\n' ' ')" ;;
    esac
    printf '  %-9s %-6s %-22s %-6s %s\n' "$key" "$code" "${pod:--}" "${shard:--}" "$note"
  done
  rm -rf "$tmp"
  echo "  => $ok of ${#KEYS[@]} keys reached the shard that owns them; $bad got 421 Misdirected Request; $err failed otherwise."
}

# 1. Straight to the routing Service: kube-proxy balances over the pods of every shard.
send_keys "1) Keyed requests straight to the routing Service $DEMO_NS/$SVC ($CIP:$PORT), no client sidecar:" \
  "http://$CIP:$PORT"
echo "  A 421 means the request reached a pod of the wrong shard: the Service balances over every shard."

# 2. Through a client's sidecar, which routes each key to its shard from the shard map.
log "starting a client pod that routes by key (its sidecar follows the shard map)"
kc apply -f "$HERE/manifests/demo-client.yaml" >/dev/null
kc wait -n "$DEMO_NS" --for=condition=Ready pod/orders-client --timeout=180s >/dev/null \
  || die "the demo client pod did not become Ready (kubectl describe -n $DEMO_NS pod/orders-client)"
CLIENT=$(kc get -n "$DEMO_NS" pod orders-client -o jsonpath='{.status.podIP}')
send_keys "2) The same keys through the client's sidecar ($CLIENT:4140, explicit HTTP proxy):" \
  "http://$SVC.$DEMO_NS:$PORT" -x "http://$CLIENT:4140"
[ "$bad" = 0 ] && [ "$err" = 0 ] && echo "  Every key reached its owning shard: the sidecar routed it by key (x-shard-key → shard)."
kc get -n "$DEMO_NS" shardedservice "$SVC"

cat <<EOF

Demo ready in $(elapsed_since "$T0")s. The cluster keeps running.
  KUBECONFIG:  $KUBECONFIG_FILE
  kubectl:     nsenter --net=/run/netns/$E2E_NS kubectl --kubeconfig $KUBECONFIG_FILE -n $DEMO_NS get shsvc,pods,svc
  a request:   nsenter --net=/run/netns/$E2E_NS curl -s -x http://$CLIENT:4140 -H 'x-shard-key: alice' http://$SVC.$DEMO_NS:$PORT/kv/alice
  logs:        $E2E_DIR/logs
  tear down:   e2e/demo.sh down     (or e2e/scripts/cluster-down.sh)
EOF
