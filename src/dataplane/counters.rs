//! Per-worker counters. Drops are data: every frame the data plane does not
//! forward is attributed to exactly one [`DropReason`].
//!
//! Each worker owns one [`WorkerStats`] and is its only writer, so counters
//! are bumped with a relaxed load + store (no locked read-modify-write);
//! the control thread reads them with relaxed loads. Each block is
//! cache-line aligned so workers never share a line.

use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

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
    /// IPv6 extension headers; ICMP from a backend to a client that is not
    /// an error; an ICMP error from a backend quoting neither TCP nor UDP.
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
    /// the backend talks to clients on its own; or an ICMP error about no
    /// flow. Normal: small.
    NoFlow,
    /// A frame that is the kernel's (ARP, other ports) reached the socket;
    /// user space cannot hand it back. Normal: 0 (the XDP program filters
    /// them), briefly non-zero while a reload updates the XDP maps.
    NotOurs,
    /// The TX ring stayed full: the frame was recycled unsent.
    /// Normal: 0; non-zero means the egress link is saturated.
    TxRingFull,
    /// A packet that would open a flow comes from an address no router
    /// forwards from (loopback, unspecified, multicast, broadcast,
    /// link-local, IPv4 0/8 and 240/4). Normal: 0; otherwise spoofed or
    /// misrouted traffic.
    BadSource,
}

impl DropReason {
    pub const COUNT: usize = 10;
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
        DropReason::BadSource,
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
            DropReason::BadSource => "bad_source",
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

/// One worker's counters and scheduler cursors, indexed by stable id (see
/// `control::ids`), so they survive reloads. One entry for every possible
/// id: a `u16` index needs no bounds check on the packet path.
pub struct WorkerStats {
    pub core: CachePadded<Core>,
    /// Client → backend packets per listener id.
    pub listeners: PerId<Pair>,
    /// Client → backend packets per backend id.
    pub backends: PerId<Pair>,
    /// Least-connections: flows opened / seen closing, per backend id.
    pub opened: PerId<AtomicU64>,
    pub closed: PerId<AtomicU64>,
    /// Weighted round robin: this worker's cursor per service id.
    pub wrr: PerId<AtomicU32>,
}

/// One `T` per stable id.
pub type PerId<T> = Box<[T; IDS]>;

#[derive(Default)]
pub struct Core {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    pub forwarded: AtomicU64,
    pub replied: AtomicU64,
    /// ICMP errors translated and sent on (also counted in `forwarded` or
    /// `replied`).
    pub icmp: AtomicU64,
    pub passed: AtomicU64,
    pub flows_created: AtomicU64,
    pub flows_evicted: AtomicU64,
    /// Flows whose (client, backend) tuple moved to another listener.
    pub flows_rebound: AtomicU64,
    /// New flows sent to a client's persisted backend.
    pub persist_hits: AtomicU64,
    /// Persistence entries written for newly scheduled clients.
    pub persist_recorded: AtomicU64,
    /// ... of which by evicting the oldest entry of a full window.
    pub persist_evicted: AtomicU64,
    /// Clients scheduled but not recorded: the table was full and the
    /// policy is `no_record`.
    pub persist_full: AtomicU64,
    pub drops: [AtomicU64; DropReason::COUNT],
}

pub const IDS: usize = crate::control::ids::MAX_ID + 1;

fn zeroed<T: Default>() -> PerId<T> {
    let all: Box<[T]> = (0..IDS).map(|_| T::default()).collect();
    all.try_into()
        .unwrap_or_else(|_| unreachable!("IDS entries"))
}

impl Default for WorkerStats {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerStats {
    pub fn new() -> Self {
        WorkerStats {
            core: CachePadded::new(Core::default()),
            listeners: zeroed(),
            backends: zeroed(),
            opened: zeroed(),
            closed: zeroed(),
            wrr: zeroed(),
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
    pub fn listener(&self, id: u16, bytes: usize) {
        self.listeners[id as usize].add(bytes);
    }
    #[inline]
    pub fn backend(&self, id: u16, bytes: usize) {
        self.backends[id as usize].add(bytes);
    }
    #[inline]
    pub fn conn_opened(&self, backend: u16) {
        bump(&self.opened[backend as usize], 1);
    }
    #[inline]
    pub fn conn_closed(&self, backend: u16) {
        bump(&self.closed[backend as usize], 1);
    }
    /// Post-increments this worker's round-robin cursor of a service.
    #[inline]
    pub fn wrr_next(&self, service: u16) -> u32 {
        let c = &self.wrr[service as usize];
        let n = c.load(Relaxed);
        c.store(n.wrapping_add(1), Relaxed);
        n
    }
}

/// Counters every worker reads: all workers' stats (least-connections sums
/// them) and the flows the control plane's sweep found ended silently.
pub struct Shared {
    pub workers: Vec<std::sync::Arc<WorkerStats>>,
    /// Per backend id: flows closed by expiry, found by the sweep.
    pub swept: Box<[AtomicU64]>,
}

impl Shared {
    pub fn new(workers: Vec<std::sync::Arc<WorkerStats>>) -> Self {
        Shared {
            workers,
            swept: zeroed(),
        }
    }

    /// Active connections to a backend: opened − closed over all workers,
    /// minus those that expired silently.
    pub fn active(&self, backend: u16) -> i64 {
        let b = backend as usize;
        let mut a: i64 = 0;
        for w in &self.workers {
            a += w.opened[b].load(Relaxed) as i64 - w.closed[b].load(Relaxed) as i64;
        }
        a - self.swept[b].load(Relaxed) as i64
    }
}
