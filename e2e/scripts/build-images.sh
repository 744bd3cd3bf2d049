#!/usr/bin/env bash
# Build container images from the workspace's debug binaries and import them into the e2e
# cluster's containerd (no registry): shardmesh.local/{operator,sidecar,demo}:dev.
# An image whose ID (config digest) is unchanged since its last import is not imported again.
#
# Usage: e2e/scripts/build-images.sh            (after `cargo build --workspace --bins`)
# Env:   SHARDMESH_BIN_DIR  where the binaries are (default ${CARGO_TARGET_DIR:-<repo>/target}/debug)
#        SHARDMESH_IMAGE_TAG (default dev)
#        SHARDMESH_IMAGES    which images (default "operator sidecar demo")
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/lib.sh"
require_root

BIN_DIR=${SHARDMESH_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug}
TAG=${SHARDMESH_IMAGE_TAG:-dev}
IMG_DIR=$E2E_DIR/img
[ -S "$CTR_SOCK" ] || die "containerd socket $CTR_SOCK not found: start the cluster first (e2e/scripts/cluster-up.sh)"
mkdir -p "$IMG_DIR"

# image NAME BINARY required|optional
build_image() {
  local name=$1 binary=$2 need=$3 ref out id
  ref=shardmesh.local/$name:$TAG
  if [ ! -x "$BIN_DIR/$binary" ]; then
    [ "$need" = optional ] && { log "skipping $ref: $BIN_DIR/$binary not built"; return 0; }
    die "$BIN_DIR/$binary not found: run 'cargo build --workspace --bins' first"
  fi
  out=$IMG_DIR/$name.tar
  id=$(python3 "$HERE/mkimage.py" --tag "$ref" --out "$out" --binary "$BIN_DIR/$binary" --nonroot \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
  if [ -f "$IMG_DIR/$name.imported" ] && [ "$(cat "$IMG_DIR/$name.imported")" = "$id" ] \
    && ctr_k8s images ls -q | grep -qxF "$ref"; then
    log "$ref unchanged ($id); not re-imported"
  else
    ctr_k8s images import "$out" >/dev/null || die "importing $out into containerd failed"
    echo "$id" >"$IMG_DIR/$name.imported"
    log "$ref imported ($id, $(du -m "$out" | cut -f1) MB)"
  fi
  rm -f "$out"
}

for img in ${SHARDMESH_IMAGES:-operator sidecar demo}; do
  case $img in
    operator) build_image operator shardmesh-operator required ;;
    sidecar) build_image sidecar shardmesh-sidecar optional ;;
    demo) build_image demo shardmesh-demo required ;;
    *) die "unknown image $img (known: operator sidecar demo)" ;;
  esac
done
