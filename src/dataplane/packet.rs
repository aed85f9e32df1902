//! Parsing of untrusted frames into a small zero-copy view.
//!
//! The view records offsets into the frame rather than borrowing it, so the
//! NAT rewrite can modify the same buffer afterwards. Header validation uses
//! etherparse's checked slice constructors (`*HeaderSlice::from_slice`), which
//! borrow and never allocate.
//!
//! Only what the load balancer needs is read: Ethernet II (no VLAN tags),
//! IPv4 or IPv6 without extension headers, and the TCP/UDP ports.

use crate::dataplane::counters::DropReason;
use crate::util::{map_v4, Addr16};
use etherparse::{Ipv4HeaderSlice, Ipv6HeaderSlice, TcpHeaderSlice, UdpHeaderSlice};

pub const ETH_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Ethernet field offsets.
pub mod eth {
    pub const DST: core::ops::Range<usize> = 0..6;
    pub const SRC: core::ops::Range<usize> = 6..12;
    pub const ETHERTYPE: core::ops::Range<usize> = 12..14;
}

/// Offsets inside an IPv4 header.
pub mod ipv4 {
    pub const TTL: usize = 8;
    pub const CHECKSUM: usize = 10;
    pub const SRC: core::ops::Range<usize> = 12..16;
    pub const DST: core::ops::Range<usize> = 16..20;
}

/// Offsets inside an IPv6 header.
pub mod ipv6 {
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: core::ops::Range<usize> = 8..24;
    pub const DST: core::ops::Range<usize> = 24..40;
    pub const LEN: usize = 40;
}

/// Offsets inside TCP and UDP headers.
pub mod l4 {
    pub const SRC_PORT: core::ops::Range<usize> = 0..2;
    pub const DST_PORT: core::ops::Range<usize> = 2..4;
    pub const TCP_CHECKSUM: usize = 16;
    pub const UDP_CHECKSUM: usize = 6;
}

/// A TCP or UDP packet the load balancer can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub v6: bool,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub proto: u8,
    pub src: Addr16,
    pub dst: Addr16,
    pub sport: u16,
    pub dport: u16,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
}

impl Parsed {
    /// The source address as it appears on the wire (4 or 16 bytes): what
    /// the scheduler hashes.
    #[inline]
    pub fn src_wire(&self) -> &[u8] {
        if self.v6 {
            &self.src
        } else {
            &self.src[12..]
        }
    }
}

/// What a frame is, as far as the load balancer is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): always the kernel's.
    NotIp,
    /// An IP ethertype without a complete IP header: addresses unknown, so
    /// it cannot be ours; the kernel drops it.
    Truncated,
    /// IP with readable addresses but a protocol other than TCP/UDP (ICMP).
    OtherProto {
        src: Addr16,
        dst: Addr16,
    },
    /// IP with readable addresses whose ports cannot be used.
    Unusable {
        src: Addr16,
        dst: Addr16,
        why: DropReason,
    },
    L4(Parsed),
}

/// [`parse`] into `out`: the burst pipeline keeps the result in its
/// per-frame state, and building it there directly avoids a copy through
/// the stack.
#[inline(always)]
pub fn parse_into(frame: &[u8], out: &mut Frame) {
    // The common case (see `parse_v4`), written in place.
    // (Version 4, no options: `parse_v4_slow` may be called on it.)
    if frame.len() >= ETH_LEN + 20 && frame[12..14] == [0x08, 0x00] && frame[ETH_LEN] == 0x45 {
        let ip = &frame[ETH_LEN..];
        // Two assignments, not one of a `match`: that one was built on the
        // stack and copied over with memcpy.
        if let Some(p) = fast_v4(ip) {
            *out = Frame::L4(p);
        } else {
            *out = parse_v4_slow(ip);
        }
        return;
    }
    *out = parse(frame);
}

#[inline(always)]
pub fn parse(frame: &[u8]) -> Frame {
    if frame.len() < ETH_LEN {
        return Frame::NotIp;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = &frame[ETH_LEN..];
    match ethertype {
        ETHERTYPE_IPV4 => parse_v4(ip),
        ETHERTYPE_IPV6 => parse_v6(ip),
        _ => Frame::NotIp,
    }
}

#[inline(always)]
fn parse_v4(ip: &[u8]) -> Frame {
    // Read the addresses first, from a fixed 20-byte header: even a frame
    // whose header is otherwise broken is attributed to a VIP (and counted)
    // when its destination is one, exactly as the XDP program does.
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Frame::Truncated;
    }
    match fast_v4(ip) {
        Some(p) => Frame::L4(p),
        None => parse_v4_slow(ip),
    }
}

/// IPv4 that [`fast_v4`] did not take (`ip` holds a version-4 header of at
/// least 20 bytes).
#[inline(never)]
fn parse_v4_slow(ip: &[u8]) -> Frame {
    let src = map_v4(ip[ipv4::SRC].try_into().expect("4 bytes"));
    let dst = map_v4(ip[ipv4::DST].try_into().expect("4 bytes"));
    parse_v4_checked(ip, src, dst)
}

/// The common IPv4 case, checked by hand: no options, not a fragment, the
/// total length within the frame, and a complete TCP/UDP header. It accepts
/// exactly what the checked path accepts for such a header, and returns the
/// same result; anything else (options, a fragment, a bad length, another
/// protocol) is `None` and takes that path. `ip` is at least 20 bytes.
#[inline(always)]
fn fast_v4(ip: &[u8]) -> Option<Parsed> {
    if ip[0] != 0x45 {
        return None;
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff; // MF, offset
    let proto = ip[9];
    if frag != 0 || !(20..=ip.len()).contains(&total) {
        return None;
    }
    let (sport, dport) = ports_fast(&ip[20..total], proto)?;
    Some(Parsed {
        v6: false,
        l3: ETH_LEN,
        l4: ETH_LEN + 20,
        proto,
        src: map_v4(ip[ipv4::SRC].try_into().expect("4 bytes")),
        dst: map_v4(ip[ipv4::DST].try_into().expect("4 bytes")),
        sport,
        dport,
        ttl: ip[ipv4::TTL],
    })
}

/// IPv4 through etherparse's checked header slices: every case.
#[inline(never)]
fn parse_v4_checked(ip: &[u8], src: Addr16, dst: Addr16) -> Frame {
    let unusable = |why| Frame::Unusable { src, dst, why };

    let hdr = match Ipv4HeaderSlice::from_slice(ip) {
        Ok(h) => h,
        Err(_) => return unusable(DropReason::Malformed),
    };
    let proto = hdr.protocol().0;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Frame::OtherProto { src, dst };
    }
    if hdr.is_fragmenting_payload() {
        return unusable(DropReason::Fragment);
    }
    let hlen = hdr.slice().len();
    let total = hdr.total_len() as usize;
    if total > ip.len() || total < hlen {
        return unusable(DropReason::Malformed);
    }
    match ports(&ip[hlen..total], proto) {
        Some((sport, dport)) => Frame::L4(Parsed {
            v6: false,
            l3: ETH_LEN,
            l4: ETH_LEN + hlen,
            proto,
            src,
            dst,
            sport,
            dport,
            ttl: hdr.ttl(),
        }),
        None => unusable(DropReason::Malformed),
    }
}

/// Whether IPv6 next header `nh` is an extension header that a TCP or UDP
/// header may follow in the clear (RFC 8200 §4; IANA "IPv6 Extension
/// Header Types" without ESP, whose payload is encrypted). The steering
/// program's `is_ipv6_extension` is the same list.
pub fn is_ipv6_extension(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

#[inline]
fn parse_v6(ip: &[u8]) -> Frame {
    let hdr = match Ipv6HeaderSlice::from_slice(ip) {
        Ok(h) => h,
        Err(_) => return Frame::Truncated,
    };
    let src: Addr16 = ip[ipv6::SRC].try_into().expect("16 bytes");
    let dst: Addr16 = ip[ipv6::DST].try_into().expect("16 bytes");
    if is_v4_mapped(&src) || is_v4_mapped(&dst) {
        // IPv4-mapped addresses never appear on the wire (RFC 4291
        // §2.5.5.2), and l4lb keys IPv4 by exactly that form: such a
        // packet would otherwise pass for IPv4 traffic of a flow or VIP.
        return Frame::Unusable {
            src,
            dst,
            why: DropReason::Malformed,
        };
    }
    let proto = hdr.next_header().0;
    const ICMPV6: u8 = 58;
    if proto == ICMPV6 {
        return Frame::OtherProto { src, dst };
    }
    if proto != PROTO_TCP && proto != PROTO_UDP && !is_ipv6_extension(proto) {
        // Another upper-layer protocol: as for IPv4.
        return Frame::OtherProto { src, dst };
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        // Extension headers (fragments included) are not followed.
        return Frame::Unusable {
            src,
            dst,
            why: DropReason::Unsupported,
        };
    }
    let end = ipv6::LEN + hdr.payload_length() as usize;
    if end > ip.len() {
        return Frame::Unusable {
            src,
            dst,
            why: DropReason::Malformed,
        };
    }
    let seg = &ip[ipv6::LEN..end];
    match ports(seg, proto) {
        // IPv6 receivers discard UDP with a zero checksum (RFC 8200 §8.1):
        // there is no sum to update, and a made-up one would be wrong.
        Some(_) if proto == PROTO_UDP && seg[l4::UDP_CHECKSUM..l4::UDP_CHECKSUM + 2] == [0, 0] => {
            Frame::Unusable {
                src,
                dst,
                why: DropReason::Malformed,
            }
        }
        Some((sport, dport)) => Frame::L4(Parsed {
            v6: true,
            l3: ETH_LEN,
            l4: ETH_LEN + ipv6::LEN,
            proto,
            src,
            dst,
            sport,
            dport,
            ttl: hdr.hop_limit(),
        }),
        None => Frame::Unusable {
            src,
            dst,
            why: DropReason::Malformed,
        },
    }
}

/// Whether `a` is an IPv4-mapped IPv6 address (`::ffff:0:0/96`), the form
/// l4lb stores IPv4 addresses in.
#[inline]
pub fn is_v4_mapped(a: &Addr16) -> bool {
    a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

/// Whether `a` (of the family `v6` says; IPv4 as [`map_v4`] gives it) can
/// not be the source of a packet a router forwards (RFC 1812 §5.3.7, RFC
/// 3927 §7, RFC 4291 §2.5): IPv4 0/8, 127/8, 169.254/16, and 224/4 and
/// above (multicast, reserved, broadcast); IPv6 `::`, `::1`, `fe80::/10`
/// and `ff00::/8`.
#[inline]
pub fn is_martian_source(a: &Addr16, v6: bool) -> bool {
    if v6 {
        a[0] == 0xff || (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || (a[..15] == [0; 15] && a[15] <= 1)
    } else {
        let (x, y) = (a[12], a[13]);
        x == 0 || x == 127 || x >= 224 || (x == 169 && y == 254)
    }
}

/// [`ports`] for a well-formed TCP or UDP header, by hand: the same checks
/// as etherparse's (TCP: data offset at least 5 and within the segment;
/// UDP: 8 bytes and a length between 8 and the segment's). `None` for
/// anything else, which then goes through [`ports`].
#[inline(always)]
fn ports_fast(seg: &[u8], proto: u8) -> Option<(u16, u16)> {
    let ok = match proto {
        PROTO_TCP => {
            seg.len() >= 20 && {
                let off = (seg[12] >> 4) as usize * 4;
                off >= 20 && off <= seg.len()
            }
        }
        PROTO_UDP => {
            seg.len() >= 8 && {
                let len = u16::from_be_bytes([seg[4], seg[5]]) as usize;
                (8..=seg.len()).contains(&len)
            }
        }
        _ => false,
    };
    if ok {
        Some((
            u16::from_be_bytes([seg[0], seg[1]]),
            u16::from_be_bytes([seg[2], seg[3]]),
        ))
    } else {
        None
    }
}

/// Source and destination port of a complete TCP or UDP header.
#[inline]
fn ports(seg: &[u8], proto: u8) -> Option<(u16, u16)> {
    let ok = if proto == PROTO_TCP {
        TcpHeaderSlice::from_slice(seg).is_ok()
    } else {
        // RFC 768: the length covers header and data, so it is at least 8
        // and cannot run past the IP payload.
        UdpHeaderSlice::from_slice(seg).is_ok_and(|u| {
            let len = u.length() as usize;
            (8..=seg.len()).contains(&len)
        })
    };
    ok.then(|| {
        (
            u16::from_be_bytes([seg[0], seg[1]]),
            u16::from_be_bytes([seg[2], seg[3]]),
        )
    })
}

#[cfg(test)]
mod tests {
    //! Static byte fixtures: each frame is written out field by field, so a
    //! reader can check an offset against the RFC without running anything.

    use super::*;

    /// Ethernet II to l4lb's client port from the gateway, IPv4.
    const ETH_V4: [u8; 14] = [
        0x02, 0, 0, 0, 0, 0x01, // dst
        0x02, 0, 0, 0, 0x0c, 0x01, // src
        0x08, 0x00, // IPv4
    ];
    const ETH_V6: [u8; 14] = [
        0x02, 0, 0, 0, 0, 0x01, // dst
        0x02, 0, 0, 0, 0x0c, 0x01, // src
        0x86, 0xdd, // IPv6
    ];
    /// IPv4, IHL 5, total length 40, DF, TTL 64, TCP, 198.18.4.7 → 198.18.100.1
    /// (header checksum not filled in: the parser does not verify it).
    const IPV4_TCP: [u8; 20] = [
        0x45, 0x00, 0x00, 0x28, // version/IHL, DSCP, total length
        0x1c, 0x46, 0x40, 0x00, // id, DF, fragment offset 0
        0x40, 0x06, 0x00, 0x00, // TTL 64, TCP, checksum
        198, 18, 4, 7, // src
        198, 18, 100, 1, // dst
    ];
    /// TCP SYN 40000 → 80, data offset 5.
    const TCP_SYN: [u8; 20] = [
        0x9c, 0x40, 0x00, 0x50, // ports
        0, 0, 0, 1, // seq
        0, 0, 0, 0, // ack
        0x50, 0x02, 0xfa, 0xf0, // data offset 5, SYN, window
        0, 0, 0, 0, // checksum, urgent pointer
    ];
    /// UDP 50000 → 53, length 8.
    const UDP_EMPTY: [u8; 8] = [0xc3, 0x50, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00];
    /// The same with a checksum (IPv6 UDP must carry one; the parser does
    /// not verify it, only that it is not zero).
    const UDP6_EMPTY: [u8; 8] = [0xc3, 0x50, 0x00, 0x35, 0x00, 0x08, 0x12, 0x34];
    /// IPv6, payload length 8, UDP, hop limit 33, 2001:2::7 → 2001:2::100.
    const IPV6_UDP: [u8; 40] = [
        0x60, 0, 0, 0, // version, traffic class, flow label
        0x00, 0x08, 17, 33, // payload length, next header, hop limit
        0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07, // src
        0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00, // dst
    ];

    fn frame(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn tcp4() -> Vec<u8> {
        frame(&[&ETH_V4, &IPV4_TCP, &TCP_SYN])
    }

    /// `tcp4()` with byte `at` set to `value`.
    fn tcp4_with(edits: &[(usize, u8)]) -> Vec<u8> {
        let mut f = tcp4();
        for &(at, value) in edits {
            f[at] = value;
        }
        f
    }

    const CLIENT: Addr16 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 4, 7];
    const VIP: Addr16 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 100, 1];

    #[test]
    fn ipv4_tcp_frame_yields_offsets_addresses_ports_and_ttl() {
        let p = Parsed {
            v6: false,
            l3: 14,
            l4: 34,
            proto: PROTO_TCP,
            src: CLIENT,
            dst: VIP,
            sport: 40000,
            dport: 80,
            ttl: 64,
        };
        assert_eq!(parse(&tcp4()), Frame::L4(p));
        assert_eq!(p.src_wire(), &[198, 18, 4, 7]);
    }

    #[test]
    fn ipv4_options_move_the_l4_header() {
        // IHL 6: one 4-byte option (router alert), total length 44.
        let mut ip = IPV4_TCP;
        ip[0] = 0x46;
        ip[3] = 44;
        let f = frame(&[&ETH_V4, &ip, &[0x94, 0x04, 0, 0], &TCP_SYN]);
        let Frame::L4(p) = parse(&f) else {
            panic!("{:?}", parse(&f))
        };
        assert_eq!((p.l3, p.l4, p.sport, p.dport), (14, 38, 40000, 80));
    }

    #[test]
    fn ethernet_padding_after_the_ip_packet_is_ignored() {
        // An empty UDP datagram is 28 bytes of IP: a minimum-size (60-byte)
        // Ethernet frame carries it with 18 bytes of padding.
        let mut ip = IPV4_TCP;
        ip[3] = 28;
        ip[9] = PROTO_UDP;
        let f = frame(&[&ETH_V4, &ip, &UDP_EMPTY, &[0xee; 18]]);
        assert_eq!(f.len(), 60);
        let Frame::L4(p) = parse(&f) else {
            panic!("{:?}", parse(&f))
        };
        assert_eq!(
            (p.proto, p.sport, p.dport, p.l4),
            (PROTO_UDP, 50000, 53, 34)
        );
    }

    #[test]
    fn ipv6_udp_frame_yields_offsets_addresses_ports_and_hop_limit() {
        let f = frame(&[&ETH_V6, &IPV6_UDP, &UDP6_EMPTY]);
        let Frame::L4(p) = parse(&f) else {
            panic!("{:?}", parse(&f))
        };
        assert!(p.v6);
        assert_eq!((p.l3, p.l4, p.proto), (14, 54, PROTO_UDP));
        assert_eq!(p.src, <[u8; 16]>::try_from(&IPV6_UDP[8..24]).unwrap());
        assert_eq!(p.dst, <[u8; 16]>::try_from(&IPV6_UDP[24..40]).unwrap());
        assert_eq!((p.sport, p.dport, p.ttl), (50000, 53, 33));
        assert_eq!(p.src_wire(), &IPV6_UDP[8..24], "all 16 bytes are hashed");
    }

    #[test]
    fn frames_without_a_readable_ip_header_are_not_attributed() {
        let tcp = tcp4();
        let v6 = frame(&[&ETH_V6, &IPV6_UDP, &UDP6_EMPTY]);
        let mut vlan = tcp4();
        vlan[12..14].copy_from_slice(&[0x81, 0x00]);
        let mut arp = tcp4();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let table: [(&str, Vec<u8>, Frame); 9] = [
            ("empty", vec![], Frame::NotIp),
            ("13 bytes", tcp[..13].to_vec(), Frame::NotIp),
            ("ARP ethertype", arp, Frame::NotIp),
            ("VLAN tag (not followed)", vlan, Frame::NotIp),
            (
                "IPv4 ethertype, no IP",
                tcp[..14].to_vec(),
                Frame::Truncated,
            ),
            ("19 bytes of IPv4", tcp[..33].to_vec(), Frame::Truncated),
            (
                "version 6 under the IPv4 ethertype",
                tcp4_with(&[(14, 0x65)]),
                Frame::Truncated,
            ),
            ("39 bytes of IPv6", v6[..53].to_vec(), Frame::Truncated),
            (
                "version 4 under the IPv6 ethertype",
                frame(&[&ETH_V6, &[0x45], &IPV6_UDP[1..], &UDP_EMPTY]),
                Frame::Truncated,
            ),
        ];
        for (what, f, want) in table {
            assert_eq!(parse(&f), want, "{what}");
        }
    }

    #[test]
    fn broken_ipv4_packets_are_unusable_with_their_reason() {
        use DropReason::*;
        let mut udp_cut = frame(&[&ETH_V4, &IPV4_TCP, &UDP_EMPTY[..6]]);
        udp_cut[14 + 3] = 26;
        udp_cut[14 + 9] = PROTO_UDP;
        let table: [(&str, Vec<u8>, DropReason); 9] = [
            ("IHL 4", tcp4_with(&[(14, 0x44)]), Malformed),
            (
                "IHL 15, beyond the frame",
                tcp4_with(&[(14, 0x4f)]),
                Malformed,
            ),
            (
                "total length beyond the frame",
                tcp4_with(&[(17, 41)]),
                Malformed,
            ),
            (
                "total length below the header",
                tcp4_with(&[(17, 19)]),
                Malformed,
            ),
            (
                "TCP header cut by total length",
                tcp4_with(&[(17, 39)]),
                Malformed,
            ),
            ("TCP data offset 4", tcp4_with(&[(46, 0x40)]), Malformed),
            ("UDP header cut", udp_cut, Malformed),
            ("more fragments", tcp4_with(&[(20, 0x20)]), Fragment),
            (
                "fragment offset 1",
                tcp4_with(&[(20, 0), (21, 1)]),
                Fragment,
            ),
        ];
        for (what, f, why) in table {
            assert_eq!(
                parse(&f),
                Frame::Unusable {
                    src: CLIENT,
                    dst: VIP,
                    why
                },
                "{what}"
            );
        }
        // A fragment is reported as one before its lengths are looked at.
        assert_eq!(
            parse(&tcp4_with(&[(20, 0x20), (17, 99)])),
            Frame::Unusable {
                src: CLIENT,
                dst: VIP,
                why: Fragment
            }
        );
    }

    #[test]
    fn non_tcp_udp_ipv4_is_other_proto_even_when_fragmented() {
        let want = Frame::OtherProto {
            src: CLIENT,
            dst: VIP,
        };
        assert_eq!(parse(&tcp4_with(&[(23, 1)])), want, "ICMP");
        assert_eq!(parse(&tcp4_with(&[(23, 1), (20, 0x20)])), want);
        assert_eq!(parse(&tcp4_with(&[(23, 47)])), want, "GRE");
    }

    #[test]
    fn ipv6_extension_headers_icmpv6_and_bad_lengths() {
        let src: Addr16 = IPV6_UDP[8..24].try_into().unwrap();
        let dst: Addr16 = IPV6_UDP[24..40].try_into().unwrap();
        let with = |next: u8, payload_len: u8, rest: &[u8]| {
            let mut ip = IPV6_UDP;
            ip[6] = next;
            ip[5] = payload_len;
            frame(&[&ETH_V6, &ip, rest])
        };
        let unusable = |why| Frame::Unusable { src, dst, why };
        let mapped = |at: usize| {
            let mut ip = IPV6_UDP;
            ip[at..at + 16].copy_from_slice(&map_v4([198, 18, 100, 1]));
            let f = frame(&[&ETH_V6, &ip, &UDP6_EMPTY]);
            let (src, dst) = (
                ip[8..24].try_into().unwrap(),
                ip[24..40].try_into().unwrap(),
            );
            (f, src, dst)
        };
        for (at, what) in [(8, "source"), (24, "destination")] {
            let (f, src, dst) = mapped(at);
            assert_eq!(
                parse(&f),
                Frame::Unusable {
                    src,
                    dst,
                    why: DropReason::Malformed
                },
                "IPv4-mapped {what}"
            );
        }
        let table: [(&str, Vec<u8>, Frame); 11] = [
            (
                "UDP with a zero checksum",
                with(17, 8, &UDP_EMPTY),
                unusable(DropReason::Malformed),
            ),
            (
                "UDP with a checksum",
                with(17, 8, &UDP6_EMPTY),
                Frame::L4(Parsed {
                    v6: true,
                    l3: 14,
                    l4: 54,
                    proto: PROTO_UDP,
                    src,
                    dst,
                    sport: 50000,
                    dport: 53,
                    ttl: 33,
                }),
            ),
            (
                "hop-by-hop options",
                with(0, 8, &[17, 0, 0, 0, 0, 0, 0, 0]),
                unusable(DropReason::Unsupported),
            ),
            (
                "fragment header",
                with(44, 8, &[17, 0, 0, 1, 0, 0, 0, 1]),
                unusable(DropReason::Unsupported),
            ),
            (
                "ICMPv6",
                with(58, 8, &[128, 0, 0, 0, 0, 1, 0, 1]),
                Frame::OtherProto { src, dst },
            ),
            (
                "OSPF, no extension header: another protocol, as for IPv4",
                with(89, 8, &[2, 1, 0, 8, 0, 0, 0, 0]),
                Frame::OtherProto { src, dst },
            ),
            (
                "ESP: what follows is encrypted, another protocol",
                with(50, 8, &[0, 0, 0, 1, 0, 0, 0, 1]),
                Frame::OtherProto { src, dst },
            ),
            (
                "destination options",
                with(60, 8, &[6, 0, 0, 0, 0, 0, 0, 0]),
                unusable(DropReason::Unsupported),
            ),
            (
                "payload length beyond the frame",
                with(17, 9, &UDP_EMPTY),
                unusable(DropReason::Malformed),
            ),
            (
                "UDP header cut",
                with(17, 6, &UDP_EMPTY[..6]),
                unusable(DropReason::Malformed),
            ),
            (
                "TCP header cut",
                with(6, 8, &TCP_SYN[..8]),
                unusable(DropReason::Malformed),
            ),
        ];
        for (what, f, want) in table {
            assert_eq!(parse(&f), want, "{what}");
        }
    }

    #[test]
    fn martian_sources_are_exactly_the_reserved_ranges() {
        let v4 = |a: [u8; 4]| is_martian_source(&map_v4(a), false);
        let v6 = |s: &str| {
            let a: std::net::Ipv6Addr = s.parse().unwrap();
            is_martian_source(&a.octets(), true)
        };
        for a in [
            [0, 0, 0, 0],
            [0, 255, 255, 255],
            [127, 0, 0, 1],
            [127, 255, 255, 255],
            [169, 254, 0, 1],
            [169, 254, 255, 255],
            [224, 0, 0, 0],
            [239, 255, 255, 255],
            [240, 0, 0, 1],
            [255, 255, 255, 255],
        ] {
            assert!(v4(a), "{a:?} is martian");
        }
        for a in [
            [1, 0, 0, 0],
            [126, 255, 255, 255],
            [128, 0, 0, 0],
            [169, 253, 255, 255],
            [169, 255, 0, 0],
            [198, 18, 4, 7],
            [223, 255, 255, 255],
        ] {
            assert!(!v4(a), "{a:?} is an ordinary source");
        }
        for a in ["::", "::1", "fe80::1", "febf:ffff::1", "ff02::1", "ff0e::1"] {
            assert!(v6(a), "{a} is martian");
        }
        for a in [
            "::2",
            "fec0::1",
            "fe7f::1",
            "fc00::1",
            "2001:2::7",
            "64:ff9b::1",
        ] {
            assert!(!v6(a), "{a} is an ordinary source");
        }
    }

    #[test]
    fn ipv4_fast_path_agrees_with_the_checked_path_on_every_edit() {
        // Every header byte of a TCP and a UDP frame set to values that hit
        // the fast path's checks (version/IHL, lengths, flags, offsets,
        // protocol, data offset), and every truncation: both paths must
        // classify each variant identically.
        let udp = frame(&[
            &ETH_V4,
            &{
                let mut ip = IPV4_TCP;
                ip[3] = 28;
                ip[9] = PROTO_UDP;
                ip
            },
            &UDP_EMPTY,
        ]);
        let values = [
            0x00, 0x01, 0x05, 0x08, 0x14, 0x1c, 0x20, 0x28, 0x3f, 0x40, 0x45, 0x46, 0x50, 0x60,
            0xff,
        ];
        let mut checked = 0;
        for base in [tcp4(), udp] {
            for at in 14..base.len() {
                for v in values {
                    let mut f = base.clone();
                    f[at] = v;
                    for end in [f.len(), f.len() - 1, 34, 41] {
                        let whole = &f[..end.min(f.len())];
                        let mut into = Frame::NotIp;
                        parse_into(whole, &mut into);
                        assert_eq!(into, parse(whole), "parse_into, byte {at} = {v:#04x}");
                        let ip = &f[ETH_LEN..end.min(f.len())];
                        if ip.len() < 20 || ip[0] >> 4 != 4 {
                            continue;
                        }
                        let src = map_v4(ip[12..16].try_into().unwrap());
                        let dst = map_v4(ip[16..20].try_into().unwrap());
                        assert_eq!(
                            parse_v4(ip),
                            parse_v4_checked(ip, src, dst),
                            "byte {at} = {v:#04x}, {} bytes of IP",
                            ip.len()
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 1000, "{checked} variants");
    }

    #[test]
    fn no_prefix_of_a_frame_panics_or_reads_past_its_end() {
        let frames = [
            tcp4(),
            frame(&[&ETH_V6, &IPV6_UDP, &UDP6_EMPTY]),
            tcp4_with(&[(14, 0x4f)]),
        ];
        for f in &frames {
            for n in 0..=f.len() {
                if let Frame::L4(p) = parse(&f[..n]) {
                    assert_eq!(n, f.len(), "only the whole frame is usable");
                    assert!(p.l4 + 8 <= n);
                }
            }
        }
    }
}
