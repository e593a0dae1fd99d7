#!/usr/bin/env bash
# Installs everything roost's demo and tests need, idempotently: Debian packages (PostgreSQL:
# the tests make throwaway clusters of their own with its initdb; Chromium: the web view's
# browser tests drive it through Playwright, which never downloads a browser of its own), a
# .venv with roost in it, and the test artifacts (Firecracker binary, guest kernel and
# initramfs).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 busybox-static dnsmasq-base nftables iptables iputils-ping lz4 socat unzip
          containernetworking-plugins iproute2 cpio python3-venv ca-certificates openssl gcc
          libc6-dev postgresql chromium)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
stamp=.venv/.roost-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing roost and its dev tools into .venv"
    .venv/bin/pip install -q --upgrade pip
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
# Test and demo artifacts (git-ignored): the Firecracker binary and a bootable demo guest.
./scripts/fetch-firecracker.sh build/firecracker
.venv/bin/roost image build-demo --out build/demo
echo "setup: done"
