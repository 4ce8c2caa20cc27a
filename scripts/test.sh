#!/usr/bin/env bash
# mvm's whole test suite, on a fresh machine, in one command (as root):
#   scripts/test.sh
# 1. installs missing Debian packages (scripts/deps.sh)
# 2. builds the guest kernel (cached in ${MVM_CACHE_DIR:-/var/cache/mvm}) and every binary
#    (one cargo profile: dev, static)
# 3. checks formatting (cargo fmt --check) and lints (cargo clippy -D warnings) of every crate
# 4. builds and checks the base image and the kernel under QEMU (rootfs/test.sh, guest-kernel/test.sh)
# 5. runs every cargo test: unit, KVM test guests, jailer, agent, API/CLI (jail tier), shim
# 6. runs the vm-tier suite (tests/nested/run.sh): directly on hardware KVM, otherwise inside a
#    QEMU guest with emulated SVM, so no vm-tier test is skipped on hosts without VT-x
# 7. runs each fuzz target (virtio devices, the VMM's HTTP API) briefly (vmm/fuzz/run-fuzz.sh) with cargo-fuzz, on the nightly
#    toolchain or, where there is none, on stable with RUSTC_BOOTSTRAP=1
# Exits non-zero if any stage fails, after running them all; prints a summary line per stage.
# With CI set (non-empty), a stage whose tools are missing fails instead of being skipped.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH:/sbin:/usr/sbin"
results=()
failed=0
# No incremental caches: a fresh build gains nothing from them, and they add gigabytes to the
# target/ a clean checkout must have room for (about 4 GB without them).
export CARGO_INCREMENTAL=0

# Free space on the file system holding target/, for the log: a stage that dies of a full disk
# says so only deep in its own output.
disk_free() {
    df -h --output=avail,size "$repo" | awk -v dir="$repo" 'NR == 2 { print "disk: " $1 " free of " $2 " under " dir }'
}
disk_free

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
        disk_free
        echo "scripts/test.sh: stopping: a build stage failed" >&2
        exit 1
    fi
}

must deps scripts/deps.sh
must guest-kernel guest-kernel/build.sh
must build cargo build --workspace --bins --examples --tests
stage fmt cargo fmt --all --check
stage clippy cargo clippy --workspace --all-targets -- -D warnings
must rootfs rootfs/build.sh
stage rootfs-test rootfs/test.sh
stage guest-kernel-test guest-kernel/test.sh
stage cargo-test cargo test --workspace --no-fail-fast
stage vm-tier tests/nested/run.sh

# Fuzz smoke run of the guest-facing virtio parsers. cargo-fuzz needs -Z flags: it uses the
# nightly toolchain when there is one, else the stable one with RUSTC_BOOTSTRAP=1 (cargo-fuzz
# honours it; stable ships the sanitizer runtimes). Without cargo-fuzz (scripts/deps.sh installs
# it) the stage is skipped, or fails under CI.
fuzz_smoke() {
    local toolchain=nightly vars=()
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        toolchain=stable
        vars=(RUSTC_BOOTSTRAP=1)
    fi
    if ! env "${vars[@]}" cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
        local why="cargo-fuzz is not installed (cargo install cargo-fuzz --locked, or scripts/deps.sh)"
        if [ -n "${CI:-}" ]; then
            echo "FAIL fuzz-smoke: $why; CI is set, so the stage cannot be skipped" >&2
            return 1
        fi
        echo "SKIP fuzz-smoke: $why"
        return 0
    fi
    echo "fuzz-smoke: $toolchain toolchain ${vars[*]}"
    env "${vars[@]}" MVM_FUZZ_TOOLCHAIN="$toolchain" vmm/fuzz/run-fuzz.sh "${MVM_FUZZ_SECONDS:-20}"
}
stage fuzz-smoke fuzz_smoke

echo
echo "=== summary"
printf '%s\n' "${results[@]}"
disk_free
passed=$(( ${#results[@]} - failed ))
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
