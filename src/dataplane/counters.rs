//! Per-worker counters. Drops are data: every frame the data plane does not
//! forward is attributed to exactly one [`DropReason`].
//!
//! Each worker owns one [`WorkerStats`] and is its only writer, so counters
//! are bumped with a relaxed load + store (no locked read-modify-write);
//! the control thread reads them with relaxed loads. Each block is
//! cache-line aligned so workers never share a line.

use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a frame that reached the data plane was not forwarded. The comment of
/// each says what value is normal in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Broken IP/TCP/UDP header or lengths to a VIP or from a backend.
    /// Normal: near 0; a rising count means a broken or hostile sender.
    Malformed = 0,
    /// IPv4 fragment to a VIP: an L4 balancer without reassembly cannot route
    /// it by port. Normal: 0 unless clients send oversized UDP.
    Fragment,
    /// IPv6 extension headers, or ICMP from a backend to a client.
    /// Normal: near 0.
    Unsupported,
    /// The listener's backend service has no server with weight > 0 that is
    /// up. Normal: 0; non-zero means an outage.
    NoBackend,
    /// The next hop's MAC address (backend or client gateway) is not known
    /// yet. Normal: 0 after start-up.
    NoNeighbour,
    /// TTL / hop limit would reach 0. Normal: 0 (routing loop otherwise).
    TtlExceeded,
    /// A backend's packet to a client with no flow: the flow aged out, or
    /// the backend talks to clients on its own. Normal: small.
    NoFlow,
    /// A frame that is the kernel's (ARP, other ports) reached the socket;
    /// user space cannot hand it back. Normal: 0 (the XDP program filters
    /// them), briefly non-zero while a reload updates the XDP maps.
    NotOurs,
    /// The TX ring stayed full: the frame was recycled unsent.
    /// Normal: 0; non-zero means the egress link is saturated.
    TxRingFull,
}

impl DropReason {
    pub const COUNT: usize = 9;
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::Unsupported,
        DropReason::NoBackend,
        DropReason::NoNeighbour,
        DropReason::TtlExceeded,
        DropReason::NoFlow,
        DropReason::NotOurs,
        DropReason::TxRingFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::Unsupported => "unsupported",
            DropReason::NoBackend => "no_backend",
            DropReason::NoNeighbour => "no_neighbour",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::NoFlow => "no_flow",
            DropReason::NotOurs => "not_ours",
            DropReason::TxRingFull => "tx_ring_full",
        }
    }
}

#[inline]
fn bump(c: &AtomicU64, n: u64) {
    // Single writer: a plain load + store is enough and avoids a locked
    // instruction per packet.
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Packet and byte counters of one listener or backend.
#[derive(Default)]
pub struct Pair {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
}

impl Pair {
    #[inline]
    pub fn add(&self, bytes: usize) {
        bump(&self.packets, 1);
        bump(&self.bytes, bytes as u64);
    }
    pub fn read(&self) -> (u64, u64) {
        (self.packets.load(Relaxed), self.bytes.load(Relaxed))
    }
}

/// One worker's counters.
pub struct WorkerStats {
    pub core: CachePadded<Core>,
    /// Client → backend packets per listener id.
    pub listeners: Box<[Pair]>,
    /// Client → backend packets per backend id.
    pub backends: Box<[Pair]>,
}

#[derive(Default)]
pub struct Core {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    pub forwarded: AtomicU64,
    pub replied: AtomicU64,
    pub passed: AtomicU64,
    pub flows_created: AtomicU64,
    pub flows_evicted: AtomicU64,
    /// Flows whose (client, backend) tuple moved to another listener.
    pub flows_rebound: AtomicU64,
    pub drops: [AtomicU64; DropReason::COUNT],
}

impl WorkerStats {
    pub fn new(max_listeners: usize, max_backends: usize) -> Self {
        WorkerStats {
            core: CachePadded::new(Core::default()),
            listeners: (0..max_listeners).map(|_| Pair::default()).collect(),
            backends: (0..max_backends).map(|_| Pair::default()).collect(),
        }
    }

    #[inline]
    pub fn count_drop(&self, why: DropReason) {
        bump(&self.core.drops[why as usize], 1);
    }
    #[inline]
    pub fn drops(&self, why: DropReason) -> u64 {
        self.core.drops[why as usize].load(Relaxed)
    }
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        bump(c, n);
    }
    #[inline]
    pub fn listener(&self, id: u32, bytes: usize) {
        if let Some(p) = self.listeners.get(id as usize) {
            p.add(bytes);
        }
    }
    #[inline]
    pub fn backend(&self, id: u32, bytes: usize) {
        if let Some(p) = self.backends.get(id as usize) {
            p.add(bytes);
        }
    }
}
