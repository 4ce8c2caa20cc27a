#!/usr/bin/env bash
# Installs the Debian packages mvm's build and test suite need, when any is missing.
#   scripts/deps.sh            (as root)
set -euo pipefail

packages=(
    # guest kernel (guest-kernel/build.sh)
    build-essential binutils flex bison libelf-dev bc xz-utils linux-source-6.1
    # base images (rootfs/build.sh)
    busybox-static e2fsprogs fakeroot umoci
    # vm tier without VT-x: the nested harness (tests/nested/run.sh) and guest-kernel/test.sh
    qemu-system-x86 linux-image-amd64 cpio
    # jail tier, sandbox networking, leak checks
    iproute2 util-linux nftables procps psmisc
    # containerd shim tests
    containerd runc
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "scripts/deps.sh: run as root to install: ${missing[*]}" >&2; exit 1; }
echo "scripts/deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
