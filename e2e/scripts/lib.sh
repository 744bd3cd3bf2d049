# shellcheck shell=bash disable=SC2034
# Shared helpers for the e2e shell scripts (sourced, not executed).
CACHE=${SHARDMESH_CACHE:-$HOME/.cache/shardmesh}
mkdir -p "$CACHE"

log() { printf '[shardmesh-e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# apt packages, installed once; a stamp file keeps re-runs instant.
APT_PACKAGES=(etcd-server golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev
  containerd runc containernetworking-plugins iptables openssl iproute2 util-linux curl bc
  busybox-static)

apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_deb_src() {
  grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/ && return 0
  grep -rqs '^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null && return 0
  # Same mirror and suites as the configured binary sources, as deb-src.
  sed -n '1,/^$/p' /etc/apt/sources.list.d/debian.sources | sed 's/^Types: deb$/Types: deb-src/' \
    > /etc/apt/sources.list.d/shardmesh-deb-src.sources
  apt-get update -qq >/dev/null
}

install_build_deps() {
  ensure_deb_src
  apt_install "${APT_PACKAGES[@]}"
  # kubectl: any recent one will do; Debian's kubernetes-client (1.20, the server's version) if none.
  command -v kubectl >/dev/null || apt_install kubernetes-client
  command -v python3 >/dev/null || apt_install python3
}

# --- cluster layout shared by cluster-up/down, build-images, test.sh and demo.sh ---
E2E_DIR=${SHARDMESH_E2E_DIR:-/tmp/shardmesh-e2e}
case $E2E_DIR in
  /*/*) ;;
  *) die "SHARDMESH_E2E_DIR=$E2E_DIR: give an absolute path at least two levels deep (e.g. /tmp/shardmesh-e2e)" ;;
esac
E2E_DIR=${E2E_DIR%/}
E2E_NS=${SHARDMESH_E2E_NETNS:-shardmesh-e2e}
[[ $E2E_NS =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]] || die "SHARDMESH_E2E_NETNS=$E2E_NS: use lowercase letters, digits and '-' (max 31)"
# Marker file: the state dir is ours to delete only if it holds this (or is empty).
E2E_MARKER=.shardmesh-e2e-state
# owns_state_dir: true if $E2E_DIR is absent, empty or marked as ours.
owns_state_dir() {
  [ ! -e "$E2E_DIR" ] || [ -f "$E2E_DIR/$E2E_MARKER" ] || [ -z "$(ls -A "$E2E_DIR" 2>/dev/null)" ]
}
NODE_IP=10.254.0.10           # on the netns's lo; kubelet refuses a loopback node IP
NODE_NAME=shardmesh-e2e-node
POD_CIDR=10.254.64.0/24       # CNI bridge (host-local IPAM)
SERVICE_CIDR=10.254.128.0/20  # ClusterIPs (4,096: the operator benchmark makes 1,000 Services); routed to lo inside the netns so kube-proxy DNATs them
API_PORT=6443
ETCD_PORT=2379
BRIDGE=shardmesh-br0
KUBECONFIG_FILE=$E2E_DIR/kubeconfig
CTR_SOCK=$E2E_DIR/ctr/containerd.sock
# Host sysctls the kubelet rewrites (not per network namespace): saved before, restored after.
HOST_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

# Host paths the kubelet/containerd/CNI create whatever their flags say; removed at teardown
# when cluster-up found them absent (listed in $E2E_DIR/created-paths).
HOST_PATHS=(/run/netns /run/containerd /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# Run a command inside the cluster's network namespace (nsenter, not `ip netns exec`, which
# remounts /sys and hides the cgroup mounts from the kubelet).
# The release binaries the images are made of (e2e/release.sh packs them): operator, sidecar,
# demo app, and the preStop helper, static because it runs inside any application image.
build_release() {
  cargo build --release --locked -p shardmesh-operator -p shardmesh-sidecar -p shardmesh-demo --bins
  cargo rustc --release --locked -p shardmesh-hook --bin shardmesh-hook -- -C target-feature=+crt-static
}

in_ns() { nsenter --net="/run/netns/$E2E_NS" "$@"; }
kc() { in_ns kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }
ctr_k8s() { ctr --address "$CTR_SOCK" -n k8s.io "$@"; }

# True if PID runs (a zombie counts as gone: PID 1 here may never reap it).
pid_alive() {
  local pid=$1 state
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# PID recorded for component NAME, if any.
recorded_pid() { if [ -f "$E2E_DIR/pids/$1" ]; then cat "$E2E_DIR/pids/$1"; fi; }

now_s() { date +%s.%N; }
elapsed_since() { LC_ALL=C printf '%.1f' "$(echo "$(now_s) - $1" | bc)"; }

# wait_for DESC TIMEOUT_S LOGFILE PIDNAME -- CMD...
# Polls CMD until it succeeds. Fails (printing DESC and the log tail) on timeout, or at once if
# the component PIDNAME (may be "-") has exited.
wait_for() {
  local desc=$1 timeout=$2 logf=$3 pidname=$4; shift 5
  local start pid
  start=$(now_s)
  while ! "$@" >/dev/null 2>&1; do
    if [ "$pidname" != - ]; then
      pid=$(recorded_pid "$pidname")
      if ! pid_alive "$pid"; then
        log "$pidname (pid ${pid:-?}) exited while waiting for: $desc"
        [ -f "$logf" ] && { log "last lines of $logf:"; tail -n 40 "$logf" >&2; }
        return 1
      fi
    fi
    if [ "$(echo "$(now_s) - $start > $timeout" | bc)" = 1 ]; then
      log "timed out after ${timeout}s waiting for: $desc"
      [ -f "$logf" ] && { log "last lines of $logf:"; tail -n 40 "$logf" >&2; }
      return 1
    fi
    sleep 0.3
  done
}

# Make this shell a child subreaper (re-exec through python's prctl) so that daemons orphaned by
# scripts it runs are re-parented to it and reaped, instead of to a PID 1 that may not reap.
# Usage (first line of a script): become_subreaper "$0" "$@"
become_subreaper() {
  [ "${SHARDMESH_SUBREAPER:-}" = "$$" ] && return 0
  command -v python3 >/dev/null || { log "python3 not found; orphaned daemons are left to PID 1"; return 0; }
  export SHARDMESH_SUBREAPER=$$
  exec python3 -c 'import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.stderr.write("warning: PR_SET_CHILD_SUBREAPER failed\n")
os.execvp(sys.argv[1], sys.argv[1:])' bash "$@"
}

require_root() { [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, mounts, containerd)"; }
