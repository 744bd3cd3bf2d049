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
# demo app and the preStop helper, built (the sidecar and the helper static) by one script.
build_release() {
  "$REPO_ROOT/e2e/scripts/build-release.sh"
}

in_ns() { nsenter --net="/run/netns/$E2E_NS" "$@"; }

# Starts a daemon in the background (its output to $E2E_DIR/logs/NAME.log) and records its PID
# in $E2E_DIR/pids/NAME.
start_daemon() {
  local name=$1; shift
  "$@" >"$E2E_DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$E2E_DIR/pids/$name"
}

# node_runtime_config DIR SOCK BRIDGE SUBNET: a node's containerd config (DIR/ctr/config.toml:
# private root, state, socket, pod netns under its state dir, the local pause image) and its
# CNI bridge network (DIR/cni) handing out SUBNET.
node_runtime_config() {
  local dir=$1 sock=$2 bridge=$3 subnet=$4
  mkdir -p "$dir/ctr" "$dir/cni/net.d" "$dir/cni/ipam"
  containerd config default | sed \
    -e "s#^root = .*#root = \"$dir/ctr/root\"#" \
    -e "s#^state = .*#state = \"$dir/ctr/state\"#" \
    -e "s#^  address = \"/run/containerd/containerd.sock\"#  address = \"$sock\"#" \
    -e "s#^    path = \"/opt/containerd\"#    path = \"$dir/ctr/opt\"#" \
    -e 's#sandbox_image = .*#sandbox_image = "shardmesh.local/pause:1"#' \
    -e 's#bin_dir = "/opt/cni/bin"#bin_dir = "/usr/lib/cni"#' \
    -e "s#conf_dir = \"/etc/cni/net.d\"#conf_dir = \"$dir/cni/net.d\"#" \
    -e 's#restrict_oom_score_adj = false#restrict_oom_score_adj = true#' \
    -e 's#netns_mounts_under_state_dir = false#netns_mounts_under_state_dir = true#' \
    >"$dir/ctr/config.toml"
  grep -q "$sock" "$dir/ctr/config.toml" || die "containerd config: socket address not replaced"
  cat >"$dir/cni/net.d/10-shardmesh-e2e.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "shardmesh-e2e", "plugins": [
  {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$dir/cni/ipam",
            "ranges": [[{"subnet": "$subnet"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
}

# /sys/fs/cgroup/<controller>/NAME in every cgroup-v1 hierarchy (a kubelet's --cgroup-root
# must exist).
make_cgroup_root() {
  local name=$1 m d
  while read -r _ m fstype _; do
    [ "$fstype" = cgroup ] || continue
    d="$m/$name"
    mkdir -p "$d"
    if [ -f "$m/cpuset.cpus" ]; then
      [ -n "$(cat "$d/cpuset.cpus")" ] || cat "$m/cpuset.cpus" >"$d/cpuset.cpus"
      [ -n "$(cat "$d/cpuset.mems")" ] || cat "$m/cpuset.mems" >"$d/cpuset.mems"
    fi
  done </proc/mounts
}

# --- extra nodes (e2e/scripts/node-add.sh N, N = 1-9) ---
# Node N runs in network namespace $E2E_NS-nN, joined to the cluster's namespace by a veth pair
# (nsmN there, uplink in the node), with node IP 10.254.0.(10+N), pods in 10.254.(64+N).0/24,
# its state in $E2E_DIR/nodes/N, its pods under the cgroup root /$E2E_NS-nN, and the PIDs of
# its daemons in $E2E_DIR/pids/{supervisor,containerd,kubelet,kube-proxy}-nN.
node_ns() { echo "$E2E_NS-n$1"; }
node_name() { echo "$NODE_NAME-$1"; }
node_ip() { echo "10.254.0.$((10 + $1))"; }
node_pod_cidr() { echo "10.254.$((64 + $1)).0/24"; }
node_dir() { echo "$E2E_DIR/nodes/$1"; }
node_ctr_sock() { echo "$E2E_DIR/nodes/$1/ctr/containerd.sock"; }
node_link() { echo "nsm$1"; }
# Indexes of the extra nodes added (their state dirs exist), ascending.
node_indexes() {
  local d
  for d in "$E2E_DIR"/nodes/[1-9]; do [ -d "$d" ] && basename "$d"; done
  true
}
# Every running containerd's socket: the first node's, then the added nodes' (a node stopped by
# node-stop.sh is left out, as a powered-off machine would be).
all_ctr_socks() {
  local n
  echo "$CTR_SOCK"
  for n in $(node_indexes); do
    pid_alive "$(recorded_pid "containerd-n$n")" && node_ctr_sock "$n"
  done
  true
}

# import_images SOCK IMAGES_DIR: imports each archive listed in IMAGES_DIR/images.txt ("<ref>
# <config id> <manifest digest> <bytes> <file>" per image) into the containerd at SOCK, unless
# it holds that digest under that name already, and tags the demo image "<ref>-next" (the
# rollout scenario's new image tag: same bytes, another reference, so every shard rolls).
import_images() {
  local sock=$1 dir=$2 ref id digest bytes file demo_ref
  while read -r ref id digest bytes file; do
    case $ref in '#'* | '') continue ;; esac
    if ctr --address "$sock" -n k8s.io images ls \
      | awk -v r="$ref" -v d="$digest" '$1 == r && $3 == d {found=1} END {exit !found}'; then
      log "$ref unchanged in $sock ($digest); not re-imported"
    else
      ctr --address "$sock" -n k8s.io images import "$dir/$file" >/dev/null \
        || die "importing $dir/$file into $sock failed"
      ctr --address "$sock" -n k8s.io images ls \
        | awk -v r="$ref" -v d="$digest" '$1 == r && $3 == d {found=1} END {exit !found}' \
        || die "$ref is not in $sock with digest $digest after importing $file"
      log "$ref imported into $sock from $file ($digest, $((bytes / 1048576)) MiB)"
    fi
  done <"$dir/images.txt"
  demo_ref=$(awk '$1 ~ /\/demo:/ {print $1; exit}' "$dir/images.txt")
  [ -n "$demo_ref" ] || die "no demo image in $dir/images.txt"
  ctr --address "$sock" -n k8s.io images tag --force "$demo_ref" "$demo_ref-next" >/dev/null \
    || die "tagging $demo_ref as $demo_ref-next in $sock failed"
  log "$demo_ref also tagged $demo_ref-next in $sock (rollout scenario)"
}
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

# start_kubelet PIDNAME BIN KUBECONFIG SOCK DIR NODE IP CGROUP_ROOT: a node's kubelet (state in
# DIR/kubelet, pods under /CGROUP_ROOT), for the first node and the added ones alike.
start_kubelet() {
  local pidname=$1 bin=$2 kc=$3 sock=$4 dir=$5 node=$6 ip=$7 cgroot=$8
  start_daemon "$pidname" "$bin/kubelet" --kubeconfig="$kc" --container-runtime=remote \
    --container-runtime-endpoint="unix://$sock" --runtime-request-timeout=5m \
    --root-dir="$dir/kubelet" --cert-dir="$dir/kubelet/pki" \
    --hostname-override="$node" --node-ip="$ip" \
    --address="$ip" --port=10250 --read-only-port=0 \
    --healthz-bind-address=127.0.0.1 --healthz-port=10248 \
    --cgroup-driver=cgroupfs --cgroup-root="/$cgroot" --cgroups-per-qos=true \
    --fail-swap-on=false --anonymous-auth=true --authorization-mode=AlwaysAllow \
    --pod-infra-container-image=shardmesh.local/pause:1 \
    --eviction-hard='memory.available<100Mi,nodefs.available<1%,imagefs.available<1%' \
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 \
    --cluster-domain=cluster.local --resolv-conf="" --max-pods=60 --node-status-update-frequency=2s
}

# start_kube_proxy PIDNAME BIN KUBECONFIG NODE POD_CIDR: a node's kube-proxy (iptables, inside
# the node's network namespace only).
start_kube_proxy() {
  local pidname=$1 bin=$2 kc=$3 node=$4 cidr=$5
  start_daemon "$pidname" "$bin/kube-proxy" --kubeconfig="$kc" --hostname-override="$node" \
    --proxy-mode=iptables --masquerade-all --cluster-cidr="$cidr" \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256 \
    --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0
}

# PIDs of everything added node N runs (what stopping the machine would end): processes in its
# network namespace or its pod cgroups, and its containerd's shims (which run in the host's
# network namespace but name the node's socket).
node_pids() {
  local n=$1 ns_ino="" p sock cg
  sock=$(node_ctr_sock "$n")
  [ -e "/run/netns/$(node_ns "$n")" ] && ns_ino=$(stat -L -c %i "/run/netns/$(node_ns "$n")" 2>/dev/null || true)
  {
    for p in /proc/[0-9]*; do
      p=${p#/proc/}
      if [ -n "$ns_ino" ] && [ "$(stat -L -c %i "/proc/$p/ns/net" 2>/dev/null)" = "$ns_ino" ]; then
        echo "$p"; continue
      fi
      [ -r "/proc/$p/cmdline" ] || continue
      if tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF -e "$sock"; then echo "$p"; fi
    done
    for cg in /sys/fs/cgroup/*/"$(node_ns "$n")"; do
      [ -d "$cg" ] && find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
    done
  } | sort -un | while read -r p; do pid_alive "$p" && echo "$p"; done
  true
}
