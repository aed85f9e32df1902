#!/usr/bin/env bash
# The demo: builds l4lb, brings up the network-namespace harness, runs l4lb on
# config/l4lb.toml unchanged, sends TCP (HTTP) and UDP traffic from 1000
# client addresses, prints the per-backend distribution and stickiness and
# l4lb's own counters, then cleans everything up. Root required.
#
# Traffic stays inside the l4lb-* namespaces, on 198.18.0.0/15.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ ${EUID} -eq 0 ]] || { echo "demo.sh: run as root (network namespaces, XDP)" >&2; exit 1; }
scripts/install-deps.sh
echo "== building (release)"
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release

LOG=$(mktemp -d /tmp/l4lb-demo.XXXXXX)
SOCK="$LOG/ctl.sock"
# config/l4lb.toml as is, except for a private control socket so that the
# demo never collides with an l4lb running on this machine.
sed "s#^\[instance\]#[instance]\ncontrol_socket = \"$SOCK\"#" config/l4lb.toml >"$LOG/l4lb.toml"

cleanup() {
    set +e
    [[ -n ${LB_PID:-} ]] && kill -TERM "$LB_PID" 2>/dev/null && wait "$LB_PID" 2>/dev/null
    scripts/netns.sh down >/dev/null 2>&1
    rm -rf "$LOG"
}
trap cleanup EXIT INT TERM

echo "== topology"
scripts/netns.sh up --clients 1000
for b in b1 b2 b3; do
    ip netns exec "l4lb-$b" "$BIN/l4lb-harness" serve --name "$b" 2>/dev/null &
done

echo "== l4lb run -c config/l4lb.toml"
"$BIN/l4lb" check -c "$LOG/l4lb.toml"
ip netns exec l4lb-lb "$BIN/l4lb" run -c "$LOG/l4lb.toml" 2>"$LOG/l4lb.log" &
LB_PID=$!
ready=
for _ in $(seq 100); do
    "$BIN/l4lb" stats -s "$SOCK" >/dev/null 2>&1 && { ready=1; break; }
    kill -0 "$LB_PID" 2>/dev/null || { cat "$LOG/l4lb.log"; exit 1; }
    sleep 0.1
done
[[ -n $ready ]] || { cat "$LOG/l4lb.log"; echo "demo.sh: l4lb did not answer on $SOCK within 10 s" >&2; exit 1; }

echo "== traffic: 1000 clients x 3 connections to each of web (tcp 198.18.100.1:80),"
echo "   web-alt (tcp 198.18.100.2:80, same backend service) and echo (udp 198.18.100.1:53)"
echo "   weights: web 50/30/20 (b1/b2/b3), echo 1:1:1"
ip netns exec l4lb-client "$BIN/l4lb-harness" drive \
    --vip-tcp 198.18.100.1:80,198.18.100.2:80 --vip-udp 198.18.100.1:53 \
    --sources 198.18.4.1-198.18.7.238 --conns 3 --summary

echo "== l4lb stats"
"$BIN/l4lb" stats -s "$SOCK"
echo "== demo done; cleaning up"
