#!/usr/bin/env bash
# Installs what building and testing l4lb needs on a fresh Debian machine:
# the C toolchain pieces xsk-rs (libxdp/libbpf built from source) and the XDP
# program need, and the tools the netns harness uses. Idempotent: packages
# already present are not reinstalled.
set -euo pipefail

# gcc: libxdp's configure (xsk-rs builds it) insists on it, and rustc links
# with `cc`. llvm: libxdp's `llc`. clang brings libc6-dev (with the kernel
# headers build.rs needs for asm/types.h) and binutils.
PKGS=(
    gcc clang llvm libelf-dev zlib1g-dev libpcap-dev m4 make pkg-config  # xsk-rs, build.rs
    iproute2 ethtool procps                                             # netns harness (ip, ethtool, sysctl)
    iputils-ping                                                        # netns tests: a server pings the host
)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
    if [[ ${EUID} -ne 0 ]]; then
        echo "install-deps: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in cargo gcc clang llc ip ethtool sysctl ping; do
    command -v "$tool" >/dev/null || { echo "install-deps: $tool still missing" >&2; exit 1; }
done
# A minimal rustup profile has neither rustfmt nor clippy: add them to the
# active toolchain (from rustup's own server; nothing else is installed
# outside Debian's packages).
for comp in clippy fmt; do
    cargo "$comp" --version >/dev/null 2>&1 && continue
    if command -v rustup >/dev/null; then
        echo "install-deps: adding the ${comp/fmt/rustfmt} component"
        rustup component add "${comp/fmt/rustfmt}" >/dev/null || true
    fi
    cargo "$comp" --version >/dev/null 2>&1 || {
        echo "install-deps: cargo $comp missing (install Rust with rustup, then: rustup component add ${comp/fmt/rustfmt})" >&2
        exit 1
    }
done
echo "install-deps: ok"
