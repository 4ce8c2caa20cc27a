#!/usr/bin/env bash
# Build the mvm guest kernel (x86_64 `vmlinux` + `bzImage`) from Debian's linux-source-6.1.
#
# The configuration is `tinyconfig` plus guest-kernel/mvm.config, merged with
# scripts/kconfig/merge_config.sh (allnoconfig fill) and normalised with `make olddefconfig`;
# the build fails if any option of the fragment did not survive. Results are cached under
#   ${MVM_CACHE_DIR:-/var/cache/mvm}/kernel/<hash>/
# where <hash> covers the source package version, the fragment, this script and the compiler
# version, then copied to ${MVM_ARTIFACTS:-<repo>/target/mvm-artifacts}/{vmlinux,bzImage}.
#
# Usage: guest-kernel/build.sh [--jobs N] [--force] [--keep-tree]
#   --jobs N      parallel make jobs (default: number of CPUs)
#   --force       rebuild even if the cache holds this configuration
#   --keep-tree   keep the configured source tree (<hash>/linux) for inspection or rebuilds
set -euo pipefail

readonly SRC_PKG=linux-source-6.1
readonly SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
readonly BUILD_DEPS=(linux-source-6.1 flex bison libelf-dev bc build-essential xz-utils)

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)
fragment="$script_dir/mvm.config"
script_path="$script_dir/$(basename "${BASH_SOURCE[0]}")"

die() { echo "guest-kernel/build.sh: error: $*" >&2; exit 1; }
log() { echo "guest-kernel/build.sh: $*" >&2; }

jobs=$(nproc)
force=false
keep_tree=false
while [ $# -gt 0 ]; do
    case "$1" in
        --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; jobs=$2; shift 2 ;;
        --jobs=*) jobs=${1#--jobs=}; shift ;;
        --force) force=true; shift ;;
        --keep-tree) keep_tree=true; shift ;;
        -h|--help) sed -n '2,/^set /s/^# \{0,1\}//p' "$script_path"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$jobs'"
[ -f "$fragment" ] || die "config fragment $fragment is missing"

# --- Build dependencies -----------------------------------------------------------------------
missing_deps() {
    local missing=()
    dpkg-query -W -f='${Status}' "$SRC_PKG" 2>/dev/null | grep -q 'install ok installed' \
        && [ -f "$SRC_TARBALL" ] || missing+=("$SRC_PKG")
    for tool in flex:flex bison:bison bc:bc make:build-essential gcc:build-essential xz:xz-utils; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
    done
    [ -f /usr/include/gelf.h ] || missing+=(libelf-dev)
    printf '%s\n' "${missing[@]}" | sort -u | grep -v '^$' || true
}
mapfile -t missing_pkgs < <(missing_deps)
if [ "${#missing_pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        die "missing build dependencies: ${missing_pkgs[*]}; install them with:
    sudo apt-get install -y ${BUILD_DEPS[*]}"
    fi
    log "installing missing build dependencies: ${missing_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing_pkgs[@]}" >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing_pkgs[@]}" >/dev/null; } \
        || die "apt-get install ${missing_pkgs[*]} failed"
    [ -z "$(missing_deps)" ] || die "still missing after apt-get install: $(missing_deps | tr '\n' ' ')"
fi

# --- Cache key ----------------------------------------------------------------------------------
src_version=$(dpkg-query -W -f='${Version}' "$SRC_PKG")
cc_version=$(gcc --version | head -n1)
key=$( {
    echo "source $SRC_PKG $src_version"
    echo "compiler $cc_version"
    echo "--- fragment"; cat "$fragment"
    echo "--- script"; cat "$script_path"
} | sha256sum | cut -c1-16)

cache_root=${MVM_CACHE_DIR:-/var/cache/mvm}
if ! mkdir -p "$cache_root/kernel" 2>/dev/null || [ ! -w "$cache_root/kernel" ]; then
    fallback="${XDG_CACHE_HOME:-$HOME/.cache}/mvm"
    log "cache dir $cache_root is not writable; using $fallback (set MVM_CACHE_DIR to choose)"
    cache_root=$fallback
    mkdir -p "$cache_root/kernel" || die "cannot create cache dir $cache_root/kernel"
fi
cache_dir="$cache_root/kernel/$key"
artifacts=${MVM_ARTIFACTS:-$repo_root/target/mvm-artifacts}
mkdir -p "$artifacts" || die "cannot create artifacts dir $artifacts"

# One builder per configuration; a second invocation waits and then finds the cache warm.
exec 9>"$cache_root/kernel/.$key.lock"
flock 9

# --- Configure and build (cache miss) ---------------------------------------------------------
verify_config() { # <.config> <fragment>: every fragment line must hold in the final .config
    local config=$1 frag=$2 bad=0 line sym want have
    while IFS= read -r line; do
        if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym=${BASH_REMATCH[1]}; want=${BASH_REMATCH[2]}
        elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym=${BASH_REMATCH[1]}; want=n
        else
            continue
        fi
        have=$(sed -n "s/^$sym=//p" "$config")
        [ -n "$have" ] || have=n
        if [ "$have" != "$want" ]; then
            echo "  $sym: fragment wants '$want', final .config has '$have'" >&2
            bad=1
        fi
    done < "$frag"
    return $bad
}

if $force || [ ! -f "$cache_dir/vmlinux" ] || [ ! -f "$cache_dir/bzImage" ]; then
    work="$cache_root/kernel/$key.work"
    rm -rf "$work" "$cache_dir"
    mkdir -p "$work"
    start=$(date +%s)
    log "building $SRC_PKG $src_version with $(basename "$fragment") (key $key, -j$jobs) in $work"
    tree="$work/linux"
    mkdir -p "$tree"
    tar -xJf "$SRC_TARBALL" -C "$tree" --strip-components=1 || die "cannot extract $SRC_TARBALL"
    # Reproducible-build inputs: no host name, user or wall-clock time in the image.
    export ARCH=x86_64 KBUILD_BUILD_TIMESTAMP="Thu Jan  1 00:00:00 UTC 1970" \
        KBUILD_BUILD_USER=mvm KBUILD_BUILD_HOST=mvm KBUILD_BUILD_VERSION=1
    (
        cd "$tree"
        # Kconfig reports every symbol a fragment overrides; keep that in a log for diagnosis.
        { make tinyconfig && scripts/kconfig/merge_config.sh -n .config "$fragment" \
            && make olddefconfig; } > "$work/config.log" 2>&1
    ) || { tail -n 30 "$work/config.log" >&2; die "kernel configuration failed; full log: $work/config.log"; }
    if ! verify_config "$tree/.config" "$fragment"; then
        die "options of $fragment did not survive merge_config.sh + olddefconfig (missing
dependency or a symbol renamed in $src_version); see $work/config.log and $tree/.config"
    fi
    log "configuration verified: all $(grep -cE '^(CONFIG_|# CONFIG_)' "$fragment") fragment options hold"
    make -C "$tree" -s -j"$jobs" vmlinux bzImage > "$work/make.log" 2>&1 \
        || { tail -n 40 "$work/make.log" >&2; die "kernel build failed; full log: $work/make.log"; }
    end=$(date +%s)

    out="$cache_dir.partial"
    rm -rf "$out"; mkdir -p "$out"
    cp "$tree/vmlinux" "$tree/arch/x86/boot/bzImage" "$out/"
    cp "$tree/.config" "$out/config"
    cp "$tree/System.map" "$out/"
    cat > "$out/build-info" <<EOF
source=$SRC_PKG $src_version
compiler=$cc_version
kernel_release=$(cat "$tree/include/config/kernel.release")
jobs=$jobs
build_seconds=$((end - start))
vmlinux_bytes=$(stat -c %s "$out/vmlinux")
bzImage_bytes=$(stat -c %s "$out/bzImage")
EOF
    mv "$out" "$cache_dir"
    if $keep_tree; then
        mv "$tree" "$cache_dir/linux"
    fi
    rm -rf "$work"
    log "built in $((end - start)) s"
else
    log "cache hit: $cache_dir"
fi

cp -f "$cache_dir/vmlinux" "$artifacts/vmlinux.tmp.$$" && mv -f "$artifacts/vmlinux.tmp.$$" "$artifacts/vmlinux"
cp -f "$cache_dir/bzImage" "$artifacts/bzImage.tmp.$$" && mv -f "$artifacts/bzImage.tmp.$$" "$artifacts/bzImage"
cp -f "$cache_dir/config" "$artifacts/kernel.config"
sed 's/^/  /' "$cache_dir/build-info" >&2
echo "$artifacts/vmlinux"
echo "$artifacts/bzImage"
