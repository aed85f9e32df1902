//! The shared lock-free table behind flows and session persistence.
//!
//! Three kinds of entry, told apart by a kind tag in the key:
//! * forward flow (client addr:port → VIP:port, protocol) → listener and
//!   backend: an established flow keeps its backend even when the scheduler
//!   would now choose another (reload, weight change);
//! * reply flow (backend addr:port → client addr:port) → listener: when one
//!   backend service serves several listeners, the reply's tuple alone does
//!   not say which VIP:port it must come from;
//! * persistence (backend service, client address) → backend, in its own
//!   table instance.
//!
//! Each entry carries its own idle timeout (flows: the instance's flow idle
//! timeout; persistence: the service's persistence timeout).
//!
//! # Design
//! * Fixed capacity (a power of two), allocated once: memory never grows, a
//!   flood of spoofed clients only evicts entries.
//! * Open addressing with a bounded probe window of [`WINDOW`] slots; an
//!   insert into a full window evicts its least recently seen entry (counted).
//! * Each slot is one cache line guarded by a sequence lock: readers never
//!   block or write (they retry when they see a concurrent write), a writer
//!   claims the slot with one compare-and-swap and never waits for anyone.
//!   All fields are atomics, so a racing read is never undefined behaviour.
//! * Expiry is lazy: an entry idle for longer than the timeout is a miss and
//!   its slot is free for reuse; nothing stops the world. (The control plane
//!   walks the table in small slices only to count silently ended flows as
//!   closed for least-connections; it never frees anything.)
//! * The slot index hash is seeded per process (the table is private to one
//!   process), so an attacker cannot aim collisions at one window.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Slots probed per lookup: 8 cache lines, usually prefetched together.
pub const WINDOW: usize = 8;

const KIND_REPLY: u64 = 1;
const KIND_FORWARD: u64 = 3;
const KIND_PERSIST: u64 = 5;

/// A table key: five 64-bit words whose last word is never 0 (the kind tag
/// is odd), so that an empty slot never matches.
pub trait TableKey {
    fn words(&self) -> [u64; 5];
}

/// A flow in the reply direction: backend → client. Addresses in the
/// 16-byte form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub proto: u8,
    pub client: [u8; 16],
    pub client_port: u16,
    pub backend: [u8; 16],
    pub backend_port: u16,
}

/// A flow in the forward direction: client → VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardKey {
    pub proto: u8,
    pub client: [u8; 16],
    pub client_port: u16,
    pub vip: [u8; 16],
    pub vip_port: u16,
}

/// A persisted client of a backend service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistKey {
    pub service: u16,
    pub client: [u8; 16],
}

/// What an entry maps to: stable listener and backend ids (0 = none), and
/// whether the flow was seen closing (TCP FIN/RST), for least-connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowValue {
    pub listener: u16,
    pub backend: u16,
    pub closed: bool,
}

impl FlowValue {
    pub fn new(listener: u16, backend: u16) -> Self {
        FlowValue {
            listener,
            backend,
            closed: false,
        }
    }
    #[inline]
    fn pack(self) -> u64 {
        self.listener as u64 | (self.backend as u64) << 16 | (self.closed as u64) << 32
    }
    #[inline]
    fn unpack(v: u64) -> Self {
        FlowValue {
            listener: v as u16,
            backend: (v >> 16) as u16,
            closed: (v >> 32) & 1 == 1,
        }
    }
}

#[inline]
fn w(b: &[u8]) -> u64 {
    u64::from_ne_bytes(b.try_into().expect("8 bytes"))
}

impl TableKey for FlowKey {
    #[inline]
    fn words(&self) -> [u64; 5] {
        [
            w(&self.client[..8]),
            w(&self.client[8..]),
            w(&self.backend[..8]),
            w(&self.backend[8..]),
            (self.client_port as u64) << 32
                | (self.backend_port as u64) << 16
                | (self.proto as u64) << 8
                | KIND_REPLY,
        ]
    }
}

impl TableKey for ForwardKey {
    #[inline]
    fn words(&self) -> [u64; 5] {
        [
            w(&self.client[..8]),
            w(&self.client[8..]),
            w(&self.vip[..8]),
            w(&self.vip[8..]),
            (self.client_port as u64) << 32
                | (self.vip_port as u64) << 16
                | (self.proto as u64) << 8
                | KIND_FORWARD,
        ]
    }
}

impl TableKey for PersistKey {
    #[inline]
    fn words(&self) -> [u64; 5] {
        [
            w(&self.client[..8]),
            w(&self.client[8..]),
            0,
            0,
            (self.service as u64) << 32 | KIND_PERSIST,
        ]
    }
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// The entry existed with this value and was refreshed.
    Existing,
    /// The entry existed with another value, which was replaced (returned).
    Replaced(FlowValue),
    /// Inserted into a free slot, or over an expired entry (returned: its
    /// flow ended without being seen closing).
    Inserted(Option<FlowValue>),
    /// Inserted by evicting the least recently seen live entry (returned).
    Evicted(FlowValue),
    /// Not inserted: the window was full and eviction was not allowed, or
    /// every slot of the window was being written by other workers.
    Full,
}

#[repr(C, align(64))]
#[derive(Default)]
struct Slot {
    /// Even: stable. Odd: a writer owns the slot.
    seq: AtomicU32,
    /// Seconds (caller's clock) the entry was last used.
    last_seen: AtomicU32,
    /// Idle seconds after which the entry is dead.
    timeout: AtomicU32,
    key: [AtomicU64; 5],
    value: AtomicU64,
}

pub struct FlowTable {
    slots: Box<[Slot]>,
    mask: usize,
    seed: u64,
}

/// Key equality without a call to memcmp (which `==` on `[u64; 5]` becomes):
/// five XORs folded into one test.
#[inline(always)]
fn same(a: &[u64; 5], b: &[u64; 5]) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0
}

#[inline]
fn mix(mut h: u64, w: u64) -> u64 {
    // splitmix64's finaliser, applied per word.
    h = (h ^ w).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 31)
}

impl FlowTable {
    /// A table of at least `capacity` slots (rounded up to a power of two,
    /// minimum [`WINDOW`]).
    pub fn new(capacity: usize) -> Self {
        let n = capacity.max(WINDOW).next_power_of_two();
        let slots = (0..n).map(|_| Slot::default()).collect();
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x6c34_6c62);
            h.finish()
        };
        FlowTable {
            slots,
            mask: n - 1,
            seed,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of memory the table holds.
    pub fn memory(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot>()
    }

    #[inline]
    fn home(&self, words: &[u64; 5]) -> usize {
        let mut h = self.seed;
        for w in words {
            h = mix(h, *w);
        }
        h as usize & self.mask
    }

    #[inline]
    fn live(&self, slot: &Slot, now: u32) -> bool {
        now.wrapping_sub(slot.last_seen.load(Ordering::Relaxed))
            <= slot.timeout.load(Ordering::Relaxed)
    }

    /// Reads the slot's key and value consistently. `None` while a writer
    /// owns the slot.
    #[inline]
    fn read(slot: &Slot) -> Option<([u64; 5], u64)> {
        for _ in 0..4 {
            let s1 = slot.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let key = [
                slot.key[0].load(Ordering::Relaxed),
                slot.key[1].load(Ordering::Relaxed),
                slot.key[2].load(Ordering::Relaxed),
                slot.key[3].load(Ordering::Relaxed),
                slot.key[4].load(Ordering::Relaxed),
            ];
            let value = slot.value.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if slot.seq.load(Ordering::Relaxed) == s1 {
                return Some((key, value));
            }
        }
        None
    }

    /// Refreshes the entry's timer; true if the second changed (the cache
    /// line is only dirtied then).
    #[inline]
    fn touch(slot: &Slot, now: u32) -> bool {
        if slot.last_seen.load(Ordering::Relaxed) != now {
            slot.last_seen.store(now, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Looks an entry up, refreshing its idle timer on a hit.
    #[inline]
    pub fn lookup(&self, key: &impl TableKey, now: u32) -> Option<FlowValue> {
        self.lookup_touched(key, now).map(|(v, _)| v)
    }

    /// Like [`FlowTable::lookup`], also saying whether this hit moved the
    /// entry's timer to a new second: callers that keep a companion entry
    /// alive do so then, at most once a second per flow.
    #[inline]
    pub fn lookup_touched(&self, key: &impl TableKey, now: u32) -> Option<(FlowValue, bool)> {
        let words = key.words();
        let home = self.home(&words);
        for i in 0..WINDOW {
            let slot = &self.slots[(home + i) & self.mask];
            if let Some((k, v)) = Self::read(slot) {
                if same(&k, &words) && self.live(slot, now) {
                    let touched = Self::touch(slot, now);
                    return Some((FlowValue::unpack(v), touched));
                }
            }
        }
        None
    }

    /// Makes `key` map to `value` with idle timeout `timeout`: refreshes an
    /// identical entry, replaces a different one, or inserts. When the window
    /// is full, evicts its least recently seen entry if `evict`, else gives
    /// up ([`Upsert::Full`]).
    #[inline]
    pub fn upsert(
        &self,
        key: &impl TableKey,
        value: FlowValue,
        now: u32,
        timeout: u32,
        evict: bool,
    ) -> Upsert {
        let words = key.words();
        let home = self.home(&words);
        // Two passes: a concurrent writer may take our chosen slot between
        // the scan and the claim.
        for _ in 0..2 {
            // (slot, the dead entry it held if any)
            let mut free: Option<(usize, Option<FlowValue>)> = None;
            let mut oldest: Option<(usize, u32, FlowValue)> = None;
            for i in 0..WINDOW {
                let idx = (home + i) & self.mask;
                let slot = &self.slots[idx];
                let Some((k, v)) = Self::read(slot) else {
                    continue;
                };
                let live = k[4] != 0 && self.live(slot, now);
                if live && same(&k, &words) {
                    let old = FlowValue::unpack(v);
                    if old == value {
                        let _ = Self::touch(slot, now);
                        return Upsert::Existing;
                    }
                    if self.write(idx, &words, value, now, timeout) {
                        return Upsert::Replaced(old);
                    }
                    continue;
                }
                if !live {
                    let dead = (k[4] != 0).then(|| FlowValue::unpack(v));
                    free.get_or_insert((idx, dead));
                } else {
                    let age = now.wrapping_sub(slot.last_seen.load(Ordering::Relaxed));
                    if oldest.is_none_or(|(_, a, _)| age > a) {
                        oldest = Some((idx, age, FlowValue::unpack(v)));
                    }
                }
            }
            let (idx, outcome) = match (free, oldest) {
                (Some((i, dead)), _) => (i, Upsert::Inserted(dead)),
                (None, Some((i, _, old))) if evict => (i, Upsert::Evicted(old)),
                (None, _) => return Upsert::Full,
            };
            if self.write(idx, &words, value, now, timeout) {
                return outcome;
            }
        }
        Upsert::Full
    }

    /// Marks a live entry closed (for least-connections). True if this call
    /// changed it (so each flow is counted closed once).
    pub fn mark_closed(&self, key: &impl TableKey, now: u32) -> bool {
        let words = key.words();
        let home = self.home(&words);
        for i in 0..WINDOW {
            let idx = (home + i) & self.mask;
            let slot = &self.slots[idx];
            if let Some((k, v)) = Self::read(slot) {
                if same(&k, &words) && self.live(slot, now) {
                    let mut val = FlowValue::unpack(v);
                    if val.closed {
                        return false;
                    }
                    val.closed = true;
                    let timeout = slot.timeout.load(Ordering::Relaxed);
                    return self.write(idx, &words, val, now, timeout);
                }
            }
        }
        false
    }

    /// Visits `count` slots from `start` (wrapping) and, for each dead entry
    /// of the forward kind not yet counted closed, marks it closed and calls
    /// `f` with its value. The control plane sweeps the table in slices with
    /// this, so flows that ended silently stop counting as active.
    pub fn sweep_dead_forward(
        &self,
        start: usize,
        count: usize,
        now: u32,
        f: &mut dyn FnMut(FlowValue),
    ) {
        for i in 0..count.min(self.slots.len()) {
            let idx = (start + i) & self.mask;
            let slot = &self.slots[idx];
            let Some((k, v)) = Self::read(slot) else {
                continue;
            };
            if k[4] & 0xff != KIND_FORWARD || self.live(slot, now) {
                continue;
            }
            let mut val = FlowValue::unpack(v);
            if val.closed {
                continue;
            }
            val.closed = true;
            let timeout = slot.timeout.load(Ordering::Relaxed);
            let last = slot.last_seen.load(Ordering::Relaxed);
            if self.write(idx, &k, val, last, timeout) {
                f(val);
            }
        }
    }

    /// Claims slot `idx` and writes the entry. False if another writer owns it.
    fn write(
        &self,
        idx: usize,
        words: &[u64; 5],
        value: FlowValue,
        now: u32,
        timeout: u32,
    ) -> bool {
        let slot = &self.slots[idx];
        let s = slot.seq.load(Ordering::Relaxed);
        if s & 1 == 1
            || slot
                .seq
                .compare_exchange(s, s.wrapping_add(1), Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        // Readers that saw the old even value must notice the change: order
        // the odd sequence number before the data stores.
        fence(Ordering::Release);
        for (dst, w) in slot.key.iter().zip(words) {
            dst.store(*w, Ordering::Relaxed);
        }
        slot.value.store(value.pack(), Ordering::Relaxed);
        slot.last_seen.store(now, Ordering::Relaxed);
        slot.timeout.store(timeout, Ordering::Relaxed);
        slot.seq.store(s.wrapping_add(2), Ordering::Release);
        true
    }

    /// Live entries (a full scan: for stats, not the packet path).
    pub fn count_live(&self, now: u32) -> usize {
        self.slots
            .iter()
            .filter(|s| s.key[4].load(Ordering::Relaxed) != 0 && self.live(s, now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::map_v4;
    use std::sync::Arc;

    fn key(client: u32, port: u16) -> FlowKey {
        FlowKey {
            proto: 6,
            client: map_v4(client.to_be_bytes()),
            client_port: port,
            backend: map_v4([198, 18, 2, 11]),
            backend_port: 8080,
        }
    }
    const V: FlowValue = FlowValue {
        listener: 3,
        backend: 7,
        closed: false,
    };
    const T: u32 = 300;

    #[test]
    fn inserted_flow_is_found_and_others_are_not() {
        let t = FlowTable::new(1024);
        assert_eq!(
            t.upsert(&key(1, 1000), V, 10, T, true),
            Upsert::Inserted(None)
        );
        assert_eq!(t.lookup(&key(1, 1000), 10), Some(V));
        assert_eq!(t.lookup(&key(1, 1001), 10), None);
        assert_eq!(t.lookup(&key(2, 1000), 10), None);
        let mut other_proto = key(1, 1000);
        other_proto.proto = 17;
        assert_eq!(t.lookup(&other_proto, 10), None);
    }

    #[test]
    fn kinds_of_key_never_collide() {
        let t = FlowTable::new(1024);
        let client = map_v4([198, 18, 4, 1]);
        let vip = map_v4([198, 18, 2, 11]);
        let fwd = ForwardKey {
            proto: 6,
            client,
            client_port: 1000,
            vip,
            vip_port: 8080,
        };
        t.upsert(&key(0xc612_0401, 1000), V, 1, T, true);
        assert_eq!(t.lookup(&fwd, 1), None, "same bytes, other kind");
        let p = PersistKey { service: 1, client };
        assert_eq!(t.lookup(&p, 1), None);
    }

    #[test]
    fn upsert_refreshes_an_identical_flow_and_replaces_a_different_one() {
        let t = FlowTable::new(1024);
        t.upsert(&key(1, 1000), V, 10, T, true);
        assert_eq!(t.upsert(&key(1, 1000), V, 11, T, true), Upsert::Existing);
        let other = FlowValue::new(9, 7);
        assert_eq!(
            t.upsert(&key(1, 1000), other, 12, T, true),
            Upsert::Replaced(V)
        );
        assert_eq!(t.lookup(&key(1, 1000), 12), Some(other));
        assert_eq!(t.count_live(12), 1, "replaced in place, not duplicated");
    }

    #[test]
    fn idle_entry_expires_after_its_own_timeout_and_traffic_refreshes_it() {
        let t = FlowTable::new(1024);
        t.upsert(&key(1, 1000), V, 100, 300, true);
        t.upsert(&key(2, 1000), V, 100, 30, true);
        // Used at 350: still live (idle 250 s), timer refreshed.
        assert_eq!(t.lookup(&key(1, 1000), 350), Some(V));
        assert_eq!(t.lookup(&key(1, 1000), 650), Some(V));
        // 301 s of silence: gone.
        assert_eq!(t.lookup(&key(1, 1000), 951), None);
        // The 30 s entry died at 131.
        assert_eq!(t.lookup(&key(2, 1000), 131), None);
        assert_eq!(t.count_live(951), 0);
    }

    #[test]
    fn reusing_an_expired_slot_returns_the_dead_entry() {
        let t = FlowTable::new(8);
        t.upsert(&key(1, 1), V, 0, 10, true);
        // Fill the window's other slots with live entries at t = 20.
        let mut dead_seen = None;
        for i in 2..10u32 {
            if let Upsert::Inserted(Some(d)) = t.upsert(&key(i, 1), V, 20, T, true) {
                dead_seen = Some(d);
            }
        }
        assert_eq!(dead_seen, Some(V));
    }

    #[test]
    fn full_table_evicts_instead_of_growing() {
        let t = FlowTable::new(64);
        let mut evicted = 0;
        for i in 0..10_000u32 {
            match t.upsert(&key(i, 1), V, 5, T, true) {
                Upsert::Evicted(_) => evicted += 1,
                Upsert::Inserted(None) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(t.capacity(), 64);
        assert_eq!(t.count_live(5), 64);
        assert!(evicted >= 10_000 - 64, "evicted {evicted}");
        // The most recent insert is always findable.
        assert_eq!(t.lookup(&key(9_999, 1), 5), Some(V));
    }

    #[test]
    fn full_window_without_eviction_refuses_and_keeps_old_entries() {
        let t = FlowTable::new(8); // one window = the whole table
        for i in 0..8u32 {
            assert_eq!(t.upsert(&key(i, 1), V, 1, T, false), Upsert::Inserted(None));
        }
        assert_eq!(t.upsert(&key(100, 1), V, 2, T, false), Upsert::Full);
        for i in 0..8u32 {
            assert_eq!(t.lookup(&key(i, 1), 2), Some(V));
        }
    }

    #[test]
    fn eviction_takes_the_least_recently_seen_entry() {
        let t = FlowTable::new(8); // one window = the whole table
        for i in 0..8u32 {
            t.upsert(&key(i, 1), V, 10 + i, T, true);
        }
        // Refresh flow 0 so that flow 1 is now the oldest.
        assert_eq!(t.lookup(&key(0, 1), 20), Some(V));
        assert_eq!(t.upsert(&key(100, 1), V, 21, T, true), Upsert::Evicted(V));
        assert_eq!(t.lookup(&key(1, 1), 21), None);
        assert_eq!(t.lookup(&key(0, 1), 21), Some(V));
        assert_eq!(t.lookup(&key(100, 1), 21), Some(V));
    }

    #[test]
    fn a_flow_is_marked_closed_once() {
        let t = FlowTable::new(64);
        let k = ForwardKey {
            proto: 6,
            client: map_v4([1, 2, 3, 4]),
            client_port: 5,
            vip: map_v4([5, 6, 7, 8]),
            vip_port: 80,
        };
        t.upsert(&k, V, 1, T, true);
        assert!(t.mark_closed(&k, 2));
        assert!(!t.mark_closed(&k, 3));
        assert_eq!(t.lookup(&k, 3).map(|v| v.closed), Some(true));
    }

    #[test]
    fn sweep_reports_each_silently_ended_forward_flow_once() {
        let t = FlowTable::new(64);
        for i in 0..10u8 {
            let k = ForwardKey {
                proto: 17,
                client: map_v4([1, 2, 3, i]),
                client_port: 5,
                vip: map_v4([5, 6, 7, 8]),
                vip_port: 53,
            };
            t.upsert(&k, V, 1, 30, true);
            if i == 0 {
                t.mark_closed(&k, 1);
            }
        }
        t.upsert(&key(1, 1), V, 1, 30, true); // a reply entry: not counted
        let mut n = 0;
        t.sweep_dead_forward(0, 64, 20, &mut |_| n += 1);
        assert_eq!(n, 0, "nothing is dead at 20");
        t.sweep_dead_forward(0, 64, 100, &mut |v| {
            assert_eq!(v.backend, 7);
            n += 1
        });
        assert_eq!(n, 9, "ten forward flows, one already closed");
        t.sweep_dead_forward(0, 64, 200, &mut |_| n += 1);
        assert_eq!(n, 9, "counted once");
    }

    #[test]
    fn concurrent_writers_and_readers_never_see_torn_entries() {
        let t = Arc::new(FlowTable::new(1 << 12));
        let threads: Vec<_> = (0..4u32)
            .map(|tid| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for round in 0..20_000u32 {
                        let c = (round * 7 + tid) % 3000;
                        // The value is a function of the key: a torn read
                        // would pair a key with another key's value.
                        let v = FlowValue::new(c as u16, (c as u16) ^ 0xabcd);
                        t.upsert(&key(c, c as u16), v, 1, T, true);
                        if let Some(got) = t.lookup(&key(c, c as u16), 1) {
                            assert_eq!(got, v);
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        for c in 0..3000u32 {
            if let Some(got) = t.lookup(&key(c, c as u16), 1) {
                assert_eq!(got.listener, c as u16);
                assert_eq!(got.backend, (c as u16) ^ 0xabcd);
            }
        }
    }
}
