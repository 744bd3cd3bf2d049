#!/usr/bin/env bash
# The project's test command: unit tests, then the end-to-end suite against a real single-node
# Kubernetes v1.20.2 started in a private network namespace on this machine.
#
# Usage: e2e/test.sh [--keep] [--skip-unit]
#   --keep        leave the cluster running afterwards (tear down with e2e/scripts/cluster-down.sh)
#   --skip-unit   skip `cargo test --workspace` (when iterating on the e2e scenarios only)
# Env:     CI=true for non-interactive output; SHARDMESH_E2E_DIR, SHARDMESH_E2E_NETNS (see
#          e2e/scripts/cluster-up.sh); SHARDMESH_E2E_TEST_ARGS extra args for the e2e test binary.
#
# Phases: deps (apt, cached k8s build, helm) -> cargo build -> cargo test (unit) -> release build
# -> cluster up -> images (e2e/release.sh's OCI archives, written twice and compared, imported
# into containerd) -> helm install (of the packaged chart, default image tags) -> e2e scenarios
# -> control plane -> bench smoke -> nodes (two more kubelet nodes join: e2e/scripts/node-add.sh)
# -> failure domains (drain one node, lose another) -> helm lifecycle. On failure, diagnostics go to the logs dir, which is
# copied to /tmp/shardmesh-e2e-logs-<timestamp> (printed). The cluster is always torn down unless
# --keep is given.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/scripts/lib.sh"
# Daemons the scripts start are re-parented to this shell and reaped by it.
become_subreaper "$0" "$@"

KEEP=0
SKIP_UNIT=0
for arg in "$@"; do
  case $arg in
    --keep) KEEP=1 ;;
    --skip-unit) SKIP_UNIT=1 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument $arg (usage: e2e/test.sh [--keep] [--skip-unit])" ;;
  esac
done
require_root
if [ "${CI:-}" = true ] || [ ! -t 1 ]; then
  export CARGO_TERM_COLOR=never CARGO_TERM_PROGRESS_WHEN=never
fi
cd "$REPO_ROOT"

T_ALL=$(now_s)
PHASE=none
PHASE_T0=$T_ALL
TIMINGS=()
CLUSTER_STARTED=0

phase() {
  phase_done
  PHASE=$1
  PHASE_T0=$(now_s)
  log "=== phase: $PHASE"
}
phase_done() {
  [ "$PHASE" = none ] || TIMINGS+=("$(printf '%-14s %6ss' "$PHASE" "$(elapsed_since "$PHASE_T0")")")
  PHASE=none
}

collect_diagnostics() {
  local d=$E2E_DIR/logs/diagnostics
  mkdir -p "$d"
  if ! kc get --raw /readyz --request-timeout=10s >/dev/null 2>&1; then
    log "API server not reachable; only component logs are available"
    return 0
  fi
  log "collecting diagnostics into $d"
  local t=(--request-timeout=30s)
  kc get all,shardedservices,shardmapslices,leases,pdb,configmaps,mutatingwebhookconfigurations,validatingwebhookconfigurations \
    -A -o wide "${t[@]}" >"$d/get-all.txt" 2>&1 || true
  kc get nodes -o yaml "${t[@]}" >"$d/nodes.yaml" 2>&1 || true
  kc get shardedservices -A -o yaml "${t[@]}" >"$d/shardedservices.yaml" 2>&1 || true
  kc get shardmapslices -A -o yaml "${t[@]}" >"$d/shardmapslices.yaml" 2>&1 || true
  kc describe pods -A "${t[@]}" >"$d/describe-pods.txt" 2>&1 || true
  kc get events -A --sort-by=.lastTimestamp "${t[@]}" >"$d/events.txt" 2>&1 || true
  local ns pod c
  while read -r ns pod; do
    for c in $(kc get pod -n "$ns" "$pod" "${t[@]}" \
      -o jsonpath='{range .spec.initContainers[*]}{.name}{" "}{end}{range .spec.containers[*]}{.name}{" "}{end}' 2>/dev/null); do
      kc logs -n "$ns" "$pod" -c "$c" "${t[@]}" >"$d/pod-$ns-$pod-$c.log" 2>&1 || true
      kc logs -n "$ns" "$pod" -c "$c" --previous "${t[@]}" >"$d/pod-$ns-$pod-$c.previous.log" 2>/dev/null \
        || rm -f "$d/pod-$ns-$pod-$c.previous.log"
    done
  done < <(kc get pods -A --no-headers "${t[@]}" -o custom-columns=NS:.metadata.namespace,NAME:.metadata.name 2>/dev/null)
  in_ns "$HELM" --kubeconfig "$KUBECONFIG_FILE" list -A >"$d/helm-list.txt" 2>&1 || true
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  FAILED_PHASE=${FAILED_PHASE:-$PHASE}
  phase_done
  if [ "$rc" -ne 0 ]; then
    log "FAILED (exit $rc) in phase: ${FAILED_PHASE:-?}"
    if [ "$CLUSTER_STARTED" = 1 ]; then
      collect_diagnostics || true
    fi
    if [ "$CLUSTER_STARTED" = 1 ] && [ -d "$E2E_DIR/logs" ]; then
      local kept
      kept=/tmp/shardmesh-e2e-logs-$(date +%Y%m%d-%H%M%S)
      cp -a "$E2E_DIR/logs" "$kept" && log "logs and diagnostics kept in $kept"
    fi
  fi
  if [ "$CLUSTER_STARTED" = 1 ]; then
    if [ "$KEEP" = 1 ]; then
      log "cluster left running (--keep): KUBECONFIG=$KUBECONFIG_FILE"
      log "  nsenter --net=/run/netns/$E2E_NS kubectl --kubeconfig $KUBECONFIG_FILE get pods -A"
      log "  tear down: e2e/scripts/cluster-down.sh"
    else
      local t
      t=$(now_s)
      "$HERE/scripts/cluster-down.sh" || log "WARNING: teardown reported an error"
      TIMINGS+=("$(printf '%-14s %6ss' teardown "$(elapsed_since "$t")")")
    fi
  fi
  log "phase timings:"
  local line
  for line in "${TIMINGS[@]}"; do printf '  %s\n' "$line" >&2; done
  log "total $(elapsed_since "$T_ALL")s: $([ "$rc" = 0 ] && echo PASSED || echo FAILED)"
  exit "$rc"
}
trap 'FAILED_PHASE=$PHASE' ERR
trap on_exit EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

phase deps
install_build_deps
"$HERE/scripts/build-k8s.sh" >/dev/null
HELM=$("$HERE/scripts/install-helm.sh")

phase cargo-build
cargo build --workspace --bins --locked

if [ "$SKIP_UNIT" = 0 ]; then
  phase unit-tests
  cargo test --workspace --locked
else
  # The e2e crate's test binary is still needed (it runs offline inside the netns).
  phase build-e2e
  cargo test -p shardmesh-e2e --locked --no-run
fi

# The cluster runs the release images, as users would.
phase release-build
build_release

phase cluster-up
CLUSTER_STARTED=1
"$HERE/scripts/cluster-up.sh"

phase images
"$HERE/scripts/build-images.sh" --no-build

# From the packaged chart with its defaults (image tags = appVersion), as a user installs it.
phase helm-install
mkdir -p "$E2E_DIR/chart"
CHART_TGZ=$("$HELM" package "$REPO_ROOT/charts/shardmesh" -d "$E2E_DIR/chart" | sed -n 's/.*saved it to: //p')
[ -f "$CHART_TGZ" ] || die "helm package wrote no chart archive"
in_ns "$HELM" --kubeconfig "$KUBECONFIG_FILE" install shardmesh "$CHART_TGZ" \
  -n shardmesh-system --create-namespace --wait --timeout 5m

phase e2e
E2E_ENV=(env KUBECONFIG="$KUBECONFIG_FILE" SHARDMESH_E2E=1 SHARDMESH_E2E_LOGS="$E2E_DIR/logs" SHARDMESH_HELM="$HELM"
  SHARDMESH_E2E_IMAGES="$E2E_DIR/images/images.txt" SHARDMESH_E2E_CTR_SOCK="$CTR_SOCK")
# shellcheck disable=SC2086 # SHARDMESH_E2E_TEST_ARGS is a list of words
in_ns "${E2E_ENV[@]}" cargo test -p shardmesh-e2e --locked --offline --no-fail-fast -- --ignored \
  --test-threads=2 --skip helm_lifecycle --skip control_plane --skip failure_domains ${SHARDMESH_E2E_TEST_ARGS:-}

# Alone: restarts the API server and the operator, which would disturb concurrent scenarios.
phase control-plane
in_ns "${E2E_ENV[@]}" cargo test -p shardmesh-e2e --locked --offline --test control_plane -- --ignored --test-threads=1

# The operator and webhook benchmarks in smoke mode (proves the harness runs; never judges
# timing): BENCHMARKS.md, e2e/bench/run.sh.
phase bench-smoke
"$HERE/bench/run.sh" --smoke --out "$E2E_DIR/logs/bench-smoke"

# Late, so that every scenario above runs on the single node it was written for: two more kubelet
# nodes join (each its own network namespace, containerd, pod range and kube-proxy), then the
# failure-domain scenario drains one and stops the other abruptly.
phase nodes
"$HERE/scripts/node-add.sh" 1
"$HERE/scripts/node-add.sh" 2
phase failure-domains
# --nocapture: its timeline (placement, drain, node loss, failed requests) is printed either way.
in_ns "${E2E_ENV[@]}" cargo test -p shardmesh-e2e --locked --offline --test failure_domains -- --ignored --nocapture

# Last, alone: helm upgrade and uninstall of the release the scenarios above ran against.
phase helm-lifecycle
in_ns "${E2E_ENV[@]}" cargo test -p shardmesh-e2e --locked --offline --test helm_lifecycle -- --ignored
phase_done
