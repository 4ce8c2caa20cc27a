#!/usr/bin/env bash
# Install mvm so that it runs without this source checkout:
#
#   sudo scripts/install.sh [--prefix DIR] [--bin-dir DIR] [--unit-dir DIR]
#   sudo scripts/install.sh --uninstall [--prefix DIR] [--unit-dir DIR]
#
#   --prefix DIR     installation prefix (default /usr/local)
#   --bin-dir DIR    take the binaries already built in DIR instead of running
#                    `cargo build --release` (e.g. target/x86_64-unknown-linux-gnu/debug)
#   --unit-dir DIR   directory of the systemd unit (default PREFIX/lib/systemd/system; systemd
#                    reads /usr/local/lib/systemd/system and /usr/lib/systemd/system, for
#                    another prefix pass /etc/systemd/system)
#   --uninstall      remove what an install with the same options put there
#   DESTDIR=DIR      stage everything under DIR (for packagers); paths inside the files,
#                    such as the unit's ExecStart, stay those of PREFIX
#
# What goes where (mvm and mvmd find their helpers next to themselves, else in
# PREFIX/libexec/mvm, and `mvm build` finds the builders in PREFIX/share/mvm):
#   PREFIX/bin/             mvm, mvmd, containerd-shim-mvm-v2
#   PREFIX/libexec/mvm/     mvm-jailer, mvm-agent, mvm-vmm, mvm-dns, mvm-egress
#   PREFIX/share/mvm/       rootfs/build.sh, guest-kernel/{build.sh,mvm.config}
#   UNIT_DIR/mvmd.service   mvmd as a systemd service
# Nothing is written outside these: state (/var/lib/mvm, with the images `mvm build` makes in
# /var/lib/mvm/artifacts) and run directories (/run/mvm) are made by mvm when it first runs.
set -euo pipefail

die() { echo "install.sh: error: $*" >&2; exit 1; }
log() { echo "install.sh: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly USER_BINS=(mvm mvmd containerd-shim-mvm-v2)
readonly HELPER_BINS=(mvm-jailer mvm-agent mvm-vmm mvm-dns mvm-egress)
readonly BUILDERS=(rootfs/build.sh guest-kernel/build.sh guest-kernel/mvm.config)

prefix=/usr/local
bin_dir=""
unit_dir=""
uninstall=false
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix|--bin-dir|--unit-dir)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a directory"
            case "$1" in
                --prefix) prefix=$2 ;;
                --bin-dir) bin_dir=$2 ;;
                --unit-dir) unit_dir=$2 ;;
            esac
            shift 2 ;;
        --uninstall) uninstall=true; shift ;;
        -h|--help) sed -n '2,/^set /s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
case "$prefix" in /*) ;; *) die "--prefix must be an absolute path, got '$prefix'" ;; esac
prefix=${prefix%/}
unit_dir=${unit_dir:-$prefix/lib/systemd/system}
case "$unit_dir" in /*) ;; *) die "--unit-dir must be an absolute path, got '$unit_dir'" ;; esac
destdir=${DESTDIR:-}
destdir=${destdir%/}
[ -z "$destdir" ] || case "$destdir" in /*) ;; *) die "DESTDIR must be an absolute path, got '$destdir'" ;; esac

# Installed paths (as the running system sees them; DESTDIR is prepended when writing).
bindir=$prefix/bin
libexecdir=$prefix/libexec/mvm
sharedir=$prefix/share/mvm
unit=$unit_dir/mvmd.service

if $uninstall; then
    for f in "${USER_BINS[@]/#/$bindir/}" "${HELPER_BINS[@]/#/$libexecdir/}" \
             "${BUILDERS[@]/#/$sharedir/}" "$unit"; do
        [ ! -e "$destdir$f" ] || { rm -f "$destdir$f"; log "removed $f"; }
    done
    # Only the directories mvm owns, and only once empty.
    rmdir "$destdir$sharedir/rootfs" "$destdir$sharedir/guest-kernel" "$destdir$sharedir" \
        "$destdir$libexecdir" 2>/dev/null || true
    exit 0
fi

if [ -z "$bin_dir" ]; then
    command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs), or pass --bin-dir with built binaries"
    log "building the release binaries (cargo build --release; several minutes the first time)"
    (cd "$repo" && cargo build --release --locked -p cli -p api -p shim -p jailer -p agent -p vmm -p mvm-sandbox --bins) \
        || die "cargo build --release failed"
    bin_dir=$repo/target/x86_64-unknown-linux-gnu/release
fi
[ -d "$bin_dir" ] || die "--bin-dir $bin_dir is not a directory"
for b in "${USER_BINS[@]}" "${HELPER_BINS[@]}"; do
    [ -f "$bin_dir/$b" ] && [ -x "$bin_dir/$b" ] \
        || die "$bin_dir/$b is missing; build it (cargo build -p cli -p api -p shim -p jailer -p agent -p vmm -p mvm-sandbox --bins) or pass another --bin-dir"
done
for f in "${BUILDERS[@]}"; do
    [ -f "$repo/$f" ] || die "$repo/$f is missing: run install.sh from an mvm source checkout"
done

for b in "${USER_BINS[@]}"; do
    install -D -m 0755 "$bin_dir/$b" "$destdir$bindir/$b"
done
for b in "${HELPER_BINS[@]}"; do
    install -D -m 0755 "$bin_dir/$b" "$destdir$libexecdir/$b"
done
for f in "${BUILDERS[@]}"; do
    mode=0644
    case "$f" in *.sh) mode=0755 ;; esac
    install -D -m "$mode" "$repo/$f" "$destdir$sharedir/$f"
done
install -d -m 0755 "$destdir$unit_dir"
cat > "$destdir$unit.tmp" <<EOF
[Unit]
Description=mvm sandbox daemon (micro-VM and jail sandboxes behind a REST API)
After=network-online.target
Wants=network-online.target

[Service]
# Serves /run/mvm/mvmd.sock; state in /var/lib/mvm. Options (\`mvmd --help\`) go in a drop-in
# (systemctl edit mvmd): an empty "ExecStart=", then e.g. "ExecStart=$bindir/mvmd --tcp 127.0.0.1:7070".
Type=exec
ExecStart=$bindir/mvmd
Restart=on-failure
# Sandboxes live in mvm's own cgroups, outside this unit's, so they outlive a restart of
# mvmd, which adopts them when it starts again.
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
EOF
mv -f "$destdir$unit.tmp" "$destdir$unit"
chmod 0644 "$destdir$unit"

log "installed into ${destdir}${prefix}: bin/{${USER_BINS[*]}}, libexec/mvm/{${HELPER_BINS[*]}}, share/mvm/{rootfs,guest-kernel}; unit ${destdir}${unit}"
if [ -z "$destdir" ]; then
    log "next: $bindir/mvm build --skip-kernel   (the base image, for the jail tier; without --skip-kernel also the guest kernel, ~10 minutes once)"
    log "      $bindir/mvm run --rm -- echo hi   (--isolation jail where the host has no hardware virtualization)"
    [ ! -d /run/systemd/system ] || log "      systemctl daemon-reload && systemctl enable --now mvmd"
fi
