//! A worker's flow cache: the established IPv4 flows this worker has
//! forwarded in the current second, with their rewrite worked out.
//!
//! The full forward path of an established flow looks up its listener,
//! hashes a five-word key, reads the shared flow table's slot under its
//! sequence lock, checks the entry against the snapshot (listener, backend
//! kept by the service) and computes the NAT rewrite's checksum deltas. For
//! a flow that did all of that less than a second ago, under the same
//! snapshot, every answer is the same. So the full path leaves them here,
//! in one cache line per flow (a direct-mapped table, this worker's own),
//! and the flow's next packets in that second take them from there: the
//! Ethernet addresses, the server's address and port, and the two checksum
//! deltas (RFC 1624), applied as they are.
//!
//! A line is used only while all of these hold, so that a packet that
//! takes it is forwarded exactly as the full path would forward it:
//! * same snapshot generation: any reload, health change or neighbour
//!   change publishes a new snapshot, and every line goes stale at once;
//! * same second of the coarse clock: the full path runs at least once a
//!   second per flow and worker, and so refreshes the flow's shared entries
//!   (the flow table's expiry moves in whole seconds; its refresh happens
//!   at most once a second anyway) and sees what other workers did to the
//!   flow (closed or replaced it);
//! * the packet is IPv4 without options, UDP or TCP without SYN, FIN or
//!   RST (those change the flow's state), TTL above 1;
//! * the key matches: source and destination address and port, protocol.
//!
//! Only the full path writes lines, and only for an established flow it
//! kept (not new, not closed, not still opening) to a server whose MAC is
//! known.
//!
//! Lines are atomics read and written with relaxed loads and stores
//! (plain moves on x86-64): the worker is the only writer and reader, but
//! the cache lives behind a shared reference like the rest of the
//! per-burst state.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::dataplane::checksum::Wsum;
use crate::util::{fold_mul, Mac};

/// Lines per worker: 64 KiB, so that the cache stays in L2 next to the
/// flow table's hot lines.
pub const LINES: usize = 1024;

/// Bit 40 of the second key word is set in every key, so that a zeroed
/// line never matches.
const VALID: u64 = 1 << 40;

/// One flow: 8 words, one cache line.
#[repr(C, align(64))]
#[derive(Default)]
struct Line {
    /// Source and destination address, as on the wire (frame bytes 26..34).
    k0: AtomicU64,
    /// Source and destination port as on the wire (bytes 34..38), the
    /// protocol at bit 32, [`VALID`].
    k1: AtomicU64,
    /// The snapshot generation the line was written under.
    generation: AtomicU64,
    /// The second it was written in (low 32 bits), the listener's stable id
    /// (bits 32..48), the backend's (48..64).
    when_ids: AtomicU64,
    /// Destination MAC (6 bytes), then the first two bytes of the source
    /// MAC.
    eth0: AtomicU64,
    /// The last four bytes of the source MAC, then the server's IPv4
    /// address (wire order).
    eth1_addr: AtomicU64,
    /// The server's port (wire order) in the low 16 bits.
    port: AtomicU64,
    /// The IPv4 header checksum's delta (address and TTL) in the low 32
    /// bits, the TCP/UDP checksum's (address and port) in the high 32.
    deltas: AtomicU64,
}

/// Where a frame's key would live, and the key: computed in the burst
/// pipeline's first stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheKey {
    k0: u64,
    k1: u64,
    index: u32,
}

/// What a hit gives the rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub listener: u16,
    pub backend: u16,
    /// Destination then source MAC: the frame's first 12 bytes.
    pub eth: [u8; 12],
    /// The server's address and port, as on the wire.
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub ip_delta: Wsum,
    pub l4_delta: Wsum,
}

/// What the full path learned about a flow it forwarded, to be cached.
pub struct Entry<'a> {
    pub listener: u16,
    pub backend: u16,
    pub dst_mac: &'a Mac,
    pub src_mac: &'a Mac,
    pub addr: [u8; 4],
    pub port: u16,
}

pub struct FlowCache {
    lines: Box<[Line]>,
    seed: [u64; 2],
}

impl Default for FlowCache {
    fn default() -> Self {
        FlowCache::new()
    }
}

/// Frame offsets of an IPv4 frame without options (Ethernet II).
mod at {
    pub const TTL: usize = 22;
    pub const IP_CHECKSUM: usize = 24;
    pub const ADDRS: usize = 26;
    pub const DST_ADDR: usize = 30;
    pub const PORTS: usize = 34;
    pub const DST_PORT: usize = 36;
    pub const UDP_CHECKSUM: usize = 40;
    pub const TCP_CHECKSUM: usize = 50;
}

#[inline(always)]
fn word<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b[at..at + N].try_into().expect("N bytes")
}

impl CacheKey {
    /// The line the key lives in.
    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// Whether this is a key (an unset one is the default: the frame is not
    /// IPv4 without options).
    #[inline(always)]
    pub fn is_set(&self) -> bool {
        self.k1 & VALID != 0
    }
}

impl FlowCache {
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let rs = std::collections::hash_map::RandomState::new();
        let mut seed = [0u64; 2];
        for (i, s) in seed.iter_mut().enumerate() {
            let mut h = rs.build_hasher();
            h.write_u64(0x0063_6163_6865 + i as u64);
            *s = h.finish();
        }
        FlowCache {
            lines: (0..LINES).map(|_| Line::default()).collect(),
            seed,
        }
    }

    /// The key of an IPv4 frame without options whose TCP or UDP header
    /// the parser has checked (`proto`).
    #[inline(always)]
    pub fn key(&self, frame: &[u8], proto: u8) -> CacheKey {
        let k0 = u64::from_ne_bytes(word(frame, at::ADDRS));
        let k1 = u32::from_ne_bytes(word(frame, at::PORTS)) as u64 | (proto as u64) << 32 | VALID;
        let h = fold_mul(k0 ^ self.seed[0], k1 ^ self.seed[1]);
        CacheKey {
            k0,
            k1,
            index: (h as usize & (LINES - 1)) as u32,
        }
    }

    /// Whether `key`'s line holds its flow, written under snapshot
    /// `generation` in second `now`.
    #[inline(always)]
    pub fn holds(&self, key: &CacheKey, generation: u64, now: u32) -> bool {
        let l = &self.lines[key.index as usize];
        l.k0.load(Relaxed) == key.k0
            && l.k1.load(Relaxed) == key.k1
            && l.generation.load(Relaxed) == generation
            && l.when_ids.load(Relaxed) as u32 == now
    }

    /// The cached rewrite of `key`'s flow, if [`FlowCache::holds`] it.
    #[inline(always)]
    pub fn get(&self, key: &CacheKey, generation: u64, now: u32) -> Option<Hit> {
        if !self.holds(key, generation, now) {
            return None;
        }
        let l = &self.lines[key.index as usize];
        let when_ids = l.when_ids.load(Relaxed);
        let eth0 = l.eth0.load(Relaxed).to_le_bytes();
        let eth1_addr = l.eth1_addr.load(Relaxed).to_le_bytes();
        let deltas = l.deltas.load(Relaxed);
        let mut eth = [0u8; 12];
        eth[..8].copy_from_slice(&eth0);
        eth[8..].copy_from_slice(&eth1_addr[..4]);
        Some(Hit {
            listener: (when_ids >> 32) as u16,
            backend: (when_ids >> 48) as u16,
            eth,
            addr: word(&eth1_addr, 4),
            port: (l.port.load(Relaxed) as u16).to_le_bytes(),
            ip_delta: Wsum::from_bits(deltas as u32),
            l4_delta: Wsum::from_bits((deltas >> 32) as u32),
        })
    }

    /// Drops `key`'s flow from its line, if the line holds it.
    #[cold]
    pub fn forget(&self, key: &CacheKey) {
        let l = &self.lines[key.index as usize];
        if l.k0.load(Relaxed) == key.k0 && l.k1.load(Relaxed) == key.k1 {
            l.k1.store(0, Relaxed);
        }
    }

    /// Caches the rewrite of `frame`'s flow (IPv4 without options, its key
    /// `key`) to `e`, for the rest of second `now` under snapshot
    /// `generation`. Call before rewriting the frame: the deltas are worked
    /// out from its destination as it arrived.
    #[inline]
    pub fn put(&self, key: &CacheKey, frame: &[u8], e: &Entry, generation: u64, now: u32) {
        let vip: [u8; 4] = word(frame, at::DST_ADDR);
        let vip_port = u16::from_ne_bytes(word(frame, at::DST_PORT));
        let port = u16::from_ne_bytes(e.port.to_be_bytes());
        let addr_delta = Wsum::ZERO.replace(u32::from_ne_bytes(vip), u32::from_ne_bytes(e.addr));
        let ip_delta = addr_delta.merge(Wsum::TTL_DECREMENT);
        let l4_delta = addr_delta.replace(vip_port as u32, port as u32);

        let mut eth0 = [0u8; 8];
        eth0[..6].copy_from_slice(e.dst_mac);
        eth0[6..].copy_from_slice(&e.src_mac[..2]);
        let mut eth1_addr = [0u8; 8];
        eth1_addr[..4].copy_from_slice(&e.src_mac[2..]);
        eth1_addr[4..].copy_from_slice(&e.addr);

        let l = &self.lines[key.index as usize];
        l.k0.store(key.k0, Relaxed);
        l.k1.store(key.k1, Relaxed);
        l.generation.store(generation, Relaxed);
        l.when_ids.store(
            now as u64 | (e.listener as u64) << 32 | (e.backend as u64) << 48,
            Relaxed,
        );
        l.eth0.store(u64::from_le_bytes(eth0), Relaxed);
        l.eth1_addr.store(u64::from_le_bytes(eth1_addr), Relaxed);
        l.port
            .store(u16::from_le_bytes(port.to_ne_bytes()) as u64, Relaxed);
        l.deltas.store(
            ip_delta.to_bits() as u64 | (l4_delta.to_bits() as u64) << 32,
            Relaxed,
        );
    }
}

/// Rewrites an IPv4 frame without options (UDP if `udp`, else TCP, whose
/// headers the parser has checked) as [`crate::dataplane::nat::rewrite`]
/// would towards the cached server `h`, TTL above 1.
#[inline(always)]
pub fn rewrite(frame: &mut [u8], udp: bool, h: &Hit) {
    if udp {
        rewrite_fixed::<{ at::UDP_CHECKSUM + 2 }>(frame, at::UDP_CHECKSUM, true, h);
    } else {
        rewrite_fixed::<{ at::TCP_CHECKSUM + 2 }>(frame, at::TCP_CHECKSUM, false, h);
    }
}

#[inline(always)]
fn rewrite_fixed<const N: usize>(frame: &mut [u8], l4_checksum: usize, udp: bool, h: &Hit) {
    let f: &mut [u8; N] = (&mut frame[..N]).try_into().expect("checked headers");
    f[..12].copy_from_slice(&h.eth);
    f[at::DST_ADDR..at::DST_ADDR + 4].copy_from_slice(&h.addr);
    f[at::TTL] -= 1;
    let ipsum: &mut [u8; 2] = (&mut f[at::IP_CHECKSUM..at::IP_CHECKSUM + 2])
        .try_into()
        .expect("2 bytes");
    h.ip_delta.update(ipsum);
    f[at::DST_PORT..at::DST_PORT + 2].copy_from_slice(&h.port);
    let sum: &mut [u8; 2] = (&mut f[l4_checksum..l4_checksum + 2])
        .try_into()
        .expect("2 bytes");
    // RFC 768: an IPv4 UDP checksum of zero means "none"; it stays so.
    h.l4_delta.update_l4(sum, udp, true);
}
