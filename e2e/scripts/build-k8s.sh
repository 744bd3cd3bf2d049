#!/usr/bin/env bash
# Build Kubernetes v1.20.2 server binaries offline from Debian's `kubernetes` source package and
# cache them. Only the first run pays (~5 min on 2 cores); later runs find the cache and return.
#
# Usage: e2e/scripts/build-k8s.sh            (prints the directory holding the binaries)
# Env:   SHARDMESH_CACHE (default ~/.cache/shardmesh)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/lib.sh"

K8S_VERSION=v1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
OUT="$CACHE/k8s-$K8S_VERSION/bin"
BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

have_all() { for b in "${BINS[@]}"; do [ -x "$OUT/$b" ] || return 1; done; }
if have_all; then echo "$OUT"; exit 0; fi

install_build_deps
WORK="$CACHE/k8s-$K8S_VERSION/src"
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"
cd "$WORK"
log "downloading Debian source package kubernetes=$DEB_VERSION"
apt-get source --download-only "kubernetes=$DEB_VERSION" >"$WORK/apt-source.log" 2>&1 \
  || die "apt-get source kubernetes failed; see $WORK/apt-source.log"
dpkg-source -x "kubernetes_${DEB_VERSION}.dsc" k8s >/dev/null 2>&1
cd k8s
# The vendored reflect2 1.0.1 crashes under Go >= 1.18 the first time a custom resource is
# written (fatal error in mapiterinit); Debian's 1.0.2 sources are a drop-in replacement.
rm -rf vendor/github.com/modern-go/reflect2 && mkdir vendor/github.com/modern-go/reflect2
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
   /usr/share/gocode/src/github.com/modern-go/reflect2/*.s vendor/github.com/modern-go/reflect2/
unset GOFLAGS
export GOPROXY=off CGO_ENABLED=0 HOME="$WORK/home"
export KUBE_GIT_VERSION=$K8S_VERSION KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
mkdir -p "$HOME"
log "building ${BINS[*]} (first run only; log: $WORK/make.log)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy" \
  >"$WORK/make.log" 2>&1 || { tail -30 "$WORK/make.log" >&2; die "kubernetes build failed; see $WORK/make.log"; }
for b in "${BINS[@]}"; do cp "_output/bin/$b" "$OUT/$b.tmp" && mv "$OUT/$b.tmp" "$OUT/$b"; done
cd "$CACHE" && rm -rf "$WORK"   # the tree is ~2.5 GB; only the binaries are kept
"$OUT/kube-apiserver" --version >&2
echo "$OUT"
