#!/usr/bin/env bash
# Operator and webhook benchmarks on the running e2e cluster (BENCHMARKS.md, parts 3 and 4).
#
# Usage: e2e/bench/run.sh [--smoke] [options]
#   --smoke          CI mode: 200 ShardedServices, 30 pods per kind, debug build (what
#                    `cargo build --workspace --bins` made), a few minutes; never judges timing
#   (default)        full mode: 1000 ShardedServices, 200 pods per kind, release build
#   --services N     ShardedServices (4 shards x 3 replicas each) to apply
#   --per-namespace M  ShardedServices per namespace (smoke: all 200 in one; full: 100, i.e. 10
#                    namespaces: 1000 in one namespace exhausts the API server, see BENCHMARKS.md)
#   --pods K         pods per kind (with / without sidecar injection)
#   --deadline S     seconds the services may take to converge before the run fails (default 600)
#   --release | --debug   which build of shardmesh-operator and the benchmark client to run
#   --skip-operator | --skip-webhook   run one part only
#   --out DIR        results and the operator's log (default $SHARDMESH_E2E_DIR/logs/bench-<time>)
# Env: SHARDMESH_BENCH_LOG  the operator's RUST_LOG filter (default info)
#   -h, --help
# Needs: root, the cluster and the Helm release that `e2e/test.sh --keep` leaves running
# (e2e/scripts/cluster-up.sh, build-images.sh, helm install). Honours CARGO_TARGET_DIR.
#
# The operator part scales the release's operator Deployment to 0, runs `shardmesh-operator
# controller` as a process in the cluster's network namespace with the admin kubeconfig (so its
# CPU and memory come from /proc), and scales the Deployment back afterwards. Its namespaces have a
# ResourceQuota of 0 pods: the StatefulSets get no pods and the node stays idle. After they
# converge and settle, nothing changes for a quiet window as long as the operator's resync
# period and its spread (--resync-period 5m: 370 s; smoke: 20s, 35 s), in which every service is
# resynced: the writes counted there are writes of nothing.
# Exits non-zero only when the benchmark cannot run or objects do not converge by the deadline.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/../scripts/lib.sh"

SMOKE=0
SERVICES=
PER_NS=
PODS=
DEADLINE=600
PROFILE=
RUN_OPERATOR=1
RUN_WEBHOOK=1
OUT=
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --services) SERVICES=${2:?--services needs a number}; shift ;;
    --per-namespace) PER_NS=${2:?--per-namespace needs a number}; shift ;;
    --pods) PODS=${2:?--pods needs a number}; shift ;;
    --deadline) DEADLINE=${2:?--deadline needs seconds}; shift ;;
    --release) PROFILE=release ;;
    --debug) PROFILE=debug ;;
    --skip-operator) RUN_OPERATOR=0 ;;
    --skip-webhook) RUN_WEBHOOK=0 ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see e2e/bench/run.sh --help)" ;;
  esac
  shift
done
if [ "$SMOKE" = 1 ]; then
  RESYNC=20s
  QUIET=35
  SERVICES=${SERVICES:-200}
  PER_NS=${PER_NS:-$SERVICES}
  PODS=${PODS:-30}
  PROFILE=${PROFILE:-debug}
else
  RESYNC=5m
  QUIET=370
  SERVICES=${SERVICES:-1000}
  PER_NS=${PER_NS:-100}
  PODS=${PODS:-200}
  PROFILE=${PROFILE:-release}
fi
require_root
cd "$REPO_ROOT"
OUT=${OUT:-$E2E_DIR/logs/bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
T0=$(now_s)

if [ ! -f "$KUBECONFIG_FILE" ] || [ ! -e "/run/netns/$E2E_NS" ]; then
  die "no e2e cluster ($KUBECONFIG_FILE, netns $E2E_NS): start one with 'e2e/test.sh --keep' first"
fi
kc get --raw /readyz --request-timeout=10s >/dev/null \
  || die "the e2e cluster's API server does not answer /readyz: start it with 'e2e/test.sh --keep'"
kc -n shardmesh-system get deployment shardmesh-operator shardmesh-webhook >/dev/null \
  || die "the shardmesh Helm release is not installed in shardmesh-system (see e2e/test.sh's helm-install phase)"

# A previous run's namespace being garbage-collected loads the API server: wait for it.
for i in $(seq 1 300); do
  left=$(kc get namespaces -o name | grep '^namespace/e2e-bench-' || true)
  [ -z "$left" ] && break
  left=${left//$'\n'/ }
  [ "$i" = 1 ] && log "bench: waiting for earlier benchmark namespaces to be deleted: $left"
  [ "$i" = 300 ] && log "WARNING: after 300s still not deleted (figures will be disturbed): $left"
  sleep 1
done

log "bench: building shardmesh-operator and scale_bench ($PROFILE)"
BUILD=(cargo build --locked -p shardmesh-operator --bin shardmesh-operator -p shardmesh-e2e --bin scale_bench)
[ "$PROFILE" = release ] && BUILD+=(--release)
"${BUILD[@]}"
BIN_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/$PROFILE
BENCH=(env KUBECONFIG="$KUBECONFIG_FILE" SHARDMESH_E2E=1 "$BIN_DIR/scale_bench")

# Sum and count of the admission-handler histogram over the webhook's pods (from their /metrics).
webhook_handler_totals() {
  local ip sum=0 count=0 m
  for ip in $(kc -n shardmesh-system get pods -l app.kubernetes.io/component=webhook \
    -o jsonpath='{range .items[*]}{.status.podIP}{" "}{end}'); do
    m=$(in_ns curl -sf --max-time 5 "http://$ip:8081/metrics") || continue
    sum=$(echo "$sum + $(awk '/^shardmesh_webhook_admission_duration_seconds_sum/ {print $2}' <<<"$m")" | bc)
    count=$(echo "$count + $(awk '/^shardmesh_webhook_admission_duration_seconds_count/ {print $2}' <<<"$m")" | bc)
  done
  echo "$sum $count"
}

# --- part 4: pod creation with and without injection ---
if [ "$RUN_WEBHOOK" = 1 ]; then
  log "bench: webhook: $PODS pods with injection, $PODS without"
  kc -n shardmesh-system rollout status deployment/shardmesh-webhook --timeout=120s >/dev/null \
    || die "waiting for the webhook Deployment to be available timed out (kubectl -n shardmesh-system get pods)"
  before=$(webhook_handler_totals)
  in_ns "${BENCH[@]}" webhook --pods "$PODS" | tee -a "$RESULTS"
  after=$(webhook_handler_totals)
  # The webhook's own view: time inside its admission handler, from its /metrics.
  read -r s0 n0 <<<"$before"
  read -r s1 n1 <<<"$after"
  if [ -n "$n1" ] && [ "$(echo "$n1 > $n0" | bc)" = 1 ]; then
    echo "WEBHOOK_HANDLER {\"admissions\": $(echo "$n1 - $n0" | bc), \"mean_handler_us\": $(echo "scale=1; ($s1 - $s0) * 1000000 / ($n1 - $n0)" | bc)}" \
      | tee -a "$RESULTS"
  fi
fi

# --- part 3: the operator at scale ---
OP_PID=
REPLICAS=
METRICS_PORT=${SHARDMESH_BENCH_METRICS_PORT:-18090}
restore() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$OP_PID" ] && pid_alive "$OP_PID"; then
    kill "$OP_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do pid_alive "$OP_PID" || break; sleep 0.1; done
  fi
  if [ -n "$REPLICAS" ]; then
    log "bench: scaling the operator Deployment back to $REPLICAS"
    kc -n shardmesh-system scale deployment/shardmesh-operator --replicas="$REPLICAS" >/dev/null \
      || log "WARNING: could not scale deployment/shardmesh-operator back to $REPLICAS"
  fi
  exit "$rc"
}
if [ "$RUN_OPERATOR" = 1 ]; then
  trap restore EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  REPLICAS=$(kc -n shardmesh-system get deployment shardmesh-operator -o jsonpath='{.spec.replicas}')
  log "bench: operator: scaling the Deployment (replicas $REPLICAS) to 0; running the controller as a process"
  kc -n shardmesh-system scale deployment/shardmesh-operator --replicas=0 >/dev/null
  for i in $(seq 1 120); do
    [ -z "$(kc -n shardmesh-system get pods -l app.kubernetes.io/component=controller -o name)" ] && break
    [ "$i" = 120 ] && die "waiting 120s for the operator Deployment's pods to terminate timed out"
    sleep 1
  done
  # Same settings as the chart with the webhook on (--sidecar-injection, info logs as JSON),
  # without leader election: it is the only controller now.
  # nsenter and env exec: $! is the operator's own PID.
  nsenter --net="/run/netns/$E2E_NS" env KUBECONFIG="$KUBECONFIG_FILE" RUST_LOG="${SHARDMESH_BENCH_LOG:-info}" \
    SHARDMESH_LOG_FORMAT=json "$BIN_DIR/shardmesh-operator" controller --sidecar-injection \
    --resync-period "$RESYNC" --metrics-addr "127.0.0.1:$METRICS_PORT" --instance bench >"$OUT/operator.log" 2>&1 &
  OP_PID=$!
  for i in $(seq 1 60); do
    pid_alive "$OP_PID" || die "shardmesh-operator exited at start; see $OUT/operator.log: $(tail -3 "$OUT/operator.log")"
    grep -q '"controller started"\|controller started' "$OUT/operator.log" \
      && in_ns curl -sf "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null && break
    [ "$i" = 60 ] && die "waiting 60s for the operator process to start its controller and /readyz on 127.0.0.1:$METRICS_PORT timed out; see $OUT/operator.log"
    sleep 1
  done
  [ "$(basename "$(readlink "/proc/$OP_PID/exe")")" = shardmesh-operator ] \
    || die "PID $OP_PID is not the shardmesh-operator process ($(readlink "/proc/$OP_PID/exe"))"
  # Let it finish the initial listing of the ShardedServices already in the cluster.
  sleep 3
  in_ns "${BENCH[@]}" operator --services "$SERVICES" --per-namespace "$PER_NS" --operator-pid "$OP_PID" \
    --metrics "127.0.0.1:$METRICS_PORT" --deadline "$DEADLINE" --clk-tck "$(getconf CLK_TCK)" --quiet "$QUIET" \
    | tee -a "$RESULTS"
fi

# --- summary ---
python3 - "$RESULTS" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
rows = [json.loads(l.split(" ", 1)[1]) for l in lines if l.startswith("RESULT ")]
for l in lines:
    if l.startswith("WEBHOOK_HANDLER "):
        h = json.loads(l.split(" ", 1)[1])
        print(f"webhook: its admission handler took {h['mean_handler_us']} us on average "
              f"over {h['admissions']} admissions (its /metrics)")
for r in rows:
    if r["benchmark"] == "webhook":
        w, wo = r["with_injection"], r["without_injection"]
        print(f"webhook: pod create, {r['pods_per_kind']} per kind: "
              f"with injection p50 {w['p50_ms']:.2f} ms p99 {w['p99_ms']:.2f} ms; "
              f"without p50 {wo['p50_ms']:.2f} ms p99 {wo['p99_ms']:.2f} ms; "
              f"ratio p50 {r['p50_ratio']:.2f}x p99 {r['p99_ratio']:.2f}x")
    else:
        c, s = r["until_converged"], r["until_settled"]
        print(f"operator: {r['services']} x ({r['shards']}x{r['replicas_per_shard']}), "
              f"{r['services_per_namespace']} per namespace, "
              f"{r['child_objects']} child objects: applied in {r['applied_seconds']:.1f} s, "
              f"converged in {r['converged_seconds']:.1f} s; CPU {c['cpu_seconds']:.1f} s; "
              f"RSS idle {r['rss_idle_mib']:.1f} MiB, peak {r['rss_peak_mib']:.1f} MiB; "
              f"{c['reconciles']:.0f} reconciles ({c['reconcile_errors']:.0f} errors), "
              f"{c['api_requests']:.0f} API requests = {c['api_requests_per_reconcile']:.1f}/reconcile "
              f"{c['api_requests_by_verb']}; after settling: {s['reconciles']:.0f} reconciles, "
              f"{s['api_requests_per_reconcile']:.1f} requests/reconcile")
        q = r["quiet"]
        print(f"operator per service until settled: CPU {s['cpu_ms_per_service']:.2f} ms, "
              f"{s['reconciles_per_service']:.2f} reconciles, {s['writes_per_service']:.2f} writes; "
              f"writes per owned object {s['writes_per_owned_object']:.2f} "
              f"(owned-object applies {s['owned_object_applies_per_object']:.2f}); "
              f"converged {r['converged_after_last_apply_seconds']:.1f} s after the last apply; "
              f"peak RSS {r['rss_peak_mib_per_1000_services']:.1f} MiB per 1000 services")
        print(f"operator, {q['seconds']:.0f} s with nothing changing: {q['reconciles_main']:.0f} "
              f"reconciles ({q['reconciles_main'] / r['services']:.2f} per service"
              f"{'' if q['reconciles_main'] >= r['services'] else ': NOT every service was resynced'}), "
              f"{q['writes']:.0f} writes {q['api_requests_by_verb']}, CPU {q['cpu_seconds']:.2f} s")
EOF
log "bench: done in $(elapsed_since "$T0")s; results in $RESULTS, operator log in $OUT"
