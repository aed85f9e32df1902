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

/// IPv4 address bytes into the 16-byte form.
#[inline]
pub fn map_v4(b: [u8; 4]) -> Addr16 {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..].copy_from_slice(&b);
    a
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr16_round_trips_both_families() {
        for ip in [v4(198, 18, 0, 1), "2001:2::1".parse().unwrap()] {
            assert_eq!(ip_from16(&addr16(&ip)), ip);
        }
        assert_eq!(map_v4([198, 18, 0, 1]), addr16(&v4(198, 18, 0, 1)));
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
