//! ICMP errors about NAT'ed flows, translated as the flow itself is
//! (RFC 5508 §4, as IPVS and stateful NATs do).
//!
//! An ICMP error quotes the start of the packet that caused it. Without
//! translation, the error names addresses its receiver never used:
//!
//! * **To a server.** A router on the client's path (or the client) answers
//!   a reply the server sent, e.g. "fragmentation needed" / "packet too
//!   big". The error goes to the VIP and quotes VIP:port → client. It is
//!   sent on to the flow's server, with its destination and the quoted
//!   source rewritten to the server's address and port, so that the server's
//!   path MTU discovery (and its TCP or UDP socket) sees it.
//! * **To a client.** The server answers a client's packet, e.g. "port
//!   unreachable". The error comes from the server and quotes client →
//!   server:port. It is sent on to the client, with its source and the
//!   quoted destination rewritten to the VIP and the listener's port.
//!
//! Only the error types are translated (IPv4: destination unreachable, time
//! exceeded, parameter problem; ICMPv6: destination unreachable, packet too
//! big, time exceeded, parameter problem), and only when they quote a TCP or
//! UDP packet of a live flow. This is the slow path: an error whose ICMP
//! checksum is wrong is dropped (`malformed`), the checksum of one that is
//! translated is recomputed over the whole message, and the quoted headers'
//! checksums are updated incrementally (the quote is usually cut short of
//! the payload).

use crate::dataplane::checksum::{checksum, l4_checksum, Wsum};
use crate::dataplane::counters::DropReason;
use crate::dataplane::packet::{eth, ipv4, ipv6, l4, ETH_LEN, PROTO_TCP, PROTO_UDP};
use crate::util::{map_v4, Addr16, Mac};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// Offset of the checksum in an ICMP or ICMPv6 header.
const ICMP_CHECKSUM: usize = 2;
/// Length of the ICMP header before the quoted packet.
const ICMP_HEADER: usize = 8;

/// Whether ICMP (`v6` false) or ICMPv6 message type `ty` is an error that
/// quotes a packet. The steering program (bpf/l4lb_steer.c) redirects the
/// same types when they are sent to a VIP.
#[inline]
pub fn is_error_type(v6: bool, ty: u8) -> bool {
    if v6 {
        // Destination unreachable, packet too big, time exceeded,
        // parameter problem (RFC 4443 §3).
        matches!(ty, 1..=4)
    } else {
        // Destination unreachable, time exceeded, parameter problem
        // (RFC 792).
        matches!(ty, 3 | 11 | 12)
    }
}

/// An ICMP error and the TCP/UDP packet it quotes, as offsets into the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    pub v6: bool,
    /// Offset of the ICMP header.
    icmp: usize,
    /// End of the ICMP message (from the outer IP length, not the frame's:
    /// a short frame may carry Ethernet padding).
    end: usize,
    /// Offset of the quoted IP header.
    inner: usize,
    /// Offset of the quoted TCP/UDP header.
    inner_l4: usize,
    /// The error's own TTL / hop limit.
    pub ttl: u8,
    /// The quoted packet.
    pub proto: u8,
    pub src: Addr16,
    pub dst: Addr16,
    pub sport: u16,
    pub dport: u16,
}

/// What an ICMP frame is to the translator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icmp {
    /// Not ICMP, or an ICMP message that is not an error (echo, neighbour
    /// discovery, ...).
    NotError,
    /// An error quoting a TCP or UDP packet.
    Error(IcmpError),
    /// An error that cannot be translated: a cut or broken quote, a quoted
    /// fragment, or a quote of another protocol.
    Bad(DropReason),
}

/// Reads an ICMP error out of `frame` (Ethernet II, IPv4 or IPv6).
pub fn parse(frame: &[u8]) -> Icmp {
    if frame.len() < ETH_LEN {
        return Icmp::NotError;
    }
    match [frame[12], frame[13]] {
        [0x08, 0x00] => parse_v4(frame),
        [0x86, 0xdd] => parse_v6(frame),
        _ => Icmp::NotError,
    }
}

fn parse_v4(frame: &[u8]) -> Icmp {
    let ip = &frame[ETH_LEN..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != PROTO_ICMP {
        return Icmp::NotError;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || total < ihl || total > ip.len() {
        return Icmp::Bad(DropReason::Malformed);
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Icmp::Bad(DropReason::Fragment);
    }
    let msg = &ip[ihl..total];
    if msg.len() < ICMP_HEADER || !is_error_type(false, msg[0]) {
        return Icmp::NotError;
    }
    if checksum(msg) != 0 {
        // Damaged on its way: the translation recomputes the checksum, so
        // passing it on would hide that from its receiver (RFC 5508 §7).
        return Icmp::Bad(DropReason::Malformed);
    }
    let quote = &msg[ICMP_HEADER..];
    // The quote: an IPv4 header and at least the 8 bytes with the ports
    // (RFC 792).
    if quote.len() < 20 || quote[0] >> 4 != 4 {
        return Icmp::Bad(DropReason::Malformed);
    }
    let qihl = usize::from(quote[0] & 0x0f) * 4;
    if qihl < 20 || quote.len() < qihl + 8 {
        return Icmp::Bad(DropReason::Malformed);
    }
    let proto = quote[9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Icmp::Bad(DropReason::Unsupported);
    }
    if u16::from_be_bytes([quote[6], quote[7]]) & 0x1fff != 0 {
        // A later fragment: no ports to find the flow by.
        return Icmp::Bad(DropReason::Fragment);
    }
    let icmp = ETH_LEN + ihl;
    let inner = icmp + ICMP_HEADER;
    let addr = |at: usize| map_v4(quote[at..at + 4].try_into().expect("4 bytes"));
    let port = |at: usize| u16::from_be_bytes([quote[qihl + at], quote[qihl + at + 1]]);
    Icmp::Error(IcmpError {
        v6: false,
        icmp,
        end: ETH_LEN + total,
        inner,
        inner_l4: inner + qihl,
        ttl: ip[ipv4::TTL],
        proto,
        src: addr(ipv4::SRC.start),
        dst: addr(ipv4::DST.start),
        sport: port(l4::SRC_PORT.start),
        dport: port(l4::DST_PORT.start),
    })
}

fn parse_v6(frame: &[u8]) -> Icmp {
    let ip = &frame[ETH_LEN..];
    if ip.len() < ipv6::LEN || ip[0] >> 4 != 6 || ip[6] != PROTO_ICMPV6 {
        return Icmp::NotError;
    }
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if ipv6::LEN + payload > ip.len() {
        return Icmp::Bad(DropReason::Malformed);
    }
    let msg = &ip[ipv6::LEN..ipv6::LEN + payload];
    if msg.len() < ICMP_HEADER || !is_error_type(true, msg[0]) {
        return Icmp::NotError;
    }
    if l4_checksum(&ip[ipv6::SRC], &ip[ipv6::DST], PROTO_ICMPV6, msg) != 0 {
        // As for IPv4 (the sum covers the pseudo-header too).
        return Icmp::Bad(DropReason::Malformed);
    }
    let quote = &msg[ICMP_HEADER..];
    if quote.len() < ipv6::LEN + 8 || quote[0] >> 4 != 6 {
        return Icmp::Bad(DropReason::Malformed);
    }
    let proto = quote[6];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        // Another protocol, or extension headers (not followed, as in the
        // rest of the data plane).
        return Icmp::Bad(DropReason::Unsupported);
    }
    let icmp = ETH_LEN + ipv6::LEN;
    let inner = icmp + ICMP_HEADER;
    let addr = |r: core::ops::Range<usize>| -> Addr16 { quote[r].try_into().expect("16 bytes") };
    let port = |at: usize| u16::from_be_bytes([quote[ipv6::LEN + at], quote[ipv6::LEN + at + 1]]);
    Icmp::Error(IcmpError {
        v6: true,
        icmp,
        end: ETH_LEN + ipv6::LEN + payload,
        inner,
        inner_l4: inner + ipv6::LEN,
        ttl: ip[ipv6::HOP_LIMIT],
        proto,
        src: addr(ipv6::SRC),
        dst: addr(ipv6::DST),
        sport: port(l4::SRC_PORT.start),
        dport: port(l4::DST_PORT.start),
    })
}

/// Which addresses a translation rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toward {
    /// An error to a VIP about a reply: its destination and the quoted
    /// packet's source (VIP:port) become the server's `addr`:`port`.
    Server,
    /// An error from a server about a client's packet: its source and the
    /// quoted packet's destination (server:port) become the VIP's.
    Client,
}

/// Rewrites the error `e` in `frame` (see [`Toward`]), sent from `src_mac`
/// to `dst_mac`, with its TTL / hop limit decremented. The caller has
/// checked that the TTL is above 1 and that `addr` is of the frame's family.
pub fn translate(
    frame: &mut [u8],
    e: &IcmpError,
    toward: Toward,
    addr: &Addr16,
    port: u16,
    src_mac: &Mac,
    dst_mac: &Mac,
) {
    frame[eth::DST].copy_from_slice(dst_mac);
    frame[eth::SRC].copy_from_slice(src_mac);
    // (outer address, quoted address, quoted port) offsets in their headers.
    let (outer_at, inner_at, port_at) = match (toward, e.v6) {
        (Toward::Server, false) => (ipv4::DST, ipv4::SRC, l4::SRC_PORT),
        (Toward::Client, false) => (ipv4::SRC, ipv4::DST, l4::DST_PORT),
        (Toward::Server, true) => (ipv6::DST, ipv6::SRC, l4::SRC_PORT),
        (Toward::Client, true) => (ipv6::SRC, ipv6::DST, l4::DST_PORT),
    };
    let (l3, inner) = (ETH_LEN, e.inner);
    let addr: &[u8] = if e.v6 { addr } else { &addr[12..] };

    // The outer header, as a router would.
    let outer_delta = replace(&mut frame[l3 + outer_at.start..l3 + outer_at.end], addr);
    if e.v6 {
        frame[l3 + ipv6::HOP_LIMIT] -= 1;
    } else {
        frame[l3 + ipv4::TTL] -= 1;
        outer_delta
            .merge(Wsum::TTL_DECREMENT)
            .update(field2(frame, l3 + ipv4::CHECKSUM));
    }

    // The quoted packet: address (and the quoted IPv4 header's checksum),
    // port, and the quoted TCP/UDP checksum if the quote reaches it.
    let inner_delta = replace(
        &mut frame[inner + inner_at.start..inner + inner_at.end],
        addr,
    );
    if !e.v6 {
        inner_delta.update(field2(frame, inner + ipv4::CHECKSUM));
    }
    let port_field = field2(frame, e.inner_l4 + port_at.start);
    let old_port = u16::from_ne_bytes(*port_field);
    let new_port = u16::from_ne_bytes(port.to_be_bytes());
    *port_field = new_port.to_ne_bytes();
    let udp = e.proto == PROTO_UDP;
    let ck = e.inner_l4
        + if udp {
            l4::UDP_CHECKSUM
        } else {
            l4::TCP_CHECKSUM
        };
    if ck + 2 <= e.end {
        // A UDP checksum of zero means "none" (IPv4) and stays so; l4lb
        // forwards no IPv6 UDP without one, so such a quote is not of a
        // packet it sent, and zero is left as found rather than made up.
        inner_delta
            .replace(old_port as u32, new_port as u32)
            .update_l4(field2(frame, ck), udp, true);
    }

    // The ICMP checksum, over the whole message (and, for ICMPv6, the
    // pseudo-header of the rewritten outer addresses).
    let c = e.icmp + ICMP_CHECKSUM;
    frame[c..c + 2].fill(0);
    let msg = &frame[e.icmp..e.end];
    let sum = if e.v6 {
        l4_checksum(
            &frame[l3 + ipv6::SRC.start..l3 + ipv6::SRC.end],
            &frame[l3 + ipv6::DST.start..l3 + ipv6::DST.end],
            PROTO_ICMPV6,
            msg,
        )
    } else {
        checksum(msg)
    };
    frame[c..c + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Overwrites the address `field` (4 or 16 bytes) with `new` and returns
/// the checksum delta.
fn replace(field: &mut [u8], new: &[u8]) -> Wsum {
    match field.len() {
        4 => Wsum::replace_field::<4>(
            field.try_into().expect("4 bytes"),
            new.try_into().expect("4 bytes"),
        ),
        _ => Wsum::replace_field::<16>(
            field.try_into().expect("16 bytes"),
            new.try_into().expect("16 bytes"),
        ),
    }
}

/// The 16-bit field of `frame` at `at`.
fn field2(frame: &mut [u8], at: usize) -> &mut [u8; 2] {
    (&mut frame[at..at + 2]).try_into().expect("2 bytes")
}

#[cfg(test)]
/// An ICMP(v6) error frame from `src` to `dst` with hop limit `ttl`,
/// quoting `quote`: "port unreachable", or when `too_big`,
/// "fragmentation needed" / "packet too big" with MTU 1400. The one
/// builder of such frames for the unit tests here and in the pipeline.
pub(crate) fn error_frame(
    eth: (Mac, Mac),
    src: &str,
    dst: &str,
    ttl: u8,
    too_big: bool,
    quote: &[u8],
) -> Vec<u8> {
    use etherparse::{
        icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode, Icmpv4Type, Icmpv6Type,
        PacketBuilder,
    };
    use std::net::IpAddr;
    let b = PacketBuilder::ethernet2(eth.0, eth.1);
    let mut out = Vec::new();
    match (
        src.parse::<IpAddr>().unwrap(),
        dst.parse::<IpAddr>().unwrap(),
    ) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let h = if too_big {
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }
            } else {
                DestUnreachableHeader::Port
            };
            b.ipv4(s.octets(), d.octets(), ttl)
                .icmpv4(Icmpv4Type::DestinationUnreachable(h))
                .write(&mut out, quote)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ty = if too_big {
                Icmpv6Type::PacketTooBig { mtu: 1400 }
            } else {
                Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port)
            };
            b.ipv6(s.octets(), d.octets(), ttl)
                .icmpv6(ty)
                .write(&mut out, quote)
        }
        _ => panic!("mixed families"),
    }
    .unwrap();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::addr16;
    use etherparse::{IcmpEchoHeader, Icmpv6Type, PacketBuilder, SlicedPacket, TransportSlice};
    use std::net::IpAddr;

    const A: Mac = [2, 0, 0, 0, 0, 1];
    const B: Mac = [2, 0, 0, 0, 0, 2];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn octets4(s: &str) -> [u8; 4] {
        match ip(s) {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(_) => panic!("{s}"),
        }
    }

    fn octets6(s: &str) -> [u8; 16] {
        match ip(s) {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => panic!("{s}"),
        }
    }

    /// An IP packet (no Ethernet header) from `src`:`sport` to `dst`:`dport`.
    fn quoted(src: &str, sport: u16, dst: &str, dport: u16, udp: bool) -> Vec<u8> {
        let b = if ip(src).is_ipv4() {
            PacketBuilder::ipv4(octets4(src), octets4(dst), 64)
        } else {
            PacketBuilder::ipv6(octets6(src), octets6(dst), 64)
        };
        let mut out = Vec::new();
        let payload = [0x5a; 100];
        if udp {
            b.udp(sport, dport).write(&mut out, &payload).unwrap();
        } else {
            b.tcp(sport, dport, 7, 1000)
                .ack(9)
                .write(&mut out, &payload)
                .unwrap();
        }
        out
    }

    /// Checks every checksum of a translated frame from scratch: outer IPv4
    /// header, ICMP message, quoted IPv4 header, and the quoted UDP/TCP
    /// checksum against an incremental-free recompute of the original
    /// packet with the new addresses.
    fn assert_checksums(frame: &[u8], e: &IcmpError, want_quote: &[u8]) {
        let msg = &frame[e.icmp..e.end];
        if e.v6 {
            let ip = &frame[ETH_LEN..];
            let mut zeroed = msg.to_vec();
            zeroed[2..4].fill(0);
            let sum = l4_checksum(&ip[8..24], &ip[24..40], PROTO_ICMPV6, &zeroed);
            assert_eq!(u16::from_be_bytes([msg[2], msg[3]]), sum, "ICMPv6 checksum");
        } else {
            assert_eq!(
                checksum(&frame[ETH_LEN..ETH_LEN + 20]),
                0,
                "outer IPv4 header"
            );
            assert_eq!(checksum(msg), 0, "ICMP checksum");
            assert_eq!(checksum(&msg[8..28]), 0, "quoted IPv4 header");
        }
        assert_eq!(&msg[8..], want_quote, "quoted packet");
    }

    #[test]
    fn port_unreachable_from_a_server_reaches_the_client_from_the_vip() {
        for (client, vip, server, udp) in [
            ("198.18.4.7", "198.18.100.1", "198.18.2.11", true),
            ("198.18.4.7", "198.18.100.1", "198.18.2.11", false),
            ("2001:2:0:4::7", "2001:2:0:100::1", "2001:2:0:2::11", true),
            ("2001:2:0:4::7", "2001:2:0:100::1", "2001:2:0:2::11", false),
        ] {
            // The server received client:40000 -> server:9053 and answers
            // with an error quoting it.
            let q = quoted(client, 40000, server, 9053, udp);
            let mut f = error_frame((A, B), server, client, 64, false, &q);
            let Icmp::Error(e) = parse(&f) else {
                panic!("{client} {udp}: not an error: {:?}", parse(&f))
            };
            assert_eq!(
                (e.src, e.sport, e.dst, e.dport),
                (addr16(&ip(client)), 40000, addr16(&ip(server)), 9053)
            );
            assert_eq!(e.proto, if udp { PROTO_UDP } else { PROTO_TCP });
            translate(&mut f, &e, Toward::Client, &addr16(&ip(vip)), 53, &B, &A);

            // What the client's kernel matches its socket against: the
            // packet it sent, client:40000 -> VIP:53.
            let want = quoted(client, 40000, vip, 53, udp);
            assert_checksums(&f, &e, &want);
            let s = SlicedPacket::from_ethernet(&f).unwrap();
            let net = s.net.unwrap();
            let (src, dst, ttl) = match net {
                etherparse::NetSlice::Ipv4(h) => (
                    IpAddr::from(h.header().source()),
                    IpAddr::from(h.header().destination()),
                    h.header().ttl(),
                ),
                etherparse::NetSlice::Ipv6(h) => (
                    IpAddr::from(h.header().source()),
                    IpAddr::from(h.header().destination()),
                    h.header().hop_limit(),
                ),
                other => panic!("not IP: {other:?}"),
            };
            assert_eq!((src, dst, ttl), (ip(vip), ip(client), 63));
            assert!(matches!(
                s.transport,
                Some(TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_))
            ));
            assert_eq!((&f[0..6], &f[6..12]), (&A[..], &B[..]));
        }
    }

    #[test]
    fn packet_too_big_to_a_vip_reaches_the_server_about_its_own_reply() {
        for (client, vip, server, router) in [
            ("198.18.4.7", "198.18.100.1", "198.18.2.11", "198.18.0.2"),
            (
                "2001:2:0:4::7",
                "2001:2:0:100::1",
                "2001:2:0:2::11",
                "2001:2::2",
            ),
        ] {
            // A router on the client's path could not forward the server's
            // reply VIP:80 -> client:40000.
            let q = quoted(vip, 80, client, 40000, false);
            let mut f = error_frame((A, B), router, vip, 64, true, &q);
            let Icmp::Error(e) = parse(&f) else {
                panic!("not an error")
            };
            translate(
                &mut f,
                &e,
                Toward::Server,
                &addr16(&ip(server)),
                8080,
                &B,
                &A,
            );
            // The server sees an error about the reply it really sent.
            let want = quoted(server, 8080, client, 40000, false);
            assert_checksums(&f, &e, &want);
            let dst = if e.v6 {
                IpAddr::from(<[u8; 16]>::try_from(&f[38..54]).unwrap())
            } else {
                IpAddr::from(<[u8; 4]>::try_from(&f[30..34]).unwrap())
            };
            assert_eq!(dst, ip(server));
            // The MTU the router reported is passed on untouched.
            let mtu = if e.v6 {
                u32::from_be_bytes(f[e.icmp + 4..e.icmp + 8].try_into().unwrap())
            } else {
                u32::from(u16::from_be_bytes([f[e.icmp + 6], f[e.icmp + 7]]))
            };
            assert_eq!(mtu, 1400);
        }
    }

    #[test]
    fn a_quote_cut_before_the_tcp_checksum_keeps_the_rest_consistent() {
        // Only the IP header and 8 bytes of TCP are quoted (RFC 792's
        // minimum): no TCP checksum to update.
        let full = quoted("198.18.4.7", 40000, "198.18.2.11", 8080, false);
        let mut f = error_frame((A, B), "198.18.2.11", "198.18.4.7", 64, false, &full[..28]);
        let Icmp::Error(e) = parse(&f) else {
            panic!("not an error")
        };
        translate(
            &mut f,
            &e,
            Toward::Client,
            &addr16(&ip("198.18.100.1")),
            80,
            &B,
            &A,
        );
        let want = quoted("198.18.4.7", 40000, "198.18.100.1", 80, false);
        assert_checksums(&f, &e, &want[..28]);
    }

    #[test]
    fn an_ipv4_udp_quote_without_checksum_keeps_none() {
        let mut q = quoted("198.18.4.7", 40000, "198.18.2.11", 9053, true);
        q[26..28].fill(0);
        let mut f = error_frame((A, B), "198.18.2.11", "198.18.4.7", 64, false, &q);
        let Icmp::Error(e) = parse(&f) else {
            panic!("not an error")
        };
        translate(
            &mut f,
            &e,
            Toward::Client,
            &addr16(&ip("198.18.100.1")),
            53,
            &B,
            &A,
        );
        let msg = &f[e.icmp..e.end];
        assert_eq!(&msg[8 + 26..8 + 28], &[0, 0]);
        assert_eq!(checksum(msg), 0);
    }

    #[test]
    fn what_is_not_a_translatable_error() {
        // An echo request is no error.
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv4(octets4("198.18.4.7"), octets4("198.18.100.1"), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        assert_eq!(parse(&echo), Icmp::NotError);
        let mut echo6 = Vec::new();
        PacketBuilder::ethernet2(A, B)
            .ipv6(octets6("2001:2::7"), octets6("2001:2::1"), 64)
            .icmpv6(Icmpv6Type::EchoRequest(IcmpEchoHeader { id: 1, seq: 1 }))
            .write(&mut echo6, b"ping")
            .unwrap();
        assert_eq!(parse(&echo6), Icmp::NotError);
        // UDP is not ICMP.
        assert_eq!(
            parse(&quoted("198.18.4.7", 1, "198.18.4.8", 2, true)),
            Icmp::NotError
        );

        let q = quoted("198.18.4.7", 40000, "198.18.2.11", 9053, true);
        // Each edit is checked on its own: the ICMP checksum is made right
        // again after it (a wrong one is a case of its own, below).
        let bad = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut f = error_frame((A, B), "198.18.2.11", "198.18.4.7", 64, false, &q);
            edit(&mut f);
            if f.len() >= 38 {
                let end = (14 + usize::from(u16::from_be_bytes([f[16], f[17]]))).min(f.len());
                f[36..38].fill(0);
                let sum = checksum(&f[34..end]);
                f[36..38].copy_from_slice(&sum.to_be_bytes());
            }
            parse(&f)
        };
        // Quote starts at 14 + 20 + 8 = 42.
        assert_eq!(
            bad(&|f| f.truncate(42 + 27)),
            Icmp::Bad(DropReason::Malformed),
            "IP length beyond the frame"
        );
        assert_eq!(
            bad(&|f| f[42 + 9] = 1),
            Icmp::Bad(DropReason::Unsupported),
            "quotes ICMP"
        );
        assert_eq!(
            bad(&|f| f[42 + 7] = 1),
            Icmp::Bad(DropReason::Fragment),
            "quotes a later fragment"
        );
        assert_eq!(
            bad(&|f| f[20] = 0x20),
            Icmp::Bad(DropReason::Fragment),
            "the error itself is fragmented"
        );
        assert_eq!(
            bad(&|f| f[42] = 0x44),
            Icmp::Bad(DropReason::Malformed),
            "quoted IHL 16"
        );
        // A wrong ICMP checksum, in the header or anywhere in the quote.
        for at in [36, 42 + 12, 42 + 20 + 7] {
            let mut f = error_frame((A, B), "198.18.2.11", "198.18.4.7", 64, false, &q);
            f[at] ^= 0x01;
            assert_eq!(
                parse(&f),
                Icmp::Bad(DropReason::Malformed),
                "ICMP checksum wrong (byte {at} flipped)"
            );
        }
        let q6 = quoted("2001:2::7", 40000, "2001:2:0:2::11", 9053, true);
        let good6 = error_frame((A, B), "2001:2:0:2::11", "2001:2::7", 64, false, &q6);
        assert!(matches!(parse(&good6), Icmp::Error(_)));
        // The ICMPv6 sum covers the outer addresses (pseudo-header) too.
        for at in [14 + 8, 14 + 40 + 2, 14 + 40 + 8 + 40 + 7] {
            let mut f = good6.clone();
            f[at] ^= 0x01;
            assert_eq!(
                parse(&f),
                Icmp::Bad(DropReason::Malformed),
                "ICMPv6 checksum wrong (byte {at} flipped)"
            );
        }

        // Cut inside the quoted ports: shorten the IP total length too.
        let mut cut = error_frame((A, B), "198.18.2.11", "198.18.4.7", 64, false, &q[..24]);
        assert_eq!(parse(&cut), Icmp::Bad(DropReason::Malformed));
        cut.truncate(20);
        assert_eq!(parse(&cut), Icmp::NotError);
    }

    #[test]
    fn error_types_are_the_ones_that_quote_a_packet() {
        let v4: Vec<u8> = (0..=255).filter(|t| is_error_type(false, *t)).collect();
        assert_eq!(v4, [3, 11, 12]);
        let v6: Vec<u8> = (0..=255).filter(|t| is_error_type(true, *t)).collect();
        assert_eq!(v6, [1, 2, 3, 4]);
    }
}
