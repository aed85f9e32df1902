//! Backend scheduling: weighted Maglev consistent hashing.
//!
//! Everything here is pure and deterministic: no clock, no I/O, no randomness,
//! and no process-seeded hashing (`std`'s `RandomState` is never used). The same
//! backend set and client address give the same backend on every process and
//! every machine, so several load-balancer instances (or a restarted one) agree
//! on where a client goes without sharing state.
//!
//! # Hash functions (specified; changing any of them re-shuffles clients)
//!
//! All hashing uses XXH3-64 (`xxhash_rust::xxh3::xxh3_64_with_seed`) with fixed
//! seeds, each the big-endian `u64` of an 8-byte ASCII tag:
//!
//! | use                     | input                                   | seed                                   |
//! |-------------------------|-----------------------------------------|----------------------------------------|
//! | client address          | 4 (IPv4) or 16 (IPv6) address bytes, network order | [`CLIENT_SEED`] = `b"l4lb-cli"` = `0x6c34_6c62_2d63_6c69` |
//! | Maglev permutation offset | 18-byte [`MaglevBackend::key`]       | [`maglev::OFFSET_SEED`] = `b"l4lb-off"` = `0x6c34_6c62_2d6f_6666` |
//! | Maglev permutation skip | 18-byte [`MaglevBackend::key`]          | [`maglev::SKIP_SEED`] = `b"l4lb-skp"` = `0x6c34_6c62_2d73_6b70` |
//!
//! The client hash is reduced to a table slot inside [`Maglev::lookup`] by a
//! multiply-shift (`(hash * size) >> 64` in 128-bit arithmetic), see there.

pub mod maglev;

pub use maglev::{Maglev, MaglevBackend, DEFAULT_TABLE_SIZE};

use std::net::IpAddr;

/// Seed of [`client_hash`]: the big-endian `u64` of the ASCII bytes `"l4lb-cli"`,
/// i.e. `0x6c34_6c62_2d63_6c69`.
pub const CLIENT_SEED: u64 = u64::from_be_bytes(*b"l4lb-cli");

/// Fixed, specified hash of a client's source address for backend selection:
/// `xxh3_64_with_seed(bytes, CLIENT_SEED)` over the address bytes in network
/// order — 4 bytes for IPv4, 16 bytes for IPv6.
///
/// The address is hashed as given: an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d` in an `IpAddr::V6`) hashes its 16 bytes and therefore
/// differs from `IpAddr::V4(a.b.c.d)`, exactly as the data plane sees the two
/// on the wire (IPv6 packet vs IPv4 packet).
#[inline]
pub fn client_hash(addr: &IpAddr) -> u64 {
    match addr {
        IpAddr::V4(a) => client_hash_bytes(&a.octets()),
        IpAddr::V6(a) => client_hash_bytes(&a.octets()),
    }
}

/// [`client_hash`] from raw address bytes already in network order (as found
/// in the packet header): pass 4 bytes for IPv4 and 16 for IPv6. Equal to
/// `client_hash` for the same address. Any other length is hashed as-is.
#[inline]
pub fn client_hash_bytes(addr: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(addr, CLIENT_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn client_hash_bytes_matches_client_hash() {
        for v4 in [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(10, 1, 2, 3),
            Ipv4Addr::new(192, 168, 100, 7),
            Ipv4Addr::new(255, 255, 255, 255),
        ] {
            assert_eq!(
                client_hash(&IpAddr::V4(v4)),
                client_hash_bytes(&v4.octets()),
                "{v4}"
            );
            assert_eq!(
                client_hash(&IpAddr::V4(v4)),
                client_hash_bytes(&u32::from(v4).to_be_bytes()),
                "{v4}"
            );
        }
        for v6 in [
            Ipv6Addr::UNSPECIFIED,
            "2001:db8::1".parse::<Ipv6Addr>().unwrap(),
            "fd00:1:2:3:4:5:6:7".parse::<Ipv6Addr>().unwrap(),
            "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap(),
        ] {
            assert_eq!(
                client_hash(&IpAddr::V6(v6)),
                client_hash_bytes(&v6.octets()),
                "{v6}"
            );
            assert_eq!(
                client_hash(&IpAddr::V6(v6)),
                client_hash_bytes(&u128::from(v6).to_be_bytes()),
                "{v6}"
            );
        }
    }

    #[test]
    fn client_hash_is_xxh3_64_with_the_documented_seed() {
        assert_eq!(CLIENT_SEED, 0x6c34_6c62_2d63_6c69);
        let a = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(
            client_hash(&IpAddr::V4(a)),
            xxhash_rust::xxh3::xxh3_64_with_seed(&[10, 0, 0, 1], 0x6c34_6c62_2d63_6c69)
        );
    }

    #[test]
    fn ipv4_and_ipv4_mapped_ipv6_hash_differently() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        assert_ne!(client_hash(&v4), client_hash(&mapped));
    }
}
