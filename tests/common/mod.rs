//! Frame builders shared by the integration tests.
//!
//! Every frame is built with etherparse's `PacketBuilder`, which computes the
//! IPv4 header and TCP/UDP checksums from scratch. An expected output frame is
//! built the same way from its own description (addresses, ports, MACs, TTL),
//! never derived from the input frame, so comparing l4lb's output with it byte
//! for byte checks the incremental (RFC 1624) checksum updates against a full
//! recompute.
//!
//! The addresses are those of `tests/fixtures/replay.toml` (the demo config
//! plus static neighbours).

// Each test crate that includes this module uses a different subset of it.
#![allow(dead_code)]

use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv4Type, IpHeaders, IpNumber, Ipv4Header,
    Ipv4Options, PacketBuilder, TcpHeader, TcpOptionElement,
};
use l4lb::replay::{BACKEND_IF_MAC, CLIENT_IF_MAC};
use l4lb::util::Mac;
use std::path::PathBuf;

/// The replay config: the demo's listeners and services, static neighbours.
pub const REPLAY_CONFIG: &str = "tests/fixtures/replay.toml";

/// MAC of the client-side router (`instance.client_gateway` 198.18.0.2).
pub const GATEWAY_MAC: Mac = [0x02, 0, 0, 0, 0x0c, 0x01];

pub const GATEWAY: [u8; 4] = [198, 18, 0, 2];
pub const CLIENT: [u8; 4] = [198, 18, 4, 7];
/// VIP of listeners "web" (tcp/80) and "echo" (udp/53).
pub const VIP: [u8; 4] = [198, 18, 100, 1];
/// VIP of listener "web-alt" (tcp/80), served by the same service as "web".
pub const VIP_ALT: [u8; 4] = [198, 18, 100, 2];
/// The servers, each with its static neighbour MAC.
pub const SERVERS: [([u8; 4], Mac); 3] = [
    ([198, 18, 2, 11], [0x02, 0, 0, 0, 0x0b, 0x01]),
    ([198, 18, 2, 12], [0x02, 0, 0, 0, 0x0b, 0x02]),
    ([198, 18, 2, 13], [0x02, 0, 0, 0, 0x0b, 0x03]),
];

/// The MAC `tests/fixtures/replay.toml` gives a server.
pub fn server_mac(addr: [u8; 4]) -> Mac {
    SERVERS
        .iter()
        .find(|(a, _)| *a == addr)
        .map(|(_, m)| *m)
        .unwrap_or_else(|| panic!("{addr:?} is not a server of the replay config"))
}

/// The replay config as a path from the crate root (tests run there).
pub fn replay_config_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(REPLAY_CONFIG)
}

pub fn replay_config() -> l4lb::config::Config {
    l4lb::config::Config::from_file(&replay_config_path()).expect("replay.toml is valid")
}

/// One TCP/UDP packet as it appears on one link: Ethernet, IPv4 and port
/// fields. Everything else (sequence numbers, options, payload) is fixed by
/// the builder used, so two frames built from different hops by the same
/// builder differ only in these fields and the checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub eth_src: Mac,
    pub eth_dst: Mac,
    pub src: [u8; 4],
    pub sport: u16,
    pub dst: [u8; 4],
    pub dport: u16,
    pub ttl: u8,
}

impl Hop {
    /// A client's packet as the gateway delivers it to l4lb's client port.
    pub fn from_client(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Hop {
        Hop {
            eth_src: GATEWAY_MAC,
            eth_dst: CLIENT_IF_MAC,
            src,
            sport,
            dst,
            dport,
            ttl: 64,
        }
    }

    /// A server's packet as it reaches l4lb's backend port.
    pub fn from_server(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Hop {
        Hop {
            eth_src: server_mac(src),
            eth_dst: BACKEND_IF_MAC,
            src,
            sport,
            dst,
            dport,
            ttl: 64,
        }
    }

    /// What l4lb should send to the server after the forward NAT: the
    /// destination becomes `server:port`, out of the backend port to the
    /// server's MAC, one hop later.
    pub fn to_server(self, server: [u8; 4], port: u16) -> Hop {
        Hop {
            eth_src: BACKEND_IF_MAC,
            eth_dst: server_mac(server),
            dst: server,
            dport: port,
            ttl: self.ttl - 1,
            ..self
        }
    }

    /// What l4lb should send to the client after the reverse NAT: the source
    /// becomes `vip:port`, out of the client port to the gateway, one hop
    /// later.
    pub fn to_client(self, vip: [u8; 4], port: u16) -> Hop {
        Hop {
            eth_src: CLIENT_IF_MAC,
            eth_dst: GATEWAY_MAC,
            src: vip,
            sport: port,
            ttl: self.ttl - 1,
            ..self
        }
    }

    pub fn ttl(self, ttl: u8) -> Hop {
        Hop { ttl, ..self }
    }

    fn ipv4(&self, proto: IpNumber, options: &[u8]) -> Ipv4Header {
        let mut ip = Ipv4Header::new(0, self.ttl, proto, self.src, self.dst).expect("header");
        // Non-zero, so that a rewrite touching it would show.
        ip.identification = 0x1c46;
        ip.options = Ipv4Options::try_from(options).expect("options");
        ip
    }
}

fn build_tcp(h: &Hop, ip_options: &[u8], tcp: TcpHeader, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(h.eth_src, h.eth_dst)
        .ip(IpHeaders::Ipv4(
            h.ipv4(IpNumber::TCP, ip_options),
            Default::default(),
        ))
        .tcp_header(tcp);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build TCP frame");
    out
}

fn tcp_header(h: &Hop, seq: u32) -> TcpHeader {
    TcpHeader::new(h.sport, h.dport, seq, 64240)
}

/// A client's SYN with MSS, SACK-permitted and window-scale options.
pub fn tcp_syn(h: &Hop) -> Vec<u8> {
    tcp_syn_with_ip_options(h, &[])
}

/// [`tcp_syn`] with IPv4 options (a multiple of 4 bytes).
pub fn tcp_syn_with_ip_options(h: &Hop, ip_options: &[u8]) -> Vec<u8> {
    let mut t = tcp_header(h, 0x0102_0304);
    t.syn = true;
    t.set_options(&[
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::SelectiveAcknowledgementPermitted,
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ])
    .expect("TCP options");
    build_tcp(h, ip_options, t, &[])
}

/// A server's SYN-ACK answering [`tcp_syn`].
pub fn tcp_syn_ack(h: &Hop) -> Vec<u8> {
    let mut t = tcp_header(h, 0xa0b0_c0d0);
    t.syn = true;
    t.ack = true;
    t.acknowledgment_number = 0x0102_0305;
    t.set_options(&[
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::SelectiveAcknowledgementPermitted,
    ])
    .expect("TCP options");
    build_tcp(h, &[], t, &[])
}

/// A data segment (PSH+ACK) carrying `payload`.
pub fn tcp_data(h: &Hop, payload: &[u8]) -> Vec<u8> {
    let mut t = tcp_header(h, 0x0102_0305);
    t.ack = true;
    t.psh = true;
    t.acknowledgment_number = 0xa0b0_c0d1;
    build_tcp(h, &[], t, payload)
}

pub fn udp(h: &Hop, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(h.eth_src, h.eth_dst)
        .ip(IpHeaders::Ipv4(
            h.ipv4(IpNumber::UDP, &[]),
            Default::default(),
        ))
        .udp(h.sport, h.dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build UDP frame");
    out
}

/// Offset of the UDP checksum in a frame built by [`udp`].
pub const UDP_CHECKSUM_AT: usize = 14 + 20 + 6;

/// [`udp`] with the checksum field 0 ("no checksum", RFC 768).
pub fn udp_without_checksum(h: &Hop, payload: &[u8]) -> Vec<u8> {
    let mut f = udp(h, payload);
    f[UDP_CHECKSUM_AT..UDP_CHECKSUM_AT + 2].copy_from_slice(&[0, 0]);
    f
}

/// An ICMP echo request from `src` to `dst` (ports of `h` unused).
pub fn icmp_echo(h: &Hop) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(h.eth_src, h.eth_dst)
        .ip(IpHeaders::Ipv4(
            h.ipv4(IpNumber::ICMP, &[]),
            Default::default(),
        ))
        .icmpv4_echo_request(0x4242, 1);
    let payload = b"ping payload";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build ICMP frame");
    out
}

/// An ICMP error of type `ty` along `h` (its ports unused), quoting the IP
/// packet of `frame` (an Ethernet frame: its first 14 bytes are skipped).
pub fn icmp_error(h: &Hop, ty: Icmpv4Type, frame: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(h.eth_src, h.eth_dst)
        .ip(IpHeaders::Ipv4(
            h.ipv4(IpNumber::ICMP, &[]),
            Default::default(),
        ))
        .icmpv4(ty);
    let quote = &frame[14..];
    let mut out = Vec::with_capacity(b.size(quote.len()));
    b.write(&mut out, quote).expect("build ICMP error");
    out
}

/// "Port unreachable", quoting `frame`.
pub fn port_unreachable(h: &Hop, frame: &[u8]) -> Vec<u8> {
    let ty = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    icmp_error(h, ty, frame)
}

/// "Fragmentation needed" with a next-hop MTU of 1400, quoting `frame`.
pub fn fragmentation_needed(h: &Hop, frame: &[u8]) -> Vec<u8> {
    let ty = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1400,
    });
    icmp_error(h, ty, frame)
}

/// The gateway asking who has `target`, broadcast.
pub fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GATEWAY_MAC, [0xff; 6]).arp(
        ArpPacket::new(
            ArpHardwareId::ETHERNET,
            EtherType::IPV4,
            ArpOperation::REQUEST,
            &GATEWAY_MAC,
            &GATEWAY,
            &[0; 6],
            &target,
        )
        .expect("ARP packet"),
    );
    let mut out = Vec::with_capacity(b.size());
    b.write(&mut out).expect("build ARP frame");
    out
}

/// A TCP SYN over IPv6 between two documentation-range hosts.
pub fn ipv6_tcp_syn(src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GATEWAY_MAC, CLIENT_IF_MAC)
        .ipv6(src, dst, 64)
        .tcp(40000, 80, 1, 64240)
        .syn();
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).expect("build IPv6 frame");
    out
}

/// Recomputes the IPv4 header checksum of an Ethernet frame after a test
/// has edited the header (so that only the edit is wrong with it).
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let hdr = 14..14 + ihl.max(20);
    frame[24] = 0;
    frame[25] = 0;
    let mut sum = 0u32;
    for w in frame[hdr].chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Sets the IPv4 total length of an Ethernet frame (header checksum fixed).
pub fn set_ipv4_total_len(frame: &mut [u8], total: u16) {
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(frame);
}

/// Where two frames first differ, for assertion messages.
pub fn first_difference(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!(
            "first difference at byte {i}: got {:#04x}, want {:#04x}\n got:  {}\n want: {}",
            got[i],
            want[i],
            hex(got),
            hex(want)
        ),
        None if got.len() != want.len() => {
            format!("length {} != {}", got.len(), want.len())
        }
        None => "equal".to_string(),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fresh, unique scratch directory under the system temp dir, removed on
/// drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "l4lb-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
