#!/usr/bin/env bash
# mvm's whole test suite, on a fresh machine, in one command (as root):
#   scripts/test.sh
# 1. installs missing Debian packages (scripts/deps.sh)
# 2. builds the guest kernel (cached in ${MVM_CACHE_DIR:-/var/cache/mvm}) and every binary
#    (one cargo profile: dev, static)
# 3. builds and checks the base image and the kernel under QEMU (rootfs/test.sh, guest-kernel/test.sh)
# 4. runs every cargo test: unit, KVM test guests, jailer, agent, API/CLI (jail tier), shim
# 5. runs the vm-tier suite (tests/nested/run.sh): directly on hardware KVM, otherwise inside a
#    QEMU guest with emulated SVM, so no vm-tier test is skipped on hosts without VT-x
# 6. runs each virtio fuzz target briefly (vmm/fuzz/run-fuzz.sh), where cargo-fuzz is installed
# Exits non-zero if any stage fails, after running them all; prints a summary line per stage.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH:/sbin:/usr/sbin"
results=()
failed=0

stage() {
    local name=$1
    shift
    echo
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@"; then
        results+=("PASS  $name ($((SECONDS - start)) s)")
    else
        results+=("FAIL  $name ($((SECONDS - start)) s)")
        failed=$((failed + 1))
    fi
}

must() {
    stage "$@"
    if [ "$failed" -gt 0 ]; then
        printf '%s\n' "${results[@]}"
        echo "scripts/test.sh: stopping: a build stage failed" >&2
        exit 1
    fi
}

must deps scripts/deps.sh
must guest-kernel guest-kernel/build.sh
must build cargo build --workspace --bins --examples --tests
must rootfs rootfs/build.sh
stage rootfs-test rootfs/test.sh
stage guest-kernel-test guest-kernel/test.sh
stage cargo-test cargo test --workspace --no-fail-fast
stage vm-tier tests/nested/run.sh

# Fuzz smoke run of the guest-facing virtio parsers (cargo-fuzz needs a nightly toolchain; where
# there is none the stage says so and is skipped).
fuzz_smoke() {
    if cargo +nightly fuzz --version >/dev/null 2>&1; then
        vmm/fuzz/run-fuzz.sh "${MVM_FUZZ_SECONDS:-20}"
    else
        echo "SKIP fuzz-smoke: no nightly toolchain with cargo-fuzz (rustup toolchain install nightly && cargo install cargo-fuzz)"
    fi
}
stage fuzz-smoke fuzz_smoke

echo
echo "=== summary"
printf '%s\n' "${results[@]}"
passed=$(( ${#results[@]} - failed ))
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
