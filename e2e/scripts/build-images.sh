#!/usr/bin/env bash
# The release images in the e2e cluster: e2e/release.sh writes the OCI archives (release
# binaries; every image written twice and compared), then each archive is imported into the
# cluster's containerd with `ctr images import`, exactly as a user would load them. An image
# whose manifest digest is already there under its name is not imported again.
#
# Usage: e2e/scripts/build-images.sh [--no-build]
#   --no-build   the release binaries are already built (e2e/test.sh builds them in its own phase)
# Env:   SHARDMESH_IMAGES_DIR  where the archives go (default $E2E_DIR/images)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/lib.sh"
require_root

RELEASE_ARGS=(--check)
for arg in "$@"; do
  case $arg in
    --no-build) RELEASE_ARGS+=(--no-build) ;;
    *) die "unknown argument $arg (usage: e2e/scripts/build-images.sh [--no-build])" ;;
  esac
done
[ -S "$CTR_SOCK" ] || die "containerd socket $CTR_SOCK not found: start the cluster first (e2e/scripts/cluster-up.sh)"
IMAGES_DIR=${SHARDMESH_IMAGES_DIR:-$E2E_DIR/images}
"$REPO_ROOT/e2e/release.sh" --out "$IMAGES_DIR" "${RELEASE_ARGS[@]}" >/dev/null

# images.txt: "<ref> <config id> <manifest digest> <bytes> <file>" per image.
while read -r ref id digest bytes file; do
  case $ref in '#'* | '') continue ;; esac
  if ctr_k8s images ls | awk -v r="$ref" -v d="$digest" '$1 == r && $3 == d {found=1} END {exit !found}'; then
    log "$ref unchanged ($digest); not re-imported"
  else
    ctr_k8s images import "$IMAGES_DIR/$file" >/dev/null || die "importing $IMAGES_DIR/$file into containerd failed"
    ctr_k8s images ls | awk -v r="$ref" -v d="$digest" '$1 == r && $3 == d {found=1} END {exit !found}' \
      || die "$ref is not in containerd with digest $digest after importing $file"
    log "$ref imported from $file ($digest, $((bytes / 1048576)) MiB)"
  fi
done <"$IMAGES_DIR/images.txt"

# A second tag of the demo image: the rollout scenario's "new image tag" (same bytes, a
# different reference, so the pod template changes and every shard rolls).
demo_ref=$(awk '$1 ~ /\/demo:/ {print $1; exit}' "$IMAGES_DIR/images.txt")
[ -n "$demo_ref" ] || die "no demo image in $IMAGES_DIR/images.txt"
ctr_k8s images tag --force "$demo_ref" "$demo_ref-next" >/dev/null \
  || die "tagging $demo_ref as $demo_ref-next failed"
log "$demo_ref also tagged $demo_ref-next (rollout scenario)"
