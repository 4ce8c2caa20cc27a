#!/bin/sh
# /init of the L1 initramfs built by tests/nested/run.sh: runs inside QEMU TCG (-cpu max,
# emulated AMD SVM), loads Debian's kvm modules for a real /dev/kvm, runs the inner test driver
# and powers off. Everything goes to the serial console, where run.sh collects the
# `nested: ` lines; `nested: EXIT <status>` is the driver's exit status.
#
# Output goes through the kernel's log (/dev/kmsg), not the tty: the kernel console writes the
# UART by polling, while a tty write waits for the UART's transmit interrupt, and QEMU TCG's SVM
# emulation loses an interrupt now and then while a micro-VM runs (the two-vCPU IPI lockup noted
# in run.sh is another). A lost transmit interrupt leaves the tty stuck for good: L1 goes on, but
# every later line, and with it the driver writing them, waits forever. A heartbeat every
# $heartbeat_s s says L1 is alive and whether a one-byte tty write still completes.
export PATH=/usr/local/sbin:/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s

# The initramfs is the kernel's rootfs, which pivot_root(2) cannot leave (EINVAL), and the
# jailer pivots. Move everything to a tmpfs and make that the root first.
if [ ! -e /.on-tmpfs ]; then
    mkdir -p /newroot
    mount -t tmpfs -o size=90% tmpfs /newroot
    for entry in /*; do
        case "$entry" in /newroot|/proc|/sys|/dev) ;; *) cp -a "$entry" /newroot/ ;; esac
    done
    mkdir -p /newroot/proc /newroot/sys /newroot/dev
    touch /newroot/.on-tmpfs
    exec switch_root /newroot /init
fi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# /run as on any host (`ip netns add` keeps its namespaces in /run/netns).
mkdir -p /run
mount -t tmpfs -o mode=0755 tmpfs /run
# Loopback up, as on any host: 127.0.0.1 exists only then (published ports are tested on it).
ip link set lo up

# say LINE...: one line to the console through the kernel log (<1>: printed even with `quiet`;
# run.sh passes printk.devkmsg=on printk.time=0, so lines are neither rate-limited nor stamped).
say() {
    printf '<1>%s\n' "$*" > /dev/kmsg
}
# relay: stdin to the console, line by line as it comes (no filter that buffers); /dev/kmsg
# takes at most 1 KiB per record, so long lines go in pieces of 250 characters.
relay() {
    while IFS= read -r line || [ -n "$line" ]; do
        while [ "${#line}" -gt 250 ]; do
            say "${line:0:250}"
            line=${line:250}
        done
        say "$line"
    done
}
heartbeat_s=15
heartbeat() {
    beat=0
    while sleep "$heartbeat_s"; do
        beat=$((beat + 1))
        if [ -e /tmp/tty-probe ]; then
            tty="a one-byte tty write has been waiting since heartbeat $(cat /tmp/tty-probe) (lost UART interrupt)"
        else
            tty="tty writes complete"
            echo "$beat" > /tmp/tty-probe
            (printf '\n' > /dev/ttyS0 && rm -f /tmp/tty-probe) &
        fi
        say "nested: INFO L1 alive at $(cut -d' ' -f1 /proc/uptime) s; $tty"
    done
}
heartbeat &
# Cgroups as on a fresh Debian 12 host: only cgroup2, at /sys/fs/cgroup, with the controllers
# systemd delegates enabled in the root's cgroup.subtree_control. The vm-tier suite runs on
# cgroup v2 here; the host's cargo tests cover v1.
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
for controller in cpuset cpu io memory pids; do
    if grep -qw "$controller" /sys/fs/cgroup/cgroup.controllers; then
        echo "+$controller" > /sys/fs/cgroup/cgroup.subtree_control
    fi
done
say "nested: INFO L1 cgroup v2 controllers enabled: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
say "nested: INFO L1 userspace $(cut -d' ' -f1 /proc/uptime) s after its kernel started"

finish() {
    say "nested: EXIT $1"
    poweroff -f
    sleep 60
}

start=$(cut -d' ' -f1 /proc/uptime)
while read -r module; do
    if ! insmod "/lib/modules/$module"; then
        say "nested: FAIL l1-kvm: insmod $module failed:"
        dmesg | tail -n 20 | sed 's/^/    /' | relay
        finish 1
    fi
done < /lib/modules/load-order
if [ ! -c /dev/kvm ]; then
    say "nested: FAIL l1-kvm: /dev/kvm is missing after loading $(tr '\n' ' ' < /lib/modules/load-order)"
    dmesg | grep -iE 'kvm|svm' | sed 's/^/    /' | relay
    finish 1
fi
# The tick (Tick Device mode 0: periodic, 1: one-shot; a clock event device's mode 2: periodic,
# 3: one-shot), see run.sh.
say "nested: INFO L1 tick: $(grep -E '^(Tick Device: mode|Clock Event Device| mode:)' /proc/timer_list \
    | tr -s ' ' | paste -sd' ')"
say "nested: INFO /dev/kvm ready; modules loaded from $start s to $(cut -d' ' -f1 /proc/uptime) s of L1 uptime"
# (Without this script's own lines, which are in the kernel log too.)
dmesg | grep -v 'nested: ' | grep -E 'kvm|SVM|Nested' | sed 's/^/nested: INFO L1 dmesg: /' | relay

# One driver argument per line (values may contain spaces): split on newlines only.
IFS='
'
# shellcheck disable=SC2046
set -- $(cat /mvm/driver-args)
unset IFS
# A second boot after an L1 hang leaves out the tests the first one finished (run.sh passes
# their names as mvm.skip=a,b,c).
skip=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^mvm\.skip=//p')
if [ -n "$skip" ]; then
    set -- "$@" --skip "$skip"
fi
# The ports QEMU forwards from L0 to L1's user-mode NIC (run.sh passes them as mvm.l0ports=a,b).
l0ports=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^mvm\.l0ports=//p')
if [ -n "$l0ports" ]; then
    set -- "$@" --l0-ports "$l0ports"
fi
# The driver's status survives the pipe through a file (busybox sh has no pipefail).
{ /mvm/bin/mvm-nested --assets /mvm --mode nested "$@" 2>&1; echo $? > /tmp/driver-status; } | relay
finish "$(cat /tmp/driver-status)"

