#!/usr/bin/env bash
# mvm's main job, from a fresh Debian/Ubuntu machine: install what is needed, build, launch a
# sandbox and print a command's output.
#
#   sudo scripts/demo.sh [-- CMD...]
#
# The tier is chosen from the hardware: `vm` (micro-VM) where /dev/kvm is hardware KVM, else
# `jail` (the agent as a jailed host process). MVM_DEMO_TIER=vm|jail overrides the choice.
# Default command: print the sandbox's hostname, kernel and user.
set -euo pipefail

die() { echo "demo.sh: error: $*" >&2; exit 1; }
log() { echo "demo.sh: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ "$(id -u)" -eq 0 ] || die "run as root (sandboxes need namespaces, cgroups and mounts): sudo $0 $*"

cmd=(sh -c 'echo "hello from sandbox $(hostname): $(uname -sr), uid $(id -u)"')
if [ "${1:-}" = "--" ]; then
    shift
    [ $# -gt 0 ] && cmd=("$@")
fi

# --- Packages -------------------------------------------------------------------------------
packages=(build-essential libc6-dev pkg-config busybox-static e2fsprogs fakeroot nftables iproute2 curl ca-certificates)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "install these packages first: ${missing[*]}"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] || {
        log "installing the Rust toolchain with rustup"
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
    }
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# --- Tier -----------------------------------------------------------------------------------
tier=${MVM_DEMO_TIER:-}
if [ -z "$tier" ]; then
    if [ -e /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ]; then tier=vm; else tier=jail; fi
fi
case "$tier" in vm|jail) ;; *) die "MVM_DEMO_TIER must be vm or jail, not '$tier'" ;; esac
log "isolation tier: $tier"

# --- Build ----------------------------------------------------------------------------------
cd "$repo"
log "building mvm (cargo build; a few minutes the first time)"
cargo build -p jailer -p agent -p api -p cli -p vmm --bins
bin="$repo/target/x86_64-unknown-linux-gnu/debug"
log "building the base image (rootfs/build.sh)"
rootfs/build.sh --agent "$bin/mvm-agent" >/dev/null
# Only the vm tier boots a guest kernel: the jail tier does not wait for one it will not use.
if [ "$tier" = vm ]; then
    log "building the guest kernel (guest-kernel/build.sh; ~10 minutes the first time, cached after)"
    guest-kernel/build.sh >/dev/null
else
    log "no guest kernel needed for the jail tier (build it with guest-kernel/build.sh for the vm tier)"
fi

# --- Run ------------------------------------------------------------------------------------
log "running: mvm run --rm --isolation $tier -- ${cmd[*]}"
export MVM_BIN_DIR="$bin" MVM_ARTIFACTS="$repo/target/mvm-artifacts"
exec "$bin/mvm" run --rm --isolation "$tier" -- "${cmd[@]}"
