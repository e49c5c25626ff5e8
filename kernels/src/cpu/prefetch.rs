//! Software prefetch for the matrix-vector kernels.
//!
//! A decoded token reads every weight once, so the kernels stream their bytes. The
//! hardware prefetchers alone do not keep a quantized kernel fed: measured on this
//! project's Xeon (AVX-512) with a 94 MB Q4/g32 matrix, the AVX-512 dense kernel read
//! 2.37 GB/s without software prefetch and 5.33 GB/s with it, the same as when the
//! matrix sits in cache (SmolLM2 decode went from 28 to 55 tokens/s on one thread).
//! Each row walk therefore asks, at the start of a row, for the bytes of its streams
//! [`AHEAD`] bytes further on. A prefetch is a hint: it never faults, whatever the
//! address, and changes no result.

use super::{BitmaskRef, CsrRef, TwoFourRef, csr_blocks};

/// How far ahead of the bytes a row reads the kernels ask for a stream's bytes.
/// Measured on the kernel benchmark's 94 MB Q4/g32 matrix: 1 KiB already reaches the
/// in-cache speed; 2 KiB leaves room for slower memory.
pub(crate) const AHEAD: usize = 2048;

/// Cache line size assumed (64 bytes on every x86-64 and on the ARM cores cap
/// targets; a larger line only means some hints are redundant).
const LINE: usize = 64;

/// Asks for the cache lines of `bytes[from..from + len]`, clipped to `bytes`.
#[inline(always)]
pub(crate) fn range(bytes: &[u8], from: usize, len: usize) {
    let end = from.saturating_add(len).min(bytes.len());
    let mut o = from;
    while o < end {
        line(bytes.as_ptr().wrapping_add(o));
        o += LINE;
    }
}

/// Asks for the bytes `AHEAD` past the stretch `from..from + len` of `bytes` (a
/// row's part of a stream).
#[inline(always)]
pub(crate) fn ahead(bytes: &[u8], from: usize, len: usize) {
    range(bytes, from.saturating_add(AHEAD), len);
}

/// Bitmask row `r`: its mask bytes and its values (of `bs` bytes per value, or per
/// block for quantized values starting at byte `vbyte`).
#[inline(always)]
pub(crate) fn bitmask_row(m: &BitmaskRef<'_>, r: usize, vbyte: usize, vlen: usize) {
    let mb = m.cols.div_ceil(8);
    ahead(m.mask, r * m.cols / 8, mb + 1);
    ahead(m.values.bytes, vbyte, vlen);
}

/// Block-CSR row `r`: its column indices (from entry `first`, `count` of them) and its
/// values (`vbyte`, `vlen` as in [`bitmask_row`]).
#[inline(always)]
pub(crate) fn csr_row(
    m: &CsrRef<'_>,
    r: usize,
    first: usize,
    count: usize,
    vbyte: usize,
    vlen: usize,
) {
    let nb = csr_blocks(m.cols);
    ahead(m.block_ptr, 4 * r * nb, 4 * nb);
    ahead(m.col_idx, first, count);
    ahead(m.values.bytes, vbyte, vlen);
}

/// 2:4 row `first / groups`: its meta nibbles and values (`ds` bytes per value).
#[inline(always)]
pub(crate) fn two_four_row(m: &TwoFourRef<'_>, first: usize, groups: usize, ds: usize) {
    ahead(m.meta, first / 2, groups.div_ceil(2));
    ahead(m.values.bytes, 2 * first * ds, 2 * groups * ds);
}

/// Asks for the cache line holding `p` (never dereferenced).
#[inline(always)]
fn line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is a hint: it never faults and reads or writes nothing
    // architecturally visible, whatever the address (SSE, part of x86-64's baseline).
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `prfm` is a hint: it never faults, whatever the address, and touches no
    // register or memory the program can see; the asm uses no stack.
    unsafe {
        core::arch::asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}
