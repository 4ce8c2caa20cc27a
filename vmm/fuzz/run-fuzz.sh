#!/usr/bin/env bash
# Runs every fuzz target of mvm-vmm (its virtio devices' guest-facing parsers, and the API's
# HTTP parser and router) for N seconds each (default 30: the CI smoke run) on its corpus
# directory, and fails if any target finds a crash.
# Needs cargo-fuzz and a nightly toolchain:
#   rustup toolchain install nightly && cargo install cargo-fuzz
# or, with no nightly at hand, the stable toolchain unlocked for -Z flags:
#   RUSTC_BOOTSTRAP=1 MVM_FUZZ_TOOLCHAIN=stable vmm/fuzz/run-fuzz.sh
# Usage: vmm/fuzz/run-fuzz.sh [seconds-per-target] [target...]
set -euo pipefail
cd "$(dirname "$0")"
toolchain="${MVM_FUZZ_TOOLCHAIN:-nightly}"
seconds="${1:-30}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(chain block net vsock balloon api)
mkdir -p logs
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    log="logs/$target.log"
    echo "== $target: ${seconds}s"
    if ! cargo "+$toolchain" fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len=70000 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FAIL $target: see vmm/fuzz/$log and vmm/fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E "^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)" "$log" || true
done
