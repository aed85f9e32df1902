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

#[inline]
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

#[inline]
fn parse_v4(ip: &[u8]) -> Frame {
    // Read the addresses first, from a fixed 20-byte header: even a frame
    // whose header is otherwise broken is attributed to a VIP (and counted)
    // when its destination is one, exactly as the XDP program does.
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Frame::Truncated;
    }
    let src = map_v4(ip[ipv4::SRC].try_into().expect("4 bytes"));
    let dst = map_v4(ip[ipv4::DST].try_into().expect("4 bytes"));
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

#[inline]
fn parse_v6(ip: &[u8]) -> Frame {
    let hdr = match Ipv6HeaderSlice::from_slice(ip) {
        Ok(h) => h,
        Err(_) => return Frame::Truncated,
    };
    let src: Addr16 = ip[ipv6::SRC].try_into().expect("16 bytes");
    let dst: Addr16 = ip[ipv6::DST].try_into().expect("16 bytes");
    let proto = hdr.next_header().0;
    const ICMPV6: u8 = 58;
    if proto == ICMPV6 {
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
    match ports(&ip[ipv6::LEN..end], proto) {
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

/// Source and destination port of a complete TCP or UDP header.
#[inline]
fn ports(seg: &[u8], proto: u8) -> Option<(u16, u16)> {
    let ok = if proto == PROTO_TCP {
        TcpHeaderSlice::from_slice(seg).is_ok()
    } else {
        UdpHeaderSlice::from_slice(seg).is_ok()
    };
    ok.then(|| {
        (
            u16::from_be_bytes([seg[0], seg[1]]),
            u16::from_be_bytes([seg[2], seg[3]]),
        )
    })
}
