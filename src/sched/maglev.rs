//! Weighted Maglev consistent hashing.
//!
//! Table population follows Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer" (NSDI'16), §3.4 "Backend selection": every
//! backend `i` has a preference list over the `M` slots (M prime)
//!
//! ```text
//! offset_i = h1(key_i) mod M
//! skip_i   = h2(key_i) mod (M - 1) + 1
//! permutation_i[j] = (offset_i + j * skip_i) mod M
//! ```
//!
//! and backends take turns claiming their next preferred free slot until the
//! table is full. Since `M` is prime and `1 <= skip_i < M`, each preference
//! list visits every slot exactly once, so a backend can always find a free
//! slot while one exists.
//!
//! Weights use the per-round credit scheme of Katran's `MaglevHashV2`: in every
//! round each backend's credit grows by its weight, and a backend whose credit
//! has reached the largest weight in the set spends that much credit and claims
//! one slot. A backend of weight `w` therefore claims `w / max_weight` slots per
//! round, and slot shares are proportional to weight (up to one slot of
//! rounding). Weight 0 never claims anything and is left out entirely.
//!
//! `h1` and `h2` are XXH3-64 (`xxh3_64_with_seed`) over the 18-byte
//! [`MaglevBackend::key`] with seeds [`OFFSET_SEED`] and [`SKIP_SEED`].
//! Backends are processed in ascending key order, so the table depends only on
//! the *set* of (key, weight) pairs, never on the order of the input slice.
//!
//! Permutations are never materialised: each backend keeps just (next
//! position, skip, credit), and advancing is one add and one conditional
//! subtract, so building needs `O(M + N)` memory and no per-slot allocation.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

/// Default lookup table size: the prime 65537 (= 2^16 + 1). With up to ~650
/// backends this keeps M > 100·N, the regime where the paper reports
/// near-perfect balance and minimal disruption.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Smallest accepted table size (the smallest prime).
pub const MIN_TABLE_SIZE: u32 = 2;

/// Largest accepted table size: 16 777 213 = 2^24 − 3, the largest prime below
/// 2^24. Caps the table at 64 MiB of `u32` and keeps all build arithmetic far
/// from overflow.
pub const MAX_TABLE_SIZE: u32 = 16_777_213;

/// Largest accepted backend weight.
pub const MAX_WEIGHT: u8 = 100;

/// Seed of `h1` (permutation offset): big-endian `u64` of ASCII `"l4lb-off"`,
/// i.e. `0x6c34_6c62_2d6f_6666`.
pub const OFFSET_SEED: u64 = u64::from_be_bytes(*b"l4lb-off");

/// Seed of `h2` (permutation skip): big-endian `u64` of ASCII `"l4lb-skp"`,
/// i.e. `0x6c34_6c62_2d73_6b70`.
pub const SKIP_SEED: u64 = u64::from_be_bytes(*b"l4lb-skp");

/// Marks an unowned slot (only possible when no backend has weight > 0).
const EMPTY: u32 = u32::MAX;

/// One backend as seen by the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaglevBackend {
    /// The backend's identity: 16-byte address (IPv4 as the IPv4-mapped IPv6
    /// address `::ffff:a.b.c.d`) followed by the port, big-endian.
    pub key: [u8; 18],
    /// Relative weight, `0..=100` ([`MAX_WEIGHT`]); 0 = drained (no slots).
    pub weight: u8,
}

impl MaglevBackend {
    /// Backend `addr:port` with the given weight. An `IpAddr::V4` and its
    /// IPv4-mapped `IpAddr::V6` form give the same key (the same backend).
    pub fn new(addr: IpAddr, port: u16, weight: u8) -> Self {
        let v6 = match addr {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        let mut key = [0u8; 18];
        key[..16].copy_from_slice(&v6.octets());
        key[16..].copy_from_slice(&port.to_be_bytes());
        MaglevBackend { key, weight }
    }
}

/// Human-readable `addr:port` of a key, for error messages.
fn describe_key(key: &[u8; 18]) -> String {
    let mut a = [0u8; 16];
    a.copy_from_slice(&key[..16]);
    let v6 = Ipv6Addr::from(a);
    let port = u16::from_be_bytes([key[16], key[17]]);
    match v6.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{port}"),
        None => format!("[{v6}]:{port}"),
    }
}

/// Trial division; `n <= MAX_TABLE_SIZE` so at most ~2048 odd divisors.
fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n & 1 == 0 {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// A built Maglev lookup table. Clones share the table: a snapshot can
/// reuse the previous one's tables for services whose servers did not
/// change (reached through the same one pointer as a boxed slice).
#[derive(Clone)]
pub struct Maglev {
    /// `table[slot]` = index into the `backends` slice given to [`Maglev::build`],
    /// or `u32::MAX` if empty (only when no backend has weight > 0).
    table: Arc<[u32]>,
    /// Length of the `backends` slice given to `build` (for `slot_counts`).
    n_backends: u32,
}

impl fmt::Debug for Maglev {
    // Summarised: a derived Debug would print all M slots.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("size", &self.size())
            .field("n_backends", &self.n_backends)
            .field("slot_counts", &self.slot_counts())
            .finish()
    }
}

/// Lazy permutation state of one weight > 0 backend during `build`.
struct Perm {
    /// Next slot of the preference list to try (`offset + next * skip mod M`).
    pos: u32,
    skip: u32,
    credit: u32,
    weight: u32,
    /// Index into the caller's slice.
    index: u32,
}

impl Maglev {
    /// Build the lookup table.
    ///
    /// `size` must be a prime in [`MIN_TABLE_SIZE`]`..=`[`MAX_TABLE_SIZE`]
    /// (2..=16 777 213); use [`DEFAULT_TABLE_SIZE`] unless there are more than
    /// a few hundred backends (keep `size` ≳ 100 × backends for good balance).
    ///
    /// Errors: size out of range or not prime; a weight above [`MAX_WEIGHT`];
    /// two backends with the same key; `u32::MAX` or more backends.
    ///
    /// The result depends only on the set of backends, not on their order in
    /// `backends`: they are processed sorted by key, and the table stores
    /// indices into `backends` as given. Empty input, or all weights 0, is
    /// fine: every lookup then returns `None`. If more backends have weight > 0
    /// than there are slots, the ones later in key order get no slot.
    pub fn build(backends: &[MaglevBackend], size: u32) -> Result<Maglev, String> {
        if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
            return Err(format!(
                "maglev table size {size} out of range {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE}"
            ));
        }
        if !is_prime(size) {
            return Err(format!("maglev table size {size} is not prime"));
        }
        if backends.len() >= EMPTY as usize {
            return Err(format!("too many backends: {}", backends.len()));
        }
        if let Some((i, b)) = backends
            .iter()
            .enumerate()
            .find(|(_, b)| b.weight > MAX_WEIGHT)
        {
            return Err(format!(
                "backend {} (index {i}) has weight {} > {MAX_WEIGHT}",
                describe_key(&b.key),
                b.weight
            ));
        }

        let mut order: Vec<u32> = (0..backends.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| backends[a as usize].key.cmp(&backends[b as usize].key));
        if let Some(w) = order
            .windows(2)
            .find(|w| backends[w[0] as usize].key == backends[w[1] as usize].key)
        {
            let (a, b) = (w[0].min(w[1]), w[0].max(w[1]));
            return Err(format!(
                "duplicate backend {} (indices {a} and {b})",
                describe_key(&backends[a as usize].key)
            ));
        }

        let m = size;
        let mut table = vec![EMPTY; m as usize].into_boxed_slice();
        let mut perms: Vec<Perm> = order
            .iter()
            .filter(|&&i| backends[i as usize].weight > 0)
            .map(|&i| {
                let b = &backends[i as usize];
                let h1 = xxhash_rust::xxh3::xxh3_64_with_seed(&b.key, OFFSET_SEED);
                let h2 = xxhash_rust::xxh3::xxh3_64_with_seed(&b.key, SKIP_SEED);
                Perm {
                    pos: (h1 % u64::from(m)) as u32,
                    skip: (h2 % u64::from(m - 1)) as u32 + 1,
                    credit: 0,
                    weight: u32::from(b.weight),
                    index: i,
                }
            })
            .collect();
        let n_backends = backends.len() as u32;
        let Some(max_weight) = perms.iter().map(|p| p.weight).max() else {
            return Ok(Maglev {
                table: table.into(),
                n_backends,
            });
        };

        let mut filled = 0u32;
        'rounds: loop {
            for p in perms.iter_mut() {
                p.credit += p.weight;
                if p.credit < max_weight {
                    continue;
                }
                p.credit -= max_weight;
                // Walk the preference list to the next free slot. Terminates:
                // the table is not full and the list covers every slot.
                let mut pos = p.pos;
                while table[pos as usize] != EMPTY {
                    pos += p.skip;
                    if pos >= m {
                        pos -= m;
                    }
                }
                table[pos as usize] = p.index;
                pos += p.skip;
                if pos >= m {
                    pos -= m;
                }
                p.pos = pos;
                filled += 1;
                if filled == m {
                    break 'rounds;
                }
            }
        }
        Ok(Maglev {
            table: table.into(),
            n_backends,
        })
    }

    /// Whether `self` and `other` share one table (a clone's).
    pub fn shares_table(&self, other: &Maglev) -> bool {
        Arc::ptr_eq(&self.table, &other.table)
    }

    /// Backend for a client hash (normally [`super::client_hash`]): an index
    /// into the `backends` slice given to [`Maglev::build`], or `None` if no
    /// backend has weight > 0.
    ///
    /// The slot is chosen by multiply-shift ("fastrange"):
    /// `slot = (hash as u128 * size as u128) >> 64`, which maps the full 64-bit
    /// hash uniformly onto `0..size` with one multiply (no division) and uses
    /// the hash's high bits. No allocation, no data-dependent branch besides
    /// the always-passing bounds check.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        let b = self.table[self.slot(hash)];
        (b != EMPTY).then_some(b)
    }

    /// Starts loading the slot [`Maglev::lookup`] will read for `hash`
    /// (the burst pipeline asks a stage ahead: the 256 KiB table of a
    /// 65537-slot build does not stay in cache next to the flow tables).
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if let Some(s) = self.table.get(self.slot(hash)) {
            crate::util::prefetch(s);
        }
    }

    #[inline(always)]
    fn slot(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.table.len() as u128) >> 64) as usize
    }

    /// Number of slots `M` (the prime given to `build`).
    pub fn size(&self) -> u32 {
        self.table.len() as u32
    }

    /// Number of slots owned by each input backend, indexed like the
    /// `backends` slice given to `build`.
    pub fn slot_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.n_backends as usize];
        for &b in self.table.iter() {
            if b != EMPTY {
                counts[b as usize] += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::client_hash;
    use std::net::Ipv4Addr;

    const N_CLIENTS: u32 = 100_000;

    fn backend(i: u32, weight: u8) -> MaglevBackend {
        let ip = Ipv4Addr::from(0x0a00_0000 + i + 1); // 10.0.x.y
        MaglevBackend::new(IpAddr::V4(ip), 80, weight)
    }

    fn backends(n: u32, weight: u8) -> Vec<MaglevBackend> {
        (0..n).map(|i| backend(i, weight)).collect()
    }

    /// 100k client hashes of the addresses 172.16.0.0, 172.16.0.1, ...
    fn client_hashes() -> Vec<u64> {
        (0..N_CLIENTS)
            .map(|i| client_hash(&IpAddr::V4(Ipv4Addr::from(0xac10_0000 + i))))
            .collect()
    }

    /// Backend key (or none) per client.
    type Assignment = Vec<Option<[u8; 18]>>;

    /// The backend key each client maps to.
    fn keys_for(m: &Maglev, bs: &[MaglevBackend], hashes: &[u64]) -> Assignment {
        hashes
            .iter()
            .map(|&h| m.lookup(h).map(|i| bs[i as usize].key))
            .collect()
    }

    /// Deterministic Fisher-Yates with splitmix64 (tests must not be random).
    fn shuffled<T: Clone>(v: &[T], mut seed: u64) -> Vec<T> {
        let mut v = v.to_vec();
        for i in (1..v.len()).rev() {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            v.swap(i, (z % (i as u64 + 1)) as usize);
        }
        v
    }

    fn shares(m: &Maglev) -> Vec<f64> {
        m.slot_counts()
            .iter()
            .map(|&c| f64::from(c) / f64::from(m.size()))
            .collect()
    }

    #[test]
    fn determinism() {
        let hashes = client_hashes();
        let mut bs = backends(20, 100);
        for (i, b) in bs.iter_mut().enumerate() {
            b.weight = [100, 50, 1, 0, 73][i % 5];
        }
        let a = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap();
        let b = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap();
        let expect = keys_for(&a, &bs, &hashes);
        assert_eq!(keys_for(&b, &bs, &hashes), expect);
        assert_eq!(a.table, b.table);

        let mut rev = bs.clone();
        rev.reverse();
        let r = Maglev::build(&rev, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(keys_for(&r, &rev, &hashes), expect);

        for seed in [1, 2, 3] {
            let sh = shuffled(&bs, seed);
            assert_ne!(sh, bs);
            let s = Maglev::build(&sh, DEFAULT_TABLE_SIZE).unwrap();
            assert_eq!(keys_for(&s, &sh, &hashes), expect, "shuffle seed {seed}");
        }
    }

    /// Pins the exact hash functions, seeds, slot reduction and fill order:
    /// if this fails, clients of a running fleet would be re-shuffled.
    #[test]
    fn determinism_golden() {
        let bs = [
            MaglevBackend::new("10.0.0.1".parse().unwrap(), 80, 100),
            MaglevBackend::new("10.0.0.2".parse().unwrap(), 80, 50),
            MaglevBackend::new("2001:db8::3".parse().unwrap(), 8080, 25),
        ];
        let m = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(m.slot_counts(), GOLDEN_SLOT_COUNTS);
        let got: Vec<(&str, u64, Option<u32>)> = GOLDEN_CLIENTS
            .iter()
            .map(|&(c, _, _)| {
                let h = client_hash(&c.parse().unwrap());
                (c, h, m.lookup(h))
            })
            .collect();
        let want: Vec<(&str, u64, Option<u32>)> = GOLDEN_CLIENTS
            .iter()
            .map(|&(c, h, b)| (c, h, Some(b)))
            .collect();
        assert_eq!(got, want);
    }

    const GOLDEN_SLOT_COUNTS: [u32; 3] = [37450, 18725, 9362];
    /// (client address, client_hash, backend index)
    const GOLDEN_CLIENTS: [(&str, u64, u32); 10] = [
        ("192.0.2.1", 0x33c0_8e22_e7ee_dd22, 1),
        ("192.0.2.2", 0x1c73_cdd5_9aef_19a3, 0),
        ("192.0.2.4", 0xdcd3_42aa_c585_da55, 1),
        ("192.0.2.14", 0xe4c5_d25d_1d0c_d418, 2),
        ("192.0.2.21", 0x628b_b9e4_5c00_8be4, 2),
        ("198.51.100.7", 0x4636_8567_77b4_d74b, 0),
        ("10.10.10.10", 0x2898_0076_a03a_e2ee, 0),
        ("2001:db8:1::1", 0xd7b5_067d_de10_8205, 0),
        ("2001:db8:1::4", 0x94ba_b7ec_5418_24cb, 1),
        ("2001:db8:1::e", 0x165b_82a5_f59f_5514, 2),
    ];

    /// Straightforward transcription of the paper's permutation and Katran's
    /// `MaglevHashV2` loop (materialised permutations, `next[]` counters,
    /// `%` everywhere), over backends sorted by key.
    fn reference_table(bs: &[MaglevBackend], m: u32) -> Vec<u32> {
        use xxhash_rust::xxh3::xxh3_64_with_seed;
        let mut sorted: Vec<(usize, MaglevBackend)> = bs.iter().copied().enumerate().collect();
        sorted.sort_by_key(|(_, b)| b.key);
        sorted.retain(|(_, b)| b.weight > 0);
        let m64 = u64::from(m);
        let perm: Vec<Vec<u64>> = sorted
            .iter()
            .map(|(_, b)| {
                let offset = xxh3_64_with_seed(&b.key, OFFSET_SEED) % m64;
                let skip = xxh3_64_with_seed(&b.key, SKIP_SEED) % (m64 - 1) + 1;
                (0..m64).map(|j| (offset + j * skip) % m64).collect()
            })
            .collect();
        let mut result = vec![EMPTY; m as usize];
        if sorted.is_empty() {
            return result;
        }
        let max_w = sorted
            .iter()
            .map(|(_, b)| u32::from(b.weight))
            .max()
            .unwrap();
        let mut next = vec![0usize; sorted.len()];
        let mut cum = vec![0u32; sorted.len()];
        let mut n = 0;
        loop {
            for i in 0..sorted.len() {
                cum[i] += u32::from(sorted[i].1.weight);
                if cum[i] >= max_w {
                    cum[i] -= max_w;
                    let mut cur = perm[i][next[i]];
                    while result[cur as usize] != EMPTY {
                        next[i] += 1;
                        cur = perm[i][next[i]];
                    }
                    result[cur as usize] = sorted[i].0 as u32;
                    next[i] += 1;
                    n += 1;
                    if n == m {
                        return result;
                    }
                }
            }
        }
    }

    #[test]
    fn table_matches_reference_transcription() {
        let mut mixed = backends(37, 1);
        for (i, b) in mixed.iter_mut().enumerate() {
            b.weight = [100, 1, 0, 50, 33, 99, 7][i % 7];
        }
        let sets = [backends(1, 5), backends(3, 100), backends(12, 1), mixed];
        for bs in &sets {
            for m in [2, 3, 31, 1009, DEFAULT_TABLE_SIZE] {
                let rev: Vec<_> = bs.iter().rev().copied().collect();
                for input in [bs, &rev] {
                    let got = Maglev::build(input, m).unwrap();
                    assert_eq!(
                        &got.table[..],
                        &reference_table(input, m)[..],
                        "n={} m={m}",
                        bs.len()
                    );
                }
            }
        }
    }

    #[test]
    fn higher_weight_gets_more_slots() {
        let mut bs = backends(2, 100);
        bs[1].weight = 1;
        let m = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap();
        let c = m.slot_counts();
        assert!(c[0] > c[1] && c[1] > 0, "{c:?}");
        let s = shares(&m);
        assert!((s[0] - 100.0 / 101.0).abs() < 0.01, "{s:?}");
        assert!((s[1] - 1.0 / 101.0).abs() < 0.01, "{s:?}");

        let mut bs = backends(4, 10);
        bs[2].weight = 20;
        let c = Maglev::build(&bs, DEFAULT_TABLE_SIZE)
            .unwrap()
            .slot_counts();
        assert!(c[2] > c[0] && c[2] > c[1] && c[2] > c[3], "{c:?}");
    }

    #[test]
    fn slots_proportional_to_weight() {
        let cases: [&[u8]; 6] = [
            &[50, 30, 20],
            &[100, 1],
            &[1, 100, 1],
            &[100, 100, 100, 100],
            &[7, 13, 100, 42, 1, 99],
            &[3, 1],
        ];
        for ws in cases {
            let bs: Vec<_> = ws
                .iter()
                .enumerate()
                .map(|(i, &w)| backend(i as u32, w))
                .collect();
            let m = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap();
            let total: u32 = ws.iter().map(|&w| u32::from(w)).sum();
            assert_eq!(m.slot_counts().iter().sum::<u32>(), m.size());
            for (i, s) in shares(&m).into_iter().enumerate() {
                let want = f64::from(ws[i]) / f64::from(total);
                assert!(
                    (s - want).abs() <= 0.01,
                    "weights {ws:?}: {i} has {s}, want {want}"
                );
            }
        }
        // The credit scheme fills shares exactly, up to one slot of rounding.
        let bs = [backend(0, 50), backend(1, 30), backend(2, 20)];
        let c = Maglev::build(&bs, DEFAULT_TABLE_SIZE)
            .unwrap()
            .slot_counts();
        for (got, w) in c.iter().zip([50.0, 30.0, 20.0]) {
            let want = f64::from(DEFAULT_TABLE_SIZE) * w / 100.0;
            assert!((f64::from(*got) - want).abs() <= 1.0, "{c:?}");
        }
    }

    #[test]
    fn client_traffic_follows_weights() {
        let bs = [backend(0, 50), backend(1, 30), backend(2, 20)];
        let m = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap();
        let mut n = [0u32; 3];
        for h in client_hashes() {
            n[m.lookup(h).unwrap() as usize] += 1;
        }
        for (got, want) in n.iter().zip([0.5, 0.3, 0.2]) {
            let s = f64::from(*got) / f64::from(N_CLIENTS);
            assert!((s - want).abs() <= 0.01, "{n:?}");
        }
    }

    #[test]
    fn weight_zero_gets_no_slots() {
        let mut bs = backends(5, 40);
        bs[1].weight = 0;
        bs[4].weight = 0;
        let m = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap();
        let c = m.slot_counts();
        assert_eq!(c.len(), 5);
        assert_eq!((c[1], c[4]), (0, 0));
        assert_eq!(c[0] + c[2] + c[3], m.size());
        for h in client_hashes() {
            let b = m.lookup(h).unwrap();
            assert!(b != 1 && b != 4);
        }
        // A weight-0 backend does not perturb the others' slots at all.
        let without: Vec<_> = [0, 2, 3].iter().map(|&i| bs[i]).collect();
        let m2 = Maglev::build(&without, DEFAULT_TABLE_SIZE).unwrap();
        let hashes = client_hashes();
        assert_eq!(keys_for(&m, &bs, &hashes), keys_for(&m2, &without, &hashes));
    }

    #[test]
    fn all_zero_weights_lookup_none() {
        let m = Maglev::build(&backends(3, 0), DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(m.slot_counts(), vec![0, 0, 0]);
        assert_eq!(m.size(), DEFAULT_TABLE_SIZE);
        for h in client_hashes().into_iter().chain([0, u64::MAX]) {
            assert_eq!(m.lookup(h), None);
        }
    }

    #[test]
    fn empty_backends_lookup_none() {
        let m = Maglev::build(&[], DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(m.slot_counts(), Vec::<u32>::new());
        for h in client_hashes().into_iter().chain([0, u64::MAX]) {
            assert_eq!(m.lookup(h), None);
        }
        let m = Maglev::build(&[], 2).unwrap();
        assert_eq!((m.lookup(0), m.lookup(u64::MAX)), (None, None));
    }

    #[test]
    fn every_slot_filled_and_lookup_in_range_at_hash_extremes() {
        for size in [2, 3, 5, 7, 251, DEFAULT_TABLE_SIZE] {
            let bs = backends(4, 100);
            let m = Maglev::build(&bs, size).unwrap();
            assert_eq!(m.size(), size);
            assert_eq!(m.slot_counts().iter().sum::<u32>(), size);
            for h in [0, 1, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
                assert!(m.lookup(h).unwrap() < 4);
            }
        }
        // More backends than slots: the table is still full, nobody panics.
        let bs = backends(10, 100);
        let m = Maglev::build(&bs, 7).unwrap();
        assert_eq!(m.slot_counts().iter().sum::<u32>(), 7);
    }

    fn fraction_changed(
        a: &Maglev,
        abs: &[MaglevBackend],
        b: &Maglev,
        bbs: &[MaglevBackend],
        hashes: &[u64],
    ) -> (f64, Assignment, Assignment) {
        let ka = keys_for(a, abs, hashes);
        let kb = keys_for(b, bbs, hashes);
        let changed = ka.iter().zip(&kb).filter(|(x, y)| x != y).count();
        (changed as f64 / hashes.len() as f64, ka, kb)
    }

    #[test]
    fn removing_one_backend_moves_only_its_clients_plus_small_remainder() {
        let hashes = client_hashes();
        for n in [3u32, 5, 10, 50] {
            let all = backends(n, 100);
            let full = Maglev::build(&all, DEFAULT_TABLE_SIZE).unwrap();
            for removed in [0, n as usize / 2, n as usize - 1] {
                let mut rest = all.clone();
                let gone = rest.remove(removed).key;
                let m = Maglev::build(&rest, DEFAULT_TABLE_SIZE).unwrap();
                let (frac, before, after) = fraction_changed(&full, &all, &m, &rest, &hashes);
                let bound = 1.0 / f64::from(n) + 0.01;
                assert!(frac <= bound, "n={n} removed={removed}: {frac} > {bound}");
                let mut its_clients = 0;
                for (b, a) in before.iter().zip(&after) {
                    assert_ne!(*a, Some(gone));
                    if *b == Some(gone) {
                        its_clients += 1;
                        assert_ne!(a, b);
                    }
                }
                assert!(its_clients > 0);
            }
        }
    }

    #[test]
    fn adding_one_backend_moves_only_clients_to_it_plus_small_remainder() {
        let hashes = client_hashes();
        for n in [3u32, 5, 10, 50] {
            let old = backends(n, 100);
            let mut new = old.clone();
            new.insert(1, backend(n, 100));
            let added = backend(n, 100).key;
            let a = Maglev::build(&old, DEFAULT_TABLE_SIZE).unwrap();
            let b = Maglev::build(&new, DEFAULT_TABLE_SIZE).unwrap();
            let (frac, _, after) = fraction_changed(&a, &old, &b, &new, &hashes);
            let ideal = 1.0 / f64::from(n + 1);
            assert!(frac <= ideal + 0.01, "n={n}: {frac} > {ideal} + 0.01");
            let to_new =
                after.iter().filter(|k| **k == Some(added)).count() as f64 / hashes.len() as f64;
            assert!(
                (to_new - ideal).abs() <= 0.01,
                "n={n}: new backend got {to_new}"
            );
        }
    }

    #[test]
    fn changing_one_weight_moves_few_clients() {
        let hashes = client_hashes();
        let a_bs = backends(10, 100);
        let mut b_bs = a_bs.clone();
        b_bs[3].weight = 50;
        let a = Maglev::build(&a_bs, DEFAULT_TABLE_SIZE).unwrap();
        let b = Maglev::build(&b_bs, DEFAULT_TABLE_SIZE).unwrap();
        let (frac, _, _) = fraction_changed(&a, &a_bs, &b, &b_bs, &hashes);
        // Backend 3 goes from 1/10 to 1/19.5 of traffic: ~4.9% must move.
        assert!(frac <= 0.1, "{frac}");
    }

    #[test]
    fn size_must_be_prime() {
        let bs = backends(3, 1);
        for bad in [
            0,
            1,
            4,
            9,
            65536,
            65535,
            1_000_000,
            MAX_TABLE_SIZE + 2,
            u32::MAX,
        ] {
            assert!(Maglev::build(&bs, bad).is_err(), "{bad}");
        }
        for good in [2, 3, 13, 251, 65521, DEFAULT_TABLE_SIZE, 655_373] {
            assert_eq!(Maglev::build(&bs, good).unwrap().size(), good);
        }
        assert!(is_prime(MAX_TABLE_SIZE));
        // Primes above the bound are rejected too.
        assert!(is_prime(16_777_259));
        assert!(Maglev::build(&bs, 16_777_259).is_err());
        assert!(Maglev::build(&[], 1).is_err());
    }

    #[test]
    fn duplicate_keys_rejected() {
        let mut bs = backends(4, 10);
        bs.push(backend(2, 99));
        let e = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap_err();
        assert!(e.contains("duplicate") && e.contains("10.0.0.3:80"), "{e}");
        // An IPv4 address and its IPv4-mapped IPv6 form are the same backend.
        let dup = [
            MaglevBackend::new("10.1.1.1".parse().unwrap(), 53, 1),
            MaglevBackend::new("::ffff:10.1.1.1".parse().unwrap(), 53, 1),
        ];
        assert!(Maglev::build(&dup, DEFAULT_TABLE_SIZE).is_err());
        // Same address, different port: distinct backends.
        let ok = [
            MaglevBackend::new("10.1.1.1".parse().unwrap(), 53, 1),
            MaglevBackend::new("10.1.1.1".parse().unwrap(), 54, 1),
        ];
        assert!(Maglev::build(&ok, DEFAULT_TABLE_SIZE).is_ok());
    }

    #[test]
    fn weight_above_100_rejected() {
        let bs = [backend(0, 100), backend(1, 101)];
        let e = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap_err();
        assert!(e.contains("weight 101"), "{e}");
    }

    #[test]
    fn backend_key_layout() {
        let b = MaglevBackend::new("192.0.2.9".parse().unwrap(), 0x1f90, 7);
        let mut want = [0u8; 18];
        want[10] = 0xff;
        want[11] = 0xff;
        want[12..16].copy_from_slice(&[192, 0, 2, 9]);
        want[16..].copy_from_slice(&[0x1f, 0x90]);
        assert_eq!(b.key, want);
        assert_eq!(b.weight, 7);
        let v6 = MaglevBackend::new("2001:db8::1".parse().unwrap(), 443, 1);
        assert_eq!(&v6.key[..2], &[0x20, 0x01]);
        assert_eq!(&v6.key[16..], &443u16.to_be_bytes());
        assert_eq!(OFFSET_SEED, 0x6c34_6c62_2d6f_6666);
        assert_eq!(SKIP_SEED, 0x6c34_6c62_2d73_6b70);
    }

    #[test]
    fn debug_is_summarised() {
        let m = Maglev::build(&backends(2, 1), DEFAULT_TABLE_SIZE).unwrap();
        let s = format!("{m:?}");
        assert!(s.len() < 200 && s.contains("65537"), "{s}");
    }

    /// Not a benchmark, a guard against accidental quadratic behaviour.
    #[test]
    fn build_1000_backends_is_fast() {
        let bs: Vec<_> = (0..1000)
            .map(|i| backend(i, [100, 1][i as usize % 2]))
            .collect();
        let t = std::time::Instant::now();
        let m = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap();
        let dt = t.elapsed();
        assert_eq!(m.slot_counts().iter().sum::<u32>(), DEFAULT_TABLE_SIZE);
        // Generous (debug builds, shared CI machines); release is ~ms.
        assert!(dt.as_secs() < 5, "{dt:?}");
    }
}
