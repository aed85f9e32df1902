#!/usr/bin/env bash
# Network-namespace topology for testing l4lb.
#
#   l4lb-client                l4lb-lb                   l4lb-sw            l4lb-bK
#   cl0 198.18.0.2/24 ---- lb-c 198.18.0.1/24
#       2001:2::2/64            2001:2::1/64
#   + N /32 sources             lb-b 198.18.2.1/24 ---- sw-lb ]
#     from 198.18.4.0/22             2001:2:0:2::1/64          [ br0 ]-- sw-bK ---- eth0 198.18.2.1K/24
#   + N /128 sources                                                                     2001:2:0:2::1K/64
#     from 2001:2:0:4::1
#   198.18.100.0/24 and 2001:2:0:100::/64 (VIPs)
#     via 198.18.0.1 and 2001:2::1
#
# Everything lives inside namespaces named l4lb-*, on 198.18.0.0/15 (RFC 2544)
# and 2001:2::/48 (RFC 5180) only; nothing in the host's own namespace is
# created or changed. Duplicate address detection is off in the namespaces,
# so IPv6 addresses are usable at once.
#
# Usage: scripts/netns.sh up [--clients N] [--queues Q] | down | status
set -euo pipefail

readonly NS_CLIENT="l4lb-client"
readonly NS_LB="l4lb-lb"
readonly NS_SW="l4lb-sw"
readonly BACKENDS=(1 2 3)
# 198.18.4.0/22 holds four /24s; .0 and .255 of each are skipped.
readonly MAX_CLIENTS=$((4 * 254))
readonly LINK_WAIT_SECS=10

die() {
    echo "netns.sh: $*" >&2
    exit 1
}

usage() {
    cat >&2 <<'EOF'
usage: scripts/netns.sh up [--clients N] [--queues Q]
                                    build the topology (tears down any previous one first);
                                    Q RX/TX queues per veth (1-8, default 1)
       scripts/netns.sh down               remove every l4lb-* namespace
       scripts/netns.sh status             list the l4lb-* namespaces
EOF
    exit 2
}

check_prereqs() {
    [[ ${EUID} -eq 0 ]] || die "must run as root (creates network namespaces)"
    local tool
    for tool in ip ethtool; do
        command -v "${tool}" >/dev/null 2>&1 ||
            die "'${tool}' not found (Debian: apt-get install iproute2 ethtool)"
    done
}

# The namespaces this topology owns, by exact name: other tools share the
# l4lb- prefix (the benchmark's l4lb-bench-*) and must not be torn down.
list_ns() {
    local want="^(${NS_CLIENT}|${NS_LB}|${NS_SW}|l4lb-b[0-9]+)$"
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "${want}" || true
}

# Processes still running inside a namespace keep it (and its veths, and any
# XDP program on them) alive after `ip netns delete`. They were started by the
# harness user inside our namespaces, so stop them by pid before deleting.
stop_ns_processes() {
    local ns pids all_pids=()
    for ns in "$@"; do
        pids=$(ip netns pids "${ns}" 2>/dev/null || true)
        [[ -n "${pids}" ]] || continue
        echo "netns.sh: stopping processes in ${ns}: ${pids//$'\n'/ }" >&2
        # shellcheck disable=SC2206 # word splitting of the pid list is intended
        all_pids+=(${pids})
    done
    [[ ${#all_pids[@]} -gt 0 ]] || return 0
    kill -TERM "${all_pids[@]}" 2>/dev/null || true
    local i pid alive
    for ((i = 0; i < 30; i++)); do
        alive=()
        for pid in "${all_pids[@]}"; do
            kill -0 "${pid}" 2>/dev/null && alive+=("${pid}")
        done
        [[ ${#alive[@]} -gt 0 ]] || return 0
        sleep 0.1
    done
    echo "netns.sh: killing stubborn processes: ${alive[*]}" >&2
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

do_down() {
    local namespaces
    mapfile -t namespaces < <(list_ns)
    [[ ${#namespaces[@]} -gt 0 ]] || return 0
    stop_ns_processes "${namespaces[@]}"
    local ns
    for ns in "${namespaces[@]}"; do
        # Deleting a namespace destroys the veth ends inside it, and with
        # them their peers, so no link needs deleting separately.
        ip netns delete "${ns}" 2>/dev/null || true
    done
    local left
    left=$(list_ns)
    [[ -z "${left}" ]] || die "could not remove namespaces: ${left//$'\n'/ }"
}

do_status() {
    local namespaces ns
    mapfile -t namespaces < <(list_ns)
    if [[ ${#namespaces[@]} -eq 0 ]]; then
        echo "no l4lb-* namespaces"
        return 0
    fi
    for ns in "${namespaces[@]}"; do
        printf '%-12s %s\n' "${ns}" \
            "$(ip -n "${ns}" -br addr show 2>/dev/null | awk '$1 != "lo" {sub(/@.*/, "", $1); printf "%s(%s) ", $1, $2}')"
    done
}

# Turn offloads off so that frames on the wire are complete, independently
# checksummed 1500-byte packets: a socket sending over veth otherwise leaves
# CHECKSUM_PARTIAL frames (an AF_XDP forwarder would see wrong checksums),
# and GRO would hand generic XDP merged super-frames.
no_offload() {
    local ns=$1 dev=$2
    shift 2
    ip netns exec "${ns}" ethtool -K "${dev}" "$@" tso off gso off gro off >/dev/null 2>&1 ||
        die "ethtool -K ${dev} ($*) failed in ${ns}"
}

# Source i (0-based) is 198.18.(4 + i/254).(1 + i%254) and 2001:2:0:4::(i+1).
client_addr_batch() {
    local n=$1 i third fourth
    for ((i = 0; i < n; i++)); do
        third=$((4 + i / 254))
        fourth=$((1 + i % 254))
        echo "address add 198.18.${third}.${fourth}/32 dev cl0"
        printf 'address add 2001:2:0:4::%x/128 dev cl0 nodad\n' $((i + 1))
    done
}

# Before any interface exists in the namespace: new interfaces take the
# "default" settings. No duplicate address detection (addresses would stay
# tentative for a second), no router solicitations or autoconfiguration.
ipv6_quiet() {
    local ns=$1 key
    for key in accept_dad=0 dad_transmits=0 router_solicitations=0 accept_ra=0 autoconf=0; do
        ip netns exec "${ns}" sysctl -qw "net.ipv6.conf.all.${key}" "net.ipv6.conf.default.${key}" ||
            die "sysctl net.ipv6.conf.*.${key} failed in ${ns}"
    done
}

wait_link_up() {
    local ns=$1 dev=$2 deadline=$((SECONDS + LINK_WAIT_SECS))
    while :; do
        # LOWER_UP means the carrier is there (for a veth: both ends are up).
        local flags
        flags=$(ip -n "${ns}" link show dev "${dev}" 2>/dev/null || true)
        [[ "${flags}" == *LOWER_UP* ]] && return 0
        ((SECONDS < deadline)) || die "${ns}/${dev} not up after ${LINK_WAIT_SECS}s"
        sleep 0.1
    done
}

do_up() {
    local clients=$1 queues=$2
    do_down

    # Remove the half-built topology if any step fails (set -e or die), so
    # `up` never leaves something that looks usable but is not.
    trap 'rc=$?; if ((rc != 0)); then echo "netns.sh: up failed, tearing down" >&2; do_down; fi' EXIT

    local ns
    for ns in "${NS_CLIENT}" "${NS_LB}" "${NS_SW}"; do
        ip netns add "${ns}"
    done
    local k
    for k in "${BACKENDS[@]}"; do
        ip netns add "l4lb-b${k}"
    done
    for ns in "${NS_CLIENT}" "${NS_LB}" "${NS_SW}"; do
        ipv6_quiet "${ns}"
    done
    for k in "${BACKENDS[@]}"; do
        ipv6_quiet "l4lb-b${k}"
    done

    # Create each veth pair inside a namespace directly (never in the host's).
    # With --queues N every veth has N RX and N TX queues: a sending veth
    # spreads flows over its TX queues by hash and the peer receives each on
    # the matching RX queue, so l4lb's worker i (queue i) sees its share.
    local q=(numtxqueues "${queues}" numrxqueues "${queues}")
    ip -n "${NS_CLIENT}" link add cl0 "${q[@]}" type veth peer name lb-c "${q[@]}" netns "${NS_LB}"
    ip -n "${NS_LB}" link add lb-b "${q[@]}" type veth peer name sw-lb "${q[@]}" netns "${NS_SW}"
    for k in "${BACKENDS[@]}"; do
        ip -n "${NS_SW}" link add "sw-b${k}" "${q[@]}" type veth peer name eth0 "${q[@]}" netns "l4lb-b${k}"
    done

    # Client.
    ip -n "${NS_CLIENT}" link set lo up
    ip -n "${NS_CLIENT}" addr add 198.18.0.2/24 dev cl0
    ip -n "${NS_CLIENT}" addr add 2001:2::2/64 dev cl0 nodad
    if ((clients > 0)); then
        client_addr_batch "${clients}" | ip -n "${NS_CLIENT}" -batch -
    fi
    no_offload "${NS_CLIENT}" cl0 tx off
    ip -n "${NS_CLIENT}" link set cl0 up
    ip -n "${NS_CLIENT}" route add 198.18.100.0/24 via 198.18.0.1

    # Load balancer. ip_forward stays off (namespace default): l4lb forwards.
    ip -n "${NS_LB}" link set lo up
    ip -n "${NS_LB}" addr add 198.18.0.1/24 dev lb-c
    ip -n "${NS_LB}" addr add 198.18.2.1/24 dev lb-b
    ip -n "${NS_LB}" addr add 2001:2::1/64 dev lb-c nodad
    ip -n "${NS_LB}" addr add 2001:2:0:2::1/64 dev lb-b nodad
    no_offload "${NS_LB}" lb-c rx off tx off
    no_offload "${NS_LB}" lb-b rx off tx off
    ip -n "${NS_LB}" link set lb-c up
    ip -n "${NS_LB}" link set lb-b up
    ip -n "${NS_LB}" route add 198.18.4.0/22 via 198.18.0.2

    # Switch.
    ip -n "${NS_SW}" link set lo up
    # No multicast snooping: neighbour solicitations are flooded to every
    # port whatever MLD reports the bridge has or has not seen.
    ip -n "${NS_SW}" link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0
    ip -n "${NS_SW}" link set br0 up
    ip -n "${NS_SW}" link set sw-lb master br0
    ip -n "${NS_SW}" link set sw-lb up
    for k in "${BACKENDS[@]}"; do
        ip -n "${NS_SW}" link set "sw-b${k}" master br0
        ip -n "${NS_SW}" link set "sw-b${k}" up
    done

    # Backends.
    for k in "${BACKENDS[@]}"; do
        ns="l4lb-b${k}"
        ip -n "${ns}" link set lo up
        ip -n "${ns}" addr add "198.18.2.1${k}/24" dev eth0
        ip -n "${ns}" addr add "2001:2:0:2::1${k}/64" dev eth0 nodad
        no_offload "${ns}" eth0 tx off
        ip -n "${ns}" link set eth0 up
        ip -n "${ns}" route add default via 198.18.2.1
    done

    wait_link_up "${NS_CLIENT}" cl0
    wait_link_up "${NS_LB}" lb-c
    wait_link_up "${NS_LB}" lb-b
    wait_link_up "${NS_SW}" br0
    wait_link_up "${NS_SW}" sw-lb
    for k in "${BACKENDS[@]}"; do
        wait_link_up "${NS_SW}" "sw-b${k}"
        wait_link_up "l4lb-b${k}" eth0
    done

    # IPv6 routes via a gateway need the link's carrier (the prefix route
    # appears only then), so they come after the links are up.
    ip -n "${NS_CLIENT}" route add 2001:2:0:100::/64 via 2001:2::1
    ip -n "${NS_LB}" route add 2001:2:0:4::/64 via 2001:2::2
    for k in "${BACKENDS[@]}"; do
        ip -n "l4lb-b${k}" route add default via 2001:2:0:2::1
    done
    trap - EXIT

    local last="none" last6="none"
    if ((clients > 0)); then
        local i=$((clients - 1))
        last="198.18.4.1-198.18.$((4 + i / 254)).$((1 + i % 254))"
        last6=$(printf '2001:2:0:4::1-2001:2:0:4::%x' "${clients}")
    fi
    echo "l4lb netns up: client 198.18.0.2 (${clients} sources: ${last}) -> lb 198.18.0.1 | 198.18.2.1 -> br0 -> backends 198.18.2.11-13; VIPs 198.18.100.0/24"
    echo "               client 2001:2::2 (${clients} sources: ${last6}) -> lb 2001:2::1 | 2001:2:0:2::1 -> br0 -> backends 2001:2:0:2::11-13; VIPs 2001:2:0:100::/64"
}

main() {
    [[ $# -ge 1 ]] || usage
    local cmd=$1
    shift
    case "${cmd}" in
    up)
        local clients=1000 queues=1
        while [[ $# -gt 0 ]]; do
            case "$1" in
            --queues)
                [[ $# -ge 2 ]] || usage
                queues=$2
                shift 2
                ;;
            --clients)
                [[ $# -ge 2 ]] || usage
                clients=$2
                shift 2
                ;;
            --clients=*)
                clients=${1#--clients=}
                shift
                ;;
            *) usage ;;
            esac
        done
        [[ "${clients}" =~ ^[0-9]+$ ]] || die "--clients needs a number, got '${clients}'"
        clients=$((10#${clients}))
        ((clients <= MAX_CLIENTS)) || die "--clients at most ${MAX_CLIENTS} (198.18.4.0/22 without .0/.255)"
        [[ "${queues}" =~ ^[1-8]$ ]] || die "--queues needs 1-8, got '${queues}'"
        check_prereqs
        do_up "${clients}" "${queues}"
        ;;
    down)
        [[ $# -eq 0 ]] || usage
        check_prereqs
        do_down
        echo "l4lb netns down"
        ;;
    status)
        [[ $# -eq 0 ]] || usage
        do_status
        ;;
    -h | --help | help) usage ;;
    *) usage ;;
    esac
}

main "$@"
