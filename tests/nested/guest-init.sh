#!/bin/sh
# /init of the micro-VM initramfs built by tests/nested/run.sh (busybox only).
# The kernel hands unknown `key=value` command-line parameters to init as environment
# variables; `mvmtest=<case>` selects what this guest does for the inner test driver:
#   hello  report facts as `mvm-guest: <key>=<value>` lines, then reset the machine (reboot=k)
#   panic  exit, so the kernel panics ("Attempted to kill init")
#   idle   report uname -r, then start nothing and sleep forever
#   blk    /dev/vda: the project's rootfs, read-only (mount it, try to write it);
#          /dev/vdb: a scratch disk whose first MiB is copied to its second MiB; then reset
#   net    address eth0 ($mvmip), ping the host ($mvmpeer), announce net-ready, wait
#   flood  write $mvmfloodlines numbered lines to the console as fast as it takes them, then
#          announce flood-done and reset
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "mvm-guest: userspace uptime=$(cut -d' ' -f1 /proc/uptime)"
case "${mvmtest:-}" in
    hello)
        echo "mvm-guest: uname-r=$(uname -r)"
        echo "mvm-guest: cpus=$(grep -c '^processor' /proc/cpuinfo)"
        echo "mvm-guest: online=$(cat /sys/devices/system/cpu/online)"
        echo "mvm-guest: xsave=$(grep -m1 '^flags' /proc/cpuinfo | grep -cw xsave)"
        reboot -f
        ;;
    panic)
        echo "mvm-guest: init exits"
        exit 7
        ;;
    idle)
        echo "mvm-guest: uname-r=$(uname -r)"
        echo "mvm-guest: idle"
        while :; do sleep 3600; done
        ;;
    blk)
        mkdir -p /mnt
        if mount -t ext4 -o ro /dev/vda /mnt; then
            if [ -x /mnt/usr/bin/mvm-agent ] && [ -x /mnt/bin/busybox ]; then
                echo "mvm-guest: rootfs=ok"
            else
                echo "mvm-guest: rootfs=incomplete"
            fi
            umount /mnt
        else
            echo "mvm-guest: rootfs=unmountable"
        fi
        if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; then
            echo "mvm-guest: ro-write=accepted"
        else
            echo "mvm-guest: ro-write=refused"
        fi
        if dd if=/dev/vdb of=/dev/vdb bs=65536 count=16 seek=16 conv=fsync 2>/dev/null; then
            echo "mvm-guest: copy=ok"
        else
            echo "mvm-guest: copy=failed"
        fi
        reboot -f
        ;;
    net)
        ip link set lo up
        ip addr add "${mvmip:?}" dev eth0 && ip link set eth0 up
        if ping -c 3 -W 5 "${mvmpeer:?}" >/dev/null; then
            echo "mvm-guest: ping-host=ok"
        else
            echo "mvm-guest: ping-host=failed"
        fi
        echo "mvm-guest: net-ready"
        sleep 120
        reboot -f
        ;;
    flood)
        echo "mvm-guest: flood start"
        awk -v n="${mvmfloodlines:?}" 'BEGIN { for (i = 0; i < n; i++) printf "mvm-flood %06d\n", i }'
        echo "mvm-guest: flood-done lines=$mvmfloodlines"
        reboot -f
        ;;
    *)
        echo "mvm-guest: unknown mvmtest='${mvmtest:-}'"
        reboot -f
        ;;
esac
