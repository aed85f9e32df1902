//! Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! NAT changes a few 16-bit words of the IP and L4 headers (addresses, ports,
//! TTL). Recomputing the L4 checksum would read the whole payload; RFC 1624
//! §3 eqn. 3 updates it from the old and new values of the changed words:
//!
//! ```text
//! HC' = ~(~HC + ~m + m')
//! ```
//!
//! in one's complement arithmetic. Eqn. 3 (rather than eqn. 2 of RFC 1141)
//! never produces the -0 (0x0000) result for a non-zero sum.

/// Folds a 32-bit one's complement accumulator to 16 bits.
#[inline]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's complement sum of big-endian 16-bit words of `bytes` (an odd last
/// byte is padded with zero), added to `acc`.
#[inline]
fn sum_words(bytes: &[u8], mut acc: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

/// What changing one 16-bit word from `old` to `new` adds to the sum of
/// RFC 1624 eqn. 3: `~m + m'`. Deltas of several changed words add up
/// (one's complement addition is order-free), so a rewrite that changes an
/// address, a port and the TTL sums their deltas and folds once.
#[cfg(test)]
#[inline(always)]
pub fn delta16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// [`delta16`] over every word of a field replaced whole (an address):
/// `old` and `new` are its bytes before and after, in network order.
#[cfg(test)]
#[inline(always)]
pub fn delta<const N: usize>(old: &[u8; N], new: &[u8; N]) -> u32 {
    const { assert!(N % 2 == 0, "fields are whole 16-bit words") };
    let mut acc = 0;
    for i in (0..N).step_by(2) {
        acc += delta16(
            u16::from_be_bytes([old[i], old[i + 1]]),
            u16::from_be_bytes([new[i], new[i + 1]]),
        );
    }
    acc
}

/// Updates checksum `hc` (as stored in the header) by the summed deltas of
/// the words that changed.
#[cfg(test)]
#[inline(always)]
pub fn update(hc: u16, delta: u32) -> u16 {
    !fold((!hc) as u32 + delta)
}

/// A 32-bit one's complement accumulator in native byte order (Linux's
/// `__wsum`), for the NAT rewrite's hot path.
///
/// One's complement sums do not depend on byte order (RFC 1071 §2(B)):
/// summing byte-swapped words gives the byte-swapped sum. So the rewrite
/// reads each field as it lies in memory (`from_ne_bytes`), adds whole
/// 32-bit words with an end-around carry, and writes the folded result back
/// the same way: no byte swaps, and an address is one addition instead of
/// two 16-bit ones. A 32-bit word stands for the sum of its two halves
/// (2^16 ≡ 1 modulo 0xffff), so `!x` stands for `-x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wsum(u32);

impl Wsum {
    /// Nothing added yet: the start of a delta.
    pub const ZERO: Wsum = Wsum(0);

    /// An IPv4 TTL decremented by one. The TTL is the high byte of its
    /// 16-bit word (network order), so the word drops by exactly 0x0100.
    pub const TTL_DECREMENT: Wsum = Wsum(!(u16::from_ne_bytes(0x0100_u16.to_be_bytes()) as u32));

    /// Overwrites an address `field` (whole 32-bit words) with `new` and
    /// returns the delta of the change.
    #[inline(always)]
    pub fn replace_field<const N: usize>(field: &mut [u8; N], new: &[u8; N]) -> Wsum {
        const { assert!(N % 4 == 0, "fields are whole 32-bit words") };
        let word = |a: &[u8; N], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        let mut d = Wsum::ZERO;
        for i in (0..N).step_by(4) {
            d = d.replace(word(field, i), word(new, i));
        }
        *field = *new;
        d
    }

    /// The accumulator of RFC 1624 eqn. 3 for the checksum field `hc` (as
    /// read in native order): `~HC`.
    #[inline(always)]
    pub fn of_checksum(hc: u16) -> Wsum {
        Wsum(!(hc as u32))
    }

    /// Adds `x` (any 32-bit word, or a 16-bit one zero-extended), with the
    /// carry out of bit 31 added back in.
    #[inline(always)]
    pub fn plus(self, x: u32) -> Wsum {
        let (s, carry) = self.0.overflowing_add(x);
        Wsum(s + carry as u32)
    }

    /// Accounts for a 32-bit field (or a zero-extended 16-bit one) changing
    /// from `old` to `new`: `+ ~m + m'`.
    #[inline(always)]
    pub fn replace(self, old: u32, new: u32) -> Wsum {
        self.plus(!old).plus(new)
    }

    /// Adds another accumulator (a delta summed once, applied to two
    /// checksums).
    #[inline(always)]
    pub fn merge(self, other: Wsum) -> Wsum {
        self.plus(other.0)
    }

    /// The checksum field to store (native order): the sum folded to 16
    /// bits with end-around carry, complemented. It is 0xffff only if
    /// every word added was zero, which an accumulator started by
    /// [`Wsum::of_checksum`] never is (as RFC 1624 eqn. 3, it never
    /// yields the -0 form for a non-zero sum).
    #[inline(always)]
    pub fn checksum(self) -> u16 {
        // The high half of x + rotate(x, 16) is hi + lo with the carry out
        // of the low half added back.
        !(self.0.wrapping_add(self.0.rotate_right(16)) >> 16) as u16
    }

    /// Applies this delta to the checksum stored in `field` (an IPv4
    /// header's, or a TCP or ICMP one).
    #[inline(always)]
    pub fn update(self, field: &mut [u8; 2]) {
        *field = Wsum::of_checksum(u16::from_ne_bytes(*field))
            .merge(self)
            .checksum()
            .to_ne_bytes();
    }

    /// Applies this delta to a TCP or UDP checksum `field`. For UDP a
    /// computed zero is sent as all ones (RFC 768, RFC 8200 §8.1), and with
    /// `zero_is_none` (IPv4) a zero checksum means "none" and stays zero.
    #[inline(always)]
    pub fn update_l4(self, field: &mut [u8; 2], udp: bool, zero_is_none: bool) {
        let old = u16::from_ne_bytes(*field);
        if zero_is_none && udp && old == 0 {
            return;
        }
        let mut sum = Wsum::of_checksum(old).merge(self).checksum();
        if udp && sum == 0 {
            sum = 0xffff;
        }
        *field = sum.to_ne_bytes();
    }
}

/// Full RFC 1071 checksum of `bytes`: the reference the incremental update is
/// tested against, and what the replay tool uses to verify output frames.
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum_words(bytes, 0))
}

/// Full L4 checksum (TCP or UDP) over the pseudo-header and `segment` (the L4
/// header with its checksum field zeroed, plus payload). `src`/`dst` are 4
/// bytes (IPv4, RFC 793 §3.1) or 16 bytes (IPv6, RFC 8200 §8.1).
pub fn l4_checksum(src: &[u8], dst: &[u8], proto: u8, segment: &[u8]) -> u16 {
    let mut acc = sum_words(src, 0);
    acc = sum_words(dst, acc);
    acc += proto as u32;
    let len = segment.len() as u32;
    acc += (len >> 16) + (len & 0xffff);
    acc = sum_words(segment, acc);
    !fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example_sum() {
        // RFC 1071 §3 example: words 0001 f203 f4f5 f6f7 sum to ddf2 (before
        // complement).
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&bytes), !0xddf2);
    }

    #[test]
    fn incremental_update_equals_full_recompute() {
        // Deterministic pseudo-random headers: change a 4-byte field and a
        // 2-byte field, compare against recomputation.
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..10_000 {
            let mut hdr = [0u8; 40];
            for b in hdr.iter_mut() {
                *b = next() as u8;
            }
            hdr[10] = 0;
            hdr[11] = 0;
            let c = checksum(&hdr);
            hdr[10..12].copy_from_slice(&c.to_be_bytes());
            assert_eq!(checksum(&hdr), 0, "a correct header sums to zero");

            let old_addr: [u8; 4] = hdr[16..20].try_into().unwrap();
            let new_addr = (next() as u32).to_be_bytes();
            let old_port = u16::from_be_bytes([hdr[22], hdr[23]]);
            let new_port = next() as u16;
            hdr[16..20].copy_from_slice(&new_addr);
            hdr[22..24].copy_from_slice(&new_port.to_be_bytes());
            let inc = update(c, delta(&old_addr, &new_addr) + delta16(old_port, new_port));
            // The native-order accumulator of the NAT rewrite agrees.
            let ne32 = |b: [u8; 4]| u32::from_ne_bytes(b);
            let ne16 = |v: u16| u16::from_ne_bytes(v.to_be_bytes()) as u32;
            let wsum = Wsum::of_checksum(ne16(c) as u16)
                .replace(ne32(old_addr), ne32(new_addr))
                .replace(ne16(old_port), ne16(new_port))
                .checksum();
            assert_eq!(u16::from_ne_bytes(inc.to_be_bytes()), wsum);

            hdr[10] = 0;
            hdr[11] = 0;
            let full = checksum(&hdr);
            // One's complement has two zeros; RFC 1624 eqn. 3 and RFC 1071
            // agree except that either may be the other's +0/-0 form.
            assert!(
                inc == full || (inc == 0xffff && full == 0) || (inc == 0 && full == 0xffff),
                "incremental {inc:#06x} != full {full:#06x}"
            );
        }
    }
}
