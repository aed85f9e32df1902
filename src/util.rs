//! Small shared helpers: a fixed in-process hasher for the snapshot's maps,
//! MAC address formatting and address canonicalisation.

use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// FxHash (the rustc hasher): a multiply-rotate hash that is fast for the
/// small fixed-size keys of the snapshot's lookup maps. It is only used for
/// in-process tables; anything two processes must agree on (the scheduler)
/// uses the specified hash in `sched`.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8-byte chunk")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub type FxBuild = BuildHasherDefault<FxHasher>;
pub type FxMap<K, V> = hashbrown::HashMap<K, V, FxBuild>;
pub type FxSet<K> = hashbrown::HashSet<K, FxBuild>;

/// An address in the 16-byte form used by every table and by the XDP maps:
/// IPv6 as is, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
pub type Addr16 = [u8; 16];

pub fn addr16(ip: &IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Inverse of [`addr16`].
pub fn ip_from16(a: &Addr16) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Whether `a` (16-byte form) is a group address: IPv6 multicast
/// (ff00::/8), IPv4 multicast (224.0.0.0/4) or the IPv4 limited broadcast.
/// Such packets are never replies of a NAT'ed flow: IPv6 neighbour discovery
/// from a server, for one, goes to a solicited-node multicast address.
#[inline]
pub fn is_group(a: &Addr16) -> bool {
    if a[0] == 0xff {
        return true;
    }
    a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        && (a[12] & 0xf0 == 0xe0 || a[12..] == [0xff; 4])
}

/// IPv4 address bytes into the 16-byte form.
#[inline]
pub fn map_v4(b: [u8; 4]) -> Addr16 {
    // Built as one 128-bit value, so that it is written with one store: the
    // packet path reads it back as 64-bit words right away, and byte-wise
    // stores followed by a wide load stall store forwarding.
    ((u32::from_le_bytes(b) as u128) << 96 | 0xffff_u128 << 80).to_le_bytes()
}

/// The two 64-bit words of an address, as the in-process tables compare
/// and hash them (native byte order).
#[inline(always)]
pub fn addr_words(a: &Addr16) -> [u64; 2] {
    let x = u128::from_ne_bytes(*a);
    if cfg!(target_endian = "little") {
        [x as u64, (x >> 64) as u64]
    } else {
        [(x >> 64) as u64, x as u64]
    }
}

/// Multiplies two words to 128 bits and folds the halves together: the
/// mixing step of foldhash and ahash. Two words per multiply, and
/// independent pairs run in parallel.
#[inline(always)]
pub fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128).wrapping_mul(b as u128);
    (p as u64) ^ (p >> 64) as u64
}

/// A small read-only map from three-word keys to `u32`, built once per
/// snapshot: open addressing over a power-of-two array at most half full,
/// linear probing, one folded multiply per lookup. It replaces a general
/// hash map on the packet path (listener, backend and address lookups),
/// where hashing byte by byte and SIMD group probing cost more than the
/// whole lookup should. Keys must have a nonzero third word (it marks a
/// used entry).
#[derive(Debug, Clone)]
pub struct WordIndex {
    keys: Box<[[u64; 3]]>,
    values: Box<[u32]>,
    mask: usize,
    len: usize,
}

const INDEX_SEEDS: [u64; 2] = [0x243f_6a88_85a3_08d3, 0x1319_8a2e_0370_7344];

impl WordIndex {
    /// Builds the index; a key given twice keeps its first value.
    pub fn build(entries: &[([u64; 3], u32)]) -> Self {
        let n = (entries.len() * 2).max(8).next_power_of_two();
        let mut idx = WordIndex {
            keys: vec![[0; 3]; n].into_boxed_slice(),
            values: vec![0; n].into_boxed_slice(),
            mask: n - 1,
            len: 0,
        };
        for (k, v) in entries {
            assert!(k[2] != 0, "WordIndex keys have a nonzero third word");
            let mut i = idx.slot(k);
            loop {
                if idx.keys[i] == *k {
                    break;
                }
                if idx.keys[i][2] == 0 {
                    idx.keys[i] = *k;
                    idx.values[i] = *v;
                    idx.len += 1;
                    break;
                }
                i = (i + 1) & idx.mask;
            }
        }
        idx
    }

    #[inline(always)]
    fn slot(&self, k: &[u64; 3]) -> usize {
        let h = fold_mul(k[0] ^ INDEX_SEEDS[0], k[1] ^ k[2] ^ INDEX_SEEDS[1]);
        (h ^ (h >> 32)) as usize & self.mask
    }

    #[inline]
    pub fn get(&self, k: &[u64; 3]) -> Option<u32> {
        let mut i = self.slot(k);
        loop {
            let e = &self.keys[i];
            if ((e[0] ^ k[0]) | (e[1] ^ k[1]) | (e[2] ^ k[2])) == 0 {
                return Some(self.values[i]);
            }
            if e[2] == 0 {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

pub fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

pub type Mac = [u8; 6];

pub fn fmt_mac(m: &Mac) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut out = [0u8; 6];
    let mut n = 0;
    for part in s.split(':') {
        if n == 6 || part.len() != 2 {
            return None;
        }
        out[n] = u8::from_str_radix(part, 16).ok()?;
        n += 1;
    }
    (n == 6).then_some(out)
}

/// Starts loading the cache line holding `t` (a hint: never faults).
#[inline(always)]
pub fn prefetch<T>(t: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint; it never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch(t as *const T as *const i8, _MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = t;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_addresses_are_multicast_and_the_limited_broadcast() {
        let group = |s: &str| is_group(&addr16(&s.parse().unwrap()));
        for g in [
            "ff02::1:ff00:1",
            "ff05::2",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
        ] {
            assert!(group(g), "{g}");
        }
        for u in [
            "2001:2::1",
            "fe80::1",
            "198.18.0.1",
            "223.255.255.255",
            "240.0.0.1",
            "::1",
        ] {
            assert!(!group(u), "{u}");
        }
    }

    #[test]
    fn addr16_round_trips_both_families() {
        for ip in [v4(198, 18, 0, 1), "2001:2::1".parse().unwrap()] {
            assert_eq!(ip_from16(&addr16(&ip)), ip);
        }
        assert_eq!(map_v4([198, 18, 0, 1]), addr16(&v4(198, 18, 0, 1)));
    }

    #[test]
    fn word_index_finds_every_key_and_nothing_else() {
        let entries: Vec<([u64; 3], u32)> = (0..100u64)
            .map(|i| ([i * 7, i ^ 0x55, 1 + (i % 3)], i as u32))
            .collect();
        let idx = WordIndex::build(&entries);
        assert_eq!(idx.len(), 100);
        for (k, v) in &entries {
            assert_eq!(idx.get(k), Some(*v));
        }
        assert_eq!(idx.get(&[1, 2, 3]), None);
        assert_eq!(idx.get(&[0, 0x55, 2]), None, "same words, other third word");
        assert_eq!(WordIndex::build(&[]).get(&[1, 1, 1]), None);
    }

    #[test]
    fn mac_parse_and_format_round_trip() {
        let m = parse_mac("02:0a:ff:00:10:9c").unwrap();
        assert_eq!(m, [2, 10, 255, 0, 16, 156]);
        assert_eq!(fmt_mac(&m), "02:0a:ff:00:10:9c");
        assert_eq!(parse_mac("02:0a:ff:00:10"), None);
        assert_eq!(parse_mac("02:0a:ff:00:10:9c:00"), None);
        assert_eq!(parse_mac("zz:0a:ff:00:10:9c"), None);
    }
}
