#!/usr/bin/env bash
# Tear down what cluster-up.sh (and node-add.sh) started: pods first (so CNI cleans up), then the
# daemons by recorded PID, leftover containerd shims/tasks of this cluster, mounts under the state
# dir, the bridge, the network namespaces, the pod cgroups, and the host sysctls the kubelet
# changed.
# Safe to run twice and after a half-failed start. Keeps $SHARDMESH_E2E_DIR/logs.
#
# Usage: e2e/scripts/cluster-down.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/lib.sh"
require_root

DIR=$E2E_DIR
T0=$(now_s)
NETNS_FILE=/run/netns/$E2E_NS

if [ ! -e "$DIR" ] && [ ! -e "$NETNS_FILE" ]; then
  log "nothing to tear down ($DIR and netns $E2E_NS absent)"
  exit 0
fi
log "tearing down the cluster in $DIR (netns $E2E_NS)"

# stop_component NAME [TIMEOUT_S]: SIGTERM the recorded PID, SIGKILL if it outlives TIMEOUT_S.
stop_component() {
  local name=$1 timeout=${2:-15} pid i
  pid=$(recorded_pid "$name")
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 5; i++)); do pid_alive "$pid" || return 0; sleep 0.2; done
  log "$name (pid $pid) ignored SIGTERM for ${timeout}s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 25; i++)); do pid_alive "$pid" || return 0; sleep 0.2; done
  log "WARNING: $name (pid $pid) still alive"
}

# True if PID is this script or one of its descendants (the helpers it runs).
is_ours() {
  local p=$1 i
  for ((i = 0; i < 64; i++)); do
    [ "$p" = $$ ] && return 0
    [ -z "$p" ] || [ "$p" -le 1 ] && return 1
    p=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f2) || return 1
  done
  return 1
}

# PIDs of processes that belong to this cluster although no PID file names them: processes in
# our network namespace or in our pod cgroups, this cluster's containerd shims, the supervisor.
cluster_pids() {
  local ns_ino="" p cg
  [ -e "$NETNS_FILE" ] && ns_ino=$(stat -L -c %i "$NETNS_FILE" 2>/dev/null || true)
  {
    for p in /proc/[0-9]*; do
      p=${p#/proc/}
      if [ -n "$ns_ino" ] && [ "$(stat -L -c %i "/proc/$p/ns/net" 2>/dev/null)" = "$ns_ino" ]; then
        echo "$p"; continue
      fi
      [ -r "/proc/$p/cmdline" ] || continue
      if grep -qs ":/$E2E_NS\(/\|$\)" "/proc/$p/cgroup"; then echo "$p"; continue; fi
      if tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF -e "$CTR_SOCK" -e "$DIR/pids/supervisor"; then
        echo "$p"
      fi
    done
    for cg in /sys/fs/cgroup/*/"$E2E_NS"; do
      [ -d "$cg" ] && find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
    done
    for n in $(node_indexes); do node_pids "$n"; done
  } | sort -un | while read -r p; do
    pid_alive "$p" && ! is_ours "$p" && echo "$p"
  done
  true
}

apiserver_up() { pid_alive "$(recorded_pid apiserver)" && [ -e "$NETNS_FILE" ]; }

# 1) Pods first, while kubelet and containerd still run: the kubelet stops them through CRI,
#    which runs CNI DEL and removes their network namespaces. Controllers stop first so nothing
#    re-creates the pods.
stop_component kcm
stop_component scheduler
if apiserver_up && pid_alive "$(recorded_pid kubelet)"; then
  kc delete pods --all-namespaces --all --grace-period=0 --force --wait=false \
    --request-timeout=20s >/dev/null 2>&1 || log "deleting pods failed (continuing)"
  for sock in $(all_ctr_socks); do
    [ -S "$sock" ] || continue
    wait_for "the kubelets to stop all pod containers ($sock)" 60 "$DIR/logs/kubelet.log" - -- \
      bash -c "[ -z \"\$(ctr --address '$sock' -n k8s.io tasks ls -q 2>/dev/null)\" ]" \
      || log "some containers still run; killing them through containerd"
  done
fi

# 2) Daemons by recorded PID (the added nodes' as "<name>-n<N>").
# stop_containerd SUFFIX SOCK: kills the tasks of a containerd, then containerd.
stop_containerd() {
  local suffix=$1 sock=$2 t c
  if [ -S "$sock" ] && pid_alive "$(recorded_pid "containerd$suffix")"; then
    for t in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io tasks kill -s KILL "$t" >/dev/null 2>&1 || true
    done
    for t in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io tasks rm -f "$t" >/dev/null 2>&1 || true
    done
    for c in $(ctr --address "$sock" -n k8s.io containers ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io containers rm "$c" >/dev/null 2>&1 || true
    done
  fi
  stop_component "containerd$suffix"
}
for n in $(node_indexes); do
  stop_component "kube-proxy-n$n"
  stop_component "kubelet-n$n"
done
stop_component kube-proxy
stop_component kubelet
stop_component apiserver 3   # it retries removing itself from the endpoints for a long while
for n in $(node_indexes); do stop_containerd "-n$n" "$(node_ctr_sock "$n")"; done
stop_containerd "" "$CTR_SOCK"
stop_component etcd

# 3) Anything of this cluster still running (shims, container processes, a stuck start script).
for round in 1 2 3; do
  mapfile -t left < <(cluster_pids | sort -u)
  [ ${#left[@]} -eq 0 ] && break
  if [ "$round" = 1 ]; then
    log "killing leftover processes of this cluster:"
    for p in "${left[@]}"; do
      printf '  %s %s\n' "$p" "$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | cut -c1-160)" >&2
    done
  fi
  kill -KILL "${left[@]}" 2>/dev/null || true
  sleep 0.5
done
# The supervisors exit by themselves once they have reaped everything.
for name in supervisor $(for n in $(node_indexes); do echo "supervisor-n$n"; done); do
  sup=$(recorded_pid "$name")
  for ((i = 0; i < 50; i++)); do pid_alive "$sup" || break; sleep 0.2; done
  pid_alive "$sup" && { kill -TERM "$sup" 2>/dev/null || true; }
done

# 4) Mounts under the state dir (overlay rootfs, shm, pod volumes, pod netns), deepest first.
for round in 1 2 3; do
  mapfile -t mnts < <(awk -v d="$DIR/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r)
  [ ${#mnts[@]} -eq 0 ] && break
  for m in "${mnts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
done

# 5) Network: the added nodes' namespaces (their links go with them), the bridge, then the
#    cluster's namespace (its iptables rules and sysctls go with it).
for nsf in /run/netns/"$E2E_NS"-n[1-9]; do
  [ -e "$nsf" ] || continue
  ip netns del "$(basename "$nsf")" 2>/dev/null || log "WARNING: could not delete netns $(basename "$nsf")"
done
if [ -e "$NETNS_FILE" ]; then
  ip -n "$E2E_NS" link del "$BRIDGE" 2>/dev/null || true
  ip netns del "$E2E_NS" 2>/dev/null || log "WARNING: could not delete netns $E2E_NS"
fi


# 6) Pod cgroups (kubelet --cgroup-root=/$E2E_NS, and /$E2E_NS-nN of added nodes), deepest first.
for cg in /sys/fs/cgroup/*/"$E2E_NS" /sys/fs/cgroup/*/"$E2E_NS"-n[1-9]; do
  if [ -d "$cg" ]; then find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
done

# 7) Host sysctls the kubelet rewrote.
if [ -f "$DIR/host-sysctls" ]; then
  while IFS= read -r kv; do sysctl -qw "$kv" >/dev/null || log "WARNING: could not restore $kv"; done <"$DIR/host-sysctls"
  rm -f "$DIR/host-sysctls"
fi

# 8) Files the kubelet and CNI write outside the state dir: pod logs, CNI result cache.
if [ -f "$DIR/started" ]; then
  find /var/log/pods -mindepth 1 -maxdepth 1 -newer "$DIR/started" -exec rm -rf {} + 2>/dev/null || true
  find /var/log/containers -maxdepth 1 -xtype l -delete 2>/dev/null || true
fi
rm -f /var/lib/cni/results/shardmesh-e2e-* 2>/dev/null || true
# Host paths that did not exist before cluster-up (/run/netns is a mount point `ip netns add`
# made; it is removed only when no other namespace is left in it).
if [ -f "$DIR/created-paths" ]; then
  while IFS= read -r path; do
    case $path in
      /run/netns)
        if [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
          umount /run/netns 2>/dev/null || true
          rmdir /run/netns 2>/dev/null || true
        fi ;;
      /run/containerd | /var/lib/kubelet | /var/log/pods | /var/log/containers | /var/lib/cni)
        awk -v d="$path/" 'index($2, d) == 1 {f=1} END {exit !f}' /proc/mounts || rm -rf "$path" ;;
    esac
  done <"$DIR/created-paths"
fi

# 9) State, except the logs.
if ! owns_state_dir; then
  log "WARNING: $DIR has no $E2E_MARKER; not removing its contents"
elif [ -d "$DIR" ] && ! awk -v d="$DIR/" 'index($2, d) == 1 {f=1} END {exit !f}' /proc/mounts; then
  find "$DIR" -mindepth 1 -maxdepth 1 ! -name logs ! -name "$E2E_MARKER" -exec rm -rf {} +
else
  [ -d "$DIR" ] && log "WARNING: mounts remain under $DIR; state not removed"
fi

mapfile -t left < <(cluster_pids | sort -u)
[ ${#left[@]} -eq 0 ] || log "WARNING: processes remain: ${left[*]}"
log "teardown done in $(elapsed_since "$T0")s (logs kept in $DIR/logs)"
