#!/usr/bin/env bash
# The release images in the e2e cluster: e2e/release.sh writes the OCI archives (release
# binaries; every image written twice and compared), then each archive is imported into the
# containerd of every node of the cluster with `ctr images import`, exactly as a user would load
# them. An image whose manifest digest is already there under its name is not imported again.
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

# Into every node's containerd (e2e/scripts/node-add.sh imports them into nodes added later).
for sock in $(all_ctr_socks); do
  import_images "$sock" "$IMAGES_DIR"
done
