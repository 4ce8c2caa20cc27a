#!/bin/sh
# /init of the L1 initramfs built by tests/nested/run.sh: runs inside QEMU TCG (-cpu max,
# emulated AMD SVM), loads Debian's kvm modules for a real /dev/kvm, runs the inner test driver
# and powers off. Everything goes to the serial console, where run.sh collects the
# `nested: ` lines; `nested: EXIT <status>` is the driver's exit status.
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
# Cgroups as on a fresh Debian 12 host: only cgroup2, at /sys/fs/cgroup, with the controllers
# systemd delegates enabled in the root's cgroup.subtree_control. The vm-tier suite runs on
# cgroup v2 here; the host's cargo tests cover v1.
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
for controller in cpuset cpu io memory pids; do
    if grep -qw "$controller" /sys/fs/cgroup/cgroup.controllers; then
        echo "+$controller" > /sys/fs/cgroup/cgroup.subtree_control
    fi
done
echo "nested: INFO L1 cgroup v2 controllers enabled: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
echo "nested: INFO L1 userspace $(cut -d' ' -f1 /proc/uptime) s after its kernel started"

finish() {
    echo "nested: EXIT $1"
    poweroff -f
    sleep 60
}

start=$(cut -d' ' -f1 /proc/uptime)
while read -r module; do
    if ! insmod "/lib/modules/$module"; then
        echo "nested: FAIL l1-kvm: insmod $module failed:"
        dmesg | tail -n 20 | sed 's/^/    /'
        finish 1
    fi
done < /lib/modules/load-order
if [ ! -c /dev/kvm ]; then
    echo "nested: FAIL l1-kvm: /dev/kvm is missing after loading $(tr '\n' ' ' < /lib/modules/load-order)"
    dmesg | grep -iE 'kvm|svm' | sed 's/^/    /'
    finish 1
fi
echo "nested: INFO /dev/kvm ready; modules loaded from $start s to $(cut -d' ' -f1 /proc/uptime) s of L1 uptime"
dmesg | grep -E 'kvm|SVM|Nested' | sed 's/^/nested: INFO L1 dmesg: /'

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
/mvm/bin/mvm-nested --assets /mvm --mode nested "$@"
finish $?
