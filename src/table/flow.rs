//! The NAT flow table: maps a backend's reply to the listener its flow came
//! through.
//!
//! Replies from a backend carry (backend address:port → client address:port).
//! When one backend service serves several listeners, that tuple alone does
//! not say which VIP:port the reply must come from; the table remembers it
//! from the client's packet.
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
//!   its slot is free for reuse. No sweeper, nothing stops the world.
//! * The slot index hash is seeded per process (the table is private to one
//!   process), so an attacker cannot aim collisions at one window.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Slots probed per lookup: 8 cache lines, usually prefetched together.
pub const WINDOW: usize = 8;

/// A flow in the reply direction. Addresses in the 16-byte form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub proto: u8,
    pub client: [u8; 16],
    pub client_port: u16,
    pub backend: [u8; 16],
    pub backend_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowValue {
    pub listener: u32,
    pub backend: u32,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// The flow existed with this value and was refreshed.
    Existing,
    /// The flow existed with another value, which was replaced (returned).
    Replaced(FlowValue),
    Inserted,
    /// Inserted by evicting a live entry (the window was full).
    Evicted,
    /// Every slot of the window was being written by other workers.
    Busy,
}

impl FlowKey {
    #[inline]
    fn words(&self) -> [u64; 5] {
        let w = |b: &[u8]| u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        [
            w(&self.client[..8]),
            w(&self.client[8..]),
            w(&self.backend[..8]),
            w(&self.backend[8..]),
            // The low byte is 1 so that a used slot never has word 4 == 0.
            (self.client_port as u64) << 32
                | (self.backend_port as u64) << 16
                | (self.proto as u64) << 8
                | 1,
        ]
    }
}

#[repr(C, align(64))]
#[derive(Default)]
struct Slot {
    /// Even: stable. Odd: a writer owns the slot.
    seq: AtomicU32,
    /// Seconds (caller's clock) the entry was last used.
    last_seen: AtomicU32,
    key: [AtomicU64; 5],
    value: AtomicU64,
}

pub struct FlowTable {
    slots: Box<[Slot]>,
    mask: usize,
    idle_timeout: u32,
    seed: u64,
}

#[inline]
fn mix(mut h: u64, w: u64) -> u64 {
    // splitmix64's finaliser, applied per word.
    h = (h ^ w).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 31)
}

impl FlowTable {
    /// A table of at least `capacity` slots (rounded up to a power of two,
    /// minimum [`WINDOW`]) whose entries expire after `idle_timeout` seconds.
    pub fn new(capacity: usize, idle_timeout: u32) -> Self {
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
            idle_timeout,
            seed,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn idle_timeout(&self) -> u32 {
        self.idle_timeout
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
        now.wrapping_sub(slot.last_seen.load(Ordering::Relaxed)) <= self.idle_timeout
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

    #[inline]
    fn unpack(v: u64) -> FlowValue {
        FlowValue {
            listener: (v >> 32) as u32,
            backend: v as u32,
        }
    }

    #[inline]
    fn touch(slot: &Slot, now: u32) {
        // Avoid dirtying the cache line when the second has not changed.
        if slot.last_seen.load(Ordering::Relaxed) != now {
            slot.last_seen.store(now, Ordering::Relaxed);
        }
    }

    /// Looks a flow up, refreshing its idle timer on a hit.
    #[inline]
    pub fn lookup(&self, key: &FlowKey, now: u32) -> Option<FlowValue> {
        let words = key.words();
        let home = self.home(&words);
        for i in 0..WINDOW {
            let slot = &self.slots[(home + i) & self.mask];
            if let Some((k, v)) = Self::read(slot) {
                if k == words && self.live(slot, now) {
                    Self::touch(slot, now);
                    return Some(Self::unpack(v));
                }
            }
        }
        None
    }

    /// Makes `key` map to `value`: refreshes an identical entry, replaces a
    /// different one, or inserts.
    #[inline]
    pub fn upsert(&self, key: &FlowKey, value: FlowValue, now: u32) -> Upsert {
        let words = key.words();
        let home = self.home(&words);
        // Two passes: a concurrent writer may take our chosen slot between
        // the scan and the claim.
        for _ in 0..2 {
            let mut free: Option<usize> = None;
            let mut oldest: Option<(usize, u32)> = None;
            for i in 0..WINDOW {
                let idx = (home + i) & self.mask;
                let slot = &self.slots[idx];
                let Some((k, v)) = Self::read(slot) else {
                    continue;
                };
                let live = k[4] != 0 && self.live(slot, now);
                if live && k == words {
                    let old = Self::unpack(v);
                    if old == value {
                        Self::touch(slot, now);
                        return Upsert::Existing;
                    }
                    if self.write(idx, &words, value, now) {
                        return Upsert::Replaced(old);
                    }
                    continue;
                }
                if !live {
                    free.get_or_insert(idx);
                } else {
                    let age = now.wrapping_sub(slot.last_seen.load(Ordering::Relaxed));
                    if oldest.is_none_or(|(_, a)| age > a) {
                        oldest = Some((idx, age));
                    }
                }
            }
            let (idx, evicting) = match (free, oldest) {
                (Some(i), _) => (i, false),
                (None, Some((i, _))) => (i, true),
                (None, None) => continue,
            };
            if self.write(idx, &words, value, now) {
                return if evicting {
                    Upsert::Evicted
                } else {
                    Upsert::Inserted
                };
            }
        }
        Upsert::Busy
    }

    /// Claims slot `idx` and writes the entry. False if another writer owns it.
    fn write(&self, idx: usize, words: &[u64; 5], value: FlowValue, now: u32) -> bool {
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
        slot.value.store(
            (value.listener as u64) << 32 | value.backend as u64,
            Ordering::Relaxed,
        );
        slot.last_seen.store(now, Ordering::Relaxed);
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
    };

    #[test]
    fn inserted_flow_is_found_and_others_are_not() {
        let t = FlowTable::new(1024, 300);
        assert_eq!(t.upsert(&key(1, 1000), V, 10), Upsert::Inserted);
        assert_eq!(t.lookup(&key(1, 1000), 10), Some(V));
        assert_eq!(t.lookup(&key(1, 1001), 10), None);
        assert_eq!(t.lookup(&key(2, 1000), 10), None);
        let mut other_proto = key(1, 1000);
        other_proto.proto = 17;
        assert_eq!(t.lookup(&other_proto, 10), None);
    }

    #[test]
    fn upsert_refreshes_an_identical_flow_and_replaces_a_different_one() {
        let t = FlowTable::new(1024, 300);
        t.upsert(&key(1, 1000), V, 10);
        assert_eq!(t.upsert(&key(1, 1000), V, 11), Upsert::Existing);
        let other = FlowValue {
            listener: 9,
            backend: 7,
        };
        assert_eq!(t.upsert(&key(1, 1000), other, 12), Upsert::Replaced(V));
        assert_eq!(t.lookup(&key(1, 1000), 12), Some(other));
        assert_eq!(t.count_live(12), 1, "replaced in place, not duplicated");
    }

    #[test]
    fn idle_flow_expires_and_traffic_refreshes_it() {
        let t = FlowTable::new(1024, 300);
        t.upsert(&key(1, 1000), V, 100);
        // Used at 350: still live (idle 250 s), timer refreshed.
        assert_eq!(t.lookup(&key(1, 1000), 350), Some(V));
        assert_eq!(t.lookup(&key(1, 1000), 650), Some(V));
        // 301 s of silence: gone.
        assert_eq!(t.lookup(&key(1, 1000), 951), None);
        assert_eq!(t.count_live(951), 0);
    }

    #[test]
    fn full_table_evicts_instead_of_growing() {
        let t = FlowTable::new(64, 300);
        let mut evicted = 0;
        for i in 0..10_000u32 {
            match t.upsert(&key(i, 1), V, 5) {
                Upsert::Evicted => evicted += 1,
                Upsert::Inserted => {}
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
    fn eviction_takes_the_least_recently_seen_entry() {
        let t = FlowTable::new(8, 300); // one window = the whole table
        for i in 0..8u32 {
            t.upsert(&key(i, 1), V, 10 + i);
        }
        // Refresh flow 0 so that flow 1 is now the oldest.
        assert_eq!(t.lookup(&key(0, 1), 20), Some(V));
        assert_eq!(t.upsert(&key(100, 1), V, 21), Upsert::Evicted);
        assert_eq!(t.lookup(&key(1, 1), 21), None);
        assert_eq!(t.lookup(&key(0, 1), 21), Some(V));
        assert_eq!(t.lookup(&key(100, 1), 21), Some(V));
    }

    #[test]
    fn concurrent_writers_and_readers_never_see_torn_entries() {
        let t = Arc::new(FlowTable::new(1 << 12, 300));
        let threads: Vec<_> = (0..4u32)
            .map(|tid| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for round in 0..20_000u32 {
                        let c = (round * 7 + tid) % 3000;
                        // The value is a function of the key: a torn read
                        // would pair a key with another key's value.
                        let v = FlowValue {
                            listener: c,
                            backend: c ^ 0xabcd,
                        };
                        t.upsert(&key(c, c as u16), v, 1);
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
                assert_eq!(got.listener, c);
                assert_eq!(got.backend, c ^ 0xabcd);
            }
        }
    }
}
