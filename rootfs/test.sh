#!/usr/bin/env bash
# Tests for rootfs/build.sh: builds images and inspects them with e2fsck and debugfs (no mount,
# no root needed for the inspection).
#
# Usage: rootfs/test.sh [--agent PATH]
#   --agent PATH  static binary to install as the agent (default: what build.sh defaults to,
#                 the workspace's mvm-agent, built when absent)
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build="$script_dir/build.sh"
export PATH="$PATH:/sbin:/usr/sbin"

agent_args=()
case "${1:-}" in
    --agent) [ $# -eq 2 ] || { echo "usage: $0 [--agent PATH]" >&2; exit 2; }; agent_args=(--agent "$2") ;;
    "") ;;
    *) echo "usage: $0 [--agent PATH]" >&2; exit 2 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/mvm-rootfs-test.XXXXXX")
chmod 0755 "$work"
trap 'rm -rf "$work"' EXIT

failures=0
pass() { echo "ok   - $*"; }
fail() { echo "FAIL - $*"; failures=$((failures + 1)); }
check() { # check <description> <command...>
    local what=$1; shift
    if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi
}
skip() { echo "SKIP - $*" >&2; echo "skip - $*"; }

# debugfs helpers: every request is one -R command against an image, read-only.
dfs() { debugfs -R "$2" "$1" 2>/dev/null; }
field() { # field <image> <path> <User|Group|Mode|Size|Type>: one value from `stat`
    dfs "$1" "stat \"$2\"" | tr -s ' ' '\n' | awk -v k="$3:" '$0 == k { getline; print; exit }'
}
link_target() { dfs "$1" "stat \"$2\"" | sed -n 's/^Fast link dest: "\(.*\)"$/\1/p'; }
is_type() { [ "$(field "$1" "$2" Type)" = "$3" ]; }
fsck_clean() { e2fsck -fn "$1"; }
file_is() { # file_is <image> <path> <expected content>
    [ "$(dfs "$1" "cat \"$2\"")" = "$3" ]
}
dump_matches() { # dump_matches <image> <path> <host file>: byte-exact copy
    debugfs -R "dump \"$2\" $work/dump" "$1" >/dev/null 2>&1 && cmp -s "$work/dump" "$3"
}
walk_owners() { # walk_owners <image> <dir>: fail if any entry below <dir> is not 0:0
    local mode uid gid name
    while IFS=/ read -r _ _ mode uid gid name _; do
        [ "$name" = . ] || [ "$name" = .. ] || [ -z "$name" ] && continue
        if [ "$uid" != 0 ] || [ "$gid" != 0 ]; then
            echo "  $2$name is owned by $uid:$gid" >&2
            return 1
        fi
        if [ "${mode:0:2}" = 40 ]; then walk_owners "$1" "$2$name/" || return 1; fi
    done < <(dfs "$1" "ls -p \"$2\"")
}

# --- The agent used throughout: the real one unless --agent says otherwise ---------------------
echo "# default image (busybox userland)"
img="$work/rootfs.ext4"
"$build" "${agent_args[@]}" --output "$img" > "$work/build.out" 2> "$work/build.err" \
    || { cat "$work/build.err" >&2; echo "FAIL - rootfs/build.sh failed"; exit 1; }
check "build prints the image path on stdout" [ "$(cat "$work/build.out")" = "$img" ]
if [ ${#agent_args[@]} -eq 2 ]; then agent=${agent_args[1]}; else
    agent="$script_dir/../target/x86_64-unknown-linux-gnu/debug/mvm-agent"; fi
check "e2fsck -fn is clean" fsck_clean "$img"
check "/usr/bin/mvm-agent is a regular file" is_type "$img" /usr/bin/mvm-agent regular
check "/usr/bin/mvm-agent has mode 0755" [ "$(field "$img" /usr/bin/mvm-agent Mode)" = 0755 ]
check "/usr/bin/mvm-agent is byte-identical to $agent" dump_matches "$img" /usr/bin/mvm-agent "$agent"
check "/sbin/init is a symlink to /usr/bin/mvm-agent" [ "$(link_target "$img" /sbin/init)" = /usr/bin/mvm-agent ]
check "/bin/busybox is byte-identical to the host's busybox-static" dump_matches "$img" /bin/busybox /bin/busybox
check "/bin/sh is a busybox applet link" [ "$(link_target "$img" /bin/sh)" = /bin/busybox ]
check "/usr/bin/wc is a busybox applet link" [ "$(link_target "$img" /usr/bin/wc)" = /bin/busybox ]
for dir in proc sys dev tmp run mnt overlay root etc; do
    check "/$dir is a directory" is_type "$img" "/$dir" directory
done
check "/tmp is 1777" [ "$(field "$img" /tmp Mode)" = 01777 ]
check "/etc/hostname is mvm" file_is "$img" /etc/hostname mvm
check "/etc/passwd has root with /bin/sh" file_is "$img" /etc/passwd "$(printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false')"
check "/etc/hosts maps localhost" sh -c "debugfs -R 'cat /etc/hosts' '$img' 2>/dev/null | grep -q '^127.0.0.1.localhost$'"
check "/etc/group is a regular file" is_type "$img" /etc/group regular
check "/etc/resolv.conf is a regular file" is_type "$img" /etc/resolv.conf regular
check "every inode is owned by root" walk_owners "$img" /
check "label and fixed UUID" sh -c "dumpe2fs -h '$img' 2>/dev/null | grep -q '^Filesystem volume name:.*mvm-rootfs' && dumpe2fs -h '$img' 2>/dev/null | grep -q '^Filesystem UUID:.*6d766d00-0000-4000-8000-726f6f746673'"
check "no journal on the read-only base" sh -c "! dumpe2fs -h '$img' 2>/dev/null | grep -q has_journal"
echo "  image size: $(( $(stat -c %s "$img") / 1048576 )) MiB"

# --- Same image built by an unprivileged user (fakeroot) -----------------------------------------
echo "# unprivileged build"
if [ "$(id -u)" -eq 0 ]; then
    unpriv=(setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$work" TMPDIR="$work")
    cp "$agent" "$work/agent"; chmod 0755 "$work/agent"
    chmod 0777 "$work"
    if "${unpriv[@]}" "$build" --agent "$work/agent" --output "$work/unpriv.ext4" > /dev/null 2> "$work/unpriv.err"; then
        pass "build as uid 65534 succeeds"
        check "unprivileged image: e2fsck clean" fsck_clean "$work/unpriv.ext4"
        check "unprivileged image: every inode owned by root" walk_owners "$work/unpriv.ext4" /
        check "unprivileged image: same tree as the root-built one" \
            cmp -s <(dfs "$img" 'ls -l -p /etc' | cut -d/ -f3-) <(dfs "$work/unpriv.ext4" 'ls -l -p /etc' | cut -d/ -f3-)
    else
        cat "$work/unpriv.err" >&2; fail "build as uid 65534 succeeds"
    fi
else
    check "build without root succeeds" "$build" --agent "$agent" --output "$work/unpriv.ext4"
    check "unprivileged image: every inode owned by root" walk_owners "$work/unpriv.ext4" /
fi

# --- --from-dir -----------------------------------------------------------------------------------
echo "# --from-dir"
user="$work/userland"
mkdir -p "$user/etc" "$user/sbin" "$user/opt/app"
echo custom-host > "$user/etc/hostname"
printf 'payload\n' > "$user/opt/app/file with spaces"
printf '#!/bin/sh\necho old init\n' > "$user/sbin/init"
ln -s ../opt/app "$user/etc/app-link"
if [ "$(id -u)" -eq 0 ]; then chown 1234:4321 "$user/opt/app/file with spaces"; fi
before=$(cd "$user" && find . -printf '%p %m %U %G %s %T@\n' | sort)
"$build" "${agent_args[@]}" --from-dir "$user" --output "$work/dir.ext4" > /dev/null 2> "$work/dir.err" \
    || { cat "$work/dir.err" >&2; fail "--from-dir build"; }
check "--from-dir: e2fsck clean" fsck_clean "$work/dir.ext4"
check "--from-dir: the user's /etc/hostname is kept" file_is "$work/dir.ext4" /etc/hostname custom-host
check "--from-dir: a file name with spaces survives" file_is "$work/dir.ext4" "/opt/app/file with spaces" payload
check "--from-dir: /sbin/init now points at the agent" [ "$(link_target "$work/dir.ext4" /sbin/init)" = /usr/bin/mvm-agent ]
check "--from-dir: the agent is installed" dump_matches "$work/dir.ext4" /usr/bin/mvm-agent "$agent"
check "--from-dir: missing mount points are added" is_type "$work/dir.ext4" /proc directory
check "--from-dir: missing /etc/passwd is added" file_is "$work/dir.ext4" /etc/passwd "root:x:0:0:root:/root:/bin/sh"
check "--from-dir: relative symlinks are kept" [ "$(link_target "$work/dir.ext4" /etc/app-link)" = ../opt/app ]
if [ "$(id -u)" -eq 0 ]; then
    check "--from-dir: foreign owners are kept" [ "$(field "$work/dir.ext4" "/opt/app/file with spaces" User)" = 1234 ]
else
    skip "--from-dir owner preservation needs root to chown the fixture"
fi
check "--from-dir: the source directory is unchanged" [ "$(cd "$user" && find . -printf '%p %m %U %G %s %T@\n' | sort)" = "$before" ]

echo "# --from-dir refuses to write through an absolute symlink"
escape="$work/escape"
mkdir -p "$escape/etc"
ln -s "$work/outside" "$escape/usr"
mkdir -p "$work/outside"
if "$build" "${agent_args[@]}" --from-dir "$escape" --output "$work/escape.ext4" > /dev/null 2> "$work/escape.err"; then
    fail "absolute /usr symlink is refused"
else
    check "absolute /usr symlink is refused with a clear error" grep -q 'resolves outside the image' "$work/escape.err"
fi
check "nothing was written outside the image" [ -z "$(ls -A "$work/outside")" ]
check "no image is left behind on failure" [ ! -e "$work/escape.ext4" ]

# --- --from-oci -----------------------------------------------------------------------------------
echo "# --from-oci"
if command -v umoci >/dev/null; then
    layout="$work/oci"
    mkdir -p "$work/layer1/etc" "$work/layer1/usr/share"
    echo hello > "$work/layer1/etc/greeting"
    echo doomed > "$work/layer1/usr/share/deleted-later"
    echo v2 > "$work/layer2-file"
    umoci init --layout "$layout" >/dev/null 2>&1
    umoci new --image "$layout:v1" >/dev/null 2>&1
    umoci insert --image "$layout:v1" "$work/layer1" / >/dev/null 2>&1
    umoci insert --image "$layout:v1" --whiteout /usr/share/deleted-later >/dev/null 2>&1
    umoci insert --image "$layout:v1" "$work/layer2-file" /etc/added >/dev/null 2>&1
    "$build" "${agent_args[@]}" --from-oci "$layout" --output "$work/oci.ext4" > /dev/null 2> "$work/oci.err" \
        || { cat "$work/oci.err" >&2; fail "--from-oci build"; }
    check "--from-oci: e2fsck clean" fsck_clean "$work/oci.ext4"
    check "--from-oci: first layer's file is there" file_is "$work/oci.ext4" /etc/greeting hello
    check "--from-oci: third layer's file is there" file_is "$work/oci.ext4" /etc/added v2
    check "--from-oci: the whiteout deleted its file" sh -c "debugfs -R 'stat /usr/share/deleted-later' '$work/oci.ext4' 2>&1 | grep -q 'File not found'"
    check "--from-oci: the agent is init" [ "$(link_target "$work/oci.ext4" /sbin/init)" = /usr/bin/mvm-agent ]
    check "--from-oci with an explicit tag" "$build" "${agent_args[@]}" --from-oci "$layout:v1" --output "$work/oci-tag.ext4"
    if [ "$(id -u)" -eq 0 ]; then
        chmod -R a+rX "$layout"  # umoci writes index.json 0600
        if "${unpriv[@]}" "$build" --agent "$work/agent" --from-oci "$layout:v1" --output "$work/oci-unpriv.ext4" \
                > /dev/null 2> "$work/oci-unpriv.err"; then
            pass "--from-oci as uid 65534 (umoci --rootless under fakeroot)"
            check "--from-oci unprivileged: e2fsck clean" fsck_clean "$work/oci-unpriv.ext4"
            check "--from-oci unprivileged: every inode owned by root" walk_owners "$work/oci-unpriv.ext4" /
            check "--from-oci unprivileged: whiteout applied" sh -c "debugfs -R 'stat /usr/share/deleted-later' '$work/oci-unpriv.ext4' 2>&1 | grep -q 'File not found'"
        else
            cat "$work/oci-unpriv.err" >&2; fail "--from-oci as uid 65534 (umoci --rootless under fakeroot)"
        fi
    fi
    if "$build" "${agent_args[@]}" --from-oci "$layout:nope" --output "$work/oci2.ext4" > /dev/null 2> "$work/oci2.err"; then
        fail "--from-oci with an unknown tag fails"
    else
        check "--from-oci with an unknown tag fails with umoci's reason" grep -q 'could not unpack' "$work/oci2.err"
    fi
else
    skip "--from-oci: umoci is not installed (apt-get install umoci)"
fi

# --- Writable layer -------------------------------------------------------------------------------
echo "# --writable-layer"
"$build" --writable-layer "$work/upper.ext4" --size 16 > /dev/null 2> "$work/upper.err" \
    || { cat "$work/upper.err" >&2; fail "--writable-layer build"; }
check "writable layer is exactly 16 MiB" [ "$(stat -c %s "$work/upper.ext4")" = $((16 * 1048576)) ]
check "writable layer: e2fsck clean" fsck_clean "$work/upper.ext4"
check "writable layer has a journal and label mvm-upper" sh -c "dumpe2fs -h '$work/upper.ext4' 2>/dev/null | grep -q has_journal && dumpe2fs -h '$work/upper.ext4' 2>/dev/null | grep -q '^Filesystem volume name:.*mvm-upper'"
check "writable layer holds only lost+found" [ "$(dfs "$work/upper.ext4" 'ls -p /' | awk -F/ '$6 != "" && $6 != "." && $6 != ".." { print $6 }')" = lost+found ]

# --- Bad input --------------------------------------------------------------------------------------
echo "# bad input is refused with a reason"
refuses() { # refuses <expected message> <build args...>
    local msg=$1; shift
    if "$build" "$@" > /dev/null 2> "$work/refuse.err"; then return 1; fi
    grep -q -- "$msg" "$work/refuse.err"
}
dynamic=$(command -v ls)
check "a dynamically linked agent is refused" refuses 'dynamically linked' --agent "$dynamic" --output "$work/x.ext4"
check "a missing agent is refused" refuses 'does not exist' --agent "$work/nope" --output "$work/x.ext4"
check "a too small --size is refused" refuses 'at least' --writable-layer "$work/x.ext4" --size 1
check "a non-numeric --size is refused" refuses 'whole number' "${agent_args[@]}" --size 12abc --output "$work/x.ext4"
mkdir -p "$work/big"
head -c $((12 * 1048576)) /dev/urandom > "$work/big/blob"
check "content larger than --size fails with advice" refuses 'try a larger --size' "${agent_args[@]}" --size 8 --from-dir "$work/big" --output "$work/x.ext4"
check "--writable-layer without --size is refused" refuses 'needs --size' --writable-layer "$work/x.ext4"
check "no half-written image is left behind" [ -z "$(find "$work" -maxdepth 1 -name 'x.ext4*')" ]

echo
if [ "$failures" -ne 0 ]; then echo "rootfs/test.sh: $failures check(s) failed"; exit 1; fi
echo "rootfs/test.sh: all checks passed"
