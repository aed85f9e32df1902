#!/usr/bin/env bash
# The full test suite, as CI runs it: installs what it needs, then formatting,
# lints, unit and offline tests, the network-namespace tests (root; they fail,
# never skip, when they cannot set up), and a build of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

if [[ ${EUID} -ne 0 ]]; then
    echo "test.sh: the netns tests need root (network namespaces, XDP); run as root" >&2
    exit 1
fi

# The netns tests tear their topology down when they end, even failing;
# this covers a test binary that is killed or aborts.
trap 'scripts/netns.sh down >/dev/null 2>&1 || true' EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test (unit, offline, netns)"
# Test binaries run one after another; inside tests/netns.rs the tests share
# one topology and serialise themselves.
cargo test
echo "== cargo bench --no-run"
cargo bench --no-run
echo "test.sh: all passed"
