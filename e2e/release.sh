#!/usr/bin/env bash
# Release images: builds the release binaries and writes one OCI image archive per image
# (operator, sidecar, demo) that `docker load`, `skopeo copy oci-archive:…`, `crane push` and
# `ctr images import` all take. No container engine, no registry, no root needed.
#
# Usage: e2e/release.sh [--repository REPO] [--out DIR] [--no-build] [--check]
#   --repository REPO  image names are REPO/{operator,sidecar,demo}:<version> (default
#                      shardmesh.local; set it to where you push, e.g. registry.example.com/shardmesh)
#   --out DIR          where the archives and images.txt go (default ${CARGO_TARGET_DIR:-target}/images)
#   --no-build         use the release binaries already built
#   --check            write every image twice and fail unless both are byte-identical
#
# <version> is the workspace version (Cargo.toml), which is also the Helm chart's appVersion, so
# the chart's default image tags name exactly these images. Images: one layer with the binary,
# the shared libraries it links (glibc from this Debian), /etc/passwd with user nonroot (65532),
# run as 65532:65532, no shell. The sidecar image also carries /shardmesh-hook, statically linked:
# the injector's init container copies it into the pod for the application's preStop hook, so it
# must run in any application image. Labels: org.opencontainers.image.{title,version,revision,
# created,source,licenses}; revision is the git commit (suffix -dirty for uncommitted changes),
# created its commit time, so one commit built in one environment gives the same digests.
# images.txt lists each image with its config id, manifest digest and size, for verification.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$HERE/.." && pwd)
REPOSITORY=shardmesh.local
OUT=
BUILD=1
CHECK=0
while [ $# -gt 0 ]; do
  case $1 in
    --repository) REPOSITORY=${2:?--repository needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a directory}; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --check) CHECK=1; shift ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "release.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $REPOSITORY =~ ^[a-z0-9]([a-z0-9._/:-]*[a-z0-9])?$ ]] \
  || { echo "release.sh: --repository $REPOSITORY is not an image repository (lower case, e.g. registry.example.com/shardmesh)" >&2; exit 2; }
TARGET=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
OUT=${OUT:-$TARGET/images}
cd "$REPO_ROOT"

VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$VERSION" ] || { echo "release.sh: no [workspace.package] version in Cargo.toml" >&2; exit 1; }
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/shardmesh/Chart.yaml)
[ "$APP_VERSION" = "$VERSION" ] \
  || { echo "release.sh: charts/shardmesh/Chart.yaml appVersion $APP_VERSION differs from the workspace version $VERSION; keep them equal" >&2; exit 1; }
if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  REVISION=$(git -C "$REPO_ROOT" rev-parse HEAD)
  git -C "$REPO_ROOT" diff --quiet HEAD -- operator sidecar e2e/demo-app Cargo.toml Cargo.lock \
    || REVISION=$REVISION-dirty
  CREATED=$(TZ=UTC git -C "$REPO_ROOT" log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ)
else
  REVISION=unknown CREATED=1970-01-01T00:00:00Z
fi
SOURCE=$(sed -n 's/^repository *= *"\(.*\)"/\1/p' Cargo.toml | head -1)
LICENSE=$(sed -n '/^\[workspace.package\]/,/^\[/s/^license *= *"\(.*\)"/\1/p' Cargo.toml)

HOOK=$TARGET/release/shardmesh-hook
if [ "$BUILD" = 1 ]; then
  echo "release.sh: e2e/scripts/build-release.sh (operator, demo; sidecar and hook static) into $TARGET" >&2
  "$HERE/scripts/build-release.sh"
fi
# The hook runs inside application images (unknown libc); the sidecar is static for its memory.
for bin in shardmesh-hook shardmesh-sidecar; do
  [ -x "$TARGET/release/$bin" ] || { echo "release.sh: $TARGET/release/$bin not built (run without --no-build)" >&2; exit 1; }
  ldd "$TARGET/release/$bin" 2>&1 | grep -qE 'not a dynamic executable|statically linked' \
    || { echo "release.sh: $TARGET/release/$bin is dynamically linked; build the release binaries with e2e/scripts/build-release.sh" >&2; exit 1; }
done
mkdir -p "$OUT"

# image NAME BINARY DIR: writes DIR/shardmesh-NAME-VERSION.oci.tar, prints mkimage's JSON line.
image() {
  local name=$1 binary=$TARGET/release/$2 dir=$3 extra=()
  [ -x "$binary" ] || { echo "release.sh: $binary not built (run without --no-build)" >&2; exit 1; }
  if [ "$name" = sidecar ]; then extra=(--file "$HOOK:/shardmesh-hook"); fi
  python3 "$HERE/scripts/mkimage.py" --tag "$REPOSITORY/$name:$VERSION" \
    --out "$dir/shardmesh-$name-$VERSION.oci.tar" --binary "$binary" --nonroot --created "$CREATED" \
    "${extra[@]}" \
    --label "org.opencontainers.image.title=shardmesh-$name" \
    --label "org.opencontainers.image.version=$VERSION" \
    --label "org.opencontainers.image.revision=$REVISION" \
    --label "org.opencontainers.image.created=$CREATED" \
    --label "org.opencontainers.image.source=${SOURCE:-unknown}" \
    --label "org.opencontainers.image.licenses=${LICENSE:-unknown}"
}

IMAGES=(operator:shardmesh-operator sidecar:shardmesh-sidecar demo:shardmesh-demo)
{
  printf '# shardmesh %s images (revision %s); verify with: skopeo inspect oci-archive:<file>\n' "$VERSION" "$REVISION"
  printf '# image config-id manifest-digest bytes file\n'
  for spec in "${IMAGES[@]}"; do
    line=$(image "${spec%%:*}" "${spec#*:}" "$OUT")
    python3 -c 'import json,sys,os; j=json.loads(sys.argv[1]); print(j["tag"], j["id"], j["digest"], j["size"], os.path.basename(j["out"]))' "$line"
  done
} >"$OUT/images.txt.tmp"
mv "$OUT/images.txt.tmp" "$OUT/images.txt"

if [ "$CHECK" = 1 ]; then
  again=$(mktemp -d "$OUT/.check.XXXXXX")
  for spec in "${IMAGES[@]}"; do
    image "${spec%%:*}" "${spec#*:}" "$again" >/dev/null
    f=shardmesh-${spec%%:*}-$VERSION.oci.tar
    if ! cmp -s "$OUT/$f" "$again/$f"; then
      rm -rf "$again"
      echo "release.sh: $f differs between two builds from the same binaries: not reproducible" >&2
      exit 1
    fi
  done
  rm -rf "$again"
  echo "release.sh: every image written twice, byte-identical (same digests)" >&2
fi
cat "$OUT/images.txt"
