#!/usr/bin/env bash
# Demo: a local single-node Kubernetes (private network namespace) with shardmesh installed and a
# ShardedService `orders` (3 shards x 2 replicas of the demo app, each pod with the injected
# sidecar); sends keyed requests first straight to its routing Service (some land on the wrong
# shard: 421), then through a client pod's sidecar, which routes each key to the shard that owns it,
# and shows which pod/shard answered each key; then grows `orders` to 4 shards live and reads the
# keys that moved (served by their previous owner during the handoff window). The cluster stays
# up afterwards.
#
# Usage: e2e/demo.sh [up] [--no-build]   set up (re-uses a running demo cluster), run the requests
#                                        (--no-build: use the release binaries already built)
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
  log "building the release binaries (the images users run)"
  build_release
fi

if [ -e "/run/netns/$E2E_NS" ] && kc get --raw /readyz --request-timeout=5s >/dev/null 2>&1; then
  log "re-using the running cluster (KUBECONFIG=$KUBECONFIG_FILE)"
else
  "$HERE/scripts/cluster-up.sh"
fi
"$HERE/scripts/build-images.sh" --no-build
log "installing the shardmesh chart"
in_ns "$HELM" --kubeconfig "$KUBECONFIG_FILE" upgrade --install shardmesh "$REPO_ROOT/charts/shardmesh" \
  -n shardmesh-system --create-namespace --wait --timeout 5m
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

# 3. Live resharding: 3 -> 4 shards; the keys that move keep their values.
if [ "$(kc get -n "$DEMO_NS" shardedservice "$SVC" -o jsonpath='{.spec.shards}')" = 3 ] \
  && [ "$(kc get -n "$DEMO_NS" shardedservice "$SVC" -o jsonpath='{.status.resharding.phase}')" = "" ]; then
  echo
  echo "3) Live resharding: spec.shards 3 -> 4 (pods of shards 0-2 are not restarted)"
  restarts_before=$(kc get -n "$DEMO_NS" pods -l shardmesh.io/service="$SVC" \
    -o jsonpath='{range .items[*]}{.metadata.name}={.metadata.uid} {end}')
  kc patch -n "$DEMO_NS" shardedservice "$SVC" --type merge -p '{"spec":{"shards":4}}' >/dev/null
  deadline=$((SECONDS + 300)) phase="" seen=""
  while [ "$phase" != Handoff ]; do
    phase=$(kc get -n "$DEMO_NS" shardedservice "$SVC" -o jsonpath='{.status.resharding.phase}')
    case " $seen " in *" ${phase:-none} "*) ;; *) seen="$seen ${phase:-none}"; log "resharding phase: ${phase:-none}" ;; esac
    [ "$SECONDS" -lt "$deadline" ] || die "orders did not reach the Handoff phase within 300s (phases seen:$seen)"
    sleep 1
  done
  kc get -n "$DEMO_NS" shardedservice "$SVC"
  echo "  GET of the same keys through the client's sidecar; keys that moved to shard 3 are read from"
  echo "  their previous owner (x-shardmesh-handoff-from), since the demo app does not copy data:"
  printf '  %-9s %-6s %-22s %s\n' KEY STATUS "ANSWERED BY" NOTE
  moved=0 stayed=0 lost=0
  tmp=$(mktemp -d)
  for key in "${KEYS[@]}"; do
    code=$(in_ns curl -s -o "$tmp/body" -D "$tmp/headers" -w '%{http_code}' --max-time 10 \
      -H "x-shard-key: $key" -x "http://$CLIENT:4140" "http://$SVC.$DEMO_NS:$PORT/kv/$key" 2>/dev/null || true)
    from=$(awk -F': ' 'tolower($1) == "x-shardmesh-handoff-from" {print $2}' "$tmp/headers" 2>/dev/null | tr -d '\r')
    pod=$(awk -F': ' 'tolower($1) == "x-demo-pod" {print $2}' "$tmp/headers" 2>/dev/null | tr -d '\r')
    if [ -n "$from" ]; then
      if [ "$code" = 200 ] && [ "$(cat "$tmp/body")" = "order of $key" ]; then
        moved=$((moved + 1)); note="moved to shard 3; its value read from shard $from (handoff)"
      else
        lost=$((lost + 1)); note="moved to shard 3; handoff answered ${code:-000}"
      fi
      printf '  %-9s %-6s %-22s %s\n' "$key" "${code:-000}" "${pod:--}" "$note"
    else
      stayed=$((stayed + 1))
    fi
  done
  rm -rf "$tmp"
  echo "  => $moved of ${#KEYS[@]} keys moved to the new shard and still read their value; $stayed stayed where they were; $lost lost."
  restarts_after=$(kc get -n "$DEMO_NS" pods -l shardmesh.io/service="$SVC" \
    -o jsonpath='{range .items[*]}{.metadata.name}={.metadata.uid} {end}')
  kept=0
  for p in $restarts_before; do case " $restarts_after " in *" $p "*) kept=$((kept + 1)) ;; esac; done
  echo "  => $kept of $(echo "$restarts_before" | wc -w) pods of shards 0-2 are the same pods as before (same UID)."
  echo "  The window closes after 5m (status.resharding.until); then shard 3 owns its keys alone."
fi

cat <<EOF

Demo ready in $(elapsed_since "$T0")s. The cluster keeps running.
  KUBECONFIG:  $KUBECONFIG_FILE
  kubectl:     nsenter --net=/run/netns/$E2E_NS kubectl --kubeconfig $KUBECONFIG_FILE -n $DEMO_NS get shsvc,pods,svc
  a request:   nsenter --net=/run/netns/$E2E_NS curl -s -x http://$CLIENT:4140 -H 'x-shard-key: alice' http://$SVC.$DEMO_NS:$PORT/kv/alice
  logs:        $E2E_DIR/logs
  tear down:   e2e/demo.sh down     (or e2e/scripts/cluster-down.sh)
EOF
