//! The shared lock-free table behind flows and session persistence.
//!
//! Three kinds of entry, told apart by a kind tag in the key:
//! * forward flow (client addr:port → VIP:port, protocol) → listener and
//!   backend: an established flow keeps its backend even when the scheduler
//!   would now choose another (reload, weight change);
//! * reply flow (backend addr:port → client addr:port) → listener: only
//!   for backends that several listeners reach, where the reply's tuple
//!   alone does not say which VIP:port it must come from (a backend of one
//!   listener answers through the forward entry);
//! * persistence (backend service, client address) → backend, in its own
//!   table instance.
//!
//! Each entry carries its own idle timeout (flows: the instance's flow idle
//! timeout, shortened to its TCP closed timeout once the flow is seen
//! closing; persistence: the service's persistence timeout).
//!
//! # Design
//! * Fixed capacity (a power of two), allocated once: memory never grows, a
//!   flood of spoofed clients only evicts entries.
//! * Buckets of [`WINDOW`] slots. A key hashes to one bucket and lives in one
//!   of its slots. An insert takes an expired entry with the key's tag (most
//!   likely the key's own), else the first slot never used or expired; into
//!   a full bucket it evicts the entry closest to expiry (with one timeout,
//!   the least recently seen), counted.
//! * Each bucket has a header cache line: a one-byte tag per slot (8 bits of
//!   the key's hash, 0 = never used) and each slot's expiry second. A miss
//!   reads that one line (unless a tag matches by chance, 1 in 255 per used
//!   slot); a hit reads it and the matching slot's line; an insert reads it
//!   and writes one slot. (The first version probed 8 slot lines per miss
//!   and per insert; a new session paid for 40 cache lines.)
//! * Each slot is one cache line guarded by a sequence lock: readers never
//!   block or write (they wait out a concurrent write, spinning), a writer
//!   claims the slot with one compare-and-swap from the sequence number it
//!   saw when it looked, and never waits for anyone: if another writer
//!   changed the slot in between, the claim fails and the writer looks
//!   again (once), so concurrent inserts never overwrite each other; nor
//!   does a writer insert a key while a slot that may hold it is being
//!   written (it would leave a second copy of the key). An inserter that
//!   owns its slot shows the key's tag there first and then checks the
//!   bucket's other slots with that tag, so that of two workers inserting
//!   one key at once (into two slots) at least one sees the other and
//!   leaves. An
//!   insert that chose a live entry to evict checks, once the slot is
//!   its own, that the entry's expiry is still the one it chose by: an
//!   entry written or refreshed after the choice is never the one evicted.
//!   The slot's expiry in the header is written under the same sequence
//!   number, so a reader sees key, value and expiry of one entry. A hit's
//!   refresh of that expiry (at most once a second) is a compare-and-swap
//!   from the expiry it read, made only while the sequence number is still
//!   the one it read under, so it never moves the expiry of an entry that
//!   replaced the one it read. All fields are atomics, so a racing read is
//!   never undefined behaviour.
//! * Expiry is lazy: an entry idle for longer than the timeout is a miss and
//!   its slot is free for reuse; nothing stops the world. (The control plane
//!   walks the table in small slices only to count silently ended flows as
//!   closed for least-connections; it never frees anything.)
//! * The bucket hash is seeded per process (the table is private to one
//!   process), so an attacker cannot aim collisions at one bucket.
//! * [`Probe`]: the hash of a key, computed once. The burst pipeline computes
//!   the probes of a whole burst first and prefetches their buckets, so that
//!   the burst's cache misses overlap instead of queueing one after another.

use crate::table::mem::{Zeroable, ZeroedArray};
use crate::util::{fold_mul, prefetch};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Slots per bucket.
pub const WINDOW: usize = 8;

/// How many times a reader looks at a slot a writer owns before giving up.
/// A write is a dozen stores, over in well under a microsecond, unless its
/// thread is preempted in the middle (workers share cores with the control
/// thread and whatever else the host runs). A reader that gave up after a
/// few looks missed entries that were there: an established flow was
/// scheduled anew, and an upsert inserted a second copy of its key. 2^20
/// looks wait out a preempted writer's time slice (milliseconds); the
/// bound only keeps a worker from spinning for ever.
const READ_TRIES: u32 = 1 << 20;

/// A slot could not be read: a writer owned it through every try.
#[derive(Debug, Clone, Copy)]
struct Busy;

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

/// What an entry maps to: stable listener and backend ids (0 = none),
/// whether the flow was seen closing (TCP FIN/RST), for least-connections,
/// and whether it is a TCP flow still opening (begun by a SYN, its
/// handshake not yet completed by the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct FlowValue {
    pub listener: u16,
    pub backend: u16,
    pub closed: bool,
    pub opening: bool,
}

impl FlowValue {
    pub fn new(listener: u16, backend: u16) -> Self {
        FlowValue {
            listener,
            backend,
            closed: false,
            opening: false,
        }
    }
    /// Whether both name the same listener and backend, whatever their
    /// state.
    #[inline]
    pub fn same_target(self, other: FlowValue) -> bool {
        self.listener == other.listener && self.backend == other.backend
    }
    /// Packed as `repr(C)` lays the fields out (listener, backend, closed,
    /// opening, a byte each for the flags), so that unpacking is a few
    /// masks rather than a re-layout (10 instructions per established
    /// packet).
    #[inline]
    fn pack(self) -> u64 {
        self.listener as u64
            | (self.backend as u64) << 16
            | (self.closed as u64) << 32
            | (self.opening as u64) << 40
    }
    #[inline]
    fn unpack(v: u64) -> Self {
        FlowValue {
            listener: v as u16,
            backend: (v >> 16) as u16,
            closed: (v >> 32) & 1 == 1,
            opening: (v >> 40) & 1 == 1,
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
    Inserted(Option<Displaced>),
    /// Inserted by evicting the live entry closest to expiry (returned).
    Evicted(Displaced),
    /// Not inserted: the bucket was full and eviction was not allowed, or
    /// other writers changed the chosen slot twice in a row.
    Full,
}

/// The entry an insert took the slot of: another key's, of any kind (a
/// reply entry may take a forward entry's slot, and the other way round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Displaced {
    pub value: FlowValue,
    /// Whether it was a forward entry: the one entry a flow is counted by
    /// (opened, closed), so the only kind whose loss ends a flow.
    pub forward: bool,
}

/// A bucket's header: one cache line read by every lookup.
#[repr(C, align(64))]
struct Bucket {
    /// Byte `i` is slot `i`'s tag: 0 if the slot was never used, else 8
    /// bits of its key's hash (never 0). Written by the slot's writer
    /// (which holds the slot's sequence lock) with a compare-and-swap loop,
    /// since writers of the bucket's other slots share the word.
    tags: AtomicU64,
    /// Slot `i`'s expiry: the last second (caller's clock) it is live.
    expires: [AtomicU32; WINDOW],
}

impl Bucket {
    /// Slot `i`'s expiry (`i` modulo [`WINDOW`]: in range without a
    /// bounds check).
    #[inline(always)]
    fn expiry(&self, i: usize) -> &AtomicU32 {
        &self.expires[i % WINDOW]
    }
}

#[repr(C, align(64))]
struct Slot {
    /// Even: stable. Odd: a writer owns the slot (and its header fields).
    seq: AtomicU32,
    /// Idle seconds after which the entry is dead.
    timeout: AtomicU32,
    key: [AtomicU64; 5],
    value: AtomicU64,
}

/// Where a key lives in a table (its bucket and tag): the hash, computed
/// once per packet and kept by the burst pipeline between its stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hint {
    bucket: u32,
    tag: u8,
    /// 1 + the slot [`FlowTable::prefetch_slot`] found the key's tag live
    /// in (0: not looked): where a lookup looks first.
    slot: u8,
    /// 1 + the free or expired slot [`FlowTable::prefetch_slot`] chose for
    /// the key's insert, when it found the key absent (0: not looked, the
    /// key probably present, or only live entries to evict): where
    /// [`FlowTable::insert_probe`] tries first, without choosing again.
    insert: u8,
}

/// A key (as words) with its [`Hint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Probe {
    pub words: [u64; 5],
    pub hint: Hint,
}

impl Hint {
    /// The bucket the key hashes to: a number below the table's bucket
    /// count, uniformly spread.
    #[inline(always)]
    pub fn bucket(&self) -> usize {
        self.bucket as usize
    }
}

impl Probe {
    #[inline(always)]
    pub fn new(key: &impl TableKey, hint: Hint) -> Self {
        Probe {
            words: key.words(),
            hint,
        }
    }
    #[inline(always)]
    fn bucket(&self) -> usize {
        self.hint.bucket as usize
    }
}

/// The slot an insert chose ([`FlowTable::insert_slot`]) and the expiry
/// it saw there.
#[derive(Debug, Clone, Copy)]
struct Pick {
    i: usize,
    /// A live entry, to be evicted.
    live: bool,
    expires: u32,
}

/// One slot, read consistently.
struct Entry {
    key: [u64; 5],
    value: u64,
    timeout: u32,
    expires: u32,
    /// The (even) sequence number it was read under: a writer claims the
    /// slot from exactly this one, so that it changes what it read.
    seq: u32,
}

// SAFETY: both are atomics only; all-zero is an empty, stable slot / a
// bucket of unused slots.
unsafe impl Zeroable for Slot {}
// SAFETY: as above.
unsafe impl Zeroable for Bucket {}

pub struct FlowTable {
    buckets: ZeroedArray<Bucket>,
    slots: ZeroedArray<Slot>,
    mask: usize,
    seed: [u64; 3],
}

/// A slot's value, timeout and expiry (inside a consistent read).
#[inline(always)]
fn rest(slot: &Slot, expires: &AtomicU32) -> (u64, u32, u32) {
    (
        slot.value.load(Ordering::Relaxed),
        slot.timeout.load(Ordering::Relaxed),
        expires.load(Ordering::Relaxed),
    )
}

/// Whether an entry expiring at `expires` is live at `now`. Wrapping
/// arithmetic: a clock a second behind another worker's still sees the
/// entry live.
#[inline(always)]
fn live_at(expires: u32, now: u32) -> bool {
    expires.wrapping_sub(now) as i32 >= 0
}

const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// A mask with bit 7 of byte `i` set where byte `i` of `x` is zero. Bytes
/// above a true zero may be flagged falsely (borrow); callers check.
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(LOW_BITS) & !x & HIGH_BITS
}

/// Sets slot `i`'s tag in the bucket header, whose other slots' writers
/// share the word (hence the compare-and-swap loop): an inserter
/// announcing its key (see `FlowTable::take`), or taking the announcement
/// back. Sequentially consistent; returns the tag word as it stands after
/// it. Of two inserters, each of which owns its slot, announces the key's tag
/// there and then looks at the other's slot, at least one sees the other:
/// a read-modify-write sees every earlier one, and a tag already there
/// before the claim is seen by any writer that looks after the claim.
#[inline(always)]
fn announce_tag(header: &Bucket, i: usize, tag: u8) -> u64 {
    let shift = 8 * i;
    let mut t = header.tags.load(Ordering::SeqCst);
    if (t >> shift) as u8 == tag {
        // Shown already (the key's own expired entry, most likely), since
        // before the claim: a writer checking this slot sees it.
        return t;
    }
    loop {
        let new = t & !(0xff << shift) | (tag as u64) << shift;
        match header
            .tags
            .compare_exchange_weak(t, new, Ordering::SeqCst, Ordering::Relaxed)
        {
            Ok(_) => return new,
            Err(now) => t = now,
        }
    }
}

/// Iterates the slot numbers flagged in a [`zero_bytes`] mask, in order.
#[inline(always)]
fn flagged(mut m: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let i = m.trailing_zeros() as usize / 8;
        m &= m - 1;
        Some(i)
    })
}

impl FlowTable {
    /// A table of at least `capacity` slots (rounded up to a power of two,
    /// minimum [`WINDOW`]).
    pub fn new(capacity: usize) -> Self {
        let n = capacity.max(WINDOW).next_power_of_two();
        let slots = ZeroedArray::new(n);
        let buckets = ZeroedArray::new(n / WINDOW);
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let rs = std::collections::hash_map::RandomState::new();
            let mut out = [0u64; 3];
            for (i, s) in out.iter_mut().enumerate() {
                let mut h = rs.build_hasher();
                h.write_u64(0x6c34_6c62 + i as u64);
                *s = h.finish();
            }
            out
        };
        FlowTable {
            buckets,
            slots,
            mask: n / WINDOW - 1,
            seed,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bucket `b`, taken modulo the number of buckets: so any index is in
    /// range, and the packet path pays no bounds check (every bucket
    /// number is a hash masked with `mask` already).
    #[inline(always)]
    fn bucket(&self, b: usize) -> &Bucket {
        // SAFETY: `buckets` holds `mask + 1` entries (`new`), and
        // `b & mask <= mask`.
        unsafe { self.buckets.get_unchecked(b & self.mask) }
    }

    /// Slot `i` of bucket `b`, both taken modulo their counts, as in
    /// [`FlowTable::bucket`].
    #[inline(always)]
    fn slot(&self, b: usize, i: usize) -> &Slot {
        // SAFETY: `slots` holds `(mask + 1) * WINDOW` entries (`new`).
        unsafe {
            self.slots
                .get_unchecked((b & self.mask) * WINDOW + (i & (WINDOW - 1)))
        }
    }

    /// Bytes of memory the table holds (mapped, in whole 2 MiB pages).
    pub fn memory(&self) -> usize {
        self.slots.mapped_bytes() + self.buckets.mapped_bytes()
    }

    /// Hashes key words: three folded multiplies, the first two
    /// independent.
    #[inline]
    pub fn hint(&self, words: &[u64; 5]) -> Hint {
        let s = &self.seed;
        let a = fold_mul(words[0] ^ s[0], words[1] ^ s[1]);
        let b = fold_mul(words[2] ^ s[2], words[3] ^ s[0]);
        let h = fold_mul(a ^ words[4], b ^ s[1]);
        let tag = (h >> 56) as u8;
        Hint {
            bucket: (h as usize & self.mask) as u32,
            tag: tag + (tag == 0) as u8,
            slot: 0,
            insert: 0,
        }
    }

    #[inline]
    pub fn probe(&self, key: &impl TableKey) -> Probe {
        let words = key.words();
        let hint = self.hint(&words);
        Probe { words, hint }
    }

    /// Starts loading the hinted bucket's header into the cache.
    #[inline(always)]
    pub fn prefetch(&self, h: Hint) {
        prefetch(self.bucket(h.bucket as usize));
    }

    /// Looks at the (prefetched) header of the hinted bucket and starts
    /// loading the slot the key is probably in: the first slot whose tag
    /// matches, else the slot an insert would take (a free or expired one,
    /// else the one closest to expiry). Returns whether a tag matched (the
    /// key is probably present), and records that slot in the hint: where
    /// the lookup will look first, or (a free or expired slot) where the
    /// insert will. Only a hint: nothing is decided here, and the insert
    /// checks the slot again once it owns it.
    ///
    /// The hit is inlined into the burst pipeline (most packets belong to
    /// established flows); the search for an insert's slot is not.
    #[inline(always)]
    pub fn prefetch_slot(&self, h: &mut Hint, now: u32) -> bool {
        let b = h.bucket as usize;
        let header = self.bucket(b);
        let tags = header.tags.load(Ordering::Relaxed);
        let hits = zero_bytes(tags ^ (h.tag as u64).wrapping_mul(LOW_BITS));
        for i in flagged(hits) {
            if live_at(header.expiry(i).load(Ordering::Relaxed), now) {
                prefetch(self.slot(b, i));
                h.slot = i as u8 + 1;
                return true;
            }
        }
        if hits != 0 {
            // Only expired entries with the key's tag: the insert takes
            // the first ([`FlowTable::insert_slot`]).
            let i = hits.trailing_zeros() as usize / 8;
            prefetch(self.slot(b, i));
            h.insert = i as u8 + 1;
        } else {
            h.insert = self.prefetch_insert_slot(b, tags, now);
        }
        false
    }

    /// Starts loading the slot an insert of a key whose tag is nowhere in
    /// bucket `b` (whose tag word is `tags`) takes
    /// ([`FlowTable::insert_slot`]); returns it as [`Hint::insert`] does.
    #[inline(never)]
    fn prefetch_insert_slot(&self, b: usize, tags: u64, now: u32) -> u8 {
        let pick = self.dead_or_soonest(b, tags, now);
        prefetch(self.slot(b, pick.i));
        if pick.live {
            0
        } else {
            pick.i as u8 + 1
        }
    }

    /// The slot an insert of a key with tag `tag` into bucket `b` (whose
    /// tag word is `tags`) takes: an expired entry with that tag (most
    /// likely the key's own, from before: a client returning after its
    /// session expired), else the first slot never used or expired, else
    /// the live entry closest to expiry (then [`Pick::live`]). Reads only
    /// the header. (Taking a free slot before the key's own expired one
    /// left copies of returning keys behind, which every later lookup of
    /// the key stepped over.)
    #[inline(always)]
    fn insert_slot(&self, b: usize, tags: u64, tag: u8, now: u32) -> Pick {
        let header = self.bucket(b);
        for i in flagged(zero_bytes(tags ^ (tag as u64).wrapping_mul(LOW_BITS))) {
            let expires = header.expiry(i).load(Ordering::Relaxed);
            if !live_at(expires, now) {
                return Pick {
                    i,
                    live: false,
                    expires,
                };
            }
        }
        self.dead_or_soonest(b, tags, now)
    }

    /// The first slot of bucket `b` never used or expired, else the live
    /// entry closest to expiry (then [`Pick::live`]).
    #[inline(always)]
    fn dead_or_soonest(&self, b: usize, tags: u64, now: u32) -> Pick {
        let header = self.bucket(b);
        let mut best = Pick {
            i: 0,
            live: true,
            expires: 0,
        };
        let mut best_left = i32::MAX;
        for i in 0..WINDOW {
            let expires = header.expiry(i).load(Ordering::Relaxed);
            if (tags >> (8 * i)) as u8 == 0 {
                return Pick {
                    i,
                    live: false,
                    expires,
                };
            }
            let left = expires.wrapping_sub(now) as i32;
            if left < 0 {
                return Pick {
                    i,
                    live: false,
                    expires,
                };
            }
            if left < best_left {
                best = Pick {
                    i,
                    live: true,
                    expires,
                };
                best_left = left;
            }
        }
        best
    }

    /// Runs `f` on slot `i` of bucket `b` (and its expiry in the header)
    /// under the slot's sequence lock: its result, and the (even) sequence
    /// number, if no writer changed the slot meanwhile. `None` if a writer
    /// still owns the slot after [`READ_TRIES`] looks.
    #[inline(always)]
    fn consistent<R>(
        &self,
        b: usize,
        i: usize,
        f: impl Fn(&Slot, &AtomicU32) -> R,
    ) -> Option<(R, u32)> {
        let slot = self.slot(b, i);
        let expires = self.bucket(b).expiry(i);
        // A few looks inlined: almost every read ends at the first.
        for _ in 0..4 {
            let s1 = slot.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let r = f(slot, expires);
            fence(Ordering::Acquire);
            if slot.seq.load(Ordering::Relaxed) == s1 {
                return Some((r, s1));
            }
        }
        Self::consistent_again(slot, expires, &f)
    }

    /// The looks after the first four, out of line: a writer owns the
    /// slot, or keeps changing it.
    #[cold]
    #[inline(never)]
    fn consistent_again<R>(
        slot: &Slot,
        expires: &AtomicU32,
        f: &impl Fn(&Slot, &AtomicU32) -> R,
    ) -> Option<(R, u32)> {
        for _ in 4..READ_TRIES {
            std::hint::spin_loop();
            let s1 = slot.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                continue;
            }
            let r = f(slot, expires);
            fence(Ordering::Acquire);
            if slot.seq.load(Ordering::Relaxed) == s1 {
                return Some((r, s1));
            }
        }
        None
    }

    /// Reads slot `i` of bucket `b` consistently. `None` while a writer
    /// owns the slot.
    #[inline(always)]
    fn read(&self, b: usize, i: usize) -> Option<Entry> {
        let ((key, (value, timeout, expires)), seq) = self.consistent(b, i, |slot, expires| {
            let key = slot.key.each_ref().map(|k| k.load(Ordering::Relaxed));
            (key, rest(slot, expires))
        })?;
        Some(Entry {
            key,
            value,
            timeout,
            expires,
            seq,
        })
    }

    /// Slot `i` of bucket `b`, read consistently, if it holds the key
    /// `words` (`Err` if a writer kept it). The key is compared as it is
    /// read, word by word against `words`, rather than copied out first:
    /// the lookup's hot path keeps one register for it instead of five.
    #[inline(always)]
    fn read_key(&self, b: usize, i: usize, words: &[u64; 5]) -> Result<Option<Entry>, Busy> {
        let Some(((diff, (value, timeout, expires)), seq)) =
            self.consistent(b, i, |slot, expires| {
                let diff = slot
                    .key
                    .iter()
                    .zip(words)
                    .fold(0, |d, (k, w)| d | (k.load(Ordering::Relaxed) ^ w));
                (diff, rest(slot, expires))
            })
        else {
            return Err(Busy);
        };
        Ok((diff == 0).then_some(Entry {
            key: *words,
            value,
            timeout,
            expires,
            seq,
        }))
    }

    /// The slot of the probe's bucket holding its key, live at `now`.
    /// (Always inlined: returned through memory, the entry's two 32-bit
    /// fields were read back as one 64-bit word, which stalls store
    /// forwarding on every lookup.)
    #[inline(always)]
    fn find(&self, p: &Probe, now: u32) -> Option<(usize, Entry)> {
        // The slot the burst pipeline saw the tag in, first: most lookups
        // end here without reading the header's tags again.
        if let Some(i) = (p.hint.slot as usize).checked_sub(1) {
            if let Ok(Some(e)) = self.read_key(p.bucket(), i & (WINDOW - 1), &p.words) {
                if live_at(e.expires, now) {
                    return Some((i & (WINDOW - 1), e));
                }
            }
        }
        let header = self.bucket(p.bucket());
        let tags = header.tags.load(Ordering::Acquire);
        let hits = zero_bytes(tags ^ (p.hint.tag as u64).wrapping_mul(LOW_BITS));
        for i in flagged(hits) {
            // Skip an expired entry without touching its slot's line (the
            // read below checks again, consistently).
            if !live_at(header.expiry(i).load(Ordering::Relaxed), now) {
                continue;
            }
            if let Ok(Some(e)) = self.read_key(p.bucket(), i, &p.words) {
                if live_at(e.expires, now) {
                    return Some((i, e));
                }
            }
        }
        None
    }

    /// [`FlowTable::find`], but `Err` when a live slot with the key's tag
    /// could not be read (a writer kept it through every try): the key may
    /// be there, so a writer must not insert it elsewhere. (Apart from
    /// `find`, which lookups inline, so that they keep no such state.)
    #[inline(always)]
    fn find_or_busy(&self, p: &Probe, now: u32) -> Result<Option<(usize, Entry)>, Busy> {
        if let Some(i) = (p.hint.slot as usize).checked_sub(1) {
            if let Ok(Some(e)) = self.read_key(p.bucket(), i & (WINDOW - 1), &p.words) {
                if live_at(e.expires, now) {
                    return Ok(Some((i & (WINDOW - 1), e)));
                }
            }
        }
        let header = self.bucket(p.bucket());
        let tags = header.tags.load(Ordering::Acquire);
        let hits = zero_bytes(tags ^ (p.hint.tag as u64).wrapping_mul(LOW_BITS));
        let mut busy = false;
        for i in flagged(hits) {
            // Skip an expired entry without touching its slot's line (the
            // read below checks again, consistently).
            if !live_at(header.expiry(i).load(Ordering::Relaxed), now) {
                continue;
            }
            match self.read_key(p.bucket(), i, &p.words) {
                Ok(Some(e)) if live_at(e.expires, now) => return Ok(Some((i, e))),
                Ok(_) => {}
                Err(Busy) => busy = true,
            }
        }
        if busy {
            Err(Busy)
        } else {
            Ok(None)
        }
    }

    /// Moves slot `i`'s expiry to `now + timeout` if that is later and the
    /// slot still holds entry `e`; true if it moved (the header line is
    /// only dirtied then: once a second).
    ///
    /// A writer may have replaced `e` since it was read: its new entry's
    /// expiry must stay. So the move is skipped when the slot's sequence
    /// number has changed, and made with a compare-and-swap from the
    /// expiry `e` was read with, which fails if a writer claimed the slot
    /// after that check and wrote another. (Only a replacement written
    /// after the check and expiring in the very second `e` did gets through
    /// both: it then lives as long as the refreshed `e` would have.) Also,
    /// of two workers touching one entry in the same second, only one sees
    /// it moved.
    #[inline]
    fn touch(&self, b: usize, i: usize, e: &Entry, now: u32) -> bool {
        let new = now.wrapping_add(e.timeout);
        if new.wrapping_sub(e.expires) as i32 > 0 {
            self.move_expiry(b, i, e.seq, e.expires, new)
        } else {
            false
        }
    }

    /// The write half of [`FlowTable::touch`], out of line: a flow's
    /// timer moves at most once a second.
    #[cold]
    #[inline(never)]
    fn move_expiry(&self, b: usize, i: usize, seq: u32, from: u32, to: u32) -> bool {
        self.slot(b, i).seq.load(Ordering::Acquire) == seq
            && self
                .bucket(b)
                .expiry(i)
                .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Looks an entry up without refreshing its idle timer: for callers
    /// that only want to know about a flow (an ICMP error about it, a
    /// candidate that may turn out not to match), not keep it alive.
    #[inline]
    pub fn peek(&self, key: &impl TableKey, now: u32) -> Option<FlowValue> {
        self.find(&self.probe(key), now)
            .map(|(_, e)| FlowValue::unpack(e.value))
    }

    /// Looks an entry up, refreshing its idle timer on a hit.
    #[inline]
    pub fn lookup(&self, key: &impl TableKey, now: u32) -> Option<FlowValue> {
        self.lookup_probe(&self.probe(key), now).map(|(v, _)| v)
    }

    /// [`FlowTable::lookup`] with a precomputed probe, also saying whether
    /// this hit moved the entry's timer to a new second: callers that keep
    /// a companion entry alive do so then, at most once a second per flow.
    #[inline(always)]
    pub fn lookup_probe(&self, p: &Probe, now: u32) -> Option<(FlowValue, bool)> {
        let (i, e) = self.find(p, now)?;
        let touched = self.touch(p.bucket(), i, &e, now);
        Some((FlowValue::unpack(e.value), touched))
    }

    /// Makes `key` map to `value` with idle timeout `timeout`: refreshes an
    /// identical entry, replaces a different one, or inserts. When the bucket
    /// is full, evicts its entry closest to expiry if `evict`, else gives
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
        self.upsert_probe(&self.probe(key), value, now, timeout, evict)
    }

    /// [`FlowTable::upsert`] with a precomputed probe.
    ///
    /// One pass, inlined into its caller; a second one, out of line, only
    /// when another writer changed the chosen slot in between. (As one
    /// loop of two passes, the compiler hoisted and spilled everything the
    /// second pass might need: a third of an insert's instructions.)
    #[inline]
    pub fn upsert_probe(
        &self,
        p: &Probe,
        value: FlowValue,
        now: u32,
        timeout: u32,
        evict: bool,
    ) -> Upsert {
        match self.upsert_once(p, value, now, timeout, evict) {
            Some(u) => u,
            None => self.upsert_again(p, value, now, timeout, evict),
        }
    }

    /// [`FlowTable::upsert_probe`] for a key that is most likely absent (a
    /// new flow, a new session: the caller has just looked it up in vain),
    /// with the same outcome. The insert is tried first, without searching
    /// the bucket for the key, into the slot the probe's hint names
    /// ([`Hint::insert`]: the burst pipeline's stages chose it already) or
    /// else the one [`FlowTable::insert_slot`] chooses: [`FlowTable::take`]
    /// shows the key's tag in its slot and then looks for the key in the
    /// bucket's other slots
    /// anyway, so if the key is there after all (stored since the caller's
    /// lookup, or being stored now) the insert gives up and a full upsert
    /// finds that entry. The full upsert also takes over when the insert
    /// found its slot changed (its second try), or when it would evict a
    /// live entry (which might be the key's own): into a full bucket this
    /// makes one try where an upsert makes two, so a writer that loses a
    /// race there gets [`Upsert::Full`] (counted by the caller) sooner.
    #[inline(always)]
    pub fn insert_probe(
        &self,
        p: &Probe,
        value: FlowValue,
        now: u32,
        timeout: u32,
        evict: bool,
    ) -> Upsert {
        let b = p.bucket();
        let pick = match (p.hint.insert as usize).checked_sub(1) {
            // Chosen by `prefetch_slot`: free or expired then. If it is
            // live now (another insert took it since), `take` leaves it be.
            Some(i) => Pick {
                i: i & (WINDOW - 1),
                live: false,
                expires: 0,
            },
            None => {
                let tags = self.bucket(b).tags.load(Ordering::Acquire);
                self.insert_slot(b, tags, p.hint.tag, now)
            }
        };
        if !pick.live {
            if let Some(u) = self.take(p, pick, value, now, timeout) {
                return u;
            }
        }
        self.upsert_again(p, value, now, timeout, evict)
    }

    #[cold]
    #[inline(never)]
    fn upsert_again(
        &self,
        p: &Probe,
        value: FlowValue,
        now: u32,
        timeout: u32,
        evict: bool,
    ) -> Upsert {
        self.upsert_once(p, value, now, timeout, evict)
            .unwrap_or(Upsert::Full)
    }

    /// One try at an upsert; `None` if another writer changed the chosen
    /// slot between the look and the claim.
    #[inline(always)]
    fn upsert_once(
        &self,
        p: &Probe,
        value: FlowValue,
        now: u32,
        timeout: u32,
        evict: bool,
    ) -> Option<Upsert> {
        let b = p.bucket();
        let expires = now.wrapping_add(timeout);
        // A slot that may hold the key but that a writer kept: inserting
        // the key elsewhere would leave two copies of it, the stale one
        // found first until it expires. Try again, or give up.
        if let Some((i, e)) = self.find_or_busy(p, now).ok()? {
            let old = FlowValue::unpack(e.value);
            if old == value {
                let _ = self.touch(b, i, &e, now);
                return Some(Upsert::Existing);
            }
            if !self.claim(b, i, e.seq) {
                return None;
            }
            self.fill(b, i, e.seq, &p.words, value, expires, timeout);
            return Some(Upsert::Replaced(old));
        }
        // The slot to take ([`FlowTable::insert_slot`]; a live one only
        // when evicting). Only the header is read; what the slot held is
        // read once it is ours.
        let header = self.bucket(b);
        let tags = header.tags.load(Ordering::Acquire);
        let pick = self.insert_slot(b, tags, p.hint.tag, now);
        if pick.live && !evict {
            return Some(Upsert::Full);
        }
        self.take(p, pick, value, now, timeout)
    }

    /// The second half of an insert: claims the slot `pick` chose, checks
    /// that it still holds what the choice saw, and writes the entry.
    /// `None` if another writer got there first.
    #[inline(always)]
    fn take(
        &self,
        p: &Probe,
        pick: Pick,
        value: FlowValue,
        now: u32,
        timeout: u32,
    ) -> Option<Upsert> {
        let (b, i) = (p.bucket(), pick.i);
        let header = self.bucket(b);
        let slot = self.slot(b, i);
        let s = slot.seq.load(Ordering::Relaxed);
        if !self.claim(b, i, s) {
            return None;
        }
        // Ours: what the slot holds now cannot change under us.
        let old_tag = (header.tags.load(Ordering::Relaxed) >> (8 * i)) as u8;
        let old_expires = header.expiry(i).load(Ordering::Relaxed);
        let old = Displaced {
            value: FlowValue::unpack(slot.value.load(Ordering::Relaxed)),
            forward: slot.key[4].load(Ordering::Relaxed) & 0xff == KIND_FORWARD,
        };
        let outcome = if old_tag == 0 {
            Upsert::Inserted(None)
        } else if !live_at(old_expires, now) {
            // Its flow ended without being seen closing.
            Upsert::Inserted(Some(old))
        } else if pick.live && old_expires == pick.expires {
            Upsert::Evicted(old)
        } else {
            // Free or expired when looked at, live now: another writer
            // inserted there (perhaps this very key). Or the entry chosen
            // for eviction was replaced, or refreshed by a hit, since the
            // choice: it is no longer the one closest to expiry, and a
            // flow just written or just used must not be the one evicted.
            // Leave it be.
            slot.seq.store(s, Ordering::Release);
            return None;
        };
        // Show the key's tag in the slot before writing it, and look for
        // the key in the bucket's other slots: another writer may have
        // inserted it since the look (or be inserting it now, into another
        // slot). Of two writers of one key, the later tag write sees the
        // earlier one's tag, so at least one of them sees the other and
        // leaves.
        let tags = announce_tag(header, i, p.hint.tag);
        let others =
            zero_bytes(tags ^ (p.hint.tag as u64).wrapping_mul(LOW_BITS)) & !(0x80 << (8 * i));
        if others != 0 && !self.alone(b, i, others, p, now) {
            announce_tag(header, i, old_tag);
            slot.seq.store(s, Ordering::Release);
            return None;
        }
        self.fill(b, i, s, &p.words, value, now.wrapping_add(timeout), timeout);
        Some(outcome)
    }

    /// Whether no slot of bucket `b` but `i` (which the caller owns) holds
    /// the probe's key live or is being written under its tag (`others`:
    /// a [`zero_bytes`] mask of the slots whose tag looked like the key's).
    /// Never waits: a slot a writer owns counts as holding the key. Out of
    /// line: the bucket holds another entry with the key's tag in 1 insert
    /// of 255 per used slot, or when another writer races this one.
    #[cold]
    #[inline(never)]
    fn alone(&self, b: usize, i: usize, others: u64, p: &Probe, now: u32) -> bool {
        let header = self.bucket(b);
        let tags = header.tags.load(Ordering::SeqCst);
        for j in flagged(others) {
            if j == i || (tags >> (8 * j)) as u8 != p.hint.tag {
                continue;
            }
            let slot = self.slot(b, j);
            let s1 = slot.seq.load(Ordering::SeqCst);
            if s1 & 1 == 1 {
                return false;
            }
            let same = slot
                .key
                .iter()
                .zip(&p.words)
                .all(|(k, w)| k.load(Ordering::Relaxed) == *w);
            let expires = header.expiry(j).load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if slot.seq.load(Ordering::Relaxed) != s1 || (same && live_at(expires, now)) {
                return false;
            }
        }
        true
    }

    /// Marks a live entry to backend `backend` closed (for
    /// least-connections), and from now on gives it an idle timeout of at
    /// most `timeout` (a TCP flow seen closing need not be kept as long as
    /// an open one). True if this call changed it (so each flow is counted
    /// closed once). An upsert of the open value (a SYN reopening the flow)
    /// brings the full timeout back.
    ///
    /// An entry to another backend is left alone: the key's flow moved
    /// there (its backend went down), and a FIN the old backend still
    /// sends ends neither the moved flow nor, a second time, its own.
    pub fn mark_closed(&self, key: &impl TableKey, backend: u16, now: u32, timeout: u32) -> bool {
        self.mark_closed_probe(&self.probe(key), backend, now, timeout)
    }

    /// [`FlowTable::mark_closed`] with a precomputed probe (the packet
    /// path has the flow's, from its lookup).
    pub fn mark_closed_probe(&self, p: &Probe, backend: u16, now: u32, timeout: u32) -> bool {
        let Some((i, e)) = self.find(p, now) else {
            return false;
        };
        let mut val = FlowValue::unpack(e.value);
        if val.closed || val.backend != backend {
            return false;
        }
        val.closed = true;
        let timeout = e.timeout.min(timeout);
        let expires = now.wrapping_add(timeout);
        if !self.claim(p.bucket(), i, e.seq) {
            return false;
        }
        self.fill(p.bucket(), i, e.seq, &p.words, val, expires, timeout);
        true
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
        let n = self.slots.len();
        for k in 0..count.min(n) {
            let idx = (start + k) & (n - 1);
            let (b, i) = (idx / WINDOW, idx % WINDOW);
            let tag = (self.bucket(b).tags.load(Ordering::Relaxed) >> (8 * i)) as u8;
            if tag == 0 {
                continue;
            }
            let Some(e) = self.read(b, i) else {
                continue;
            };
            if e.key[4] & 0xff != KIND_FORWARD || live_at(e.expires, now) {
                continue;
            }
            let mut val = FlowValue::unpack(e.value);
            if val.closed {
                continue;
            }
            val.closed = true;
            if self.claim(b, i, e.seq) {
                self.fill(b, i, e.seq, &e.key, val, e.expires, e.timeout);
                f(val);
            }
        }
    }

    /// Claims slot `i` of bucket `b`, whose sequence number was `seq`
    /// (even) when the caller looked: false if it is odd now or moved on
    /// (another writer owns it, or changed it since).
    #[inline(always)]
    fn claim(&self, b: usize, i: usize, seq: u32) -> bool {
        let slot = self.slot(b, i);
        if seq & 1 == 1
            || slot
                .seq
                .compare_exchange(
                    seq,
                    seq.wrapping_add(1),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return false;
        }
        // Readers that saw the old even value must notice the change: order
        // the odd sequence number before the data stores. (Sequentially
        // consistent, which costs nothing more on x86: an inserter's claim
        // and its announced tag are ordered with another inserter's, see
        // `announce_tag`.)
        fence(Ordering::Release);
        true
    }

    /// Writes the entry into slot `i` of bucket `b`, claimed from `seq`,
    /// and releases it. The header shows the key's tag for the slot
    /// already: [`FlowTable::take`] announced it, or the slot held the
    /// key's own entry, and nobody else writes a slot's tag while it is
    /// claimed. (Setting it here again, as this did, cost every insert
    /// another read of the tag word, for nothing.)
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn fill(
        &self,
        b: usize,
        i: usize,
        seq: u32,
        words: &[u64; 5],
        value: FlowValue,
        expires: u32,
        timeout: u32,
    ) {
        let slot = self.slot(b, i);
        let header = self.bucket(b);
        for (dst, w) in slot.key.iter().zip(words) {
            dst.store(*w, Ordering::Relaxed);
        }
        slot.value.store(value.pack(), Ordering::Relaxed);
        slot.timeout.store(timeout, Ordering::Relaxed);
        header.expiry(i).store(expires, Ordering::Relaxed);
        slot.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// Live entries (a full scan: for stats, not the packet path).
    pub fn count_live(&self, now: u32) -> usize {
        self.buckets
            .iter()
            .map(|b| {
                let tags = b.tags.load(Ordering::Relaxed);
                (0..WINDOW)
                    .filter(|&i| {
                        (tags >> (8 * i)) as u8 != 0
                            && live_at(b.expiry(i).load(Ordering::Relaxed), now)
                    })
                    .count()
            })
            .sum()
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
    /// One forward key: 1.2.3.4:5 to 5.6.7.8:80, TCP.
    fn a_forward_key() -> ForwardKey {
        ForwardKey {
            proto: 6,
            client: map_v4([1, 2, 3, 4]),
            client_port: 5,
            vip: map_v4([5, 6, 7, 8]),
            vip_port: 80,
        }
    }

    const V: FlowValue = FlowValue {
        listener: 3,
        backend: 7,
        closed: false,
        opening: false,
    };
    const T: u32 = 300;
    /// `V` in a reply entry ([`key`]'s kind), displaced by an insert.
    const D: Displaced = Displaced {
        value: V,
        forward: false,
    };

    /// An insert that takes another entry's slot says whether that entry
    /// was a forward entry, whatever the kind of the key inserted: only a
    /// forward entry's loss ends a flow.
    #[test]
    fn a_displaced_entry_says_whether_it_was_a_forward_entry() {
        let t = FlowTable::new(WINDOW);
        let fwd = |i: u32| ForwardKey {
            proto: 6,
            client: map_v4(i.to_be_bytes()),
            client_port: 1,
            vip: map_v4([198, 18, 100, 1]),
            vip_port: 80,
        };
        for i in 0..4 {
            t.upsert(&fwd(i), V, 10, T, true);
            t.upsert(&key(i, 1), V, 10, T, true);
        }
        // Slots in insert order: forward, reply, forward, ...
        let forward = Displaced {
            value: V,
            forward: true,
        };
        assert_eq!(
            t.upsert(&key(9, 1), V, 11, T, true),
            Upsert::Evicted(forward)
        );
        assert_eq!(t.upsert(&fwd(9), V, 11, T, true), Upsert::Evicted(D));
        // Expired: the same, over dead entries. An insert takes a dead
        // entry with its own tag first (most likely its own key's, from
        // before), so the keys inserted now have tags no entry has (the
        // hash is seeded per process: with fixed keys, one run in a few
        // dozen took the other kind's slot).
        let mut used: Vec<u8> = (0..4)
            .chain([9])
            .flat_map(|i| [t.probe(&fwd(i)).hint.tag, t.probe(&key(i, 1)).hint.tag])
            .collect();
        let r = (10..)
            .map(|c| key(c, 1))
            .find(|k| !used.contains(&t.probe(k).hint.tag))
            .expect("a reply key of a tag no entry has");
        used.push(t.probe(&r).hint.tag);
        let f = (10..)
            .map(fwd)
            .find(|k| !used.contains(&t.probe(k).hint.tag))
            .expect("a forward key of a tag no entry has");
        let later = 10 + T + 1;
        assert_eq!(
            t.upsert(&r, V, later, T, true),
            Upsert::Inserted(Some(forward))
        );
        assert_eq!(t.upsert(&f, V, later, T, true), Upsert::Inserted(Some(D)));
    }

    /// The slot `prefetch_slot` records is only where a lookup looks
    /// first: a hint naming another key's slot (that key moved in between
    /// the stages) still finds the right entry, or none.
    #[test]
    fn a_lookup_with_a_stale_slot_hint_still_finds_the_right_entry() {
        let t = FlowTable::new(64);
        // Two keys of one bucket, with different tags (the hash is seeded
        // per process; with equal tags stage 2 would point both at the
        // first slot, which is also correct but not what is tested here).
        let a = key(1, 1);
        let pa = t.probe(&a);
        let b = (2..)
            .map(|c| key(c, 1))
            .find(|k| {
                let h = t.probe(k).hint;
                h.bucket == pa.hint.bucket && h.tag != pa.hint.tag
            })
            .expect("a second key of the bucket");
        let w = FlowValue::new(4, 9);
        assert!(matches!(
            t.upsert(&a, V, 1, T, true),
            Upsert::Inserted(None)
        ));
        assert!(matches!(
            t.upsert(&b, w, 1, T, true),
            Upsert::Inserted(None)
        ));

        let mut hb = t.probe(&b).hint;
        assert!(t.prefetch_slot(&mut hb, 1), "b's tag is live");
        assert_ne!(hb.slot, 0, "and its slot recorded");
        let mut pa = t.probe(&a);
        assert!(t.prefetch_slot(&mut pa.hint, 1));
        assert_ne!(pa.hint.slot, hb.slot);
        assert_eq!(t.lookup_probe(&pa, 1).map(|(v, _)| v), Some(V));

        // a's probe pointing at b's slot.
        pa.hint.slot = hb.slot;
        assert_eq!(t.lookup_probe(&pa, 1).map(|(v, _)| v), Some(V));
        // An absent key pointing at b's slot.
        let c = (b.client_port + 1..)
            .map(|port| key(1, port))
            .find(|k| t.probe(k).hint.bucket == pa.hint.bucket)
            .expect("a third key of the bucket");
        let mut pc = t.probe(&c);
        pc.hint.slot = hb.slot;
        assert_eq!(t.lookup_probe(&pc, 1), None);
        // And b, expired, is not found through its own slot either.
        let mut pb = t.probe(&b);
        pb.hint = hb;
        assert_eq!(t.lookup_probe(&pb, 1 + T + 1), None);
    }

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
        assert_eq!(dead_seen, Some(D));
    }

    /// A key inserted again after its entry expired takes that entry's
    /// slot back, even with free slots in the bucket: a copy left behind
    /// would be stepped over by every later lookup of the key.
    #[test]
    fn a_returning_key_takes_its_own_expired_slot_back() {
        let t = FlowTable::new(WINDOW);
        let k = key(1, 1);
        let slots_with_its_tag = || {
            let h = t.probe(&k).hint;
            let tags = t.buckets[0].tags.load(Ordering::Relaxed);
            (0..WINDOW)
                .filter(|&i| (tags >> (8 * i)) as u8 == h.tag)
                .count()
        };
        // Another key (with another tag) in the first slot, so that the
        // key's own is not the first dead one anyway.
        let tag = |k: &FlowKey| t.probe(k).hint.tag;
        let first = (2..)
            .map(|c| key(c, 1))
            .find(|o| tag(o) != tag(&k))
            .unwrap();
        t.upsert(&first, V, 0, 10, true);
        t.upsert(&k, V, 0, 10, true);
        let other = FlowValue::new(4, 5);
        assert_eq!(t.upsert(&k, other, 20, 10, true), Upsert::Inserted(Some(D)));
        assert_eq!(t.lookup(&k, 20), Some(other));
        assert_eq!(slots_with_its_tag(), 1);
    }

    /// A lookup that read an entry just before a writer replaced it in the
    /// same slot must not move the new entry's expiry when it refreshes
    /// the one it read.
    #[test]
    fn a_refresh_of_an_entry_replaced_meanwhile_leaves_the_new_one_alone() {
        let t = FlowTable::new(WINDOW);
        let a = t.probe(&key(1, 1));
        let b = t.probe(&key(2, 2));
        t.upsert_probe(&a, V, 0, 10, true);
        // The reader's half of a lookup at second 5: the entry, unrefreshed.
        let (i, e) = t.find(&a, 5).expect("a is live");
        assert_eq!(e.expires, 10);
        // A writer claims that slot from the same sequence number and puts
        // another entry there, expiring at second 8.
        assert!(t.claim(0, i, e.seq));
        announce_tag(&t.buckets[0], i, b.hint.tag);
        t.fill(0, i, e.seq, &b.words, FlowValue::new(4, 5), 8, 3);
        // The reader now refreshes what it read (5 + 10 = 15 > 10).
        assert!(!t.touch(0, i, &e, 5));
        assert_eq!(t.buckets[0].expires[i].load(Ordering::Relaxed), 8);
        assert_eq!(t.peek(&key(2, 2), 7), Some(FlowValue::new(4, 5)));
        assert_eq!(t.peek(&key(2, 2), 9), None);
        // Unreplaced, the same refresh moves the expiry, once.
        let (i, e) = t.find(&b, 7).expect("b is live");
        assert!(t.touch(0, i, &e, 7));
        assert!(!t.touch(0, i, &e, 7));
        assert_eq!(t.peek(&key(2, 2), 9), Some(FlowValue::new(4, 5)));
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
        assert_eq!(t.upsert(&key(100, 1), V, 21, T, true), Upsert::Evicted(D));
        assert_eq!(t.lookup(&key(1, 1), 21), None);
        assert_eq!(t.lookup(&key(0, 1), 21), Some(V));
        assert_eq!(t.lookup(&key(100, 1), 21), Some(V));
    }

    /// An insert into a full bucket chooses the entry closest to expiry
    /// from the bucket's header, then claims its slot. If another writer
    /// replaced that entry in between, or a hit refreshed it, the insert
    /// must not evict what is there now (a flow just written or just
    /// used): it backs off, and its retry evicts the entry closest to
    /// expiry by then.
    #[test]
    fn an_eviction_spares_an_entry_replaced_or_refreshed_after_the_choice() {
        let t = FlowTable::new(WINDOW); // one bucket = the whole table
        for i in 0..WINDOW as u32 {
            // Key i expires at 310 + i.
            t.upsert(&key(i, 1), V, 10 + i, T, true);
        }
        let v2 = FlowValue::new(4, 5);
        let choose = |p: &Probe, now: u32| {
            let tags = t.buckets[0].tags.load(Ordering::Relaxed);
            t.insert_slot(0, tags, p.hint.tag, now)
        };

        // A writer chooses key 0's slot for a newcomer...
        let newcomer = t.probe(&key(100, 1));
        let pick = choose(&newcomer, 20);
        let (i0, e0) = t.find(&t.probe(&key(0, 1)), 20).expect("key 0 is live");
        assert!(pick.live);
        assert_eq!((pick.i, pick.expires), (i0, 310));
        // ... another one replaces key 0 there with key 50, expiring at 320...
        let k50 = t.probe(&key(50, 1));
        assert!(t.claim(0, i0, e0.seq));
        announce_tag(&t.buckets[0], i0, k50.hint.tag);
        t.fill(0, i0, e0.seq, &k50.words, V, 320, T);
        // ... and the first one's claim backs off: key 50 stays.
        assert_eq!(t.take(&newcomer, pick, v2, 20, T), None);
        assert_eq!(t.peek(&key(50, 1), 20), Some(V));
        // Its retry evicts the entry closest to expiry now: key 1.
        assert_eq!(
            t.upsert_probe(&newcomer, v2, 20, T, true),
            Upsert::Evicted(D)
        );
        assert_eq!(t.peek(&key(1, 1), 20), None);
        assert_eq!(t.peek(&key(100, 1), 20), Some(v2));

        // The same with a hit in between: key 2 is chosen (expiring at
        // 312), then used at second 25 (now expiring at 325).
        let other = t.probe(&key(101, 1));
        let pick = choose(&other, 25);
        assert_eq!(pick.expires, 312);
        assert_eq!(t.lookup(&key(2, 1), 25), Some(V));
        assert_eq!(t.take(&other, pick, v2, 25, T), None);
        assert_eq!(t.upsert_probe(&other, v2, 25, T, true), Upsert::Evicted(D));
        assert_eq!(t.peek(&key(2, 1), 25), Some(V));
        assert_eq!(t.peek(&key(3, 1), 25), None, "key 3 expired first by then");
    }

    #[test]
    fn eviction_takes_the_entry_closest_to_expiry_whatever_its_age() {
        let t = FlowTable::new(8); // one bucket = the whole table
                                   // Key 0 is the oldest but has the longest timeout; key 5 is newer
                                   // but expires first.
        t.upsert(&key(0, 1), V, 10, 3600, true);
        for i in 1..8u32 {
            let timeout = if i == 5 { 100 } else { 300 };
            t.upsert(&key(i, 1), V, 20, timeout, true);
        }
        assert_eq!(t.upsert(&key(100, 1), V, 21, T, true), Upsert::Evicted(D));
        assert_eq!(t.lookup(&key(5, 1), 21), None);
        assert_eq!(t.lookup(&key(0, 1), 21), Some(V));
    }

    #[test]
    fn a_worker_whose_clock_is_a_second_behind_still_sees_the_entry() {
        let t = FlowTable::new(64);
        t.upsert(&key(1, 1), V, 100, 30, true);
        assert_eq!(t.lookup(&key(1, 1), 99), Some(V));
        // ... and its refresh does not shorten the entry's life.
        assert_eq!(t.lookup(&key(1, 1), 130), Some(V));
        assert_eq!(t.lookup(&key(1, 1), 160), Some(V));
        assert_eq!(t.lookup(&key(1, 1), 191), None);
    }

    #[test]
    fn a_flow_is_marked_closed_once() {
        let t = FlowTable::new(64);
        let k = a_forward_key();
        t.upsert(&k, V, 1, T, true);
        assert!(
            !t.mark_closed(&k, V.backend + 1, 2, T),
            "another backend's FIN"
        );
        assert_eq!(t.peek(&k, 2), Some(V));
        assert!(t.mark_closed(&k, V.backend, 2, T));
        assert!(!t.mark_closed(&k, V.backend, 3, T));
        assert_eq!(t.lookup(&k, 3).map(|v| v.closed), Some(true));
    }

    #[test]
    fn a_closed_flow_lives_by_the_closed_timeout_until_reopened() {
        let t = FlowTable::new(64);
        let k = |port| ForwardKey {
            proto: 6,
            client: map_v4([1, 2, 3, 4]),
            client_port: port,
            vip: map_v4([5, 6, 7, 8]),
            vip_port: 80,
        };
        let closed = FlowValue { closed: true, ..V };
        // Flow 1 closes at 100 with a 300 s idle timeout and a 10 s closed
        // one: each later packet keeps it 10 s more.
        t.upsert(&k(1), V, 100, 300, true);
        assert!(t.mark_closed(&k(1), V.backend, 100, 10));
        assert_eq!(t.lookup(&k(1), 110), Some(closed));
        assert_eq!(t.peek(&k(1), 120), Some(closed));
        assert_eq!(t.peek(&k(1), 121), None, "10 s after its last packet");
        // Flow 2 closes, then a SYN reopens it (the pipeline upserts the
        // open value): the idle timeout is 300 s again.
        t.upsert(&k(2), V, 100, 300, true);
        assert!(t.mark_closed(&k(2), V.backend, 100, 10));
        assert_eq!(t.upsert(&k(2), V, 105, 300, true), Upsert::Replaced(closed));
        assert_eq!(t.peek(&k(2), 405), Some(V));
        assert_eq!(t.peek(&k(2), 406), None);
        // A closed timeout longer than the entry's own changes nothing.
        t.upsert(&k(3), V, 100, 30, true);
        assert!(t.mark_closed(&k(3), V.backend, 100, 60));
        assert_eq!(t.peek(&k(3), 130), Some(closed));
        assert_eq!(t.peek(&k(3), 131), None);
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
                t.mark_closed(&k, V.backend, 1, 30);
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

    /// Two writers inserting different keys into one bucket at once may
    /// pick the same free slot: the one that claims it second must notice
    /// and take another, not overwrite the first one's entry. Every insert
    /// reported as stored is found afterwards.
    #[test]
    fn concurrent_inserts_into_one_bucket_never_overwrite_each_other() {
        // One bucket: every key lands in it.
        let t = Arc::new(FlowTable::new(WINDOW));
        let rounds = 20_000u32;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2u32)
            .map(|tid| {
                let (t, barrier) = (Arc::clone(&t), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let mut stored = Vec::new();
                    for round in 0..rounds {
                        // Each round starts past the previous round's
                        // timeout: every slot is free for reuse.
                        let now = 1 + round * (2 * T);
                        barrier.wait();
                        let mut mine = Vec::new();
                        for k in 0..(WINDOW as u32 / 2) {
                            let c = tid * 100 + k;
                            let v = FlowValue::new(tid as u16, k as u16);
                            if t.upsert(&key(c, round as u16), v, now, T, false) != Upsert::Full {
                                mine.push((c, v));
                            }
                        }
                        barrier.wait();
                        for (c, v) in mine {
                            stored.push((round, c, t.peek(&key(c, round as u16), now) == Some(v)));
                        }
                        // The next round reuses these slots.
                        barrier.wait();
                    }
                    stored
                })
            })
            .collect();
        let mut stored = 0;
        for th in threads {
            for (round, c, found) in th.join().unwrap() {
                assert!(found, "round {round}: key {c} was stored, then lost");
                stored += 1;
            }
        }
        // Losing a race twice in a row gives up (Full); that stays rare.
        assert!(
            stored > rounds as usize * WINDOW * 9 / 10,
            "only {stored} inserts stored"
        );
    }

    /// An entry that another worker is rewriting (a FIN marking it closed,
    /// the client's ACK completing the handshake, both a single claim and
    /// fill of its slot) is still there: a lookup in the meantime must not
    /// miss it (the packet path would schedule an established flow anew),
    /// and an upsert of its key must not insert a second copy beside it.
    #[test]
    fn an_entry_being_rewritten_is_never_missed_nor_duplicated() {
        use std::sync::atomic::AtomicBool;
        let t = Arc::new(FlowTable::new(WINDOW));
        let k = a_forward_key();
        let closed = FlowValue { closed: true, ..V };
        t.upsert(&k, V, 1, T, true);
        let done = Arc::new(AtomicBool::new(false));
        let rewriter = {
            let (t, done) = (Arc::clone(&t), Arc::clone(&done));
            std::thread::spawn(move || {
                let start = std::time::Instant::now();
                let mut n = 0u32;
                while n < 2_000_000 && start.elapsed().as_secs() < 5 {
                    t.upsert(&k, if n % 2 == 0 { closed } else { V }, 1, T, true);
                    n += 1;
                }
                done.store(true, Ordering::Relaxed);
            })
        };
        let (mut missed, mut looked) = (0u64, 0u64);
        while !done.load(Ordering::Relaxed) {
            if t.lookup(&k, 1).is_none() {
                missed += 1;
            }
            t.upsert(&k, V, 1, T, true);
            looked += 1;
        }
        rewriter.join().unwrap();
        assert_eq!(missed, 0, "missed {missed} of {looked} lookups");
        assert_eq!(t.count_live(1), 1, "one entry for the key");
    }

    /// Two workers inserting the same new key at once (the first packets
    /// of one flow, or one client's session, on two queues) store it
    /// once: the one that finds the other's entry, or its write in
    /// progress, refreshes it or gives up, and never puts a second copy
    /// in another slot of the bucket.
    #[test]
    fn a_key_inserted_by_two_writers_at_once_is_stored_once() {
        two_writers_store_each_key_once(|t, k| {
            t.upsert(k, V, 1, T, true);
        });
    }

    /// The same for the insert that does not search for the key first
    /// (the packet path's, for new flows and sessions).
    #[test]
    fn a_key_inserted_without_a_search_by_two_writers_at_once_is_stored_once() {
        two_writers_store_each_key_once(|t, k| {
            t.insert_probe(&t.probe(k), V, 1, T, true);
        });
    }

    /// The same with the slot chosen ahead ([`Hint::insert`]), as the
    /// burst pipeline inserts: both writers' hints mostly name the same
    /// slot.
    #[test]
    fn a_key_inserted_into_a_slot_chosen_ahead_by_two_writers_at_once_is_stored_once() {
        two_writers_store_each_key_once(|t, k| {
            let mut p = t.probe(k);
            t.prefetch_slot(&mut p.hint, 1);
            t.insert_probe(&p, V, 1, T, true);
        });
    }

    /// The slot `prefetch_slot` chooses for an insert is only a hint too:
    /// taken by another key before the insert, the insert goes to another
    /// slot and both keys stay; still free, the insert takes it; and a
    /// returning key's hint names its own expired slot, as
    /// [`FlowTable::insert_slot`] would.
    #[test]
    fn an_insert_into_a_slot_chosen_ahead_checks_it_again() {
        let t = FlowTable::new(WINDOW);
        let a = key(1, 1);
        let tag = |k: &FlowKey| t.probe(k).hint.tag;
        let b = (2..)
            .map(|c| key(c, 1))
            .find(|k| tag(k) != tag(&a))
            .expect("a key with another tag");
        let (mut pa, mut pb) = (t.probe(&a), t.probe(&b));
        assert!(!t.prefetch_slot(&mut pa.hint, 1));
        assert!(!t.prefetch_slot(&mut pb.hint, 1));
        assert_eq!(
            (pa.hint.insert, pb.hint.insert),
            (1, 1),
            "both: the first slot"
        );
        let w = FlowValue::new(4, 9);
        assert_eq!(t.insert_probe(&pa, V, 1, T, true), Upsert::Inserted(None));
        assert_eq!(t.insert_probe(&pb, w, 1, T, true), Upsert::Inserted(None));
        assert_eq!((t.lookup(&a, 1), t.lookup(&b, 1)), (Some(V), Some(w)));
        assert_eq!(t.count_live(1), 2);
        let tags = t.buckets[0].tags.load(Ordering::Relaxed);
        assert_eq!((tags as u8, (tags >> 8) as u8), (tag(&a), tag(&b)));

        // Both expired; b returns: its hint names its own expired slot,
        // not the first expired one (a's).
        let later = 1 + T + 1;
        let mut pb = t.probe(&b);
        assert!(!t.prefetch_slot(&mut pb.hint, later));
        assert_eq!(pb.hint.insert, 2);
        assert_eq!(
            t.insert_probe(&pb, V, later, T, true),
            Upsert::Inserted(Some(Displaced {
                value: w,
                forward: false
            }))
        );
        assert_eq!(t.lookup(&b, later), Some(V));
        assert_eq!(t.count_live(later), 1);
    }

    /// An insert without a search for the key ends exactly as an upsert
    /// when the key is there after all: refreshed or replaced in place,
    /// never stored twice. Otherwise it inserts as an upsert does: into the
    /// key's own expired slot, evicting (counted) or refusing in a full
    /// bucket.
    #[test]
    fn an_insert_without_a_search_ends_as_an_upsert() {
        let t = FlowTable::new(WINDOW);
        let ins = |k: &FlowKey, v, now, evict| t.insert_probe(&t.probe(k), v, now, T, evict);
        let k = key(1, 1);
        assert_eq!(ins(&k, V, 10, true), Upsert::Inserted(None));
        assert_eq!(ins(&k, V, 11, true), Upsert::Existing);
        let other = FlowValue::new(9, 7);
        assert_eq!(ins(&k, other, 12, true), Upsert::Replaced(V));
        assert_eq!(t.lookup(&k, 12), Some(other));
        assert_eq!(t.count_live(12), 1, "replaced in place, not duplicated");
        // Expired: its own slot is taken back.
        let later = 12 + T + 1;
        assert_eq!(
            ins(&k, V, later, true),
            Upsert::Inserted(Some(Displaced {
                value: other,
                forward: false
            }))
        );
        assert_eq!(t.count_live(later), 1);
        // A full bucket: refused without eviction, else the entry closest
        // to expiry (the key's, stored first) goes.
        for c in 2..=WINDOW as u32 {
            assert!(matches!(
                ins(&key(c, 1), V, later + c, true),
                Upsert::Inserted(_)
            ));
        }
        assert_eq!(ins(&key(99, 1), V, later + 20, false), Upsert::Full);
        assert_eq!(t.peek(&k, later + 20), Some(V), "a refusal keeps the old");
        assert_eq!(
            ins(&key(99, 1), V, later + 21, true),
            Upsert::Evicted(Displaced {
                value: V,
                forward: false
            })
        );
        assert_eq!(t.count_live(later + 21), WINDOW);
        assert_eq!(t.peek(&key(99, 1), later + 21), Some(V));
        assert_eq!(t.peek(&k, later + 21), None);
    }

    /// Two threads store the same 20,000 new keys at once, one key per
    /// round, each with `store`; no key may end up stored twice.
    fn two_writers_store_each_key_once(store: fn(&FlowTable, &FlowKey)) {
        let t = Arc::new(FlowTable::new(1 << 16));
        let rounds = 20_000u32;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let start = std::time::Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (t, barrier) = (Arc::clone(&t), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    for c in 0..rounds {
                        barrier.wait();
                        if start.elapsed().as_secs() < 20 {
                            store(&t, &key(c, 1));
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let stored = (0..rounds).filter(|&c| t.peek(&key(c, 1), 1).is_some());
        assert_eq!(t.count_live(1), stored.count(), "no key twice");
    }
}
