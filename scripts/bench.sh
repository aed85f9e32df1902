#!/usr/bin/env bash
# l4lb's benchmarks. Root required for the end-to-end part.
#
#   scripts/bench.sh [e2e] [OPTIONS]  the end-to-end forwarding benchmark in
#                                     network namespaces (default: 4 runs of
#                                     10 s per case, the cases taking turns,
#                                     about 14 minutes)
#   scripts/bench.sh micro            the criterion micro-benchmarks (pipeline,
#                                     flow table, Maglev), then their table,
#                                     then the per-packet targets' benchmarks
#                                     6 more times and their medians (about
#                                     6 minutes)
#   scripts/bench.sh all [OPTIONS]    both
#   scripts/bench.sh icount           instructions per packet of the pipeline
#                                     benchmark's workloads, counted by
#                                     valgrind (installs it; no root needed
#                                     beyond that): unlike times, these
#                                     move by at most one between runs of
#                                     one build
#
# OPTIONS go to `l4lb-bench run` (see `target/release/l4lb-bench run --help`),
# e.g. a quick check: scripts/bench.sh e2e --runs 2 --secs 3
#
# Results are markdown on stdout (progress on stderr), to paste into
# BENCHMARKS.md. The end-to-end benchmark's traffic stays inside the
# namespaces l4lb-bench-{gen,lb,sink}, on 198.18.0.0/15; they are removed on
# exit, whatever happens. (The test harness's scripts/netns.sh removes only its
# own namespaces, but running both at once would skew the figures.)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=e2e
case "${1:-}" in
e2e | micro | all | icount)
    mode=$1
    shift
    ;;
esac
invocation="scripts/bench.sh $mode${*:+ $*}"

die() {
    echo "bench.sh: $*" >&2
    exit 1
}

if [[ $mode == e2e || $mode == all ]]; then
    [[ ${EUID} -eq 0 ]] || die "run as root (network namespaces, XDP, BPF_PROG_RUN)"
fi
# Every mode builds l4lb (build.rs and xsk-rs need clang, gcc, libelf...).
# Without root this only checks, and names what is missing.
scripts/install-deps.sh >&2
if [[ $mode == e2e || $mode == all ]]; then
    # What the benchmark needs beyond the build and test dependencies:
    # nftables for the kernel baseline.
    if ! command -v nft >/dev/null 2>&1; then
        echo "bench.sh: installing nftables" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends nftables >/dev/null
    fi
    for tool in nft ip ethtool sysctl; do
        command -v "$tool" >/dev/null || die "$tool still missing"
    done
fi

TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release
cleanup() {
    set +e
    if [[ -x $BIN/l4lb-bench ]]; then
        "$BIN/l4lb-bench" down
    else
        for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^l4lb-bench-'); do
            ip netns delete "$ns"
        done
    fi
}

e2e() {
    trap cleanup EXIT INT TERM
    echo "== building (release)" >&2
    cargo build --release --quiet --bin l4lb --bin l4lb-bench
    "$BIN/l4lb-bench" run --command "$invocation" "$@"
}

micro() {
    local since
    since=$(date +%s.%N)
    echo "== cargo bench (pipeline, flow_table, maglev)" >&2
    cargo bench --bench pipeline --bench flow_table --bench maglev >&2
    cargo build --release --quiet --bin l4lb-bench
    echo "### Micro-benchmarks"
    echo
    echo "- Command: \`$invocation\` (criterion 0.5; \`cargo bench --bench pipeline --bench flow_table --bench maglev\`)"
    echo "- Machine: $(nproc) × $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    "$BIN/l4lb-bench" micro-report --since "$since" "$TARGET/criterion"
    repeated
}

# The per-packet targets' benchmarks again, back to back: one criterion run
# of them moves by a few per cent with the host's load (a VM's neighbours),
# which is as much as their distance to the targets, so the verdicts use
# the median of several runs.
REPEAT_RUNS=6
REPEAT_FILTER='pipeline/(established_udp_hot|established_tcp_hot|new_session_udp|new_session_tcp)$'
repeated() {
    local r since samples
    samples=$(mktemp)
    for ((r = 1; r <= REPEAT_RUNS; r++)); do
        echo "== repeated run $r of $REPEAT_RUNS" >&2
        since=$(date +%s.%N)
        cargo bench --bench pipeline -- "$REPEAT_FILTER" \
            --warm-up-time 1 --measurement-time 3 --noplot >&2
        "$BIN/l4lb-bench" micro-report --samples --since "$since" "$TARGET/criterion" >>"$samples"
    done
    echo
    echo "#### The targets' benchmarks, repeated"
    echo
    echo "- Command: the same, then $REPEAT_RUNS more runs of \`cargo bench --bench pipeline -- \"$REPEAT_FILTER\" --warm-up-time 1 --measurement-time 3 --noplot\`, back to back ($(date -u '+%H:%M UTC') at the end)"
    echo
    "$BIN/l4lb-bench" micro-repeated "$samples"
    rm -f "$samples"
}

# Instructions per packet: valgrind's count for 2N bursts minus N bursts,
# over N × 64 frames, so that set-up cancels out.
icount() {
    if ! command -v valgrind >/dev/null 2>&1; then
        [[ ${EUID} -eq 0 ]] || die "valgrind is missing: run as root once to install it (or: apt-get install valgrind)"
        echo "bench.sh: installing valgrind" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends valgrind >/dev/null
    fi
    cargo build --release --quiet --bin l4lb-bench
    local n=2048 workload a b
    echo "### Instructions per packet"
    echo
    echo "- Command: \`$invocation\` (valgrind $(valgrind --version | sed 's/^valgrind-//'), \`--tool=callgrind\` on \`l4lb-bench pipeline-loop --bursts $n\` and \`$((2 * n))\`)"
    echo "- Machine: $(nproc) × $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), Linux $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "| workload (as in bench/pipeline.rs) | instructions per packet |"
    echo "|---|---:|"
    for workload in established new-session new-session-tcp reply; do
        a=$(count "$workload" "$n")
        b=$(count "$workload" $((2 * n)))
        echo "| $workload | $(((b - a) / (n * 64))) |"
    done
}
count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$BIN/l4lb-bench" pipeline-loop --workload "$1" --bursts "$2" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

case $mode in
e2e) e2e "$@" ;;
micro) micro ;;
icount) icount ;;
all)
    micro
    echo
    e2e "$@"
    ;;
esac
