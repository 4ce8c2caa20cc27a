#!/usr/bin/env bash
# The `vm`-tier test suite of mvm, in one command, on any x86_64 Linux host.
#
# Where /dev/kvm is hardware KVM, the inner test driver (tests/nested/driver, `mvm-nested`) runs
# directly. Where it is not (no VT-x/SVM: /sys/module/kvm_pvm, or no /dev/kvm), the driver runs
# inside a QEMU TCG guest ("L1": -cpu max emulates AMD SVM, Debian's kvm_amd gives a genuine
# /dev/kvm there), and mvm-vmm boots its micro-VMs ("L2") on that. One QEMU boot runs every test.
#
# Steps: install missing packages (apt: busybox-static cpio iproute2 nftables e2fsprogs containerd; for QEMU
# also qemu-system-x86 linux-image-amd64); build mvm-vmm, mvm-jailer, mvm-agent, mvmd, mvm, the shim and
# mvm-nested; build the guest kernel (guest-kernel/build.sh, plus tests/nested/kernel-initrd.config
# when the project kernel lacks those options), the rootfs (rootfs/build.sh) and the micro-VM
# initramfs; in QEMU mode build the L1 initramfs (busybox, the kvm, tun, veth and nf_tables
# modules of the installed Debian kernel, ip/nft/mkfs.ext4/containerd/ctr with their libraries, the assets) and
# boot it under a timeout, streaming the console (L1 has a user-mode NIC whose two forwarded ports
# the e2b case uses). While the driver runs, a watcher on the console runs the e2b Python SDK
# smoke (tests/nested/e2b_smoke.py) on this host when the e2b case asks for it. Prints a per-test
# summary and exits with the inner suite's status (2 for a harness error before any test ran).
#
# Usage: tests/nested/run.sh [--mode auto|nested|direct] [--filter TEXT] [--echo-console]
#                            [--guest-cmdline TEXT] [--timeout SECONDS]
#   --mode           auto (default) picks direct on hardware KVM, nested otherwise
#   --filter TEXT    run only inner tests whose name contains TEXT (or one of TEXT,TEXT,...)
#   --echo-console   show every micro-VM console line (default: only with a failure)
#   --guest-cmdline  extra micro-VM kernel parameters (e.g. noxsave)
#   --timeout S      limit for one QEMU boot of L1 (default 900)
# L1 prints a heartbeat every 15 s: a boot whose console is silent for MVM_NESTED_STALL_S seconds
# (default 60) is taken for a QEMU TCG hang: L1's vCPU state is taken from QEMU's monitor
# (target/nested/l1-state-N.txt), the boot is stopped and the next one (8 at most) runs the tests
# not finished yet. The summary says how many boots the suite took.
# Environment: MVM_ARTIFACTS, MVM_CACHE_DIR as for guest-kernel/build.sh; MVM_NESTED_L1_CMDLINE,
# more L1 kernel parameters; MVM_TEST_PYTHON, the Python with the pinned `e2b` package (default
# scripts/deps.sh's /opt/mvm-test-venv/bin/python); work files go to <repo>/target/nested (the last run's log:
# target/nested/console.log).
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/../.." && pwd)
script_path="$script_dir/$(basename "${BASH_SOURCE[0]}")"
export PATH="$PATH:/sbin:/usr/sbin"

die() { echo "tests/nested/run.sh: error: $*" >&2; exit 2; }
log() { echo "tests/nested/run.sh: $*" >&2; }

mode=auto
timeout_s=900
driver_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --mode) [ $# -ge 2 ] || die "--mode needs auto, nested or direct"; mode=$2; shift 2 ;;
        --filter) [ $# -ge 2 ] || die "--filter needs a text"; driver_args+=(--filter "$2"); shift 2 ;;
        --echo-console) driver_args+=(--echo-console); shift ;;
        --guest-cmdline) [ $# -ge 2 ] || die "--guest-cmdline needs a text"; driver_args+=(--extra-cmdline "$2"); shift 2 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_s=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$script_path" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ "$timeout_s" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds, got '$timeout_s'"

# --- Where to run ---------------------------------------------------------------------------------
hardware_kvm() {
    [ -e /sys/module/kvm_pvm ] && return 1
    [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]
}
case "$mode" in
    auto)
        if hardware_kvm; then mode=direct; else mode=nested; fi ;;
    direct)
        hardware_kvm || die "--mode direct needs hardware KVM: /dev/kvm is $( [ -e /sys/module/kvm_pvm ] \
            && echo 'the kvm_pvm module (no VT-x/SVM)' || echo 'missing or not accessible')" ;;
    nested) ;;
    *) die "--mode must be auto, nested or direct, got '$mode'" ;;
esac
log "mode: $mode ($( [ "$mode" = direct ] && echo 'hardware KVM, no QEMU' \
    || echo 'QEMU TCG L1 with emulated SVM; times are not hardware figures'))"

# --- Packages -------------------------------------------------------------------------------------
packages=(busybox-static cpio)
# The sandbox manager's host helpers (ip -batch, nft, mkfs.ext4); in QEMU mode they are copied
# into L1 with their shared libraries.
packages+=(iproute2 nftables e2fsprogs)
# containerd and ctr for the shim's vm tier; CNI plugins for its CRI case's pod network, protoc
# for the CRI client the driver links.
packages+=(containerd containernetworking-plugins protobuf-compiler)
# python3 picks free ports for QEMU's forwards (the e2b SDK smoke uses scripts/deps.sh's venv).
packages+=(python3)
[ "$mode" = nested ] && packages+=(qemu-system-x86 linux-image-amd64)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing packages: ${missing[*]}; install them with:
    sudo apt-get install -y --no-install-recommends ${missing[*]}"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
fi
busybox=/bin/busybox
[ -x "$busybox" ] && ! readelf -lW "$busybox" | grep -q 'Requesting program interpreter' \
    || die "$busybox is not the static busybox of busybox-static"

# --- Binaries -------------------------------------------------------------------------------------
log "building mvm-vmm, mvm-jailer, mvm-agent, mvm-dns, mvm-egress, mvmd, mvm, containerd-shim-mvm-v2, mvm-nested and mvm-udp-echo"
(cd "$repo_root" && cargo build -p vmm --bin mvm-vmm -p jailer --bin mvm-jailer -p agent --bin mvm-agent \
    -p mvm-sandbox --bin mvm-dns --bin mvm-egress -p api --bin mvmd -p cli --bin mvm -p shim --bin containerd-shim-mvm-v2 \
    -p mvm-nested-driver --bin mvm-nested -p mvm-testkit --bin mvm-udp-echo) || die "cargo build failed"
bin_dir="${CARGO_TARGET_DIR:-$repo_root/target}/x86_64-unknown-linux-gnu/debug"
binaries=(mvm-vmm mvm-jailer mvm-agent mvm-dns mvm-egress mvmd mvm containerd-shim-mvm-v2 mvm-nested mvm-udp-echo)
for b in "${binaries[@]}"; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b was not built"
    if readelf -lW "$bin_dir/$b" | grep -q 'Requesting program interpreter'; then
        die "$bin_dir/$b is dynamically linked; the harness copies binaries alone (check .cargo/config.toml)"
    fi
done

# --- Guest kernel ---------------------------------------------------------------------------------
artifacts=${MVM_ARTIFACTS:-$repo_root/target/mvm-artifacts}
mapfile -t images < <("$repo_root/guest-kernel/build.sh")
[ "${#images[@]}" -eq 2 ] || die "guest-kernel/build.sh did not print the vmlinux and bzImage paths"
vmlinux=${images[0]}
bzimage=${images[1]}
extra_fragment="$script_dir/kernel-initrd.config"
lacking=$(grep -E '^CONFIG_' "$extra_fragment" | while read -r opt; do
    grep -qx "$opt" "$artifacts/kernel.config" || echo "$opt"; done)
if [ -n "$lacking" ]; then
    # The project kernel cannot take an initrd. Build it once more with the same script and its
    # fragment plus ours (cached by guest-kernel/build.sh under its own key), in a directory that
    # holds a link to the script and the merged fragment.
    log "the project kernel lacks $(echo $lacking); building a harness variant with them"
    variant_src="$repo_root/target/nested/kernel-variant"
    mkdir -p "$variant_src"
    ln -sfn "$repo_root/guest-kernel/build.sh" "$variant_src/build.sh"
    cat "$repo_root/guest-kernel/mvm.config" "$extra_fragment" > "$variant_src/mvm.config.tmp.$$"
    mv -f "$variant_src/mvm.config.tmp.$$" "$variant_src/mvm.config"
    mapfile -t images < <(MVM_ARTIFACTS="$variant_src/out" "$variant_src/build.sh")
    [ "${#images[@]}" -eq 2 ] || die "the harness kernel variant did not build"
    vmlinux=${images[0]}
    bzimage=${images[1]}
fi

# --- Assets: what the inner driver needs, in the layout it expects --------------------------------
work="$repo_root/target/nested"
assets="$work/assets"
rm -rf "$assets" "$work/guest-root" "$work/l1-root"
mkdir -p "$assets/bin" "$assets/guest"
# Debug info is dropped (symbols stay, so backtraces name functions): it would more than double
# what QEMU loads and L1 unpacks.
for b in "${binaries[@]}"; do
    objcopy --strip-debug "$bin_dir/$b" "$assets/bin/$b" || die "objcopy --strip-debug $bin_dir/$b failed"
done
cp "$vmlinux" "$assets/guest/vmlinux"
cp "$bzimage" "$assets/guest/bzImage"
printf '%s\n' "${driver_args[@]}" > "$assets/driver-args"
"$repo_root/rootfs/build.sh" --agent "$bin_dir/mvm-agent" --output "$assets/guest/rootfs.ext4" >/dev/null \
    || die "rootfs/build.sh failed"

# A newc cpio entry for /dev/console (char 5:1), so that init has a console without mknod (and
# without root): the kernel unpacks concatenated archives in order.
console_node_cpio() {
    local name="dev/console"
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        1 $((8#20600)) 0 0 1 0 0 0 0 5 1 $((${#name} + 1)) 0
    printf '%s\0' "$name"
    # 110-byte header + name + NUL, padded to a multiple of 4.
    local pad=$(( (4 - (110 + ${#name} + 1) % 4) % 4 ))
    head -c "$pad" /dev/zero
}
# <root dir> <output>: the tree as a newc archive owned by root, plus /dev/console.
make_initramfs() {
    local root=$1 out=$2
    mkdir -p "$root/dev"
    { (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
        && console_node_cpio && printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0\0\0\0' \
        0 0 0 0 1 0 0 0 0 0 0 11 0 'TRAILER!!!'; } > "$out"
}

guest_root="$work/guest-root"
mkdir -p "$guest_root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,tmp}
cp "$busybox" "$guest_root/bin/busybox"
ln -s busybox "$guest_root/bin/sh"
cp "$script_dir/guest-init.sh" "$guest_root/init"
make_initramfs "$guest_root" "$assets/guest/initrd.cpio"
log "micro-VM initramfs: $(du -h "$assets/guest/initrd.cpio" | cut -f1)"

summary() { # <console log> <status>: the result lines again, failures last, then the verdict
    local console=$1 status=$2
    echo
    echo "=== mvm vm-tier suite ($mode) ==="
    # Failures last, next to the verdict, so a log cut short in the middle still shows them.
    grep -E '^nested: (PASS|SKIP|BENCH) |^nested: INFO L1 boot' "$console" | sed 's/^nested: /  /' || true
    grep -E '^nested: FAIL ' "$console" | sed 's/^nested: /  /' || true
    grep -m1 -E '^nested: INFO L1 alive .*lost UART interrupt' "$console" | sed 's/^nested: /  /' || true
    local kind counts=()
    for kind in PASS FAIL SKIP; do
        counts+=("$(grep -cE "^nested: $kind " "$console" || true)")
    done
    echo "  ${counts[0]} passed, ${counts[1]} failed, ${counts[2]} skipped"
    echo "  exit status $status; full log: $console"
}

# --- The e2b SDK smoke on this host ---------------------------------------------------------------
# The case e2b-sdk-vm-tier starts an mvmd of the vm tier and prints
# `nested: E2B-READY <api port> <verdict port> <token>`; the official e2b Python SDK (pinned, in
# scripts/deps.sh's venv; L1 has no Python) then drives it from here through tests/nested/e2b_smoke.py,
# which sends its verdict to the verdict port. Both are ports of this host's 127.0.0.1 (in nested
# mode QEMU forwards them to L1). Without a verdict the case fails.
e2b_python=${MVM_TEST_PYTHON:-/opt/mvm-test-venv/bin/python}
e2b_log="$work/e2b-smoke.log"
e2b_watch() { # <pid> <console offset>: until <pid> ends, runs the smoke for each E2B-READY line
    local line api verdict token url
    tail --pid="$1" -c +$(($2 + 1)) -f "$console" | while IFS= read -r line; do
        [[ "$line" == "nested: E2B-READY "* ]] || continue
        read -r api verdict token <<< "${line#nested: E2B-READY }"
        url="http://127.0.0.1:$api/e2b"
        log "E2B-READY: the e2b SDK smoke against $url (its log: $e2b_log)"
        if [ ! -x "$e2b_python" ]; then
            printf 'verdict fail\n%s is missing: run scripts/deps.sh (or set MVM_TEST_PYTHON)\n' \
                "$e2b_python" 2>/dev/null > "/dev/tcp/127.0.0.1/$verdict" \
                || log "cannot send the e2b verdict to 127.0.0.1:$verdict"
            continue
        fi
        env -i PATH=/usr/local/bin:/usr/bin:/bin E2B_API_URL="$url" E2B_SANDBOX_URL="$url" \
            E2B_API_KEY="$token" "$e2b_python" "$script_dir/e2b_smoke.py" "127.0.0.1:$verdict" \
            < /dev/null >> "$e2b_log" 2>&1 || log "the e2b SDK smoke exited with status $? (its log: $e2b_log)"
    done
}
: > "$e2b_log"

# --- Direct: run the driver on this host ----------------------------------------------------------
if [ "$mode" = direct ]; then
    console="$work/console.log"
    : > "$console"
    set +e
    "$assets/bin/mvm-nested" --assets "$assets" --mode direct "${driver_args[@]}" > >(tee -a "$console") &
    driver=$!
    e2b_watch "$driver" 0 &
    watcher=$!
    wait "$driver"
    status=$?
    wait "$watcher"
    set -e
    summary "$console" "$status"
    exit "$status"
fi

# --- Nested: the L1 initramfs ---------------------------------------------------------------------
l1_kernel=$(ls -1 /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n1)
[ -n "$l1_kernel" ] || die "no /boot/vmlinuz-*-amd64: install linux-image-amd64"
l1_release=${l1_kernel#/boot/vmlinuz-}
moddir=/lib/modules/$l1_release
[ -f "$moddir/modules.dep" ] || die "$moddir/modules.dep is missing (linux-image-$l1_release incomplete?)"
[ -r "$l1_kernel" ] || die "$l1_kernel is not readable (run as root)"

l1_root="$work/l1-root"
mkdir -p "$l1_root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,lib/modules}
cp "$busybox" "$l1_root/bin/busybox"
ln -s busybox "$l1_root/bin/sh"
cp "$script_dir/l1-init.sh" "$l1_root/init"
cp -a "$assets" "$l1_root/mvm"

# The sandbox manager's host helpers and containerd, with their shared libraries and the
# dynamic loader.
copy_with_libs() { # <binary> <directory in L1>
    mkdir -p "$l1_root$2"
    cp -L "$1" "$l1_root$2/"
    for lib in $(ldd "$1" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
        mkdir -p "$l1_root$(dirname "$lib")"
        cp -L "$lib" "$l1_root$lib"
    done
}
for tool in ip tc nft mkfs.ext4 containerd ctr; do
    path=$(command -v "$tool") || die "$tool is missing (apt packages iproute2 nftables e2fsprogs containerd)"
    copy_with_libs "$path" /usr/local/sbin
done
# The CNI plugins of the CRI case's pod network (containerd's CRI plugin runs them from
# /usr/lib/cni).
for plugin in ptp host-local loopback; do
    [ -x "/usr/lib/cni/$plugin" ] || die "/usr/lib/cni/$plugin is missing (apt package containernetworking-plugins)"
    copy_with_libs "/usr/lib/cni/$plugin" /usr/lib/cni
done
mkdir -p "$l1_root/etc"
[ ! -f /etc/mke2fs.conf ] || cp /etc/mke2fs.conf "$l1_root/etc/"
# A host's /etc/hosts and /etc/resolv.conf (containerd's CRI copies both into every pod
# sandbox); L1 has no nameserver: names resolve only where a test gives its own upstream.
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' > "$l1_root/etc/hosts"
: > "$l1_root/etc/resolv.conf"

# Modules with their dependencies (modules.dep lists a module's dependencies so that loading
# them last-to-first works), decompressed, as busybox insmod wants: kvm-amd; tun and veth for
# taps and sandbox links; nf_tables with what the manager's rulesets use (NAT masquerade,
# conntrack state, reject, fib for the host guard's `fib daddr type local`). crc32c_generic
# is libcrc32c's soft dependency (modules.softdep), which modules.dep does not list. l1-init loads them in `load-order`. The tc ingress qdisc,
# u32 filter and mirred action that join a VM to a pod's network namespace are only unpacked
# (`on-demand-tc`): the containerd case loads them just before it needs them, since with them
# loaded from boot a console-flooding micro-VM made L1 hang under QEMU TCG (5 runs of 5; 0 of 3
# without).
module_path() { # <name>: path relative to $moddir, from modules.dep
    grep -E "(^|/)$1\.ko(\.xz|\.zst|\.gz)?:" "$moddir/modules.dep" | head -n1 | cut -d: -f1
}
unpack_module() { # <name> <list>: the module and its dependencies, each listed once in <list>
    local top deps rel plain
    top=$(module_path "$1")
    [ -n "$top" ] || die "$moddir/modules.dep has no $1 module"
    deps=$(grep -E "^$top:" "$moddir/modules.dep" | cut -d: -f2)
    for rel in $(echo $deps | tr ' ' '\n' | tac) "$top"; do
        plain=$(basename "$rel" | sed -E 's/\.(xz|zst|gz)$//')
        grep -qx "$plain" "$l1_root"/lib/modules/{load-order,on-demand-*} && continue
        case "$rel" in
            *.xz) xz -dc "$moddir/$rel" ;;
            *.zst) zstd -qdc "$moddir/$rel" ;;
            *.gz) gzip -dc "$moddir/$rel" ;;
            *) cat "$moddir/$rel" ;;
        esac > "$l1_root/lib/modules/$plain" || die "cannot unpack $moddir/$rel"
        echo "$plain" >> "$l1_root/lib/modules/$2"
    done
}
: > "$l1_root/lib/modules/load-order"
: > "$l1_root/lib/modules/on-demand-tc"
: > "$l1_root/lib/modules/on-demand-net"
for want in kvm-amd tun veth crc32c_generic nf_tables nft_chain_nat nft_masq nft_nat nft_ct nft_reject_inet \
    nft_fib_inet; do
    unpack_module "$want" load-order
done
for want in sch_ingress cls_u32 act_mirred; do
    unpack_module "$want" on-demand-tc
done
# virtio-net for L1's user-mode NIC, loaded only by the case that uses it (e2b-sdk-vm-tier).
for want in virtio_pci virtio_net; do
    unpack_module "$want" on-demand-net
done
l1_initrd="$work/l1-initrd.cpio"
make_initramfs "$l1_root" "$l1_initrd"
log "L1: kernel $l1_kernel, initramfs $(du -h "$l1_initrd" | cut -f1) (modules: $(tr '\n' ' ' < "$l1_root/lib/modules/load-order"))"

# --- Nested: QEMU boots of L1 run the inner suite ---------------------------------------------------
# One boot runs every test, on ONE L1 vCPU: with two, L1 locks up now and then (a soft lockup in
# kvm_destroy_vm -> smp_call_function_many_cond when an mvm-vmm exits: the other vCPU never
# answers the IPI, by all signs while QEMU's SVM emulation runs a micro-VM on it), and one vCPU
# is as fast for this sequential suite. Should L1 still fail, that is an emulator fault, not a
# result: a boot that ends without the driver's verdict, stays silent for $stall_s s, or is not
# in userspace within $boot_limit_s s is stopped, says so, and the next boot runs the tests not
# finished yet, the interrupted one included; a test that failed stays failed. Eight such
# boots fail the suite. The console goes through `sed -u` (line-buffered): a block-buffered
# filter there holds back up to 4 KiB and makes a busy L1 look silent.
console="$work/console.log"
: > "$console"
# l1-init.sh's heartbeat prints every 15 s, whatever the driver does: 60 s of silence is a hang.
stall_s=${MVM_NESTED_STALL_S:-60}
max_boots=8
# L1 reaches userspace in 3-7 s; a boot not there by then has hung.
boot_limit_s=90
[[ "$stall_s" =~ ^[1-9][0-9]*$ ]] || die "MVM_NESTED_STALL_S must be a positive number of seconds"
# softlockup_panic ends a boot that locks up at once (L1 then ends without a verdict);
# unknown_nmi_panic makes the NMI that l1_state sends a hung L1 print a backtrace.
# printk.*: l1-init.sh writes its lines through /dev/kmsg (see there), unthrottled and unstamped.
# nohz=off highres=off: L1's tick is the local APIC timer in periodic mode, which QEMU re-fires
# by itself every 4 ms. Now and then QEMU TCG loses the wake-up of L1's halted vCPU for an
# interrupt it has raised (the APIC holds it in IRR; seen under console floods, which make many
# micro-VM exits); with the default one-shot tick, re-armed only by its own interrupt, L1 then
# slept for good. With a periodic tick the next one wakes it.
# MVM_NESTED_L1_CMDLINE adds parameters (for experiments).
base_cmdline="console=ttyS0 panic=-1 softlockup_panic=1 unknown_nmi_panic quiet printk.devkmsg=on"
base_cmdline+=" printk.time=0 nohz=off highres=off${MVM_NESTED_L1_CMDLINE:+ $MVM_NESTED_L1_CMDLINE}"

# QEMU's human monitor on two FIFOs, <monitor>.in and <monitor>.out (QEMU opens both read-write,
# and so does l1_state, so that no open blocks, not even once QEMU has gone).
monitor="$work/qemu-monitor"

l1_state() { # <boot number> <timeout pid>: at a hang, L1's vCPU as QEMU sees it ($work/l1-state-<boot>.txt)
    local boot=$1 qemu out="$work/l1-state-$1.txt" reader to_qemu size waited woke=0
    qemu=$(pgrep -P "$2" | head -n1 || true)
    : > "$out"
    cat 0<>"$monitor.out" >> "$out" &
    reader=$!
    exec {to_qemu}<>"$monitor.in"
    { echo "=== $(date +%T): QEMU's threads, then L1's vCPU"; ps -L -o tid,stat,time,comm -p "${qemu:-0}"; } \
        >> "$out" 2>&1 || true
    printf 'info registers -a\ninfo lapic\ninfo pic\nx/8i $pc\n' >&"$to_qemu"
    sleep 2
    echo "nested: INFO L1 boot $boot at the hang (QEMU monitor; all of it in $out):" | tee -a "$console"
    grep -aE '^(RIP=|LVTT[[:space:]]|IRR|ISR)' "$out" | sed 's/^/nested: INFO   /' | tee -a "$console" || true
    # Any new interrupt makes QEMU look at the local APIC again: if L1 then goes on, it was
    # halted on an interrupt QEMU had raised but lost the wake-up for.
    size=$(stat -c %s "$console")
    echo "=== $(date +%T): sendkey" >> "$out"
    printf 'sendkey shift\n' >&"$to_qemu"
    for waited in 1 2 3 4 5 6 7 8 9 10; do
        sleep 1
        if [ "$(stat -c %s "$console")" != "$size" ]; then woke=$waited; break; fi
    done
    if [ "$woke" -gt 0 ]; then
        echo "nested: INFO L1 boot $boot woke up ${woke} s after a keyboard interrupt: QEMU had lost the" \
            "wake-up of its halted vCPU" | tee -a "$console"
    else
        # With unknown_nmi_panic, a kernel that still takes NMIs panics with a backtrace.
        echo "=== $(date +%T): nmi" >> "$out"
        printf 'nmi\n' >&"$to_qemu"
        sleep 10
        echo "nested: INFO L1 boot $boot did not wake up at a keyboard interrupt; an NMI followed" | tee -a "$console"
    fi
    exec {to_qemu}>&-
    kill "$reader" 2>/dev/null || true
}

# <n>: n distinct TCP ports of 127.0.0.1 that nothing listens on now.
free_ports() {
    python3 -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

boot_l1() { # <boot number> <tests to leave out, comma-separated>: sets boot_status
    local boot=$1 skip=$2 cmdline=$base_cmdline start=$SECONDS
    [ -z "$skip" ] || cmdline+=" mvm.skip=$skip"
    # L1's user-mode NIC (QEMU's slirp; `restrict=on`: L1 reaches neither L0 nor the outside):
    # two free ports of L0's 127.0.0.1 forwarded to the same ports of L1 (10.0.2.15, set up by
    # the case that uses them, e2b-sdk-vm-tier), named on L1's command line (mvm.l0ports=).
    local l0_ports forwards="" port
    l0_ports=$(free_ports 2) || die "python3 could not pick free ports"
    for port in $l0_ports; do forwards+=",hostfwd=tcp:127.0.0.1:$port-:$port"; done
    cmdline+=" mvm.l0ports=${l0_ports// /,}"
    log "boot $boot of L1 (timeout ${timeout_s} s, silence limit ${stall_s} s); console follows"
    local offset size=-1 changed=$SECONDS now up=0 runner watcher
    offset=$(stat -c %s "$console")
    rm -f "$monitor.in" "$monitor.out"
    mkfifo "$monitor.in" "$monitor.out"
    # $! is timeout(1) itself, which passes a SIGTERM on to QEMU.
    timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
        -accel tcg,thread=multi -cpu max -m 4G -smp 1 -nographic -no-reboot \
        -kernel "$l1_kernel" -initrd "$l1_initrd" -append "$cmdline" \
        -netdev "user,id=n0,restrict=on$forwards" -device virtio-net-pci,netdev=n0 \
        -chardev pipe,id=monitor,path="$monitor" -mon chardev=monitor,mode=readline < /dev/null \
        > >(sed -u 's/\r$//' | tee -a "$console") 2>&1 &
    runner=$!
    e2b_watch "$runner" "$offset" &
    watcher=$!
    while kill -0 "$runner" 2>/dev/null; do
        sleep 5
        now=$(stat -c %s "$console")
        if [ "$up" -eq 0 ] && grep -qa 'nested: INFO L1 userspace' <(tail -c +$((offset + 1)) "$console"); then
            up=1
        fi
        if [ "$up" -eq 0 ] && [ $((SECONDS - start)) -ge "$boot_limit_s" ]; then
            echo "nested: INFO L1 boot $boot did not reach userspace within ${boot_limit_s} s (QEMU TCG hang); stopping it" \
                | tee -a "$console"
            kill -TERM "$runner" 2>/dev/null || true
            break
        elif [ "$now" != "$size" ]; then
            size=$now
            changed=$SECONDS
        elif [ $((SECONDS - changed)) -ge "$stall_s" ]; then
            echo "nested: INFO L1 boot $boot printed nothing for ${stall_s} s (QEMU TCG hang); stopping it" \
                | tee -a "$console"
            l1_state "$boot" "$runner"
            kill -TERM "$runner" 2>/dev/null || true
            break
        fi
    done
    set +e
    wait "$runner"
    boot_status=$?
    wait "$watcher"
    set -e
    sleep 1 # the console pipe drains
    echo "nested: BENCH QEMU start -> L1 end (boot $boot) = $((SECONDS - start)) s [nested TCG, not hardware]" >> "$console"
}

finished() { # whether a boot's driver reported its end (a boot runs only when the ones before did not)
    grep -qE '^nested: EXIT [0-9]+$' "$console"
}

boot=1
boot_l1 "$boot" ""
while ! finished && [ "$boot" -lt "$max_boots" ]; do
    interrupted=$( (grep -E '^nested: RUN ' "$console" || true) | tail -n1 | sed 's/^nested: RUN //')
    done_tests=$( (grep -E '^nested: (PASS|FAIL|SKIP) ' "$console" || true) \
        | sed -E 's/^nested: [A-Z]+ ([^ :]+).*/\1/' | paste -sd, -)
    echo "nested: INFO L1 boot $boot ended (status $boot_status) during ${interrupted:-start-up} without the" \
        "driver's verdict; boot $((boot + 1)) runs the tests not finished" | tee -a "$console"
    boot=$((boot + 1))
    boot_l1 "$boot" "$done_tests"
done
status=$(sed -n 's/^nested: EXIT \([0-9][0-9]*\)$/\1/p' "$console" | tail -n1)
if ! finished; then
    echo "nested: FAIL harness: L1 did not finish in $max_boots boots (QEMU status $boot_status; timeout ${timeout_s} s, silence limit ${stall_s} s)" \
        | tee -a "$console"
    status=1
elif grep -qE '^nested: FAIL ' "$console"; then
    status=1
fi
echo "nested: INFO L1 boots: $boot of $max_boots (1 when no boot was lost to a QEMU TCG hang)" | tee -a "$console"
summary "$console" "${status:-1}"
exit "${status:-1}"
