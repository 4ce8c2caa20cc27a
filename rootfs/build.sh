#!/usr/bin/env bash
# Build mvm guest disk images as ext4 files, without root privileges (mkfs.ext4 -d).
#
# Base image (read-only, shared by sandboxes):
#   rootfs/build.sh [--agent PATH] [--from-dir DIR | --from-oci LAYOUT[:TAG]] [--size MiB] [--output PATH]
#     default userland: busybox-static with its applet links and a minimal /etc
#     --agent PATH      static mvm-agent to install as /usr/bin/mvm-agent (and /sbin/init);
#                       default target/x86_64-unknown-linux-gnu/debug/mvm-agent, built with
#                       `cargo build -p agent --bin mvm-agent` when absent
#     --from-dir DIR    use the tree DIR as the userland instead of busybox (DIR is not modified)
#     --from-oci L[:T]  use tag T (default: the layout's only tag, else "latest") of the OCI image
#                       layout L as the userland, unpacked with umoci
#     --size MiB        image size; default: content plus headroom
#     --output PATH     default ${MVM_ARTIFACTS:-<repo>/target/mvm-artifacts}/rootfs.ext4
#
# Per-sandbox writable layer (upper + work dirs of the guest's overlay):
#   rootfs/build.sh --writable-layer PATH --size MiB
#
# Without root the staging tree is built under fakeroot, so the image still holds root-owned
# files: files owned by the invoking user become root's, other owners are kept.
# Determinism: the UUID and directory hash seed are fixed (MVM_ROOTFS_UUID overrides), and the
# mtime/atime of every file this script creates is SOURCE_DATE_EPOCH (default 0). e2fsprogs
# 1.47.0 still stamps inode ctime/crtime and superblock times with the build time.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script_path="$script_dir/$(basename "${BASH_SOURCE[0]}")"
repo_root=$(cd "$script_dir/.." && pwd)

# Set only by this script's own re-execution under fakeroot (which sets FAKEROOTKEY).
[ -n "${FAKEROOTKEY:-}" ] || unset MVM_ROOTFS_IN_FAKEROOT

die() { echo "rootfs/build.sh: error: $*" >&2; exit 1; }
log() { echo "rootfs/build.sh: $*" >&2; }

readonly AGENT_GUEST_PATH=/usr/bin/mvm-agent
readonly MOUNT_POINTS=(proc sys dev tmp run mnt overlay root)
readonly DEFAULT_UUID=6d766d00-0000-4000-8000-726f6f746673  # "mvm" ... "rootfs"
readonly MIN_SIZE_MIB=8

agent=""
from_dir=""
from_oci=""
size_mib=""
output=""
writable_layer=""
while [ $# -gt 0 ]; do
    case "$1" in
        --agent|--from-dir|--from-oci|--size|--output|--writable-layer)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
            case "$1" in
                --agent) agent=$2 ;;
                --from-dir) from_dir=$2 ;;
                --from-oci) from_oci=$2 ;;
                --size) size_mib=$2 ;;
                --output) output=$2 ;;
                --writable-layer) writable_layer=$2 ;;
            esac
            shift 2 ;;
        -h|--help) sed -n '2,/^set /s/^# \{0,1\}//p' "$script_path"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done

if [ -n "$size_mib" ]; then
    [[ "$size_mib" =~ ^[1-9][0-9]*$ ]] || die "--size takes a whole number of MiB, got '$size_mib'"
    [ "$size_mib" -ge "$MIN_SIZE_MIB" ] || die "--size must be at least $MIN_SIZE_MIB MiB, got $size_mib"
fi

# --- Tools --------------------------------------------------------------------------------------
# need <command> <debian package>: install the package when missing and allowed, else explain.
need() {
    command -v "$1" >/dev/null && return 0
    [ -x "/sbin/$1" ] || [ -x "/usr/sbin/$1" ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        log "installing $2 (for $1)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >/dev/null \
            || die "apt-get install $2 failed"
    else
        die "$1 is missing; install it with: sudo apt-get install -y $2"
    fi
}
export PATH="$PATH:/sbin:/usr/sbin"

# Images are written to <output>.tmp.<pid> and renamed into place; failures leave nothing behind.
tmp_image=""
cleanup() { [ -z "$tmp_image" ] || rm -f "$tmp_image"; [ -z "${staging_parent:-}" ] || rm -rf "$staging_parent"; }
trap cleanup EXIT

if [ -n "$writable_layer" ]; then
    [ -z "$agent$from_dir$from_oci$output" ] || die "--writable-layer takes only --size"
    [ -n "$size_mib" ] || die "--writable-layer needs --size MiB"
    need mkfs.ext4 e2fsprogs
    mkdir -p "$(dirname "$writable_layer")" || die "cannot create $(dirname "$writable_layer")"
    tmp_image="$writable_layer.tmp.$$"
    # A random UUID per layer: several sandboxes' layers may be attached to one host at once.
    truncate -s "${size_mib}M" "$tmp_image" || die "cannot create $tmp_image"
    mkfs.ext4 -q -F -t ext4 -L mvm-upper -m 0 -E root_owner=0:0 "$tmp_image" >/dev/null \
        || die "mkfs.ext4 failed for $writable_layer"
    mv -f "$tmp_image" "$writable_layer"; tmp_image=""
    log "writable layer: $writable_layer (${size_mib} MiB, ext4, label mvm-upper)"
    echo "$writable_layer"
    exit 0
fi

[ -z "$from_dir" ] || [ -z "$from_oci" ] || die "--from-dir and --from-oci exclude each other"
output=${output:-${MVM_ARTIFACTS:-$repo_root/target/mvm-artifacts}/rootfs.ext4}

# --- Resolve everything that needs the real user before (maybe) entering fakeroot -----------
if [ -z "${MVM_ROOTFS_IN_FAKEROOT:-}" ]; then
    need mkfs.ext4 e2fsprogs
    need readelf binutils
    if [ -z "$from_dir$from_oci" ]; then
        [ -x /bin/busybox ] && dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' \
            || { [ "$(id -u)" -eq 0 ] || die "busybox-static is missing; install it with: sudo apt-get install -y busybox-static"
                 log "installing busybox-static"
                 DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends busybox-static >/dev/null \
                     || die "apt-get install busybox-static failed"; }
    fi
    [ -z "$from_oci" ] || need umoci umoci
    [ "$(id -u)" -eq 0 ] || need fakeroot fakeroot

    if [ -z "$agent" ]; then
        agent="$repo_root/target/x86_64-unknown-linux-gnu/debug/mvm-agent"
        if [ ! -f "$agent" ]; then
            log "$agent is missing; building it with cargo build -p agent --bin mvm-agent"
            (cd "$repo_root" && cargo build -p agent --bin mvm-agent) \
                || die "building mvm-agent failed; fix the build or pass --agent PATH to a static mvm-agent"
        fi
    fi
    [ -f "$agent" ] && [ -r "$agent" ] || die "agent binary '$agent' does not exist or is unreadable"
    readelf -h "$agent" 2>/dev/null | grep -q 'Machine:.*X86-64' \
        || die "agent '$agent' is not an x86-64 ELF executable"
    if readelf -lW "$agent" | grep -q 'Requesting program interpreter'; then
        die "agent '$agent' is dynamically linked; the guest may have no dynamic loader, build it static (+crt-static)"
    fi
    agent=$(realpath "$agent")
    if [ -n "$from_dir" ]; then
        [ -d "$from_dir" ] || die "--from-dir '$from_dir' is not a directory"
        from_dir=$(realpath "$from_dir")
    fi
    if [ -n "$from_oci" ]; then
        # LAYOUT[:TAG]: the tag follows the last colon, unless the whole argument is the layout.
        layout=$from_oci
        [ -f "$layout/index.json" ] || layout=${from_oci%:*}
        [ -f "$layout/index.json" ] && [ -f "$layout/oci-layout" ] \
            || die "--from-oci '$layout' is not an OCI image layout (no index.json / oci-layout)"
        if [ "$layout" = "$from_oci" ]; then
            mapfile -t tags < <(umoci list --layout "$layout")
            if [ "${#tags[@]}" -eq 1 ]; then tag=${tags[0]}; else tag=latest; fi
        else
            tag=${from_oci##*:}
        fi
        from_oci="$(realpath "$layout"):$tag"
    fi
    mkdir -p "$(dirname "$output")" || die "cannot create $(dirname "$output")"
    output="$(realpath "$(dirname "$output")")/$(basename "$output")"

    if [ "$(id -u)" -ne 0 ]; then
        # Owners only exist inside fakeroot's session: staging, chown and mkfs.ext4 run in one.
        args=(--agent "$agent" --output "$output")
        [ -z "$from_dir" ] || args+=(--from-dir "$from_dir")
        [ -z "$from_oci" ] || args+=(--from-oci "$from_oci")
        [ -z "$size_mib" ] || args+=(--size "$size_mib")
        MVM_ROOTFS_IN_FAKEROOT=$(id -u):$(id -g) exec fakeroot -- "$script_path" "${args[@]}"
    fi
fi

# --- Stage the tree -----------------------------------------------------------------------------
staging_parent=$(mktemp -d "${TMPDIR:-/tmp}/mvm-rootfs.XXXXXX")
staging="$staging_parent/root"
epoch=${SOURCE_DATE_EPOCH:-0}
[[ "$epoch" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be seconds since 1970, got '$epoch'"
created=()  # paths (relative to the image root) this script made; their times are normalised

# Refuse to write through a symlink that leaves the image (e.g. an absolute /sbin -> /usr/sbin).
# Only the parent is resolved: the last component itself is what gets created or replaced.
inside() {
    local resolved
    resolved=$(realpath -m "$staging/$(dirname "$1")")
    case "$resolved" in
        "$staging"|"$staging"/*) ;;
        *) die "/$1 resolves outside the image (through an absolute or escaping symlink): $resolved" ;;
    esac
}
# add_file <guest path> <mode> <content>: create a file unless the userland already has one.
add_file() {
    inside "$1"
    [ -e "$staging/$1" ] || [ -L "$staging/$1" ] && return 0
    printf '%s' "$3" > "$staging/$1"
    chmod "$2" "$staging/$1"
    created+=("$1")
}

if [ -n "$from_dir" ]; then
    log "userland from directory $from_dir"
    mkdir "$staging"
    cp -a "$from_dir/." "$staging/" || die "copying $from_dir failed"
elif [ -n "$from_oci" ]; then
    log "userland from OCI image $from_oci"
    umoci_args=()
    [ -z "${MVM_ROOTFS_IN_FAKEROOT:-}" ] || umoci_args=(--rootless)
    umoci raw unpack "${umoci_args[@]}" --image "$from_oci" "$staging" > "$staging_parent/umoci.log" 2>&1 \
        || { cat "$staging_parent/umoci.log" >&2; die "umoci could not unpack $from_oci"; }
else
    log "userland: busybox-static $(dpkg-query -W -f='${Version}' busybox-static)"
    mkdir -p "$staging"/{bin,sbin,usr/bin,usr/sbin,etc}
    cp /bin/busybox "$staging/bin/busybox"
    chmod 0755 "$staging/bin/busybox"
    while IFS= read -r applet; do
        [ "$applet" = bin/busybox ] || [ -e "$staging/$applet" ] || ln -s /bin/busybox "$staging/$applet"
    done < <(/bin/busybox --list-full)
    add_file etc/passwd 0644 $'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n'
    add_file etc/group 0644 $'root:x:0:\nnogroup:x:65534:\n'
fi

# The parts of the image mvm relies on, whichever userland was chosen.
for dir in "${MOUNT_POINTS[@]}" etc usr/bin sbin; do
    inside "$dir"
    [ -d "$staging/$dir" ] && continue
    [ -e "$staging/$dir" ] && [ ! -L "$staging/$dir" ] && die "/$dir exists in the userland but is not a directory"
    [ -L "$staging/$dir" ] && continue  # a relative link to a directory inside the image
    mkdir -p "$staging/$dir"
    created+=("$dir")
done
chmod 1777 "$staging/tmp"
chmod 0700 "$staging/root"
add_file etc/passwd 0644 $'root:x:0:0:root:/root:/bin/sh\n'
add_file etc/group 0644 $'root:x:0:\n'
add_file etc/hostname 0644 $'mvm\n'
add_file etc/hosts 0644 $'127.0.0.1\tlocalhost\n::1\tlocalhost\n'
add_file etc/resolv.conf 0644 $'# Written by mvm-agent when the sandbox has network egress.\n'

inside "${AGENT_GUEST_PATH#/}"
rm -f "$staging$AGENT_GUEST_PATH"
cp "$agent" "$staging$AGENT_GUEST_PATH"
chmod 0755 "$staging$AGENT_GUEST_PATH"
created+=("${AGENT_GUEST_PATH#/}")
inside sbin/init
rm -f "$staging/sbin/init"
ln -s "$AGENT_GUEST_PATH" "$staging/sbin/init"
created+=(sbin/init)

# Ownership: everything of the default userland is root's; a user's tree keeps its owners
# except those of the invoking (unprivileged) user, which become root's.
if [ -z "$from_dir$from_oci" ]; then
    chown -hR 0:0 "$staging"
else
    for path in "${created[@]}"; do chown -h 0:0 "$staging/$path"; done
    if [ -n "${MVM_ROOTFS_IN_FAKEROOT:-}" ]; then
        find "$staging" -user "${MVM_ROOTFS_IN_FAKEROOT%:*}" -exec chown -h 0 {} +
        find "$staging" -group "${MVM_ROOTFS_IN_FAKEROOT#*:}" -exec chgrp -h 0 {} +
    fi
fi
# Timestamps: all of the default userland, and what this script added to a user's tree.
if [ -z "$from_dir$from_oci" ]; then
    find "$staging" -exec touch -h -d "@$epoch" {} +
else
    for path in "${created[@]}"; do touch -h -d "@$epoch" "$staging/$path"; done
    touch -h -d "@$epoch" "$staging"
fi

# --- Make the file system -----------------------------------------------------------------------
# Size = content * 1.25 + 1 KiB per entry + 8 MiB, unless given.
content_kib=$(du -sk --apparent-size "$staging" | cut -f1)
used_kib=$(du -sk "$staging" | cut -f1)
[ "$used_kib" -gt "$content_kib" ] && content_kib=$used_kib
entries=$(find "$staging" | wc -l)
auto_mib=$(( (content_kib * 5 / 4 + entries + 1023) / 1024 + 8 ))
size_mib=${size_mib:-$auto_mib}
inodes=$(( entries + entries / 2 + 256 ))

uuid=${MVM_ROOTFS_UUID:-$DEFAULT_UUID}
tmp_image="$output.tmp.$$"
rm -f "$tmp_image"
truncate -s "${size_mib}M" "$tmp_image"
# The base image is mounted read-only by every sandbox: no journal, no reserved blocks.
if ! mkfs.ext4 -q -F -t ext4 -N "$inodes" -m 0 -O ^has_journal \
        -L mvm-rootfs -U "$uuid" -E "hash_seed=$uuid,root_owner=0:0" -d "$staging" \
        "$tmp_image" > "$staging_parent/mkfs.err" 2>&1; then
    cat "$staging_parent/mkfs.err" >&2
    die "mkfs.ext4 failed; content is $((content_kib / 1024)) MiB in $entries entries, image size ${size_mib} MiB (try a larger --size, or omit it)"
fi
mv -f "$tmp_image" "$output"; tmp_image=""
log "rootfs: $output (${size_mib} MiB, $entries entries, content $((content_kib / 1024)) MiB, uuid $uuid)"
echo "$output"
