#!/usr/bin/env bash
# Restart the e2e cluster's kube-apiserver: stop it (SIGTERM, then SIGKILL after 5 s), keep it
# down for DOWN_S more seconds, start it again with the same command line and environment, wait
# for /readyz. Used by the scenario proving that membership and routing survive a control-plane
# outage.
#
# Usage: e2e/scripts/restart-apiserver.sh [DOWN_S]     (default 20; run inside the cluster netns)
# Prints, one per line: the epoch seconds when it was told to stop and when it was ready again.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/lib.sh"
require_root

DOWN_S=${1:-20}
DIR=$E2E_DIR
pid=$(recorded_pid apiserver)
pid_alive "$pid" || die "no running kube-apiserver recorded in $DIR/pids/apiserver"
mapfile -d '' cmd <"/proc/$pid/cmdline"
mapfile -d '' envv <"/proc/$pid/environ"
cwd=$(readlink "/proc/$pid/cwd")
[ "${#cmd[@]}" -gt 0 ] || die "cannot read the command line of pid $pid"

# SIGTERM stops it serving at once, but it then waits up to a minute for open watches; the
# rest of the shutdown is cut short with SIGKILL (what matters is that it is gone).
stopped=$(date +%s.%N)
kill -TERM "$pid"
for ((i = 0; i < 25; i++)); do pid_alive "$pid" || break; sleep 0.2; done
pid_alive "$pid" && kill -KILL "$pid"
for ((i = 0; i < 50; i++)); do pid_alive "$pid" || break; sleep 0.2; done
pid_alive "$pid" && die "kube-apiserver (pid $pid) did not stop"
log "kube-apiserver stopped; down for ${DOWN_S}s more"
sleep "$DOWN_S"

# Same binary, flags, environment and working directory; output appended to its log. setsid:
# the daemon must not die with this script's process group.
(cd "$cwd" && exec setsid env -i "${envv[@]}" "${cmd[@]}" >>"$DIR/logs/apiserver.log" 2>&1 </dev/null) &
echo $! >"$DIR/pids/apiserver"
KC=$DIR/kubeconfig
for ((i = 0; i < 600; i++)); do
  if kubectl --kubeconfig "$KC" get --raw /readyz --request-timeout=2s >/dev/null 2>&1; then
    ready=$(date +%s.%N)
    log "kube-apiserver ready again (pid $(recorded_pid apiserver))"
    echo "$stopped"
    echo "$ready"
    exit 0
  fi
  sleep 0.2
done
die "kube-apiserver did not become ready within 120s after the restart; see $DIR/logs/apiserver.log"
