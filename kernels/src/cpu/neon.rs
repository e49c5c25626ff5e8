//! aarch64 Advanced SIMD (NEON) kernels, 4 `f32` lanes, values handled 8 at a time.
//!
//! NEON is part of the aarch64 baseline, so no detection is needed. Every kernel
//! multiplies and accumulates in `f32` (`vfmaq_f32`). The boards' optional `fp16`
//! arithmetic is deliberately unused: it would accumulate in f16 and break the
//! perplexity tolerance; `dotprod` multiplies int8 by int8, and the quantized (Q8, Q4)
//! kernels keep activations in `f32` (see their section below). Both are only reported
//! by [`features`].
//!
//! f16 ↔ f32 conversion uses `fcvtl`/`fcvtn` through `asm!`: they are base Armv8
//! instructions (no FEAT_FP16), exact, but stable Rust has no `float16x4_t` to reach
//! them through intrinsics. Sparse kernels permute with `tbl` (an out-of-range index
//! gives 0, which zeroes unset lanes for free); block-CSR picks `x` with clamped scalar
//! loads (NEON has no gather). Vector loads read through raw pointers into slices
//! whose lengths were checked just before; rare tails (end of a row or of the values)
//! run out of line through zero-padded stack buffers, so the hot loops keep their
//! accumulators in registers.

use core::arch::aarch64::*;
use core::arch::asm;

use super::prefetch;
use super::simd::{self, BF16, F16, F32, bitmask_count, csr_count, f32_bytes, size};
use super::{
    BitmaskRef, CsrRef, DType, Isa, Kernels, TwoFourRef, Values, bits_at, csr_blocks, low_bits,
    scalar, u32_at,
};

/// The NEON table.
pub(super) const KERNELS: Kernels = Kernels {
    isa: Isa::Neon,
    dense_rows: entry::dense_rows,
    dense_t_rows: entry::dense_t_rows,
    bitmask_rows: entry::bitmask_rows,
    csr_rows: entry::csr_rows,
    two_four_rows: entry::two_four_rows,
    to_f32: entry::to_f32,
    from_f32: entry::from_f32,
};

/// Plain `fn` wrappers for the table (function pointers cannot point at
/// `#[target_feature]` functions directly).
mod entry {
    use super::*;

    macro_rules! entries {
        ($($name:ident($($a:ident: $t:ty),*);)*) => {$(
            pub(super) fn $name($($a: $t),*) {
                // SAFETY: this module is compiled only when `neon` is a compile-time
                // target feature, so every CPU running this code has it.
                unsafe { super::$name($($a),*) }
            }
        )*};
    }

    entries! {
        dense_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]);
        dense_t_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]);
        bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]);
        csr_rows(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]);
        two_four_rows(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]);
        to_f32(v: Values<'_>, start: usize, out: &mut [f32]);
        from_f32(x: &[f32], dtype: DType, out: &mut [u8]);
    }
}

/// The features of interest: `neon` always; `fp16` and `dotprod` when present, for
/// reports only (see the module comment for why the kernels do not use them).
pub(super) fn features() -> alloc::vec::Vec<&'static str> {
    let mut v = alloc::vec!["neon"];
    #[cfg(feature = "std")]
    let (fp16, dotprod) = (
        std::arch::is_aarch64_feature_detected!("fp16"),
        std::arch::is_aarch64_feature_detected!("dotprod"),
    );
    #[cfg(not(feature = "std"))]
    let (fp16, dotprod) = (
        cfg!(target_feature = "fp16"),
        cfg!(target_feature = "dotprod"),
    );
    if fp16 {
        v.push("fp16");
    }
    if dotprod {
        v.push("dotprod");
    }
    v
}

/// Two vectors of 4 floats: 8 values.
type F32x8 = (float32x4_t, float32x4_t);

/// 8 f16 → 8 f32, exactly.
#[inline]
#[target_feature(enable = "neon")]
fn f16x8_to_f32(h: uint16x8_t) -> F32x8 {
    let lo: float32x4_t;
    let hi: float32x4_t;
    // SAFETY: fcvtl/fcvtl2 are base Armv8 Advanced SIMD instructions that only read
    // and write the named vector registers (`out` never shares a register with `h`).
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) h,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    (lo, hi)
}

/// 8 f32 → 8 f16, rounding to nearest even (the FPCR default mode).
#[inline]
#[target_feature(enable = "neon")]
fn f32x8_to_f16(a: float32x4_t, b: float32x4_t) -> uint16x8_t {
    let h: uint16x8_t;
    // SAFETY: fcvtn/fcvtn2 are base Armv8 Advanced SIMD instructions that only read
    // and write the named vector registers (`out` never shares a register with inputs).
    unsafe {
        asm!(
            "fcvtn {h:v}.4h, {a:v}.4s",
            "fcvtn2 {h:v}.8h, {b:v}.4s",
            a = in(vreg) a,
            b = in(vreg) b,
            h = out(vreg) h,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    h
}

/// 8 values of storage `D` at `p` as `f32`.
///
/// # Safety
/// `p .. p + 8·size(D)` must be readable (no alignment needed: byte loads).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load8<const D: u8>(p: *const u8) -> F32x8 {
    // SAFETY: the caller guarantees 8 values are readable at `p`; u8 loads need no
    // alignment.
    unsafe {
        match D {
            F32 => (
                vreinterpretq_f32_u8(vld1q_u8(p)),
                vreinterpretq_f32_u8(vld1q_u8(p.add(16))),
            ),
            F16 => f16x8_to_f32(vreinterpretq_u16_u8(vld1q_u8(p))),
            _ => {
                let h = vreinterpretq_u16_u8(vld1q_u8(p));
                (
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
                )
            }
        }
    }
}

/// Up to 8 values of storage `D` (`b.len()/size(D)` of them), the rest 0.
#[inline]
#[target_feature(enable = "neon")]
fn load8_partial<const D: u8>(b: &[u8]) -> F32x8 {
    let mut buf = [0u8; 32];
    let n = b.len().min(8 * size(D));
    buf[..n].copy_from_slice(&b[..n]);
    // SAFETY: `buf` holds 32 bytes, the most 8 values of any storage take.
    unsafe { load8::<D>(buf.as_ptr()) }
}

/// 8 floats from `x[i..i+8]`.
#[inline]
#[target_feature(enable = "neon")]
fn loadx(x: &[f32], i: usize) -> F32x8 {
    let s = &x[i..i + 8];
    // SAFETY: `s` has exactly 8 elements.
    unsafe { (vld1q_f32(s.as_ptr()), vld1q_f32(s.as_ptr().add(4))) }
}

/// Up to 8 floats of `x`, the rest 0.
#[inline]
#[target_feature(enable = "neon")]
fn loadx_partial(x: &[f32]) -> F32x8 {
    let mut buf = [0f32; 8];
    let n = x.len().min(8);
    buf[..n].copy_from_slice(&x[..n]);
    loadx(&buf, 0)
}

/// Stores the first `min(8, y.len())` of `v` into `y`.
#[inline]
#[target_feature(enable = "neon")]
fn store_partial(y: &mut [f32], v: F32x8) {
    let mut buf = [0f32; 8];
    // SAFETY: `buf` holds 8 floats.
    unsafe {
        vst1q_f32(buf.as_mut_ptr(), v.0);
        vst1q_f32(buf.as_mut_ptr().add(4), v.1);
    }
    let n = y.len().min(8);
    y[..n].copy_from_slice(&buf[..n]);
}

#[target_feature(enable = "neon")]
fn dense_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    if let Some(g) = simd::q4_split_group(w.dtype, cols) {
        return q4_split_rows(w, g, cols, r0, x, y);
    }
    by_dtype!(
        w.dtype,
        dense_rows_d(w.bytes, cols, r0, x, y),
        by_q4!(w.dtype, q_dense_rows(w, cols, r0, x, y))
    )
}

#[target_feature(enable = "neon")]
fn dense_rows_d<const D: u8>(w: &[u8], cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    simd::dense_rows::<D>(w, cols, r0, x, y, |row, x| dot::<D>(row, x))
}

/// `row · x` for one row of `x.len()` values of storage `D`.
#[inline]
#[target_feature(enable = "neon")]
fn dot<const D: u8>(row: &[u8], x: &[f32]) -> f32 {
    let ds = size(D);
    let n = x.len();
    assert_eq!(row.len(), n * ds);
    let p = row.as_ptr();
    // Four independent accumulators hide the FMA latency.
    let mut a0 = vdupq_n_f32(0.0);
    let mut a1 = vdupq_n_f32(0.0);
    let mut a2 = vdupq_n_f32(0.0);
    let mut a3 = vdupq_n_f32(0.0);
    let mut c = 0;
    while c + 16 <= n {
        // SAFETY: c + 16 <= n and `row` holds n values.
        let (w0, w1) = unsafe { (load8::<D>(p.add(c * ds)), load8::<D>(p.add((c + 8) * ds))) };
        let (x0, x1) = (loadx(x, c), loadx(x, c + 8));
        a0 = vfmaq_f32(a0, w0.0, x0.0);
        a1 = vfmaq_f32(a1, w0.1, x0.1);
        a2 = vfmaq_f32(a2, w1.0, x1.0);
        a3 = vfmaq_f32(a3, w1.1, x1.1);
        c += 16;
    }
    while c + 8 <= n {
        // SAFETY: c + 8 <= n and `row` holds n values.
        let w0 = unsafe { load8::<D>(p.add(c * ds)) };
        let x0 = loadx(x, c);
        a0 = vfmaq_f32(a0, w0.0, x0.0);
        a1 = vfmaq_f32(a1, w0.1, x0.1);
        c += 8;
    }
    if c < n {
        let w0 = load8_partial::<D>(&row[c * ds..]);
        let x0 = loadx_partial(&x[c..]);
        a2 = vfmaq_f32(a2, w0.0, x0.0);
        a3 = vfmaq_f32(a3, w0.1, x0.1);
    }
    vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)))
}

#[target_feature(enable = "neon")]
fn dense_t_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        w.dtype,
        dense_t_rows_d(w.bytes, cols, r0, x, y),
        (scalar::KERNELS.dense_t_rows)(w, cols, r0, x, y)
    )
}

#[target_feature(enable = "neon")]
fn dense_t_rows_d<const D: u8>(w: &[u8], cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(y.len(), cols, "y.len() != cols");
    let ds = size(D);
    let block = super::scalar::dense_block(w, ds, cols, r0, x.len());
    if cols == 0 {
        return;
    }
    let rb = cols * ds;
    // Four rows per pass, so each chunk of `y` is loaded and stored once per four rows.
    let mut quads = block.chunks_exact(4 * rb);
    let mut xq = x.chunks_exact(4);
    for (q, xs) in (&mut quads).zip(&mut xq) {
        let rows = [&q[..rb], &q[rb..2 * rb], &q[2 * rb..3 * rb], &q[3 * rb..]];
        let mut c = 0;
        while c + 8 <= cols {
            let (mut lo, mut hi) = loadx(y, c);
            for (row, &xi) in rows.iter().zip(xs) {
                // SAFETY: c + 8 <= cols and each row slice holds `cols` values.
                let w = unsafe { load8::<D>(row.as_ptr().add(c * ds)) };
                lo = vfmaq_n_f32(lo, w.0, xi);
                hi = vfmaq_n_f32(hi, w.1, xi);
            }
            store8(&mut y[c..c + 8], (lo, hi));
            c += 8;
        }
        if c < cols {
            let (mut lo, mut hi) = loadx_partial(&y[c..]);
            for (row, &xi) in rows.iter().zip(xs) {
                let w = load8_partial::<D>(&row[c * ds..]);
                lo = vfmaq_n_f32(lo, w.0, xi);
                hi = vfmaq_n_f32(hi, w.1, xi);
            }
            store_partial(&mut y[c..], (lo, hi));
        }
    }
    for (row, &xi) in quads.remainder().chunks_exact(rb).zip(xq.remainder()) {
        let mut c = 0;
        while c + 8 <= cols {
            let (lo, hi) = loadx(y, c);
            // SAFETY: c + 8 <= cols and `row` holds `cols` values.
            let w = unsafe { load8::<D>(row.as_ptr().add(c * ds)) };
            store8(
                &mut y[c..c + 8],
                (vfmaq_n_f32(lo, w.0, xi), vfmaq_n_f32(hi, w.1, xi)),
            );
            c += 8;
        }
        if c < cols {
            let (lo, hi) = loadx_partial(&y[c..]);
            let w = load8_partial::<D>(&row[c * ds..]);
            store_partial(
                &mut y[c..],
                (vfmaq_n_f32(lo, w.0, xi), vfmaq_n_f32(hi, w.1, xi)),
            );
        }
    }
}

/// Stores 8 floats into `y[..8]`.
#[inline]
#[target_feature(enable = "neon")]
fn store8(y: &mut [f32], v: F32x8) {
    let y = &mut y[..8];
    // SAFETY: `y` has 8 elements.
    unsafe {
        vst1q_f32(y.as_mut_ptr(), v.0);
        vst1q_f32(y.as_mut_ptr().add(4), v.1);
    }
}

/// A 16-byte aligned table row, so one aligned vector load reads it.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Bytes32([u8; 32]);

/// For a mask byte `m`: `tbl` byte indices that move packed `f32` value `j` (bytes
/// `4j..4j+4` of 8 loaded values) to the lane of the `j`-th set bit; 0xff (→ 0) for
/// unset lanes.
static EXPAND: [Bytes32; 256] = {
    let mut t = [Bytes32([0xff; 32]); 256];
    let mut m = 0;
    while m < 256 {
        let mut l = 0;
        while l < 8 {
            if m & (1 << l) != 0 {
                let j = ((m & ((1 << l) - 1)) as u32).count_ones() as u8;
                let mut b = 0;
                while b < 4 {
                    t[m].0[4 * l + b] = 4 * j + b as u8;
                    b += 1;
                }
            }
            l += 1;
        }
        m += 1;
    }
    t
};

/// Lane masks for the 8 bits of a mask byte.
const BITSEL: [u32; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Two accumulators of 8 lanes.
type Acc2 = (F32x8, F32x8);

/// Sum of all lanes of two accumulators.
#[inline]
#[target_feature(enable = "neon")]
fn hsum2(a: Acc2) -> f32 {
    let s = vaddq_f32(vaddq_f32(a.0.0, a.0.1), vaddq_f32(a.1.0, a.1.1));
    vaddvq_f32(s)
}

#[target_feature(enable = "neon")]
fn bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        m.values.dtype,
        bitmask_rows_d(m, r0, x, y),
        q_bitmask_rows(m, r0, x, y)
    )
}

#[target_feature(enable = "neon")]
fn bitmask_rows_d<const D: u8>(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    let ds = size(D);
    let vals = m.values.bytes;
    let zero = vdupq_n_f32(0.0);
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let mut k = m.row_start[r] as usize;
        prefetch::bitmask_row(m, r, k * ds, bitmask_count(m, r) * ds);
        let mut acc = ((zero, zero), (zero, zero));
        let mut c = 0;
        while c + 64 <= cols {
            let bits = bits_at(m.mask, r * cols + c);
            let cnt = bits.count_ones() as usize;
            // The word's last 8-value load may reach 8 values past its own; near the
            // end of the values the padded path below takes over.
            if (k + cnt + 8) * ds > vals.len() {
                break;
            }
            if bits != 0 {
                let xs: &[f32; 64] = x[c..c + 64].try_into().unwrap();
                acc = bitmask_word::<D>(bits, vals, k, xs, acc);
            }
            k += cnt;
            c += 64;
        }
        if c < cols {
            acc = bitmask_tail::<D>(m, r, c, k, x, acc);
        }
        *yi += hsum2(acc);
    }
}

/// Expands 8 values loaded for mask byte `b` into its column lanes (zero elsewhere)
/// and multiplies-accumulates with `x`'s 8 columns, zeroed at unset lanes too so a
/// non-finite activation at a pruned position is skipped as in the scalar loop.
#[inline]
#[target_feature(enable = "neon")]
fn expand_fma(acc: F32x8, b: u8, v: F32x8, xv: F32x8) -> F32x8 {
    let t = &EXPAND[usize::from(b)].0;
    // SAFETY: each table row holds 32 bytes and BITSEL 8 u32.
    let (i0, i1, s0, s1) = unsafe {
        (
            vld1q_u8(t.as_ptr()),
            vld1q_u8(t.as_ptr().add(16)),
            vld1q_u32(BITSEL.as_ptr()),
            vld1q_u32(BITSEL.as_ptr().add(4)),
        )
    };
    let tab = uint8x16x2_t(vreinterpretq_u8_f32(v.0), vreinterpretq_u8_f32(v.1));
    let w0 = vreinterpretq_f32_u8(vqtbl2q_u8(tab, i0));
    let w1 = vreinterpretq_f32_u8(vqtbl2q_u8(tab, i1));
    let bb = vdupq_n_u32(u32::from(b));
    let x0 = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(xv.0), vtstq_u32(bb, s0)));
    let x1 = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(xv.1), vtstq_u32(bb, s1)));
    (vfmaq_f32(acc.0, w0, x0), vfmaq_f32(acc.1, w1, x1))
}

/// Multiply-accumulates one 64-column mask word: the packed values from index `k` of
/// `vals` expanded to the set bits of `bits`, times `xs`.
#[inline]
#[target_feature(enable = "neon")]
fn bitmask_word<const D: u8>(
    bits: u64,
    vals: &[u8],
    mut k: usize,
    xs: &[f32; 64],
    mut acc: Acc2,
) -> Acc2 {
    let ds = size(D);
    // Each byte loads 8 values at its first value's index: the last load ends at most
    // 8 values past the word's own.
    assert!((k + bits.count_ones() as usize + 8) * ds <= vals.len());
    for j in 0..4 {
        let b0 = (bits >> (16 * j)) as u8;
        let b1 = (bits >> (16 * j + 8)) as u8;
        let k1 = k + b0.count_ones() as usize;
        // SAFETY: k ≤ k1 ≤ k + popcount(bits) and the assert above bounds 8 values from
        // there by vals.len().
        let (v0, v1) = unsafe {
            (
                load8::<D>(vals.as_ptr().add(k * ds)),
                load8::<D>(vals.as_ptr().add(k1 * ds)),
            )
        };
        let x0 = loadx(xs, 16 * j);
        let x1 = loadx(xs, 16 * j + 8);
        acc.0 = expand_fma(acc.0, b0, v0, x0);
        acc.1 = expand_fma(acc.1, b1, v1, x1);
        k = k1 + b1.count_ones() as usize;
    }
    acc
}

/// The rest of a bitmask row from column `c` (value index `k`): a last partial word,
/// or words near the end of the values, through zero-padded copies. Kept out of line
/// so the copies do not cost the main loop its registers.
#[cold]
#[inline(never)]
#[target_feature(enable = "neon")]
fn bitmask_tail<const D: u8>(
    m: &BitmaskRef<'_>,
    r: usize,
    mut c: usize,
    mut k: usize,
    x: &[f32],
    mut acc: Acc2,
) -> Acc2 {
    let (cols, ds) = (m.cols, size(D));
    while c < cols {
        let n = (cols - c).min(64);
        let bits = bits_at(m.mask, r * cols + c) & low_bits(n);
        let cnt = bits.count_ones() as usize;
        let mut xs = [0f32; 64];
        xs[..n].copy_from_slice(&x[c..c + n]);
        let mut vb = [0u8; 72 * 4];
        vb[..cnt * ds].copy_from_slice(&m.values.bytes[k * ds..(k + cnt) * ds]);
        acc = bitmask_word::<D>(bits, &vb[..(cnt + 8) * ds], 0, &xs, acc);
        k += cnt;
        c += 64;
    }
    acc
}

/// Lane numbers, for masking the lanes past a block-CSR block.
const IOTA: [u32; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

#[target_feature(enable = "neon")]
fn csr_rows(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        m.values.dtype,
        csr_rows_d(m, r0, x, y),
        q_csr_rows(m, r0, x, y)
    )
}

#[target_feature(enable = "neon")]
fn csr_rows_d<const D: u8>(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    let ds = size(D);
    let nb = csr_blocks(cols);
    let (idx, vals) = (m.col_idx, m.values.bytes);
    // Index and value loads may run up to 7 entries past a block (the extra lanes are
    // masked off); `total` bounds them by both arrays.
    let total = idx.len().min(vals.len() / ds);
    // SAFETY: IOTA holds 8 u32.
    let (iota0, iota1) = unsafe { (vld1q_u32(IOTA.as_ptr()), vld1q_u32(IOTA.as_ptr().add(4))) };
    let zero = vdupq_n_f32(0.0);
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let first = u32_at(m.block_ptr, r * nb) as usize;
        let count = csr_count(m, nb, r);
        prefetch::csr_row(m, r, first, count, first * ds, count * ds);
        let mut acc = (zero, zero);
        for (b, xb) in x.chunks(256).enumerate() {
            let lo = u32_at(m.block_ptr, r * nb + b) as usize;
            let hi = u32_at(m.block_ptr, r * nb + b + 1) as usize;
            assert!(lo <= hi && hi <= total, "block pointers out of range");
            let lim = xb.len() - 1;
            let mut k = lo;
            while k < hi {
                if k + 8 > total {
                    acc = csr_tail::<D>(m, k, hi, xb, acc);
                    break;
                }
                // NEON has no gather: the activations come from scalar loads, clamped
                // into the block (a last block may be narrower than 256 columns, and
                // this load may run past the block), while the values load and convert
                // as vectors.
                let ib = u64::from_le_bytes(idx[k..k + 8].try_into().unwrap());
                let at = |s: u32| xb[((ib >> s) as u8 as usize).min(lim)];
                let g = [at(0), at(8), at(16), at(24), at(32), at(40), at(48), at(56)];
                let live = vdupq_n_u32((hi - k).min(8) as u32);
                let (l0, l1) = (vcltq_u32(iota0, live), vcltq_u32(iota1, live));
                // SAFETY: k + 8 <= total, so 8 values are readable at k.
                let w = unsafe { load8::<D>(vals.as_ptr().add(k * ds)) };
                let xg = loadx(&g, 0);
                acc.0 = vfmaq_f32(acc.0, mask(w.0, l0), mask(xg.0, l0));
                acc.1 = vfmaq_f32(acc.1, mask(w.1, l1), mask(xg.1, l1));
                k += 8;
            }
        }
        *yi += vaddvq_f32(vaddq_f32(acc.0, acc.1));
    }
}

/// `v` with the lanes where `keep` is 0 zeroed.
#[inline]
#[target_feature(enable = "neon")]
fn mask(v: float32x4_t, keep: uint32x4_t) -> float32x4_t {
    vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), keep))
}

/// Entries `k..hi` of a block-CSR block near the end of the arrays, through
/// zero-padded copies (out of line, like `bitmask_tail`).
#[cold]
#[inline(never)]
#[target_feature(enable = "neon")]
fn csr_tail<const D: u8>(
    m: &CsrRef<'_>,
    mut k: usize,
    hi: usize,
    xb: &[f32],
    mut acc: F32x8,
) -> F32x8 {
    let ds = size(D);
    while k < hi {
        let take = (hi - k).min(8);
        let mut g = [0f32; 8];
        for (gj, &c) in g.iter_mut().zip(&m.col_idx[k..k + take]) {
            *gj = xb[usize::from(c)];
        }
        let w = load8_partial::<D>(&m.values.bytes[k * ds..(k + take) * ds]);
        let xg = loadx(&g, 0);
        acc = (vfmaq_f32(acc.0, w.0, xg.0), vfmaq_f32(acc.1, w.1, xg.1));
        k += take;
    }
    acc
}

/// For a 2:4 meta byte (two groups, 8 columns): `tbl` byte indices that pick the four
/// kept columns' `f32` bytes out of the 8 columns' 32 bytes.
static PICK: [Bytes16; 256] = {
    let mut t = [Bytes16([0; 16]); 256];
    let mut m = 0;
    while m < 256 {
        let cols = [m & 3, (m >> 2) & 3, 4 + ((m >> 4) & 3), 4 + ((m >> 6) & 3)];
        let mut l = 0;
        while l < 4 {
            let mut b = 0;
            while b < 4 {
                t[m].0[4 * l + b] = (4 * cols[l] + b) as u8;
                b += 1;
            }
            l += 1;
        }
        m += 1;
    }
    t
};

/// A 16-byte aligned table row.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Bytes16([u8; 16]);

#[target_feature(enable = "neon")]
fn two_four_rows(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        m.values.dtype,
        two_four_rows_d(m, r0, x, y),
        q_two_four_rows(m, r0, x, y)
    )
}

/// The 4 `x` values a 2:4 meta byte selects from the 8 columns `xv`.
#[inline]
#[target_feature(enable = "neon")]
fn pick(b: u8, xv: F32x8) -> float32x4_t {
    // SAFETY: each table row holds 16 bytes.
    let idx = unsafe { vld1q_u8(PICK[usize::from(b)].0.as_ptr()) };
    let tab = uint8x16x2_t(vreinterpretq_u8_f32(xv.0), vreinterpretq_u8_f32(xv.1));
    vreinterpretq_f32_u8(vqtbl2q_u8(tab, idx))
}

#[target_feature(enable = "neon")]
fn two_four_rows_d<const D: u8>(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert!(cols.is_multiple_of(4), "2:4 needs cols % 4 == 0");
    assert_eq!(x.len(), cols, "x.len() != cols");
    let ds = size(D);
    let groups = cols / 4;
    let zero = vdupq_n_f32(0.0);
    for (i, yi) in y.iter_mut().enumerate() {
        let first = (r0 + i) * groups;
        prefetch::two_four_row(m, first, groups, ds);
        let v = &m.values.bytes[2 * first * ds..2 * (first + groups) * ds];
        let mut acc = (zero, zero);
        let mut c = 0;
        while c + 64 <= cols {
            let bits = bits_at(m.meta, 4 * (first + c / 4));
            let xs: &[f32; 64] = x[c..c + 64].try_into().unwrap();
            acc = two_four_word::<D>(bits, &v[c / 2 * ds..(c / 2 + 32) * ds], xs, acc);
            c += 64;
        }
        if c < cols {
            acc = two_four_tail::<D>(m, first, c, v, x, acc);
        }
        *yi += vaddvq_f32(vaddq_f32(acc.0, acc.1));
    }
}

/// Multiply-accumulates 64 columns (16 groups) of a 2:4 row: meta nibbles `bits`,
/// 32 values `w`, activations `xs`.
#[inline]
#[target_feature(enable = "neon")]
fn two_four_word<const D: u8>(bits: u64, w: &[u8], xs: &[f32; 64], mut acc: F32x8) -> F32x8 {
    let ds = size(D);
    assert_eq!(w.len(), 32 * ds);
    for j in 0..4 {
        let b0 = (bits >> (16 * j)) as u8;
        let b1 = (bits >> (16 * j + 8)) as u8;
        // SAFETY: `w` holds 32 values, 8 from 8·j.
        let wv = unsafe { load8::<D>(w.as_ptr().add(8 * j * ds)) };
        acc.0 = vfmaq_f32(acc.0, wv.0, pick(b0, loadx(xs, 16 * j)));
        acc.1 = vfmaq_f32(acc.1, wv.1, pick(b1, loadx(xs, 16 * j + 8)));
    }
    acc
}

/// The last `cols − c` (< 64) columns of a 2:4 row through zero-padded copies: the
/// padding's values are 0, so whatever its meta nibbles pick adds nothing.
#[cold]
#[inline(never)]
#[target_feature(enable = "neon")]
fn two_four_tail<const D: u8>(
    m: &TwoFourRef<'_>,
    first: usize,
    c: usize,
    v: &[u8],
    x: &[f32],
    acc: F32x8,
) -> F32x8 {
    let ds = size(D);
    let n = m.cols - c;
    let bits = bits_at(m.meta, 4 * (first + c / 4)) & low_bits(n);
    let mut xs = [0f32; 64];
    xs[..n].copy_from_slice(&x[c..]);
    let mut w = [0u8; 32 * 4];
    w[..n / 2 * ds].copy_from_slice(&v[c / 2 * ds..]);
    two_four_word::<D>(bits, &w[..32 * ds], &xs, acc)
}

#[target_feature(enable = "neon")]
fn to_f32(v: Values<'_>, start: usize, out: &mut [f32]) {
    by_dtype!(
        v.dtype,
        to_f32_d(v.bytes, start, out),
        q_decode(v.bytes, v.dtype, start, out)
    )
}

#[target_feature(enable = "neon")]
fn to_f32_d<const D: u8>(b: &[u8], start: usize, out: &mut [f32]) {
    let ds = size(D);
    let b = b
        .get(start * ds..(start + out.len()) * ds)
        .expect("to_f32 range out of bounds");
    let mut chunks = out.chunks_exact_mut(8);
    let mut j = 0;
    for o in &mut chunks {
        // SAFETY: `b` holds out.len() values and j + 8 <= out.len().
        store8(o, unsafe { load8::<D>(b.as_ptr().add(j * ds)) });
        j += 8;
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        store_partial(rest, load8_partial::<D>(&b[j * ds..]));
    }
}

#[target_feature(enable = "neon")]
fn from_f32(x: &[f32], dtype: DType, out: &mut [u8]) {
    if dtype.is_quantized() {
        // No SIMD quantizer: the scalar reference (a quantized KV cache does not exist;
        // this keeps the table total).
        return scalar::from_f32(x, dtype, out);
    }
    let n = out.len() / dtype.size();
    let x = &x[..n];
    match dtype {
        DType::F32 | DType::Q8 { .. } | DType::Q4 { .. } => scalar::from_f32(x, dtype, out),
        DType::F16 | DType::BF16 => {
            let mut xs = x.chunks_exact(8);
            let mut os = out.chunks_exact_mut(16);
            for (xc, oc) in (&mut xs).zip(&mut os) {
                let (a, b) = loadx(xc, 0);
                let h = if dtype == DType::F16 {
                    f32x8_to_f16(a, b)
                } else {
                    vcombine_u16(f32x4_to_bf16(a), f32x4_to_bf16(b))
                };
                // SAFETY: `oc` holds 16 bytes; u8 stores need no alignment.
                unsafe { vst1q_u8(oc.as_mut_ptr(), vreinterpretq_u8_u16(h)) };
            }
            scalar::from_f32(xs.remainder(), dtype, os.into_remainder());
        }
    }
}

/// 4 floats → 4 bf16, rounding to nearest even; NaNs become quiet NaNs (as
/// `scalar::f32_to_bf16`).
#[inline]
#[target_feature(enable = "neon")]
fn f32x4_to_bf16(v: float32x4_t) -> uint16x4_t {
    let bits = vreinterpretq_u32_f32(v);
    let lsb = vandq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(1));
    let rounded = vshrq_n_u32::<16>(vaddq_u32(vaddq_u32(bits, vdupq_n_u32(0x7fff)), lsb));
    let nan = vorrq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(0x40));
    let is_num = vceqq_f32(v, v);
    vmovn_u32(vbslq_u32(is_num, rounded, nan))
}

// ---- Quantized values (Q8, Q4; format 1.1) ------------------------------------------
//
// As on x86 (see the quantized section of `x86.rs`): 8 values at a time, decoded to
// exactly the scalar reference's values (`s·q` is exact; Q4's `s·q + m` rounds once,
// so `vfmaq` gives the reference's value), summed in `f32` in another order. The
// sparse kernels decode a row's run into a `QWindow` and run the `f32` paths.
//
// Activations stay `f32`: a `dotprod` (`sdot`) path would need int8 activations, i.e.
// quantizing `x` per token, which changes the results (and the tolerance the forward
// pass is held to), so it is deliberately not used.

/// Values `off..off + 8` of the block `blk` (`off` a multiple of 8 below the group)
/// with the block's scale `s` and (Q4) minimum `m`.
#[inline]
#[target_feature(enable = "neon")]
fn q_unit8<const Q4: bool>(blk: &[u8], off: usize, s: f32, m: float32x4_t) -> F32x8 {
    if Q4 {
        // 4 bytes = 8 codes: interleaving the low and high nibbles puts them in order.
        let b = &blk[4 + off / 2..4 + off / 2 + 4];
        let v = vcreate_u8(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        let codes = vzip1_u8(vand_u8(v, vdup_n_u8(0xF)), vshr_n_u8::<4>(v));
        let q = vmovl_u8(codes);
        let (lo, hi) = (
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(q))),
            vcvtq_f32_u32(vmovl_high_u16(q)),
        );
        (vfmaq_n_f32(m, lo, s), vfmaq_n_f32(m, hi, s))
    } else {
        let b = &blk[2 + off..2 + off + 8];
        let v = vcreate_s8(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]));
        let q = vmovl_s8(v);
        (
            vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q))), s),
            vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(q)), s),
        )
    }
}

/// The block's scale and (Q4) minimum (as lanes).
#[inline]
#[target_feature(enable = "neon")]
fn q_params<const Q4: bool>(blk: &[u8]) -> (f32, float32x4_t) {
    let s = scalar::f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
    let m = if Q4 {
        scalar::f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]))
    } else {
        0.0
    };
    (s, vdupq_n_f32(m))
}

/// Dense Q4 rows (groups a multiple of 32) against rearranged activations
/// ([`simd::q4_split_rows`]): 32 values per 16-byte load, the even and the odd codes
/// widened 4 lanes at a time. The decoded values are the reference's (`m + q·s` with
/// `s·q` exact in `f32`), only summed in another order.
#[target_feature(enable = "neon")]
fn q4_split_rows(w: Values<'_>, g: usize, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    let step = |acc: Acc2, (sc, mn): (f32, float32x4_t), codes: &[u8; 16], xc: &[f32; 32]| {
        // SAFETY: `codes` holds 16 bytes.
        let v = unsafe { vld1q_u8(codes.as_ptr()) };
        let (even, odd) = (vandq_u8(v, vdupq_n_u8(0xF)), vshrq_n_u8::<4>(v));
        // Codes 8·k .. 8·k + 8 of a nibble half as two 4-lane value vectors.
        let dec = |h: uint16x8_t| {
            let f = |u: uint32x4_t| vfmaq_n_f32(mn, vcvtq_f32_u32(u), sc);
            (f(vmovl_u16(vget_low_u16(h))), f(vmovl_high_u16(h)))
        };
        let (e0, e1) = (dec(vmovl_u8(vget_low_u8(even))), dec(vmovl_high_u8(even)));
        let (o0, o1) = (dec(vmovl_u8(vget_low_u8(odd))), dec(vmovl_high_u8(odd)));
        let (xe0, xe1, xo0, xo1) = (loadx(xc, 0), loadx(xc, 8), loadx(xc, 16), loadx(xc, 24));
        let fma = |a: float32x4_t, p: float32x4_t, q: float32x4_t, xp, xq| {
            vfmaq_f32(vfmaq_f32(a, p, xp), q, xq)
        };
        (
            (
                fma(acc.0.0, e0.0, e1.0, xe0.0, xe1.0),
                fma(acc.0.1, e0.1, e1.1, xe0.1, xe1.1),
            ),
            (
                fma(acc.1.0, o0.0, o1.0, xo0.0, xo1.0),
                fma(acc.1.1, o0.1, o1.1, xo0.1, xo1.1),
            ),
        )
    };
    let z = vdupq_n_f32(0.0);
    let params = |blk: &[u8]| q_params::<true>(blk);
    simd::q4_split_rows(w, g, cols, r0, x, y, params, ((z, z), (z, z)), step, |a| {
        hsum2(a)
    })
}

/// Dense rows of quantized values: 16 decoded values per step, four accumulators.
#[inline]
#[target_feature(enable = "neon")]
fn q_dense_rows<const Q4: bool>(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    let zero = vdupq_n_f32(0.0);
    simd::q_dense_rows::<_, _, _, 8>(
        w,
        cols,
        r0,
        x,
        y,
        |blk| q_params::<Q4>(blk),
        |blk, off, (s, m)| q_unit8::<Q4>(blk, off, s, m),
        (zero, zero),
        |a: F32x8, v: F32x8, xs| {
            let xv = loadx(xs, 0);
            (vfmaq_f32(a.0, v.0, xv.0), vfmaq_f32(a.1, v.1, xv.1))
        },
        |a0, a1| hsum2((a0, a1)),
    )
}

/// Run values `start..start + out.len()` of the quantized run `run` into `out`, 8 at a
/// time.
///
/// # Panics
/// When the values lie past the run's bytes.
#[target_feature(enable = "neon")]
fn q_decode(run: &[u8], dt: DType, start: usize, out: &mut [f32]) {
    by_q4!(dt, q_decode_q(run, dt, start, out))
}

#[inline]
#[target_feature(enable = "neon")]
fn q_decode_q<const Q4: bool>(run: &[u8], dt: DType, start: usize, out: &mut [f32]) {
    simd::q_decode::<_, _, 8>(
        run,
        dt,
        start,
        out,
        |blk| q_params::<Q4>(blk),
        |blk, off, (s, m)| q_unit8::<Q4>(blk, off, s, m),
        |o, v| store8(o, v),
    )
}

/// Quantized bitmask rows: each row's run is decoded into a window, and each 64-column
/// word runs the `f32` word kernel on the window's values.
#[target_feature(enable = "neon")]
fn q_bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let zero = vdupq_n_f32(0.0);
    simd::q_bitmask_rows(
        m,
        r0,
        x,
        y,
        |run, dt, s, o| q_decode(run, dt, s, o),
        ((zero, zero), (zero, zero)),
        |bits, v, xs, acc| bitmask_word::<F32>(bits, f32_bytes(v), 0, xs, acc),
        |acc| hsum2(acc),
    )
}

/// Quantized block-CSR rows: values from the row's window, `x` by clamped scalar loads
/// as in `csr_rows_d`.
#[target_feature(enable = "neon")]
fn q_csr_rows(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    // SAFETY: IOTA holds 8 u32.
    let (iota0, iota1) = unsafe { (vld1q_u32(IOTA.as_ptr()), vld1q_u32(IOTA.as_ptr().add(4))) };
    let step = |acc: F32x8, ib: u64, xb: &[f32], v: &[f32], live: usize| {
        // Clamped into the block whatever the bytes say (see `csr_rows_d`).
        let lim = xb.len() - 1;
        let at = |s: u32| xb[((ib >> s) as u8 as usize).min(lim)];
        let g = [at(0), at(8), at(16), at(24), at(32), at(40), at(48), at(56)];
        let live = vdupq_n_u32(live as u32);
        let (l0, l1) = (vcltq_u32(iota0, live), vcltq_u32(iota1, live));
        // The lanes past the block (or past the run) are masked off.
        let w = loadx(v, 0);
        let xg = loadx(&g, 0);
        (
            vfmaq_f32(acc.0, mask(w.0, l0), mask(xg.0, l0)),
            vfmaq_f32(acc.1, mask(w.1, l1), mask(xg.1, l1)),
        )
    };
    let zero = vdupq_n_f32(0.0);
    let decode = |run: &[u8], dt, s, o: &mut [f32]| q_decode(run, dt, s, o);
    let hsum = |acc: F32x8| vaddvq_f32(vaddq_f32(acc.0, acc.1));
    simd::q_csr_rows(m, r0, x, y, decode, (zero, zero), step, hsum)
}

/// Quantized 2:4 rows: each 64 columns' 32 values from the row's window, through the
/// `f32` word kernel.
#[target_feature(enable = "neon")]
fn q_two_four_rows(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let word = |bits, v: &[f32; 32], xs: &[f32; 64], acc| {
        two_four_word::<F32>(bits, f32_bytes(v), xs, acc)
    };
    let decode = |run: &[u8], dt, s, o: &mut [f32]| q_decode(run, dt, s, o);
    let zero = vdupq_n_f32(0.0);
    let hsum = |acc: F32x8| vaddvq_f32(vaddq_f32(acc.0, acc.1));
    simd::q_two_four_rows(m, r0, x, y, decode, (zero, zero), word, hsum)
}
