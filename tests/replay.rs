//! Table-driven packet fixtures through the data plane's pipeline, offline.
//!
//! Each fixture is a description, an input frame, the expected verdict and,
//! for forwarded frames, the expected output frame. Fixtures of one table run
//! in order on one [`Replayer`] (a reply needs its flow), at a fixed clock.
//!
//! Expected output frames are built from scratch by etherparse (see
//! `tests/common`), so byte equality checks the in-place NAT rewrite, the TTL
//! decrement and the incremental checksum updates against full recomputes.
//! Frames that are passed or dropped must come out untouched, and every frame
//! moves exactly one counter: its verdict's.

mod common;

use common::*;
use etherparse::SlicedPacket;
use l4lb::config::Config;
use l4lb::dataplane::packet::{parse, Frame};
use l4lb::dataplane::{DropReason, Port, Verdict};
use l4lb::replay::{Replayer, BACKEND_IF_MAC, CLIENT_IF_MAC};
use std::sync::atomic::Ordering::Relaxed;

const NOW: u32 = 1_000;

const FORWARD: Verdict = Verdict::Tx(Port::Backend);
const REPLY: Verdict = Verdict::Tx(Port::Client);
const PASS: Verdict = Verdict::Pass;

struct Fixture {
    what: &'static str,
    input: Vec<u8>,
    verdict: Verdict,
    /// The frame l4lb should transmit; `None` for a frame it must leave as it
    /// is (passed or dropped).
    output: Option<Vec<u8>>,
}

fn tx(what: &'static str, input: Vec<u8>, verdict: Verdict, output: Vec<u8>) -> Fixture {
    Fixture {
        what,
        input,
        verdict,
        output: Some(output),
    }
}

fn kept(what: &'static str, input: Vec<u8>, verdict: Verdict) -> Fixture {
    Fixture {
        what,
        input,
        verdict,
        output: None,
    }
}

/// Every counter a verdict can move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    forwarded: u64,
    replied: u64,
    passed: u64,
    drops: [u64; DropReason::COUNT],
}

fn counts(r: &Replayer) -> Counts {
    let c = &r.stats.core;
    Counts {
        forwarded: c.forwarded.load(Relaxed),
        replied: c.replied.load(Relaxed),
        passed: c.passed.load(Relaxed),
        drops: DropReason::ALL.map(|d| r.stats.drops(d)),
    }
}

/// The counters after one frame with verdict `v`, starting from `c`.
fn plus_one(mut c: Counts, v: Verdict) -> Counts {
    match v {
        Verdict::Tx(Port::Backend) => c.forwarded += 1,
        Verdict::Tx(Port::Client) => c.replied += 1,
        Verdict::Pass => c.passed += 1,
        Verdict::Drop(why) => c.drops[why as usize] += 1,
    }
    c
}

fn run(r: &Replayer, fixtures: &[Fixture]) {
    run_at(r, NOW, fixtures)
}

/// [`run`] at clock `now` (seconds).
fn run_at(r: &Replayer, now: u32, fixtures: &[Fixture]) {
    for (i, f) in fixtures.iter().enumerate() {
        let before = counts(r);
        let mut frame = f.input.clone();
        let v = r.process(&mut frame, now);
        assert_eq!(v, f.verdict, "fixture {i} ({}): verdict", f.what);
        let want = f.output.as_ref().unwrap_or(&f.input);
        assert!(
            frame == *want,
            "fixture {i} ({}): output frame: {}",
            f.what,
            first_difference(&frame, want)
        );
        assert_eq!(
            counts(r),
            plus_one(before, v),
            "fixture {i} ({}): exactly the verdict's counter moves by one",
            f.what
        );
    }
}

fn replayer() -> Replayer {
    Replayer::new(&replay_config()).expect("replayer")
}

/// The server `l4lb simulate` says `client` reaches through `listener`,
/// checked against the snapshot's scheduler the data plane calls.
fn simulated(r: &Replayer, listener: &str, client: [u8; 4]) -> ([u8; 4], u16) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let input = format!("{}.{}.{}.{}\n", client[0], client[1], client[2], client[3]);
    let bad = l4lb::simulate::simulate(
        &replay_config(),
        listener,
        input.as_bytes(),
        &mut out,
        &mut errors,
    )
    .expect("simulate");
    assert_eq!(bad, 0, "{}", String::from_utf8_lossy(&errors));
    let out = String::from_utf8(out).unwrap();
    let (_, server) = out.trim_end().split_once(' ').expect("CLIENT SERVER");
    let server: std::net::SocketAddrV4 = server.parse().expect("server address");

    let li = r
        .snapshot
        .listeners
        .iter()
        .position(|l| l.name == listener)
        .unwrap();
    let id = r
        .snapshot
        .pick(r.snapshot.listeners[li].service, &client)
        .expect("a server");
    let be = &r.snapshot.backends[id as usize];
    assert_eq!(
        std::net::SocketAddr::V4(server),
        std::net::SocketAddr::new(be.address, be.port),
        "simulate and the data plane's scheduler agree"
    );
    (server.ip().octets(), server.port())
}

/// A client that `listener` sends to a server other than `other`'s.
fn client_of_another_server(r: &Replayer, listener: &str, other: [u8; 4]) -> [u8; 4] {
    (1..=254)
        .map(|d| [198, 18, 5, d])
        .find(|c| simulated(r, listener, *c).0 != simulated(r, listener, other).0)
        .expect("the clients of 198.18.5.0/24 spread over several servers")
}

#[test]
fn tcp_connection_is_forwarded_to_the_scheduled_server_and_answered_from_the_vip() {
    let r = replayer();
    let (server, port) = simulated(&r, "web", CLIENT);
    assert_eq!(port, 8080);
    let c = Hop::from_client(CLIENT, 40000, VIP, 80);
    let s = Hop::from_server(server, 8080, CLIENT, 40000);
    // Odd lengths: the checksum's padding byte must not leak into the update.
    let request = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n!";
    let response = b"HTTP/1.1 204 No Content\r\n\r\n";

    let other = client_of_another_server(&r, "web", CLIENT);
    let (other_server, _) = simulated(&r, "web", other);
    let o = Hop::from_client(other, 33333, VIP, 80);
    let os = Hop::from_server(other_server, 8080, other, 33333);

    run(
        &r,
        &[
            tx(
                "SYN to the VIP: to the scheduled server's port 8080 and MAC, TTL 63",
                tcp_syn(&c),
                FORWARD,
                tcp_syn(&c.to_server(server, 8080)),
            ),
            tx(
                "the server's SYN-ACK: from the VIP:80, to the gateway's MAC",
                tcp_syn_ack(&s),
                REPLY,
                tcp_syn_ack(&s.to_client(VIP, 80)),
            ),
            tx(
                "the client's request on the same flow",
                tcp_data(&c, request),
                FORWARD,
                tcp_data(&c.to_server(server, 8080), request),
            ),
            tx(
                "the server's response",
                tcp_data(&s, response),
                REPLY,
                tcp_data(&s.to_client(VIP, 80), response),
            ),
            tx(
                "another client reaches another server",
                tcp_syn(&o),
                FORWARD,
                tcp_syn(&o.to_server(other_server, 8080)),
            ),
            tx(
                "and is answered from the same VIP",
                tcp_syn_ack(&os),
                REPLY,
                tcp_syn_ack(&os.to_client(VIP, 80)),
            ),
            tx(
                "TTL 2 still goes through, arriving with TTL 1",
                tcp_data(&c.ttl(2), request),
                FORWARD,
                tcp_data(&c.ttl(2).to_server(server, 8080), request),
            ),
        ],
    );

    let core = &r.stats.core;
    assert_eq!(core.flows_created.load(Relaxed), 2, "one flow per client");
    assert_eq!(core.flows_rebound.load(Relaxed), 0);
    // Per-listener and per-server counters (by stable id) see the client →
    // server frames.
    let web = r
        .snapshot
        .listeners
        .iter()
        .find(|l| l.name == "web")
        .unwrap();
    let (packets, bytes) = r.stats.listeners[web.id as usize].read();
    assert_eq!(packets, 4);
    let sizes = [
        tcp_syn(&c).len(),
        tcp_data(&c, request).len(),
        tcp_syn(&o).len(),
        tcp_data(&c, request).len(),
    ];
    assert_eq!(bytes, sizes.iter().sum::<usize>() as u64);
    let index = r.snapshot.backend(&l4lb::util::map_v4(server), 8080, 6);
    let id = r.snapshot.backends[index.unwrap() as usize].id;
    assert_eq!(r.stats.backends[id as usize].read().0, 3);
}

#[test]
fn two_listeners_of_one_service_each_answer_from_their_own_vip() {
    let r = replayer();
    let (server, _) = simulated(&r, "web", CLIENT);
    assert_eq!(
        simulated(&r, "web-alt", CLIENT).0,
        server,
        "one service: the same server for the same client"
    );
    let web = Hop::from_client(CLIENT, 40000, VIP, 80);
    let alt = Hop::from_client(CLIENT, 40001, VIP_ALT, 80);
    let web_reply = Hop::from_server(server, 8080, CLIENT, 40000);
    let alt_reply = Hop::from_server(server, 8080, CLIENT, 40001);
    let alt_same_port = Hop::from_client(CLIENT, 40000, VIP_ALT, 80);

    run(
        &r,
        &[
            tx(
                "SYN to web",
                tcp_syn(&web),
                FORWARD,
                tcp_syn(&web.to_server(server, 8080)),
            ),
            tx(
                "SYN to web-alt from another source port",
                tcp_syn(&alt),
                FORWARD,
                tcp_syn(&alt.to_server(server, 8080)),
            ),
            tx(
                "web's reply comes from 198.18.100.1",
                tcp_syn_ack(&web_reply),
                REPLY,
                tcp_syn_ack(&web_reply.to_client(VIP, 80)),
            ),
            tx(
                "web-alt's reply comes from 198.18.100.2",
                tcp_syn_ack(&alt_reply),
                REPLY,
                tcp_syn_ack(&alt_reply.to_client(VIP_ALT, 80)),
            ),
            // The server sees the same 4-tuple for both: newest wins.
            tx(
                "the client reuses port 40000 towards web-alt",
                tcp_syn(&alt_same_port),
                FORWARD,
                tcp_syn(&alt_same_port.to_server(server, 8080)),
            ),
            tx(
                "replies to port 40000 now come from web-alt's VIP",
                tcp_syn_ack(&web_reply),
                REPLY,
                tcp_syn_ack(&web_reply.to_client(VIP_ALT, 80)),
            ),
        ],
    );
    // A flow is (client, port, VIP, port): reusing port 40000 towards
    // web-alt is a third flow, which takes over the server-side 4-tuple.
    assert_eq!(r.stats.core.flows_created.load(Relaxed), 3);
    assert_eq!(r.stats.core.flows_rebound.load(Relaxed), 1);
}

#[test]
fn udp_datagrams_are_forwarded_and_answered_keeping_a_zero_checksum_zero() {
    let r = replayer();
    let (server, port) = simulated(&r, "echo", CLIENT);
    assert_eq!(port, 9053);
    let c = Hop::from_client(CLIENT, 50000, VIP, 53);
    let s = Hop::from_server(server, 9053, CLIENT, 50000);
    let c2 = Hop::from_client(CLIENT, 50001, VIP, 53);
    let s2 = Hop::from_server(server, 9053, CLIENT, 50001);
    let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01";
    let answer = b"odd-length answer";

    let fixtures = [
        tx(
            "UDP to 198.18.100.1:53: to the scheduled server's port 9053",
            udp(&c, query),
            FORWARD,
            udp(&c.to_server(server, 9053), query),
        ),
        tx(
            "the server's answer comes from 198.18.100.1:53",
            udp(&s, answer),
            REPLY,
            udp(&s.to_client(VIP, 53), answer),
        ),
        tx(
            "no checksum (0) to the VIP: still 0 after the rewrite",
            udp_without_checksum(&c2, query),
            FORWARD,
            udp_without_checksum(&c2.to_server(server, 9053), query),
        ),
        tx(
            "no checksum (0) in the answer: still 0",
            udp_without_checksum(&s2, answer),
            REPLY,
            udp_without_checksum(&s2.to_client(VIP, 53), answer),
        ),
    ];
    // The builders do compute a checksum; only the zeroed ones are zero.
    for f in &fixtures {
        let out = f.output.as_ref().unwrap();
        let sum = &out[UDP_CHECKSUM_AT..UDP_CHECKSUM_AT + 2];
        assert_eq!(
            sum == [0, 0],
            f.what.contains("(0)"),
            "{}: UDP checksum {sum:?}",
            f.what
        );
    }
    run(&r, &fixtures);
}

#[test]
fn traffic_that_is_not_for_a_listener_is_passed_to_the_kernel_untouched() {
    let r = replayer();
    run(
        &r,
        &[
            kept("ARP request for the VIP", arp_request(VIP), PASS),
            kept(
                "ICMP echo to the VIP",
                icmp_echo(&Hop::from_client(CLIENT, 0, VIP, 0)),
                PASS,
            ),
            kept(
                "TCP to the VIP on a port with no listener (ssh)",
                tcp_syn(&Hop::from_client(CLIENT, 40000, VIP, 22)),
                PASS,
            ),
            kept(
                "UDP to the VIP on the TCP listener's port",
                udp(&Hop::from_client(CLIENT, 40000, VIP, 80), b"x"),
                PASS,
            ),
            kept(
                "TCP to the web-alt VIP on the echo listener's port",
                tcp_syn(&Hop::from_client(CLIENT, 40000, VIP_ALT, 53)),
                PASS,
            ),
            kept(
                "TCP to an unrelated address",
                tcp_syn(&Hop::from_client(CLIENT, 40000, [198, 18, 7, 7], 80)),
                PASS,
            ),
            kept(
                "TCP from a client to a client",
                tcp_data(&Hop::from_client(CLIENT, 1, [198, 18, 4, 8], 2), b"hi"),
                PASS,
            ),
            kept(
                "IPv6 TCP to an unrelated address",
                ipv6_tcp_syn(
                    [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
                    [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                ),
                PASS,
            ),
        ],
    );
    assert_eq!(r.tables.flows.count_live(NOW), 0, "no flow recorded");
}

#[test]
fn truncated_and_malformed_frames_are_passed_or_dropped_by_reason() {
    let r = replayer();
    let syn = tcp_syn(&Hop::from_client(CLIENT, 40000, VIP, 80));
    let ip_len = syn.len() - 14;

    let eth_only = syn[..14].to_vec();
    let ip_cut_at_10 = syn[..14 + 10].to_vec();
    // A complete IP header whose total length covers only 10 bytes of TCP.
    let mut tcp_cut = syn[..14 + 20 + 10].to_vec();
    set_ipv4_total_len(&mut tcp_cut, 30);
    let mut ihl_4 = syn.clone();
    ihl_4[14] = 0x44;
    fix_ipv4_checksum(&mut ihl_4);
    let mut too_long = syn.clone();
    set_ipv4_total_len(&mut too_long, ip_len as u16 + 1);
    let mut total_below_header = syn.clone();
    set_ipv4_total_len(&mut total_below_header, 19);
    let mut first_fragment = syn.clone();
    first_fragment[20] = 0x20; // MF, offset 0 (and DF cleared)
    fix_ipv4_checksum(&mut first_fragment);
    let mut later_fragment = syn.clone();
    later_fragment[20] = 0x00;
    later_fragment[21] = 0xb9; // offset 185 * 8 bytes, last fragment
    fix_ipv4_checksum(&mut later_fragment);
    let mut bad_data_offset = syn.clone();
    bad_data_offset[14 + 20 + 12] = 0x40; // TCP data offset 4 words
    let mut udp_cut = udp(&Hop::from_client(CLIENT, 50000, VIP, 53), b"");
    udp_cut.truncate(14 + 20 + 6);
    set_ipv4_total_len(&mut udp_cut, 26);
    let mut ethernet_padding = syn.clone();
    ethernet_padding.extend_from_slice(&[0; 6]);

    let (server, _) = simulated(&r, "web", CLIENT);
    let c = Hop::from_client(CLIENT, 40000, VIP, 80);
    let mut padded_out = tcp_syn(&c.to_server(server, 8080));
    padded_out.extend_from_slice(&[0; 6]);

    run(
        &r,
        &[
            kept("Ethernet header only", eth_only, PASS),
            kept(
                "IPv4 header cut at 10 bytes: addresses unreadable",
                ip_cut_at_10,
                PASS,
            ),
            kept(
                "to the VIP with the TCP header cut",
                tcp_cut,
                Verdict::Drop(DropReason::Malformed),
            ),
            kept(
                "to the VIP with IHL 4",
                ihl_4,
                Verdict::Drop(DropReason::Malformed),
            ),
            kept(
                "to the VIP with total length beyond the frame",
                too_long,
                Verdict::Drop(DropReason::Malformed),
            ),
            kept(
                "to the VIP with total length below the header's",
                total_below_header,
                Verdict::Drop(DropReason::Malformed),
            ),
            kept(
                "to the VIP with TCP data offset 4",
                bad_data_offset,
                Verdict::Drop(DropReason::Malformed),
            ),
            kept(
                "UDP to the VIP with the UDP header cut",
                udp_cut,
                Verdict::Drop(DropReason::Malformed),
            ),
            kept(
                "first fragment to the VIP",
                first_fragment,
                Verdict::Drop(DropReason::Fragment),
            ),
            kept(
                "last fragment to the VIP",
                later_fragment,
                Verdict::Drop(DropReason::Fragment),
            ),
            tx(
                "Ethernet padding after the IP packet is carried along",
                ethernet_padding,
                FORWARD,
                padded_out,
            ),
        ],
    );
    // `run` checked each frame; the totals say the same.
    let drops = |d| r.stats.drops(d);
    assert_eq!(drops(DropReason::Malformed), 6);
    assert_eq!(drops(DropReason::Fragment), 2);
    assert_eq!(r.stats.core.passed.load(Relaxed), 2);
    assert_eq!(r.stats.core.forwarded.load(Relaxed), 1);
}

#[test]
fn server_traffic_without_a_flow_and_expiring_ttls_are_dropped() {
    let r = replayer();
    let (server, _) = simulated(&r, "web", CLIENT);
    let stranger = Hop::from_server(server, 8080, [198, 18, 4, 99], 41000);
    let from_other_port = Hop::from_server(server, 2222, CLIENT, 40000);
    let mut echo_reply = icmp_echo(&Hop::from_server(server, 0, CLIENT, 0));
    echo_reply[14 + 20] = 0; // echo reply (the checksum is not looked at)
    let c = Hop::from_client(CLIENT, 40000, VIP, 80);
    let refused = port_unreachable(
        &Hop::from_server(server, 0, CLIENT, 0),
        &tcp_syn(&c.to_server(server, 8080)),
    );
    let s = Hop::from_server(server, 8080, CLIENT, 40000);

    run(
        &r,
        &[
            kept(
                "a server's reply to a client with no flow",
                tcp_syn_ack(&stranger),
                Verdict::Drop(DropReason::NoFlow),
            ),
            kept(
                "a server host talking to a client from a non-backend port",
                tcp_data(&from_other_port, b"x"),
                Verdict::Drop(DropReason::NoFlow),
            ),
            kept(
                "an ICMP echo reply from a server to a client (no error: nothing to translate)",
                echo_reply,
                Verdict::Drop(DropReason::Unsupported),
            ),
            kept(
                "an ICMP error from a server about a packet of no flow",
                refused,
                Verdict::Drop(DropReason::NoFlow),
            ),
            kept(
                "TTL 1 to the VIP",
                tcp_syn(&c.ttl(1)),
                Verdict::Drop(DropReason::TtlExceeded),
            ),
            kept(
                "TTL 0 to the VIP",
                tcp_syn(&c.ttl(0)),
                Verdict::Drop(DropReason::TtlExceeded),
            ),
            tx(
                "the flow starts",
                tcp_syn(&c),
                FORWARD,
                tcp_syn(&c.to_server(server, 8080)),
            ),
            kept(
                "the server's reply with TTL 1",
                tcp_syn_ack(&s.ttl(1)),
                Verdict::Drop(DropReason::TtlExceeded),
            ),
        ],
    );
    assert_eq!(
        r.stats.core.flows_created.load(Relaxed),
        1,
        "a frame dropped for its TTL records no flow"
    );
}

/// ICMP errors about a flow are translated as the flow is: the server's
/// "port unreachable" reaches the client from the VIP, about the packet
/// the client sent; a router's "fragmentation needed" about a reply (sent
/// to the VIP) reaches the server, about the packet it sent. Every
/// checksum is as a fresh build of the expected frame has it.
#[test]
fn icmp_errors_about_a_flow_are_translated_both_ways() {
    let r = replayer();
    for listener in ["web", "echo"] {
        let (server, port) = simulated(&r, listener, CLIENT);
        let (vport, cport, udp_flow) = if listener == "echo" {
            (53, 50000, true)
        } else {
            (80, 40000, false)
        };
        let c = Hop::from_client(CLIENT, cport, VIP, vport);
        let s = Hop::from_server(server, port, CLIENT, cport);
        let packet = |h: &Hop| {
            if udp_flow {
                udp(h, b"query")
            } else {
                tcp_syn(h)
            }
        };
        let error_from_server = Hop::from_server(server, 0, CLIENT, 0);
        let router = [198, 18, 0, 9];
        let error_to_vip = Hop::from_client(router, 0, VIP, 0);
        let vip_error_to_server = error_to_vip.to_server(server, 0);
        run(
            &r,
            &[
                tx(
                    "the flow starts",
                    packet(&c),
                    FORWARD,
                    packet(&c.to_server(server, port)),
                ),
                tx(
                    "the server refuses the client's packet",
                    port_unreachable(&error_from_server, &packet(&c.to_server(server, port))),
                    REPLY,
                    port_unreachable(&error_from_server.to_client(VIP, 0), &packet(&c.ttl(63))),
                ),
                tx(
                    "a router cannot forward the server's reply to the client",
                    fragmentation_needed(&error_to_vip, &packet(&s.to_client(VIP, vport))),
                    FORWARD,
                    fragmentation_needed(&vip_error_to_server, &packet(&s.ttl(63))),
                ),
            ],
        );
    }
    assert_eq!(r.stats.core.icmp.load(Relaxed), 4);
}

/// A server that one listener alone reaches (the echo service) answers
/// through its flow's forward entry: a flow costs one table entry. A server
/// of the web service, which two listeners share, needs a reply entry
/// naming the listener: two entries.
#[test]
fn a_flow_to_a_server_of_one_listener_takes_one_table_entry_and_of_a_shared_one_two() {
    let r = replayer();
    let (echo_server, _) = simulated(&r, "echo", CLIENT);
    let (web_server, _) = simulated(&r, "web", CLIENT);
    let e = Hop::from_client(CLIENT, 50000, VIP, 53);
    let es = Hop::from_server(echo_server, 9053, CLIENT, 50000);
    let w = Hop::from_client(CLIENT, 40000, VIP, 80);
    let ws = Hop::from_server(web_server, 8080, CLIENT, 40000);
    run(
        &r,
        &[tx(
            "UDP to the echo listener",
            udp(&e, b"q"),
            FORWARD,
            udp(&e.to_server(echo_server, 9053), b"q"),
        )],
    );
    assert_eq!(r.tables.flows.count_live(NOW), 1, "forward entry only");
    run(
        &r,
        &[
            tx(
                "the echo server answers from the VIP",
                udp(&es, b"a"),
                REPLY,
                udp(&es.to_client(VIP, 53), b"a"),
            ),
            tx(
                "SYN to the web listener",
                tcp_syn(&w),
                FORWARD,
                tcp_syn(&w.to_server(web_server, 8080)),
            ),
            tx(
                "the web server answers from the VIP",
                tcp_syn_ack(&ws),
                REPLY,
                tcp_syn_ack(&ws.to_client(VIP, 80)),
            ),
        ],
    );
    assert_eq!(
        r.tables.flows.count_live(NOW),
        3,
        "echo: forward; web: forward and reply"
    );
}

/// Without a reply entry, the forward entry decides whose replies pass: only
/// the server the flow is on may answer through it.
#[test]
fn a_reply_from_a_server_the_flow_is_not_on_is_dropped_as_no_flow() {
    let r = replayer();
    let (server, _) = simulated(&r, "echo", CLIENT);
    let other_client = client_of_another_server(&r, "echo", CLIENT);
    let (other, _) = simulated(&r, "echo", other_client);
    assert_ne!(server, other);
    let c = Hop::from_client(CLIENT, 50000, VIP, 53);
    run(
        &r,
        &[
            tx(
                "UDP to the echo listener",
                udp(&c, b"q"),
                FORWARD,
                udp(&c.to_server(server, 9053), b"q"),
            ),
            kept(
                "another echo server answers the client's flow",
                udp(&Hop::from_server(other, 9053, CLIENT, 50000), b"a"),
                Verdict::Drop(DropReason::NoFlow),
            ),
            tx(
                "the flow's own server answers",
                udp(&Hop::from_server(server, 9053, CLIENT, 50000), b"a"),
                REPLY,
                udp(
                    &Hop::from_server(server, 9053, CLIENT, 50000).to_client(VIP, 53),
                    b"a",
                ),
            ),
        ],
    );
}

/// A server of a shared service without a reply entry for a client makes
/// l4lb look at the client's forward entries; one that names another
/// server must not be kept alive by that look. The flow, last used at NOW,
/// is gone 300 s later however often the wrong server writes in between.
#[test]
fn a_wrong_servers_packet_does_not_keep_the_clients_flow_alive() {
    let r = replayer();
    let (server, _) = simulated(&r, "web", CLIENT);
    let other_client = client_of_another_server(&r, "web", CLIENT);
    let (other, _) = simulated(&r, "web", other_client);
    assert_ne!(server, other);
    let c = Hop::from_client(CLIENT, 40000, VIP, 80);
    let s = Hop::from_server(server, 8080, CLIENT, 40000);
    let o = Hop::from_server(other, 8080, CLIENT, 40000);
    run_at(
        &r,
        NOW,
        &[tx(
            "the flow starts",
            tcp_syn(&c),
            FORWARD,
            tcp_syn(&c.to_server(server, 8080)),
        )],
    );
    for t in [NOW + 100, NOW + 200, NOW + 299] {
        run_at(
            &r,
            t,
            &[kept(
                "another web server writes to the client's port",
                tcp_syn_ack(&o),
                Verdict::Drop(DropReason::NoFlow),
            )],
        );
    }
    run_at(
        &r,
        NOW + 301,
        &[kept(
            "the flow's own server, after the idle timeout",
            tcp_syn_ack(&s),
            Verdict::Drop(DropReason::NoFlow),
        )],
    );
}

/// A UDP length field below 8 or past the IP payload (RFC 768) makes the
/// datagram malformed, like the TCP and IPv4 length errors above. (Once a
/// gap: such datagrams used to be forwarded.)
#[test]
fn udp_with_a_length_field_disagreeing_with_the_ip_payload_is_dropped_as_malformed() {
    let r = replayer();
    let c = Hop::from_client(CLIENT, 50000, VIP, 53);
    let at = UDP_CHECKSUM_AT - 2;
    let mut beyond = udp(&c, b"query");
    beyond[at..at + 2].copy_from_slice(&(8 + 5 + 100u16).to_be_bytes());
    let mut below_header = udp(&c, b"query");
    below_header[at..at + 2].copy_from_slice(&4u16.to_be_bytes());
    run(
        &r,
        &[
            kept(
                "UDP length 113 in a 33-byte IP payload",
                beyond,
                Verdict::Drop(DropReason::Malformed),
            ),
            kept(
                "UDP length 4, shorter than the UDP header",
                below_header,
                Verdict::Drop(DropReason::Malformed),
            ),
        ],
    );
}

/// The demo's web service with every server drained.
const DRAINED: &str = r#"
[instance]
name = "drained"
client_interface = "lb-c"
backend_interface = "lb-b"
client_gateway = "198.18.0.2"
flow_table_capacity = 1024

[[instance.neighbour]]
address = "198.18.0.2"
mac = "02:00:00:00:0c:01"

[[instance.neighbour]]
address = "198.18.2.11"
mac = "02:00:00:00:0b:01"

[[listener]]
name = "web"
vip = "198.18.100.1"
protocol = "tcp"
port = 80
backend_service = "web"

[[backend_service]]
name = "web"
protocol = "tcp"

  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8080
  weight = 0

  [[backend_service.server]]
  address = "198.18.2.12"
  port = 8080
  weight = 0
"#;

#[test]
fn a_service_whose_servers_all_have_weight_0_drops_new_clients_as_no_backend() {
    let cfg = Config::from_str(DRAINED, "drained.toml").expect("valid config");
    let r = Replayer::new(&cfg).expect("replayer");
    run(
        &r,
        &[
            kept(
                "SYN to the VIP",
                tcp_syn(&Hop::from_client(CLIENT, 40000, VIP, 80)),
                Verdict::Drop(DropReason::NoBackend),
            ),
            kept(
                "another client",
                tcp_syn(&Hop::from_client([198, 18, 4, 8], 40000, VIP, 80)),
                Verdict::Drop(DropReason::NoBackend),
            ),
        ],
    );
    assert_eq!(r.tables.flows.count_live(NOW), 0);
}

#[test]
fn a_server_without_a_known_mac_drops_as_no_neighbour() {
    // DRAINED without weights 0 and with only 198.18.2.11's MAC known.
    let cfg = Config::from_str(
        &DRAINED.replace("weight = 0", "weight = 100"),
        "undrained.toml",
    )
    .expect("valid config");
    let r = Replayer::new(&cfg).expect("replayer");
    let mut known = None;
    let mut unknown = None;
    for d in 1..=254 {
        let client = [198, 18, 5, d];
        let id = r.snapshot.pick(0, &client).unwrap();
        match r.snapshot.backends[id as usize]
            .address
            .to_string()
            .as_str()
        {
            "198.18.2.11" => known = known.or(Some(client)),
            _ => unknown = unknown.or(Some(client)),
        }
    }
    let (known, unknown) = (known.unwrap(), unknown.unwrap());
    let k = Hop::from_client(known, 1234, VIP, 80);
    run(
        &r,
        &[
            tx(
                "a client of the server whose MAC is known",
                tcp_syn(&k),
                FORWARD,
                tcp_syn(&k.to_server([198, 18, 2, 11], 8080)),
            ),
            kept(
                "a client of the server whose MAC is not",
                tcp_syn(&Hop::from_client(unknown, 1234, VIP, 80)),
                Verdict::Drop(DropReason::NoNeighbour),
            ),
        ],
    );
}

// ---------------------------------------------------------------------------
// Robustness: garbage in, a verdict out, never a panic.
// ---------------------------------------------------------------------------

/// xorshift64: deterministic, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One's complement sum (RFC 1071), written independently of l4lb's.
fn ones_sum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u64;
    for c in chunks {
        for w in c.chunks(2) {
            sum += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Whether an IPv4 frame's header checksum and TCP/UDP checksum verify
/// (`None` when the frame is not a complete IPv4 TCP/UDP packet).
fn ipv4_checksums_ok(f: &[u8]) -> Option<(bool, bool)> {
    if f.len() < 34 || f[12..14] != [8, 0] {
        return None;
    }
    let ihl = (f[14] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    let proto = f[23];
    if ihl < 20 || total < ihl || 14 + total > f.len() || (proto != 6 && proto != 17) {
        return None;
    }
    let ip_ok = ones_sum(&[&f[14..14 + ihl]]) == 0xffff;
    let seg = &f[14 + ihl..14 + total];
    let len = (seg.len() as u16).to_be_bytes();
    let pseudo = [0, proto, len[0], len[1]];
    let l4_ok = if proto == 17 && seg.len() >= 8 && seg[6..8] == [0, 0] {
        true // no checksum
    } else {
        ones_sum(&[&f[26..34], &pseudo, seg]) == 0xffff
    };
    Some((ip_ok, l4_ok))
}

/// Checks what a forwarded frame must be, whatever the input was.
fn check_tx(r: &Replayer, v: Verdict, input: &[u8], out: &[u8], what: &str) {
    assert_eq!(out.len(), input.len(), "{what}: length changed");
    if let Frame::OtherProto { .. } = parse(input) {
        return check_icmp_tx(input, out, what);
    }
    let Frame::L4(p) = parse(out) else {
        panic!(
            "{what}: {v:?} output does not parse as TCP/UDP: {}",
            hex(out)
        );
    };
    if let Err(e) = SlicedPacket::from_ethernet(out) {
        panic!("{what}: etherparse rejects the output: {e}");
    }
    let Frame::L4(q) = parse(input) else {
        panic!("{what}: forwarded a frame that is not TCP/UDP");
    };
    assert_eq!(p.ttl, q.ttl - 1, "{what}: TTL");
    // Only the NAT'ed fields change: MACs, TTL, IP checksum, one address,
    // one port, the L4 checksum.
    let (addr, port) = match v {
        Verdict::Tx(Port::Backend) => (p.l3 + 16, p.l4 + 2),
        _ => (p.l3 + 12, p.l4),
    };
    let l4sum = p.l4 + if p.proto == 17 { 6 } else { 16 };
    let may_change = |i: usize| {
        i < 12
            || i == p.l3 + 8
            || (p.l3 + 10..p.l3 + 12).contains(&i)
            || (addr..addr + 4).contains(&i)
            || (port..port + 2).contains(&i)
            || (l4sum..l4sum + 2).contains(&i)
    };
    if let Some(i) = (0..out.len()).find(|&i| out[i] != input[i] && !may_change(i)) {
        panic!("{what}: byte {i} changed: {}", first_difference(out, input));
    }
    match v {
        Verdict::Tx(Port::Backend) => {
            assert_eq!(out[6..12], BACKEND_IF_MAC, "{what}");
            assert!(r.snapshot.backend(&p.dst, p.dport, p.proto).is_some());
            assert_eq!((p.src, p.sport), (q.src, q.sport), "{what}: client kept");
        }
        Verdict::Tx(Port::Client) => {
            assert_eq!(out[6..12], CLIENT_IF_MAC, "{what}");
            assert_eq!(out[0..6], GATEWAY_MAC, "{what}");
            assert!(r.snapshot.listener(&p.src, p.sport, p.proto).is_some());
            assert_eq!((p.dst, p.dport), (q.dst, q.dport), "{what}: client kept");
        }
        _ => unreachable!(),
    }
    // The incremental update keeps a right checksum right (and cannot make
    // a wrong one right).
    if let (Some(before), Some(after)) = (ipv4_checksums_ok(input), ipv4_checksums_ok(out)) {
        assert_eq!(after, before, "{what}: checksum validity changed");
    }
}

/// A frame of random bytes, often shaped enough (IPv4, a VIP or a server,
/// TCP/UDP, listener or backend ports) to get past the first checks.
fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let len = rng.below(200);
    let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    let set = |f: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        if f.len() >= at + bytes.len() {
            f[at..at + bytes.len()].copy_from_slice(bytes);
        }
    };
    match rng.below(8) {
        0 => return f,
        1 => {
            set(&mut f, 12, &[0x86, 0xdd]);
            set(&mut f, 14, &[0x60]);
            return f;
        }
        _ => set(&mut f, 12, &[0x08, 0x00]),
    }
    if rng.below(4) != 0 {
        set(&mut f, 14, &[0x45]);
    }
    if rng.below(4) != 0 {
        let total = (len.saturating_sub(14) as u16).to_be_bytes();
        set(&mut f, 16, &total);
    }
    if rng.below(4) != 0 {
        set(&mut f, 20, &[0, 0]); // not a fragment
    }
    if rng.below(2) == 0 {
        set(&mut f, 22, &[64]);
    }
    let proto = [6, 17, 1, rng.next() as u8][rng.below(4)];
    set(&mut f, 23, &[proto]);
    let server = SERVERS[rng.below(3)].0;
    // The listeners and the servers' ports, by protocol.
    let (listeners, server_port): (&[([u8; 4], u16)], u16) = match proto {
        17 => (&[(VIP, 53)], 9053),
        _ => (&[(VIP, 80), (VIP_ALT, 80)], 8080),
    };
    match rng.below(3) {
        0 => {
            let (vip, port) = listeners[rng.below(listeners.len())];
            set(&mut f, 30, &vip);
            set(&mut f, 36, &port.to_be_bytes());
        }
        1 => {
            set(&mut f, 26, &server);
            set(&mut f, 30, &CLIENT);
            set(&mut f, 34, &server_port.to_be_bytes());
        }
        _ => {}
    }
    if rng.below(2) == 0 {
        set(&mut f, 46, &[0x50]); // TCP data offset 5
    }
    f
}

fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !f.is_empty() => f.truncate(rng.below(f.len())),
            1 => f.extend((0..rng.below(16)).map(|_| rng.next() as u8)),
            // Mostly hit the headers, where the decisions are.
            2..=4 if !f.is_empty() => {
                let i = rng.below(f.len().min(60));
                f[i] = rng.next() as u8;
            }
            _ if !f.is_empty() => {
                let i = rng.below(f.len());
                f[i] ^= 1 << rng.below(8);
            }
            _ => {}
        }
    }
    f
}

#[test]
fn garbage_and_mutated_frames_never_panic_and_forwarded_ones_are_well_formed() {
    let r = replayer();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // Processes one frame, checks it, says whether it was forwarded.
    let process = |input: Vec<u8>, what: &str| -> u64 {
        let mut out = input.clone();
        let v = r.process(&mut out, NOW);
        match v {
            Verdict::Tx(_) => {
                check_tx(&r, v, &input, &out, what);
                1
            }
            Verdict::Pass | Verdict::Drop(_) => {
                assert_eq!(out, input, "{what}: {v:?} frame modified");
                0
            }
        }
    };
    let mut frames = 0u64;
    let mut tx = 0u64;

    for i in 0..10_000 {
        let f = random_frame(&mut rng);
        tx += process(f, &format!("random frame {i}"));
        frames += 1;
    }
    let random_tx = tx;

    let (server, _) = simulated(&r, "web", CLIENT);
    let (echo_server, _) = simulated(&r, "echo", CLIENT);
    let c = Hop::from_client(CLIENT, 40000, VIP, 80);
    let s = Hop::from_server(server, 8080, CLIENT, 40000);
    let uc = Hop::from_client(CLIENT, 50000, VIP, 53);
    let us = Hop::from_server(echo_server, 9053, CLIENT, 50000);
    let bases = [
        tcp_syn(&c),
        tcp_syn_with_ip_options(&c, &[0x94, 0x04, 0x00, 0x00]),
        tcp_syn_ack(&s),
        tcp_data(&c, b"GET / HTTP/1.1\r\n\r\n"),
        tcp_data(&s, b"HTTP/1.1 200 OK\r\n\r\n"),
        udp(&uc, b"query"),
        udp(&us, b"answer"),
        udp_without_checksum(&uc, b"query"),
        udp_without_checksum(&us, b"answer!"),
        icmp_echo(&Hop::from_client(CLIENT, 0, VIP, 0)),
        // ICMP errors about the TCP flow, both ways.
        port_unreachable(
            &Hop::from_server(server, 0, CLIENT, 0),
            &tcp_syn(&c.to_server(server, 8080)),
        ),
        fragmentation_needed(
            &Hop::from_client([198, 18, 0, 9], 0, VIP, 0),
            &tcp_syn_ack(&s.to_client(VIP, 80)),
        ),
        arp_request(VIP),
        ipv6_tcp_syn(
            [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            [0; 16],
        ),
    ];
    // The flows the replies belong to.
    for b in [&bases[0], &bases[5]] {
        tx += process(b.clone(), "flow set-up");
        frames += 1;
    }
    for i in 0..10_000 {
        let base = &bases[rng.below(bases.len())];
        let f = mutate(&mut rng, base);
        tx += process(f, &format!("mutation {i}"));
        frames += 1;
    }

    // Every frame was counted exactly once.
    let n = counts(&r);
    let total = n.forwarded + n.replied + n.passed + n.drops.iter().sum::<u64>();
    assert_eq!(total, frames);
    assert_eq!(n.forwarded + n.replied, tx);
    // Both generators reached the rewrite often enough to mean something.
    // (Random UDP frames must also get their length field right, so fewer
    // of them pass than TCP ones: about 150 of 10k with this seed.)
    assert!(random_tx > 100, "random frames forwarded: {random_tx}");
    assert!(
        tx - random_tx > 1000,
        "mutations forwarded: {}",
        tx - random_tx
    );
    assert!(n.replied > 100, "replies: {}", n.replied);
    let icmp = r.stats.core.icmp.load(Relaxed);
    assert!(icmp > 100, "ICMP errors translated: {icmp}");
}

/// A translated ICMP error (IPv4): still ICMP, its own header checksum
/// still as valid as it came in, its ICMP checksum valid, one hop later.
fn check_icmp_tx(input: &[u8], out: &[u8], what: &str) {
    use l4lb::dataplane::checksum::checksum;
    let ihl = usize::from(out[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([out[16], out[17]]));
    assert_eq!(out[14 + 9], 1, "{what}: no longer ICMP");
    assert_eq!(out[14 + 8], input[14 + 8] - 1, "{what}: TTL");
    let header_ok = |f: &[u8]| checksum(&f[14..14 + ihl]) == 0;
    assert_eq!(
        header_ok(out),
        header_ok(input),
        "{what}: IPv4 header checksum"
    );
    assert_eq!(
        checksum(&out[14 + ihl..14 + total]),
        0,
        "{what}: ICMP checksum: {}",
        hex(out)
    );
}

const WRR_UDP: &str = r#"
[instance]
name = "wrr"
client_interface = "lb-c"
backend_interface = "lb-b"
client_gateway = "198.18.0.2"
flow_table_capacity = 1024
flow_idle_timeout = 10

[[instance.neighbour]]
address = "198.18.0.2"
mac = "02:00:00:00:0c:01"

[[instance.neighbour]]
address = "198.18.2.11"
mac = "02:00:00:00:0b:01"

[[instance.neighbour]]
address = "198.18.2.12"
mac = "02:00:00:00:0b:02"

[[listener]]
name = "echo"
vip = "198.18.100.1"
protocol = "udp"
port = 53
backend_service = "echo"

[[backend_service]]
name = "echo"
protocol = "udp"
scheduler = "weighted_round_robin"

  [[backend_service.server]]
  address = "198.18.2.11"
  port = 9053

  [[backend_service.server]]
  address = "198.18.2.12"
  port = 9053
"#;

/// The server of hop `s` sends a datagram to its client (of the echo
/// listener, 198.18.100.1:53) at each of `times`, each answered from the
/// VIP.
fn server_streams(r: &Replayer, s: &Hop, times: impl IntoIterator<Item = u32>) {
    for t in times {
        run_at(
            r,
            t,
            &[tx(
                "the server streams",
                udp(s, b"stream"),
                REPLY,
                udp(&s.to_client(VIP, 53), b"stream"),
            )],
        );
    }
}

/// The idle timeout counts silence in both directions: a client that only
/// listens (a UDP stream, a subscription) for longer than
/// `flow_idle_timeout` stays on the server still sending to it, even under
/// round robin. (Once a bug: replies refreshed only the reply entry.)
#[test]
fn a_flow_kept_alive_by_its_servers_traffic_keeps_its_server() {
    let cfg = Config::from_str(WRR_UDP, "wrr.toml").expect("valid config");
    let r = Replayer::new(&cfg).expect("replayer");
    // Round robin starts at the first server.
    let server = [198, 18, 2, 11];
    let c = Hop::from_client(CLIENT, 50000, VIP, 53);
    let s = Hop::from_server(server, 9053, CLIENT, 50000);
    run_at(
        &r,
        100,
        &[tx(
            "the client subscribes",
            udp(&c, b"subscribe"),
            FORWARD,
            udp(&c.to_server(server, 9053), b"subscribe"),
        )],
    );
    // flow_idle_timeout is 10 s: the server's stream keeps the flow busy.
    server_streams(&r, &s, [105, 110, 115, 120]);
    run_at(
        &r,
        121,
        &[tx(
            "the client's next datagram goes to the same server",
            udp(&c, b"more"),
            FORWARD,
            udp(&c.to_server(server, 9053), b"more"),
        )],
    );
}

#[test]
fn a_server_silent_while_its_client_talks_can_still_answer_after_the_idle_timeout() {
    let cfg = Config::from_str(WRR_UDP, "wrr.toml").expect("valid config");
    let r = Replayer::new(&cfg).expect("replayer");
    let server = [198, 18, 2, 11];
    let c = Hop::from_client(CLIENT, 50001, VIP, 53);
    let s = Hop::from_server(server, 9053, CLIENT, 50001);
    // flow_idle_timeout is 10 s: only the client talks, for 21 s.
    for t in [100, 105, 110, 115, 120] {
        run_at(
            &r,
            t,
            &[tx(
                "the client streams",
                udp(&c, b"stream"),
                FORWARD,
                udp(&c.to_server(server, 9053), b"stream"),
            )],
        );
    }
    // The reply entry was refreshed by the client's traffic.
    run_at(
        &r,
        121,
        &[tx(
            "the server finally answers",
            udp(&s, b"answer"),
            REPLY,
            udp(&s.to_client(VIP, 53), b"answer"),
        )],
    );
}

/// Round robin over two servers with 30 s persistence: without persistence
/// every new flow would alternate servers, so a flow that stays put proves
/// the persisted entry decided.
fn persist_udp(capacity: usize, when_full: &str) -> Config {
    let text = WRR_UDP
        .replace(
            "flow_idle_timeout = 10\n",
            &format!(
                "flow_idle_timeout = 10\npersistence_capacity = {capacity}\npersistence_when_full = \"{when_full}\"\n"
            ),
        )
        .replace(
            "scheduler = \"weighted_round_robin\"\n",
            "scheduler = \"weighted_round_robin\"\npersistence_timeout = 30\n",
        );
    Config::from_str(&text, "persist.toml").expect("valid config")
}

/// The server a new UDP flow from `client:port` is forwarded to at `now`.
fn server_for(r: &Replayer, now: u32, client: [u8; 4], port: u16) -> Option<[u8; 4]> {
    let mut f = udp(&Hop::from_client(client, port, VIP, 53), b"x");
    match r.process(&mut f, now) {
        Verdict::Tx(Port::Backend) => Some(f[30..34].try_into().expect("4 bytes")),
        _ => None,
    }
}

#[test]
fn a_persisted_client_keeps_its_server_until_30_s_of_silence() {
    let r = Replayer::new(&persist_udp(1024, "evict_oldest")).expect("replayer");
    let first = server_for(&r, 100, CLIENT, 40000).unwrap();
    // Other clients move the round-robin cursor on.
    let other = server_for(&r, 100, [198, 18, 4, 8], 40000).unwrap();
    assert_ne!(first, other, "round robin alternates");
    // New flows (new source ports) from the client, each within 30 s of the
    // last packet: every one refreshes the entry and goes to the same server.
    for (i, t) in [120, 145, 170, 199].iter().enumerate() {
        assert_eq!(
            server_for(&r, *t, CLIENT, 40001 + i as u16),
            Some(first),
            "t={t}"
        );
    }
    // 31 s of silence: the entry has expired and the scheduler decides. The
    // cursor now points at `first` again (4 persisted hits did not move it),
    // so burn one turn with another client first.
    let _ = server_for(&r, 230, [198, 18, 4, 9], 40000);
    let after = server_for(&r, 231, CLIENT, 40010).unwrap();
    assert_ne!(after, first, "expired: scheduled afresh");
    let c = &r.stats.core;
    assert_eq!(c.persist_hits.load(Relaxed), 4);
}

#[test]
fn a_flood_of_spoofed_clients_never_grows_the_persistence_table() {
    for policy in ["evict_oldest", "no_record"] {
        let r = Replayer::new(&persist_udp(1024, policy)).expect("replayer");
        let cap = r.tables.persist.capacity();
        let mem = r.tables.persist.memory();
        assert_eq!(cap, 1024);
        // A legitimate client first, then 100k spoofed sources.
        let victim = server_for(&r, 10, CLIENT, 40000).unwrap();
        for i in 0..100_000u32 {
            let src = (0xc612_8000u32 + i).to_be_bytes(); // 198.18.128.0 upward
            assert!(
                server_for(&r, 11, src, 1234).is_some(),
                "flood packet {i} forwarded"
            );
        }
        assert!(r.tables.persist.count_live(11) <= cap);
        assert_eq!(r.tables.persist.memory(), mem, "{policy}: memory unchanged");
        let c = &r.stats.core;
        match policy {
            "evict_oldest" => assert!(c.persist_evicted.load(Relaxed) > 90_000),
            _ => {
                assert!(c.persist_full.load(Relaxed) > 90_000);
                assert_eq!(c.persist_evicted.load(Relaxed), 0);
                // Recorded sessions are kept: the victim still gets its
                // server, whatever the round-robin cursor says.
                for port in 40001..40005 {
                    assert_eq!(server_for(&r, 12, CLIENT, port), Some(victim));
                }
            }
        }
    }
}

/// `persist_udp` with a second listener (port 54) on the same service, so
/// that its servers are shared and their replies find the flow through a
/// reply entry rather than the forward entry.
fn persist_udp_shared() -> Config {
    let text = WRR_UDP
        .replace(
            "flow_idle_timeout = 10\n",
            "flow_idle_timeout = 10\npersistence_capacity = 1024\n",
        )
        .replace(
            "scheduler = \"weighted_round_robin\"\n",
            "scheduler = \"weighted_round_robin\"\npersistence_timeout = 30\n",
        )
        .replace(
            "[[backend_service]]",
            "[[listener]]\nname = \"echo2\"\nvip = \"198.18.100.1\"\nprotocol = \"udp\"\nport = 54\nbackend_service = \"echo\"\n\n[[backend_service]]",
        );
    Config::from_str(&text, "persist-shared.toml").expect("valid config")
}

/// A client that only listens (its flow kept alive by the server's
/// datagrams) keeps its session too: its next flow, 60 s after its last
/// packet and so 30 s past the persistence timeout, goes to the same
/// server, though round robin would send it to the other. Checked for a
/// server of one listener (replies find the forward entry) and for a
/// shared one (replies find a reply entry). (Once a bug: only the client's
/// packets refreshed the session.)
#[test]
fn a_session_lives_while_the_servers_traffic_keeps_its_flow_alive() {
    for (what, cfg) in [
        ("one listener", persist_udp(1024, "evict_oldest")),
        ("shared", persist_udp_shared()),
    ] {
        let r = Replayer::new(&cfg).expect("replayer");
        let first = server_for(&r, 100, CLIENT, 40000).expect("forwarded");
        let s = Hop::from_server(first, 9053, CLIENT, 40000);
        // flow_idle_timeout is 10 s: the server's stream keeps the flow
        // alive, the client stays silent.
        server_streams(&r, &s, (105..=160).step_by(5));
        // Round robin: `first` went to CLIENT, so the next new client gets
        // the other server, and the one after that `first` again, which
        // leaves the cursor at the other server for CLIENT's next flow.
        let other = server_for(&r, 160, [198, 18, 4, 8], 40000).expect("forwarded");
        assert_ne!(other, first, "{what}: round robin alternates");
        assert_eq!(server_for(&r, 160, [198, 18, 4, 9], 40000), Some(first));
        assert_eq!(
            server_for(&r, 160, CLIENT, 40001),
            Some(first),
            "{what}: the listening client's session is alive"
        );
        assert_eq!(r.stats.core.persist_hits.load(Relaxed), 1, "{what}");
    }
}
