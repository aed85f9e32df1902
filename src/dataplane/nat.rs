//! In-place NAT rewrite of a parsed frame.
//!
//! Forward (client → VIP:port): destination becomes backend:port.
//! Reverse (backend → client): source becomes VIP:port.
//! Both set the Ethernet addresses for the next hop and decrement the TTL /
//! hop limit as a router would. Checksums are updated incrementally
//! (RFC 1624): the IPv4 header checksum for the address and TTL words, the
//! TCP/UDP checksum for the pseudo-header address and the port.

use crate::dataplane::checksum::Wsum;
use crate::dataplane::packet::{eth, ipv4, ipv6, l4, Parsed, PROTO_UDP};
use crate::util::Mac;

/// Which end of the flow changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Rewrite the destination (forward direction).
    Dst,
    /// Rewrite the source (reverse direction).
    Src,
}

/// Rewrites `frame` (described by `p`) so that the `side` endpoint becomes
/// `addr`:`port` (16-byte form; IPv4-mapped for IPv4), sent from `src_mac`
/// to `dst_mac`. The caller has checked that the TTL is above 1 and that
/// `addr` is of the frame's family.
#[inline(always)]
pub fn rewrite(
    frame: &mut [u8],
    p: &Parsed,
    side: Side,
    addr: &[u8; 16],
    port: u16,
    src_mac: &Mac,
    dst_mac: &Mac,
) {
    if p.v6 {
        rewrite_v6(frame, p, side, addr, port, src_mac, dst_mac);
    } else {
        let addr4: &[u8; 4] = addr[12..].try_into().expect("4 bytes");
        rewrite_v4(frame, p, side, addr4, port, src_mac, dst_mac);
    }
}

/// The TCP/UDP checksum's offset in its header.
#[inline(always)]
fn l4_checksum_at(p: &Parsed) -> usize {
    if p.proto == PROTO_UDP {
        l4::UDP_CHECKSUM
    } else {
        l4::TCP_CHECKSUM
    }
}

/// The common case, inlined into the pipeline: every field is reached
/// through a fixed-size view of its header, so that the bounds are checked
/// once per header rather than once per field; fields are read and written
/// in native byte order ([`Wsum`]).
#[inline(always)]
fn rewrite_v4(
    frame: &mut [u8],
    p: &Parsed,
    side: Side,
    addr: &[u8; 4],
    port: u16,
    src_mac: &Mac,
    dst_mac: &Mac,
) {
    let (head, seg) = frame.split_at_mut(p.l4);
    let ether: &mut [u8; 12] = (&mut head[..12]).try_into().expect("Ethernet header");
    ether[..6].copy_from_slice(dst_mac);
    ether[6..].copy_from_slice(src_mac);

    let hdr: &mut [u8; 20] = (&mut head[p.l3..p.l3 + 20])
        .try_into()
        .expect("IPv4 header");
    let at = match side {
        Side::Dst => ipv4::DST.start,
        Side::Src => ipv4::SRC.start,
    };
    let field: &mut [u8; 4] = (&mut hdr[at..at + 4]).try_into().expect("4 bytes");
    let addr_delta = Wsum::replace_field(field, addr);
    // The caller has checked that the TTL is above 1.
    hdr[ipv4::TTL] -= 1;
    let ck = ipv4::CHECKSUM;
    let ipsum: &mut [u8; 2] = (&mut hdr[ck..ck + 2]).try_into().expect("2 bytes");
    addr_delta.merge(Wsum::TTL_DECREMENT).update(ipsum);

    // The address is in the L4 pseudo-header too. RFC 768: an IPv4 UDP
    // checksum of zero means "none"; keep it so.
    rewrite_l4(seg, p, side, port, addr_delta, true);
}

/// The TCP/UDP header `seg` of the frame `p` describes: sets the `side`
/// port and updates the checksum by the port's and the address's share
/// (`addr_delta`). `zero_is_none`: a UDP checksum of 0 means "none"
/// (IPv4) and stays 0; otherwise (IPv6, where it is mandatory) it is
/// updated like any other.
#[inline(always)]
fn rewrite_l4(
    seg: &mut [u8],
    p: &Parsed,
    side: Side,
    port: u16,
    addr_delta: Wsum,
    zero_is_none: bool,
) {
    let udp = p.proto == PROTO_UDP;
    let csum_at = l4_checksum_at(p);
    let l4h = &mut seg[..csum_at + 2];
    let port_at = match side {
        Side::Dst => l4::DST_PORT.start,
        Side::Src => l4::SRC_PORT.start,
    };
    let old_port = u16::from_ne_bytes([l4h[port_at], l4h[port_at + 1]]);
    let new_port = u16::from_ne_bytes(port.to_be_bytes());
    l4h[port_at..port_at + 2].copy_from_slice(&new_port.to_ne_bytes());
    let sum: &mut [u8; 2] = (&mut l4h[csum_at..csum_at + 2])
        .try_into()
        .expect("2 bytes");
    addr_delta
        .replace(old_port as u32, new_port as u32)
        .update_l4(sum, udp, zero_is_none);
}

/// IPv6: no header checksum; the hop limit is decremented, the address's
/// share goes into the TCP/UDP checksum.
#[inline(never)]
fn rewrite_v6(
    frame: &mut [u8],
    p: &Parsed,
    side: Side,
    addr: &[u8; 16],
    port: u16,
    src_mac: &Mac,
    dst_mac: &Mac,
) {
    let (head, seg) = frame.split_at_mut(p.l4);
    head[eth::DST].copy_from_slice(dst_mac);
    head[eth::SRC].copy_from_slice(src_mac);

    let at = p.l3
        + match side {
            Side::Dst => ipv6::DST.start,
            Side::Src => ipv6::SRC.start,
        };
    let field: &mut [u8; 16] = (&mut head[at..at + 16]).try_into().expect("16 bytes");
    let addr_delta = Wsum::replace_field(field, addr);
    head[p.l3 + ipv6::HOP_LIMIT] -= 1;

    // IPv6 UDP checksums are mandatory (RFC 8200 §8.1): always updated.
    rewrite_l4(seg, p, side, port, addr_delta, false);
}

#[cfg(test)]
mod tests {
    //! The rewrite against the definition: every checksum it leaves must be
    //! what a full RFC 1071 recompute of the rewritten frame gives, byte for
    //! byte, and nothing but the NAT'ed fields may change.

    use super::*;
    use crate::dataplane::checksum::{checksum, l4_checksum};
    use crate::dataplane::packet::{parse, Frame};
    use crate::util::map_v4;
    use etherparse::PacketBuilder;

    const SRC_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
    const DST_MAC: Mac = [0x02, 0, 0, 0, 0x0b, 0x01];

    struct Spec {
        v6: bool,
        udp: bool,
        src: [u8; 16],
        dst: [u8; 16],
        sport: u16,
        dport: u16,
        ttl: u8,
    }

    fn build(s: &Spec, payload: &[u8]) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0x0c, 0x01], [0x02, 0, 0, 0, 0, 0x01]);
        let ip = if s.v6 {
            eth.ipv6(s.src, s.dst, s.ttl)
        } else {
            let v4 = |a: &[u8; 16]| <[u8; 4]>::try_from(&a[12..]).unwrap();
            eth.ipv4(v4(&s.src), v4(&s.dst), s.ttl)
        };
        let mut out = Vec::new();
        if s.udp {
            ip.udp(s.sport, s.dport).write(&mut out, payload).unwrap();
        } else {
            ip.tcp(s.sport, s.dport, 0x1234_5678, 1000)
                .ack(0x9abc_def0)
                .write(&mut out, payload)
                .unwrap();
        }
        out
    }

    fn parsed(frame: &[u8]) -> Parsed {
        match parse(frame) {
            Frame::L4(p) => p,
            other => panic!("not L4: {other:?}"),
        }
    }

    fn csum_at(p: &Parsed) -> usize {
        p.l4 + if p.proto == PROTO_UDP {
            l4::UDP_CHECKSUM
        } else {
            l4::TCP_CHECKSUM
        }
    }

    /// The L4 segment of `frame` (up to the IP length, without padding).
    fn segment(frame: &[u8], p: &Parsed) -> Vec<u8> {
        let end = if p.v6 {
            p.l4 + u16::from_be_bytes([frame[p.l3 + 4], frame[p.l3 + 5]]) as usize
        } else {
            p.l3 + u16::from_be_bytes([frame[p.l3 + 2], frame[p.l3 + 3]]) as usize
        };
        frame[p.l4..end].to_vec()
    }

    /// The TCP/UDP checksum a sender computing it in full would write.
    fn full_l4_checksum(frame: &[u8], p: &Parsed) -> u16 {
        let mut seg = segment(frame, p);
        let at = csum_at(p) - p.l4;
        seg[at..at + 2].copy_from_slice(&[0, 0]);
        let (src, dst) = if p.v6 {
            (&frame[p.l3 + 8..p.l3 + 24], &frame[p.l3 + 24..p.l3 + 40])
        } else {
            (&frame[p.l3 + 12..p.l3 + 16], &frame[p.l3 + 16..p.l3 + 20])
        };
        let c = l4_checksum(src, dst, p.proto, &seg);
        if p.proto == PROTO_UDP && c == 0 {
            0xffff // RFC 768 / RFC 8200 §8.1
        } else {
            c
        }
    }

    fn stored_l4_checksum(frame: &[u8], p: &Parsed) -> u16 {
        let at = csum_at(p);
        u16::from_be_bytes([frame[at], frame[at + 1]])
    }

    fn full_ipv4_checksum(frame: &[u8], p: &Parsed) -> u16 {
        let mut hdr = frame[p.l3..p.l4].to_vec();
        hdr[10..12].copy_from_slice(&[0, 0]);
        checksum(&hdr)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            core::array::from_fn(|_| self.next() as u8)
        }
    }

    #[test]
    fn rewritten_checksums_equal_a_full_recompute_byte_for_byte() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for i in 0..20_000 {
            let v6 = rng.next() % 2 == 0;
            let addr = |rng: &mut Rng| {
                if v6 {
                    rng.bytes::<16>()
                } else {
                    map_v4(rng.bytes::<4>())
                }
            };
            let spec = Spec {
                v6,
                udp: rng.next() % 2 == 0,
                src: addr(&mut rng),
                dst: addr(&mut rng),
                sport: rng.next() as u16,
                dport: rng.next() as u16,
                ttl: 2 + (rng.next() % 254) as u8,
            };
            let payload: Vec<u8> = (0..rng.next() % 80).map(|_| rng.next() as u8).collect();
            let mut frame = build(&spec, &payload);
            let before = frame.clone();
            let p = parsed(&frame);
            assert_eq!(stored_l4_checksum(&frame, &p), full_l4_checksum(&frame, &p));

            let side = if rng.next() % 2 == 0 {
                Side::Dst
            } else {
                Side::Src
            };
            let new_addr = addr(&mut rng);
            let new_port = rng.next() as u16;
            rewrite(
                &mut frame, &p, side, &new_addr, new_port, &SRC_MAC, &DST_MAC,
            );

            let q = parsed(&frame);
            let what = format!("case {i}: v6 {v6} udp {} {side:?}", spec.udp);
            assert_eq!(&frame[0..6], &DST_MAC, "{what}");
            assert_eq!(&frame[6..12], &SRC_MAC, "{what}");
            assert_eq!(q.ttl, spec.ttl - 1, "{what}");
            match side {
                Side::Dst => {
                    assert_eq!((q.dst, q.dport), (new_addr, new_port), "{what}");
                    assert_eq!((q.src, q.sport), (p.src, p.sport), "{what}");
                }
                Side::Src => {
                    assert_eq!((q.src, q.sport), (new_addr, new_port), "{what}");
                    assert_eq!((q.dst, q.dport), (p.dst, p.dport), "{what}");
                }
            }
            assert_eq!(
                stored_l4_checksum(&frame, &q),
                full_l4_checksum(&frame, &q),
                "{what}: L4 checksum"
            );
            if !v6 {
                let stored = u16::from_be_bytes([frame[24], frame[25]]);
                assert_eq!(stored, full_ipv4_checksum(&frame, &q), "{what}: IPv4");
            }
            // Nothing but the NAT'ed fields changes.
            let (addr_at, port_at) = match (side, v6) {
                (Side::Dst, true) => (p.l3 + ipv6::DST.start, p.l4 + 2),
                (Side::Src, true) => (p.l3 + ipv6::SRC.start, p.l4),
                (Side::Dst, false) => (p.l3 + ipv4::DST.start, p.l4 + 2),
                (Side::Src, false) => (p.l3 + ipv4::SRC.start, p.l4),
            };
            let addr_len = if v6 { 16 } else { 4 };
            let ttl_at = p.l3 + if v6 { ipv6::HOP_LIMIT } else { ipv4::TTL };
            let may_change = |j: usize| {
                j < 12
                    || j == ttl_at
                    || (!v6 && (p.l3 + ipv4::CHECKSUM..p.l3 + ipv4::CHECKSUM + 2).contains(&j))
                    || (addr_at..addr_at + addr_len).contains(&j)
                    || (port_at..port_at + 2).contains(&j)
                    || (csum_at(&p)..csum_at(&p) + 2).contains(&j)
            };
            assert_eq!(frame.len(), before.len());
            for j in (0..frame.len()).filter(|&j| !may_change(j)) {
                assert_eq!(frame[j], before[j], "{what}: byte {j} changed");
            }
        }
    }

    /// A UDP datagram whose checksum after the rewrite computes to 0: its
    /// payload word is chosen to cancel the rest of the sum.
    fn udp_summing_to_zero_after_rewrite(v6: bool) -> (Vec<u8>, [u8; 16], u16) {
        let (client, vip, server) = if v6 {
            let a = |last: u8| {
                let mut a = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                a[15] = last;
                a
            };
            (a(7), a(100), a(11))
        } else {
            (
                map_v4([198, 18, 4, 7]),
                map_v4([198, 18, 100, 1]),
                map_v4([198, 18, 2, 11]),
            )
        };
        let spec = |dst: [u8; 16], dport: u16| Spec {
            v6,
            udp: true,
            src: client,
            dst,
            sport: 50000,
            dport,
            ttl: 64,
        };
        // The rewritten datagram with a zero payload word: its checksum x
        // is !sum, so a payload word of x makes the sum all ones and the
        // checksum 0.
        let probe = build(&spec(server, 9053), &[0, 0]);
        let pp = parsed(&probe);
        let mut seg = segment(&probe, &pp);
        seg[6..8].copy_from_slice(&[0, 0]);
        let (s, d) = if v6 {
            (&probe[22..38], &probe[38..54])
        } else {
            (&probe[26..30], &probe[30..34])
        };
        let x = l4_checksum(s, d, PROTO_UDP, &seg);
        (build(&spec(vip, 53), &x.to_be_bytes()), server, 9053)
    }

    #[test]
    fn udp_checksum_that_computes_to_zero_is_sent_as_all_ones() {
        for v6 in [false, true] {
            let (mut frame, server, port) = udp_summing_to_zero_after_rewrite(v6);
            let p = parsed(&frame);
            rewrite(&mut frame, &p, Side::Dst, &server, port, &SRC_MAC, &DST_MAC);
            let q = parsed(&frame);
            let mut seg = segment(&frame, &q);
            seg[6..8].copy_from_slice(&[0, 0]);
            let (s, d) = if v6 {
                (&frame[22..38], &frame[38..54])
            } else {
                (&frame[26..30], &frame[30..34])
            };
            assert_eq!(l4_checksum(s, d, PROTO_UDP, &seg), 0, "v6 {v6}: the setup");
            assert_eq!(stored_l4_checksum(&frame, &q), 0xffff, "v6 {v6}");
        }
    }

    #[test]
    fn ipv4_udp_without_checksum_stays_without_in_both_directions() {
        for side in [Side::Dst, Side::Src] {
            let spec = Spec {
                v6: false,
                udp: true,
                src: map_v4([198, 18, 4, 7]),
                dst: map_v4([198, 18, 100, 1]),
                sport: 50000,
                dport: 53,
                ttl: 64,
            };
            let mut frame = build(&spec, b"query");
            frame[40..42].copy_from_slice(&[0, 0]);
            let p = parsed(&frame);
            let new = map_v4([198, 18, 2, 11]);
            rewrite(&mut frame, &p, side, &new, 9053, &SRC_MAC, &DST_MAC);
            let q = parsed(&frame);
            assert_eq!(stored_l4_checksum(&frame, &q), 0, "{side:?}");
            let ip = u16::from_be_bytes([frame[24], frame[25]]);
            assert_eq!(
                ip,
                full_ipv4_checksum(&frame, &q),
                "{side:?}: IPv4 still updated"
            );
        }
    }

    #[test]
    fn ipv4_header_with_options_is_rewritten_and_summed_in_full() {
        let spec = Spec {
            v6: false,
            udp: false,
            src: map_v4([198, 18, 4, 7]),
            dst: map_v4([198, 18, 100, 1]),
            sport: 40000,
            dport: 80,
            ttl: 64,
        };
        let base = build(&spec, b"GET /");
        // Insert a 4-byte option (router alert) and fix lengths and sums.
        let mut frame = base[..34].to_vec();
        frame.extend_from_slice(&[0x94, 0x04, 0, 0]);
        frame.extend_from_slice(&base[34..]);
        frame[14] = 0x46;
        let total = u16::from_be_bytes([frame[16], frame[17]]) + 4;
        frame[16..18].copy_from_slice(&total.to_be_bytes());
        let p = parsed(&frame);
        assert_eq!(p.l4, 38);
        let ip = full_ipv4_checksum(&frame, &p);
        frame[24..26].copy_from_slice(&ip.to_be_bytes());

        let server = map_v4([198, 18, 2, 11]);
        rewrite(&mut frame, &p, Side::Dst, &server, 8080, &SRC_MAC, &DST_MAC);
        let q = parsed(&frame);
        assert_eq!((q.dst, q.dport, q.ttl), (server, 8080, 63));
        assert_eq!(&frame[34..38], &[0x94, 0x04, 0, 0], "options untouched");
        let ip = u16::from_be_bytes([frame[24], frame[25]]);
        assert_eq!(ip, full_ipv4_checksum(&frame, &q));
        assert_eq!(stored_l4_checksum(&frame, &q), full_l4_checksum(&frame, &q));
    }
}
