//! In-place NAT rewrite of a parsed frame.
//!
//! Forward (client → VIP:port): destination becomes backend:port.
//! Reverse (backend → client): source becomes VIP:port.
//! Both set the Ethernet addresses for the next hop and decrement the TTL /
//! hop limit as a router would. Checksums are updated incrementally
//! (RFC 1624): the IPv4 header checksum for the address and TTL words, the
//! TCP/UDP checksum for the pseudo-header address and the port.

use crate::dataplane::checksum::{update, update16};
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
#[inline]
pub fn rewrite(
    frame: &mut [u8],
    p: &Parsed,
    side: Side,
    addr: &[u8; 16],
    port: u16,
    src_mac: &Mac,
    dst_mac: &Mac,
) {
    frame[eth::DST].copy_from_slice(dst_mac);
    frame[eth::SRC].copy_from_slice(src_mac);

    let l3 = p.l3;
    let l4o = p.l4;
    let csum_off = l4o
        + if p.proto == PROTO_UDP {
            l4::UDP_CHECKSUM
        } else {
            l4::TCP_CHECKSUM
        };
    let mut l4sum = u16::from_be_bytes([frame[csum_off], frame[csum_off + 1]]);
    // RFC 768: an IPv4 UDP checksum of zero means "none"; keep it so.
    let udp_no_sum = p.proto == PROTO_UDP && !p.v6 && l4sum == 0;

    if p.v6 {
        let range = match side {
            Side::Dst => ipv6::DST,
            Side::Src => ipv6::SRC,
        };
        let at = l3 + range.start..l3 + range.end;
        if !udp_no_sum {
            l4sum = update(l4sum, &frame[at.clone()], addr);
        }
        frame[at].copy_from_slice(addr);
        frame[l3 + ipv6::HOP_LIMIT] -= 1;
    } else {
        let range = match side {
            Side::Dst => ipv4::DST,
            Side::Src => ipv4::SRC,
        };
        let at = l3 + range.start..l3 + range.end;
        let new = &addr[12..16];
        let ck = l3 + ipv4::CHECKSUM;
        let mut ipsum = u16::from_be_bytes([frame[ck], frame[ck + 1]]);
        ipsum = update(ipsum, &frame[at.clone()], new);
        if !udp_no_sum {
            l4sum = update(l4sum, &frame[at.clone()], new);
        }
        frame[at].copy_from_slice(new);
        // TTL shares a 16-bit word with the protocol byte.
        let ttl = l3 + ipv4::TTL;
        let old_word = u16::from_be_bytes([frame[ttl], frame[ttl + 1]]);
        frame[ttl] -= 1;
        let new_word = u16::from_be_bytes([frame[ttl], frame[ttl + 1]]);
        ipsum = update16(ipsum, old_word, new_word);
        frame[ck..ck + 2].copy_from_slice(&ipsum.to_be_bytes());
    }

    let port_at = match side {
        Side::Dst => l4o + l4::DST_PORT.start,
        Side::Src => l4o + l4::SRC_PORT.start,
    };
    let old_port = u16::from_be_bytes([frame[port_at], frame[port_at + 1]]);
    frame[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
    if !udp_no_sum {
        l4sum = update16(l4sum, old_port, port);
        if p.proto == PROTO_UDP && l4sum == 0 {
            // A computed UDP checksum of zero is sent as all ones (RFC 768).
            l4sum = 0xffff;
        }
        frame[csum_off..csum_off + 2].copy_from_slice(&l4sum.to_be_bytes());
    }
}
