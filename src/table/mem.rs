//! Zero-filled, huge-page-backed arrays for the shared tables.
//!
//! A flow table of a million slots spans 72 MiB: on 4 KiB pages every
//! lookup also misses the TLB and walks the page tables, which costs about
//! as much as the cache miss itself. The tables are therefore mapped
//! directly (anonymous `mmap`, which the kernel zero-fills) and marked
//! `MADV_HUGEPAGE` before first touch, so that transparent huge pages
//! (2 MiB) back them when the system allows it (`enabled` = `always` or
//! `madvise`). When it does not, this is an ordinary zeroed mapping.

use std::ptr::NonNull;

/// Types for which all-zero bytes are a valid value (atomics, integers and
/// arrays or structs of them).
///
/// # Safety
/// The all-zero bit pattern must be a valid, initialised `Self`.
pub unsafe trait Zeroable: Sync {}

/// A fixed-length array of `T`, zero-initialised, in its own mapping.
pub struct ZeroedArray<T: Zeroable> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
}

// SAFETY: the array owns its mapping; `T: Sync` (from `Zeroable`) makes
// shared access from several threads sound, and moving the owner moves
// nothing but the pointer.
unsafe impl<T: Zeroable> Send for ZeroedArray<T> {}
// SAFETY: as above.
unsafe impl<T: Zeroable> Sync for ZeroedArray<T> {}

const HUGE_PAGE: usize = 2 << 20;

impl<T: Zeroable> ZeroedArray<T> {
    /// Maps `len` zeroed elements. Panics if the system refuses the memory
    /// (as any allocation failure does).
    pub fn new(len: usize) -> Self {
        let size = std::mem::size_of::<T>()
            .checked_mul(len.max(1))
            .expect("table size overflows");
        assert!(
            std::mem::align_of::<T>() <= 4096,
            "mappings are only page-aligned"
        );
        // Whole huge pages, so that the last one can be huge too.
        let bytes = size.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            panic!(
                "cannot map {bytes} bytes for a table: {}",
                std::io::Error::last_os_error()
            );
        }
        // A hint: failure (no THP in this kernel) leaves 4 KiB pages.
        // SAFETY: `p` is the start of a mapping of `bytes` bytes we own.
        unsafe {
            libc::madvise(p, bytes, libc::MADV_HUGEPAGE);
        }
        ZeroedArray {
            ptr: NonNull::new(p.cast::<T>()).expect("mmap returned null"),
            len,
            bytes,
        }
    }

    /// Bytes mapped (the array rounded up to whole 2 MiB pages).
    pub fn mapped_bytes(&self) -> usize {
        self.bytes
    }
}

impl<T: Zeroable> std::ops::Deref for ZeroedArray<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: the mapping holds `len` zero-filled `T`s, which are valid
        // by `Zeroable`, and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> Drop for ZeroedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference
        // into it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    // SAFETY: an atomic integer is valid when zero.
    unsafe impl Zeroable for AtomicU64 {}

    #[test]
    fn array_is_zeroed_writable_and_sized() {
        let a: ZeroedArray<AtomicU64> = ZeroedArray::new(300_000);
        assert_eq!(a.len(), 300_000);
        assert!(a.iter().all(|x| x.load(Ordering::Relaxed) == 0));
        a[299_999].store(7, Ordering::Relaxed);
        assert_eq!(a[299_999].load(Ordering::Relaxed), 7);
        assert_eq!(
            a.mapped_bytes(),
            4 << 20,
            "2.4 MB rounds up to two huge pages"
        );
    }
}
