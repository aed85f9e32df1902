//! What the benchmarks (bench/pipeline.rs, bench/e2e.rs) and the allocation
//! test (tests/alloc.rs) share: the benchmark's addresses, 64-byte IPv4
//! TCP/UDP frames with valid checksums, and the l4lb configuration they run.
//!
//! Addresses are all in 198.18.0.0/15 (RFC 2544):
//! ```text
//!  clients 198.19.0.0/16 ──► VIP 198.18.100.1  udp/53 ─► backends 198.18.2.11.. :9053
//!  (gateway 198.18.0.2)                         tcp/80 ─►                        :8080
//! ```

// Each user of this module uses a different part of it.
#![allow(dead_code)]

use etherparse::PacketBuilder;

pub type Mac = [u8; 6];

/// Every benchmark frame is this long (Ethernet header to the end of the
/// payload, no FCS): the classic 64-byte packet-rate test frame.
pub const FRAME_LEN: usize = 64;

pub const VIP: [u8; 4] = [198, 18, 100, 1];
pub const UDP_VIP_PORT: u16 = 53;
pub const TCP_VIP_PORT: u16 = 80;
pub const UDP_BACKEND_PORT: u16 = 9053;
pub const TCP_BACKEND_PORT: u16 = 8080;
/// l4lb's TCP health checks go here (bench/e2e.rs keeps a listener on it in
/// the sink namespace, so that the backends stay up).
pub const HEALTH_PORT: u16 = 9999;

/// The client-side next hop (the generator's veth in bench/e2e.rs).
pub const GATEWAY: [u8; 4] = [198, 18, 0, 2];
pub const GATEWAY_MAC: Mac = [0x02, 0xb0, 0, 0, 0, 0x01];
/// l4lb's own addresses on its two links.
pub const LB_CLIENT_ADDR: [u8; 4] = [198, 18, 0, 1];
pub const LB_BACKEND_ADDR: [u8; 4] = [198, 18, 2, 1];
/// The first client; client `i` is this address plus `i` (up to 65536).
pub const FIRST_CLIENT: [u8; 4] = [198, 19, 0, 0];
pub const MAX_CLIENT_ADDRS: u32 = 1 << 16;
/// Source ports of clients start here.
pub const FIRST_CLIENT_PORT: u16 = 20_000;

/// Backend `i` (0-based): 198.18.2.(11 + i).
pub fn backend_addr(i: usize) -> [u8; 4] {
    assert!(i < 200, "at most 200 backends");
    [198, 18, 2, 11 + i as u8]
}

/// The MAC the replay and micro-benchmark configs give backend `i`.
pub fn backend_mac(i: usize) -> Mac {
    [0x02, 0xb0, 0, 0, 0x0b, i as u8]
}

pub fn client_addr(i: u32) -> [u8; 4] {
    assert!(i < MAX_CLIENT_ADDRS, "client {i} is outside 198.19.0.0/16");
    (u32::from_be_bytes(FIRST_CLIENT) + i).to_be_bytes()
}

pub fn fmt_ip(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

pub fn fmt_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
    pub fn vip_port(self) -> u16 {
        match self {
            Proto::Udp => UDP_VIP_PORT,
            Proto::Tcp => TCP_VIP_PORT,
        }
    }
    pub fn backend_port(self) -> u16 {
        match self {
            Proto::Udp => UDP_BACKEND_PORT,
            Proto::Tcp => TCP_BACKEND_PORT,
        }
    }
}

/// One Ethernet/IPv4/UDP-or-TCP frame of exactly [`FRAME_LEN`] bytes, TTL
/// 64, with correct IPv4 and L4 checksums (etherparse computes them). TCP
/// frames are PSH+ACK data segments, as most of an established flow is.
#[allow(clippy::too_many_arguments)]
pub fn frame(
    proto: Proto,
    eth_src: Mac,
    eth_dst: Mac,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(eth_src, eth_dst).ipv4(src, dst, 64);
    let mut out = Vec::with_capacity(FRAME_LEN);
    match proto {
        Proto::Udp => {
            let b = ip.udp(sport, dport);
            let payload = vec![0x5a; FRAME_LEN - b.size(0)];
            b.write(&mut out, &payload).expect("UDP frame");
        }
        Proto::Tcp => {
            let b = ip
                .tcp(sport, dport, 0x0102_0304, 64240)
                .ack(0xa0b0_c0d0)
                .psh();
            let payload = vec![0x5a; FRAME_LEN - b.size(0)];
            b.write(&mut out, &payload).expect("TCP frame");
        }
    }
    assert_eq!(out.len(), FRAME_LEN);
    out
}

/// `n` client frames back to back, as the pipeline benchmarks and
/// `l4lb-bench pipeline-loop` feed them: client k is address k % 65536
/// (from [`FIRST_CLIENT`]), port [`FIRST_CLIENT_PORT`] + k / 65536, to
/// l4lb's client-side MAC `lb_mac`.
pub fn client_frames(proto: Proto, lb_mac: Mac, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * FRAME_LEN);
    for k in 0..n as u32 {
        let addr = client_addr(k % MAX_CLIENT_ADDRS);
        let port = FIRST_CLIENT_PORT + (k / MAX_CLIENT_ADDRS) as u16;
        out.extend_from_slice(&client_frame(proto, lb_mac, addr, port));
    }
    out
}

/// Client `i`'s frame to the VIP, as the gateway delivers it to l4lb's
/// client interface (whose MAC is `lb_mac`).
pub fn client_frame(proto: Proto, lb_mac: Mac, client: [u8; 4], sport: u16) -> Vec<u8> {
    frame(
        proto,
        GATEWAY_MAC,
        lb_mac,
        client,
        sport,
        VIP,
        proto.vip_port(),
    )
}

/// The reply a backend sends to the client of `forwarded` (a frame l4lb
/// sent to that backend): from the backend's address and port back to the
/// client's, the two MACs swapped.
pub fn reply_frame(proto: Proto, forwarded: &[u8]) -> Vec<u8> {
    let mac = |r: std::ops::Range<usize>| -> Mac { forwarded[r].try_into().expect("6 bytes") };
    let ip = |at: usize| -> [u8; 4] { forwarded[at..at + 4].try_into().expect("4 bytes") };
    let port = |at: usize| u16::from_be_bytes([forwarded[at], forwarded[at + 1]]);
    // Ethernet 0..14, IPv4 (no options) 14..34, ports 34..38.
    frame(
        proto,
        mac(0..6),
        mac(6..12),
        ip(30),
        port(36),
        ip(26),
        port(34),
    )
}

/// The l4lb configuration the benchmarks run: a UDP listener (VIP:53) and a
/// TCP listener (VIP:80), each with its own backend service of `backends`
/// equal-weight servers, static neighbours for every next hop, TCP health
/// checks on [`HEALTH_PORT`].
pub struct ConfigSpec<'a> {
    pub name: &'a str,
    pub client_interface: &'a str,
    pub backend_interface: &'a str,
    pub attach: &'a str,
    pub workers: &'a [usize],
    pub flow_table_capacity: usize,
    pub control_socket: Option<&'a str>,
    pub backends: usize,
    /// MAC of every backend (one sink in bench/e2e.rs).
    pub backend_mac: &'a dyn Fn(usize) -> Mac,
    /// `persistence_timeout` of both services, if any.
    pub persistence_timeout: Option<u32>,
    /// Extra `[instance]` lines (keys newer versions accept).
    pub extra_instance: &'a str,
    /// More UDP listeners, each with a backend service of its own (the
    /// memory test: every client gets a session with each): listener `k`
    /// on VIP port [`MEMORY_FIRST_VIP_PORT`] + k, its servers on port
    /// [`MEMORY_FIRST_BACKEND_PORT`] + k.
    pub memory_services: u16,
}

/// The memory test's listeners and servers (see `ConfigSpec`).
pub const MEMORY_FIRST_VIP_PORT: u16 = 5300;
pub const MEMORY_FIRST_BACKEND_PORT: u16 = 9100;

impl ConfigSpec<'_> {
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let workers = self
            .workers
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            s,
            "# Generated by l4lb's benchmarks (bench/common.rs).\n[instance]\nname = \"{}\"",
            self.name
        );
        let _ = writeln!(s, "client_interface = \"{}\"", self.client_interface);
        let _ = writeln!(s, "backend_interface = \"{}\"", self.backend_interface);
        let _ = writeln!(s, "client_gateway = \"{}\"", fmt_ip(GATEWAY));
        let _ = writeln!(s, "attach = \"{}\"\nbind = \"copy\"", self.attach);
        let _ = writeln!(s, "workers = [{workers}]");
        let _ = writeln!(s, "flow_table_capacity = {}", self.flow_table_capacity);
        let _ = writeln!(s, "flow_idle_timeout = 300");
        if let Some(sock) = self.control_socket {
            let _ = writeln!(s, "control_socket = \"{sock}\"");
        }
        s.push_str(self.extra_instance);
        if !self.extra_instance.is_empty() && !self.extra_instance.ends_with('\n') {
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "\n[[instance.neighbour]]\naddress = \"{}\"\nmac = \"{}\"",
            fmt_ip(GATEWAY),
            fmt_mac(&GATEWAY_MAC)
        );
        for i in 0..self.backends {
            let _ = writeln!(
                s,
                "\n[[instance.neighbour]]\naddress = \"{}\"\nmac = \"{}\"",
                fmt_ip(backend_addr(i)),
                fmt_mac(&(self.backend_mac)(i))
            );
        }
        // (name, protocol, VIP port, server port)
        let mut services: Vec<(String, Proto, u16, u16)> = [Proto::Udp, Proto::Tcp]
            .into_iter()
            .map(|p| {
                (
                    format!("bench-{}", p.name()),
                    p,
                    p.vip_port(),
                    p.backend_port(),
                )
            })
            .collect();
        for k in 0..self.memory_services {
            services.push((
                format!("mem-{k}"),
                Proto::Udp,
                MEMORY_FIRST_VIP_PORT + k,
                MEMORY_FIRST_BACKEND_PORT + k,
            ));
        }
        for (name, proto, vip_port, _) in &services {
            let n = proto.name();
            let _ = writeln!(
                s,
                "\n[[listener]]\nname = \"{name}\"\nvip = \"{}\"\nprotocol = \"{n}\"\nport = {vip_port}\nbackend_service = \"{name}\"",
                fmt_ip(VIP),
            );
        }
        for (name, proto, _, server_port) in &services {
            let n = proto.name();
            let _ = writeln!(
                s,
                "\n[[backend_service]]\nname = \"{name}\"\nprotocol = \"{n}\"\nscheduler = \"weighted_source_ip\""
            );
            if let Some(t) = self.persistence_timeout {
                let _ = writeln!(s, "persistence_timeout = {t}");
            }
            let _ = writeln!(
                s,
                "  [backend_service.health_check]\n  type = \"tcp\"\n  port = {HEALTH_PORT}"
            );
            for i in 0..self.backends {
                let _ = writeln!(
                    s,
                    "  [[backend_service.server]]\n  address = \"{}\"\n  port = {}\n  weight = 100",
                    fmt_ip(backend_addr(i)),
                    server_port
                );
            }
        }
        s
    }
}

/// The configuration of the offline benchmarks and tests (no interfaces are
/// touched): 3 backends, a 2^20-entry flow table, and persistence (300 s)
/// when this version of l4lb accepts it, so that the new-session benchmark
/// also pays for the persistence insert once the pipeline does one.
pub fn offline_config() -> (l4lb::config::Config, String) {
    offline_config_with(true)
}

/// [`offline_config`], with persistence on (when accepted) or off.
pub fn offline_config_with(persistence: bool) -> (l4lb::config::Config, String) {
    let mac = |i| backend_mac(i);
    let mut spec = ConfigSpec {
        name: "bench",
        client_interface: "bench-c",
        backend_interface: "bench-b",
        attach: "skb",
        workers: &[0],
        flow_table_capacity: 1 << 20,
        control_socket: None,
        backends: 3,
        backend_mac: &mac,
        persistence_timeout: Some(300),
        extra_instance: "",
        memory_services: 0,
    };
    let with = spec.render();
    if persistence {
        if let Ok(c) = l4lb::config::Config::from_str(&with, "<bench config>") {
            return (c, with);
        }
    }
    spec.persistence_timeout = None;
    let without = spec.render();
    match l4lb::config::Config::from_str(&without, "<bench config>") {
        Ok(c) => (c, without),
        Err(e) => panic!("the benchmark config is invalid:\n{e}\n---\n{without}"),
    }
}
