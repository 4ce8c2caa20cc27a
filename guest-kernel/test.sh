#!/usr/bin/env bash
# Boot test for the mvm guest kernel, runnable on any x86_64 Linux host (no KVM needed).
#
# Builds (or takes from the cache) the kernel with guest-kernel/build.sh, checks the images'
# boot headers (64-bit ELF vmlinux with a PVH entry note, bzImage with a 64-bit entry point),
# then boots each image under QEMU TCG on the `microvm` machine: virtio-mmio devices announced on
# the kernel command line, as mvm's VMM announces them. The root file system is a base image from
# rootfs/build.sh on virtio-blk (read-only) and a second disk is a writable layer from
# `rootfs/build.sh --writable-layer`. The guest's init, a busybox script, checks the drivers,
# file systems and overlay set-up from inside, prints a marker and reboots; the host then checks
# what the guest wrote into the writable layer. A last boot runs the real base image (busybox +
# mvm-agent as init) with a writable layer and waits for the agent to listen on vsock.
#
# Usage: guest-kernel/test.sh [--agent PATH]
#   --agent PATH  static mvm-agent for the agent boot (default: rootfs/build.sh's default, the
#                 workspace's mvm-agent, built when absent)
# Prints the wall time from QEMU start to the userspace marker (TCG: emulated, not hardware
# figures) and the guest's own uptime at that point.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)
export PATH="$PATH:/sbin:/usr/sbin"
readonly BOOT_TIMEOUT_S=90

die() { echo "guest-kernel/test.sh: error: $*" >&2; exit 1; }

agent_args=()
case "${1:-}" in
    --agent) [ $# -eq 2 ] || die "usage: $0 [--agent PATH]"; agent_args=(--agent "$2") ;;
    "") ;;
    *) die "usage: $0 [--agent PATH]" ;;
esac

if ! command -v qemu-system-x86_64 >/dev/null; then
    [ "$(id -u)" -eq 0 ] || die "qemu-system-x86_64 is missing; install it with: sudo apt-get install -y qemu-system-x86"
    echo "installing qemu-system-x86" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 >/dev/null \
        || die "apt-get install qemu-system-x86 failed"
fi
command -v readelf >/dev/null || die "readelf is missing; install it with: sudo apt-get install -y binutils"

work=$(mktemp -d "${TMPDIR:-/tmp}/mvm-kernel-test.XXXXXX")
trap 'rm -rf "$work"' EXIT

failures=0
pass() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi; }

# --- Kernel images --------------------------------------------------------------------------------
build_start=$EPOCHREALTIME
mapfile -t images < <("$script_dir/build.sh")
[ "${#images[@]}" -eq 2 ] || die "guest-kernel/build.sh did not print the vmlinux and bzImage paths"
vmlinux=${images[0]}
bzimage=${images[1]}
printf '  kernel build or cache lookup: %.1f s\n' "$(echo "$EPOCHREALTIME - $build_start" | bc)"
config="$(dirname "$vmlinux")/kernel.config"

echo "# image headers"
elf_header=$(readelf -hW "$vmlinux")
check "vmlinux is a 64-bit ELF executable for x86-64" \
    sh -c 'echo "$1" | grep -q "Class: *ELF64" && echo "$1" | grep -q "Type: *EXEC" && echo "$1" | grep -q "Machine: *Advanced Micro Devices X86-64"' _ "$elf_header"
entry=$(echo "$elf_header" | sed -n 's/^ *Entry point address: *//p')
physical_start=$(sed -n 's/^CONFIG_PHYSICAL_START=//p' "$config")
check "vmlinux entry $entry is the physical load address CONFIG_PHYSICAL_START=$physical_start" \
    [ "$((entry))" -eq "$((physical_start))" ]
# XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH entry point, present because CONFIG_PVH=y.
check "vmlinux carries the PVH entry note (Xen note type 0x12)" \
    sh -c 'readelf -nW "$1" | grep -Eq "^ *Xen +0x[0-9a-f]+[[:space:]]+.*\(0x00000012\)"' _ "$vmlinux"
check "CONFIG_PVH=y in the kernel config" grep -qx 'CONFIG_PVH=y' "$config"
# Linux boot protocol header: "HdrS" at 0x202, xloadflags at 0x236 with XLF_KERNEL_64 (bit 0).
check "bzImage has the Linux boot protocol header (HdrS)" \
    [ "$(dd if="$bzimage" bs=1 skip=$((0x202)) count=4 status=none)" = HdrS ]
xloadflags=$(od -An -tu2 -j $((0x236)) -N2 "$bzimage" | tr -d ' ')
check "bzImage advertises a 64-bit entry point (XLF_KERNEL_64)" [ $((xloadflags & 1)) -eq 1 ]
protocol=$(od -An -tx2 -j $((0x206)) -N2 "$bzimage" | tr -d ' ')
echo "  vmlinux: $(stat -c %s "$vmlinux") bytes; bzImage: $(stat -c %s "$bzimage") bytes, boot protocol 0x$protocol"

# --- Disk images ----------------------------------------------------------------------------------
# The guest's init for this test; the base image's own /sbin/init (the agent) is bypassed with
# init=, so busybox stands in for the agent binary. Each check prints one MVM-CHECK line.
# GUEST_CHECKS counts the `try` calls below (the driver loop makes three).
readonly GUEST_CHECKS=14
cat > "$work/init" <<'EOF'
#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
say() { echo "MVM-CHECK $1 $2"; }
try() { name=$1; shift; if "$@" >/dev/null 2>&1; then say "$name" ok; else say "$name" FAIL; fi; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "MVM-READY uptime=$(cut -d' ' -f1 /proc/uptime) release=$(uname -r)"
want_cpus=$(sed -n 's/.*mvmtest.cpus=\([0-9]*\).*/\1/p' /proc/cmdline)
try crng-ready sh -c 'dmesg | grep -q "random: crng init done"'
try root-is-ext4-read-only sh -c 'grep -q "^/dev/root / ext4 ro," /proc/mounts'
try devtmpfs-mounted sh -c 'grep -q "^devtmpfs /dev devtmpfs" /proc/mounts && [ -b /dev/vda ] && [ -c /dev/console ]'
try cpus-online [ "$(grep -c ^processor /proc/cpuinfo)" = "$want_cpus" ]
for driver in virtio_blk virtio_net vmw_vsock_virtio_transport; do
    try "driver-$driver" [ -d "/sys/bus/virtio/drivers/$driver" ]
done
# The carrier comes up asynchronously after `ip link set up`: give it up to 5 s.
try virtio-net-eth0-up sh -c 'ip link set lo up && ip link set eth0 up && for i in $(seq 50); do
    [ "$(cat /sys/class/net/eth0/operstate)" = up ] && exit 0; sleep 0.1; done; exit 1'
try loopback-ping ping -c 1 -W 2 127.0.0.1
try devpts-ptmx sh -c 'mkdir -p /dev/pts && mount -t devpts devpts /dev/pts && [ -c /dev/pts/ptmx ]'
try cgroup2-mount sh -c 'mount -t cgroup2 cgroup2 /sys/fs/cgroup && [ -f /sys/fs/cgroup/cgroup.procs ]'
try tmpfs-rw sh -c 'mount -t tmpfs tmpfs /run && echo t > /run/t && [ "$(cat /run/t)" = t ]'
try overlay-on-tmpfs sh -c 'mkdir /run/u /run/w /run/m &&
    mount -t overlay overlay -o lowerdir=/,upperdir=/run/u,workdir=/run/w /run/m &&
    echo via-tmpfs > /run/m/etc/mvm-tmpfs && [ "$(cat /run/u/etc/mvm-tmpfs)" = via-tmpfs ] &&
    [ ! -e /etc/mvm-tmpfs ] && umount /run/m'
try writable-layer-overlay sh -c 'dev=$(findfs LABEL=mvm-upper) && mount -t ext4 "$dev" /mnt &&
    mkdir /mnt/upper /mnt/work &&
    mount -t overlay overlay -o lowerdir=/,upperdir=/mnt/upper,workdir=/mnt/work /overlay &&
    echo written-through-overlay > /overlay/etc/mvm-written && [ ! -e /etc/mvm-written ] &&
    umount /overlay && umount /mnt'
echo MVM-DONE
sync
reboot -f
EOF

echo "# disk images"
"$repo_root/rootfs/build.sh" --agent /bin/busybox --output "$work/rootfs.ext4" > /dev/null 2> "$work/rootfs.log" \
    || { cat "$work/rootfs.log" >&2; die "rootfs/build.sh failed"; }
debugfs -w -R "write $work/init /mvm-kernel-test" "$work/rootfs.ext4" > /dev/null 2>&1
debugfs -w -R "sif /mvm-kernel-test mode 0100755" "$work/rootfs.ext4" > /dev/null 2>&1
check "test init installed in the base image" \
    sh -c 'debugfs -R "stat /mvm-kernel-test" "$1" 2>/dev/null | grep -q "Mode:  0755"' _ "$work/rootfs.ext4"
check "base image still fsck-clean" e2fsck -fn "$work/rootfs.ext4"

# --- Boots ----------------------------------------------------------------------------------------
# boot <name> <kernel image> <vcpus>
boot() {
    local name=$1 kernel=$2 cpus=$3 log="$work/$1.log" upper="$work/$1-upper.ext4"
    local start line ready_at="" ready_line="" done_seen=false rc checks_ok=0 checks_bad=0
    echo "# boot $name under QEMU TCG (microvm, $cpus vCPUs)"
    "$repo_root/rootfs/build.sh" --writable-layer "$upper" --size 16 > /dev/null 2>> "$work/rootfs.log" \
        || { cat "$work/rootfs.log" >&2; die "rootfs/build.sh --writable-layer failed"; }
    start=$EPOCHREALTIME
    set +e
    timeout --kill-after=5 "$BOOT_TIMEOUT_S" qemu-system-x86_64 \
        -M microvm,acpi=off -accel tcg -cpu max -m 256 -smp "$cpus" \
        -nographic -no-reboot -nodefaults -serial stdio \
        -kernel "$kernel" \
        -append "console=ttyS0 noxsave reboot=t panic=-1 root=/dev/vda ro init=/mvm-kernel-test mvmtest.cpus=$cpus" \
        -drive id=root,file="$work/rootfs.ext4",format=raw,if=none,readonly=on \
        -device virtio-blk-device,drive=root \
        -drive id=upper,file="$upper",format=raw,if=none \
        -device virtio-blk-device,drive=upper \
        -netdev user,id=net0,restrict=on -device virtio-net-device,netdev=net0 \
        < /dev/null 2>&1 | while IFS= read -r line; do
            line=${line%$'\r'}
            printf '%s\n' "$line" >> "$log"
            case "$line" in
                MVM-READY*) printf '%s %s\n' "$(echo "$EPOCHREALTIME - $start" | bc)" "$line" > "$work/$name.ready" ;;
            esac
        done
    rc=${PIPESTATUS[0]}
    set -e
    local wall
    wall=$(echo "$EPOCHREALTIME - $start" | bc)

    if [ "$rc" -eq 0 ]; then pass "$name: QEMU exited cleanly after the guest rebooted"
    else fail "$name: QEMU exit status $rc (124: no reboot within ${BOOT_TIMEOUT_S}s)"; fi
    if [ -f "$work/$name.ready" ]; then
        read -r ready_at ready_line < "$work/$name.ready"
        pass "$name: reached userspace ($ready_line)"
    else
        fail "$name: the guest never ran its init"
    fi
    grep -qx MVM-DONE "$log" && done_seen=true
    check "$name: init ran to completion" $done_seen
    while read -r _ check_name result; do
        if [ "$result" = ok ]; then pass "$name: guest check $check_name"; checks_ok=$((checks_ok + 1))
        else fail "$name: guest check $check_name"; checks_bad=$((checks_bad + 1)); fi
    done < <(grep '^MVM-CHECK ' "$log")
    check "$name: the guest reported all $GUEST_CHECKS checks" [ $((checks_ok + checks_bad)) -eq "$GUEST_CHECKS" ]
    check "$name: the write through the overlay landed in the writable layer's upper dir" \
        sh -c '[ "$(debugfs -R "cat /upper/etc/mvm-written" "$1" 2>/dev/null)" = written-through-overlay ]' _ "$upper"
    check "$name: writable layer fsck-clean after the guest used it" e2fsck -fn "$upper"
    if [ -n "$ready_at" ]; then
        printf '  %s: QEMU start -> userspace marker %.2f s wall (TCG), guest uptime %s; whole run %.2f s\n' \
            "$name" "$ready_at" "$(echo "$ready_line" | sed -n 's/.*uptime=\([0-9.]*\).*/\1/p') s" "$wall"
    fi
    if [ "$failures" -ne 0 ]; then
        echo "---- $name console (last 60 lines) ----"; tail -n 60 "$log"; echo "----"
    fi
}

# The production pairing: the base image with mvm-agent as /sbin/init, its overlay upper layer on
# a second disk. No vsock device here (QEMU's needs the host's vhost-vsock), so the check ends
# when the agent reports its listening socket; talking to it is the nested harness's job.
boot_agent() {
    local log="$work/agent.log" image="$work/agent-rootfs.ext4" upper="$work/agent-upper.ext4"
    local start qemu_pid ready_at="" now
    echo "# boot vmlinux with the mvm-agent base image as init"
    "$repo_root/rootfs/build.sh" "${agent_args[@]}" --output "$image" > /dev/null 2>> "$work/rootfs.log" \
        || { cat "$work/rootfs.log" >&2; die "rootfs/build.sh failed for the agent image"; }
    "$repo_root/rootfs/build.sh" --writable-layer "$upper" --size 32 > /dev/null 2>> "$work/rootfs.log" \
        || { cat "$work/rootfs.log" >&2; die "rootfs/build.sh --writable-layer failed"; }
    start=$EPOCHREALTIME
    qemu-system-x86_64 -M microvm,acpi=off -accel tcg -cpu max -m 256 -smp 2 \
        -nographic -no-reboot -nodefaults -serial stdio -kernel "$vmlinux" \
        -append "console=ttyS0 noxsave reboot=t panic=-1 root=/dev/vda ro mvm.overlay=/dev/vdb mvm.hostname=mvm-test" \
        -drive id=root,file="$image",format=raw,if=none,readonly=on -device virtio-blk-device,drive=root \
        -drive id=upper,file="$upper",format=raw,if=none -device virtio-blk-device,drive=upper \
        -netdev user,id=net0,restrict=on -device virtio-net-device,netdev=net0 \
        < /dev/null > "$log" 2>&1 &
    qemu_pid=$!
    while kill -0 "$qemu_pid" 2>/dev/null; do
        now=$(echo "$EPOCHREALTIME - $start" | bc)
        if grep -q 'mvm-agent: .*listening on vsock' "$log"; then ready_at=$now; break; fi
        [ "$(echo "$now > $BOOT_TIMEOUT_S" | bc)" -eq 0 ] || break
        sleep 0.05
    done
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    if [ -n "$ready_at" ]; then
        pass "agent: mvm-agent is PID 1 and listening on vsock ($(grep -o 'agent [0-9.]* listening on vsock:[0-9]*' "$log" | head -n1))"
        printf '  agent: QEMU start -> agent listening %.2f s wall (TCG)\n' "$ready_at"
    else
        fail "agent: mvm-agent did not report listening on vsock within ${BOOT_TIMEOUT_S}s"
    fi
    check "agent: no kernel panic" sh -c '! grep -q "Kernel panic" "$1"' _ "$log"
    # The guest is stopped without a shutdown (that needs vsock), so its writes to the layer may
    # still be in its page cache: the kernel's mount message is the evidence, not the disk.
    check "agent: mounted the writable layer (mvm.overlay=/dev/vdb) before listening" \
        sh -c 'sed -n "1,/listening on vsock/p" "$1" | grep -q "EXT4-fs (vdb): mounted filesystem"' _ "$log"
    if [ "$failures" -ne 0 ]; then
        echo "---- agent boot console (last 60 lines) ----"; tail -n 60 "$log"; echo "----"
    fi
}

boot bzImage "$bzimage" 2
boot vmlinux-pvh "$vmlinux" 1
boot_agent

echo
if [ "$failures" -ne 0 ]; then echo "guest-kernel/test.sh: $failures check(s) failed"; exit 1; fi
echo "guest-kernel/test.sh: all checks passed"
