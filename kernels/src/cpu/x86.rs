//! AVX2 + FMA + F16C kernels (x86-64), 8 `f32` lanes.
//!
//! Every kernel is a `#[target_feature]` function reached only through [`KERNELS`],
//! which [`table`] hands out after detecting AVX2, FMA, F16C and POPCNT (every AVX2
//! CPU has the last; without it `count_ones` would be a dozen instructions). Vector loads read
//! through raw pointers into slices whose lengths were checked just before (a SAFETY
//! comment says which check); tails go through zero-padded stack buffers, so no load
//! ever reaches past a slice.
//!
//! Sparse kernels avoid per-element branches: bitmask expands 8 packed values into
//! their column lanes with `vpermps` and a 256-entry index table; block-CSR picks `x`
//! with clamped scalar loads (faster than `vgatherdps` on Zen 2) and masks the lanes
//! past a block; 2:4 picks `x` within each 128-bit lane (one group of 4 columns) with
//! `vpermilps`. Rare tails (end of a row or of the values) run out of line through
//! padded copies, so the hot loops keep their accumulators in registers.

use core::arch::x86_64::*;

use super::prefetch;
use super::simd::{self, BF16, F16, F32, bitmask_count, csr_count, f32_bytes, size};
use super::{
    BitmaskRef, CsrRef, DType, Isa, Kernels, TwoFourRef, Values, bits_at, csr_blocks, low_bits,
    scalar, u32_at,
};

/// Whether this CPU has AVX2, FMA, F16C and POPCNT (at run time with `std`, else from the
/// compile-time target features).
fn detected() -> bool {
    #[cfg(feature = "std")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("popcnt")
    }
    #[cfg(not(feature = "std"))]
    {
        cfg!(all(
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c",
            target_feature = "popcnt"
        ))
    }
}

mod avx512;

/// The AVX-512 table, for the no-std `kernels` (which picks a table by compile-time
/// target features).
#[allow(unused_imports)]
pub(super) use avx512::KERNELS as AVX512;

/// The x86 tables this CPU can run, slowest first: AVX2, then AVX-512.
pub(super) fn tables() -> impl Iterator<Item = Kernels> {
    detected()
        .then_some(KERNELS)
        .into_iter()
        .chain(avx512::table())
}

/// The features of interest that this CPU has.
pub(super) fn features() -> alloc::vec::Vec<&'static str> {
    let mut v = alloc::vec::Vec::new();
    macro_rules! check {
        ($($f:tt),*) => {$(
            #[cfg(feature = "std")]
            let has = std::is_x86_feature_detected!($f);
            #[cfg(not(feature = "std"))]
            let has = cfg!(target_feature = $f);
            if has {
                v.push($f);
            }
        )*};
    }
    check!(
        "avx2", "fma", "f16c", "popcnt", "avx512f", "avx512bw", "avx512vl"
    );
    v
}

/// The AVX2 table. Private entry points only: holding this table means the features
/// were detected (see [`tables`]), which is what makes the calls below sound.
pub(super) const KERNELS: Kernels = Kernels {
    isa: Isa::Avx2,
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
                // SAFETY: only reachable through `KERNELS`, which `tables` returns only
                // when avx2, fma, f16c and popcnt were detected (or are compile-time
                // features without std), so the target features hold.
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

/// 8 values of storage `D` at `p` as `f32` lanes.
///
/// # Safety
/// `p .. p + 8·size(D)` must be readable (no alignment needed).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn load8<const D: u8>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 8 values are readable at `p`; loadu has no
    // alignment requirement.
    unsafe {
        match D {
            F32 => _mm256_loadu_ps(p.cast()),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p.cast()),
            ))),
        }
    }
}

/// Up to 8 values of storage `D` (`b.len()/size(D)` of them) as `f32` lanes, the rest 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn load8_partial<const D: u8>(b: &[u8]) -> __m256 {
    let mut buf = [0u8; 32];
    let n = b.len().min(8 * size(D));
    buf[..n].copy_from_slice(&b[..n]);
    // SAFETY: `buf` holds 32 bytes, the most 8 values of any storage take.
    unsafe { load8::<D>(buf.as_ptr()) }
}

/// 8 floats from `x[i..i+8]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn loadx(x: &[f32], i: usize) -> __m256 {
    let s = &x[i..i + 8];
    // SAFETY: `s` has exactly 8 elements.
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

/// Up to 8 floats of `x` (all of it when shorter), the rest 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn loadx_partial(x: &[f32]) -> __m256 {
    let mut buf = [0f32; 8];
    let n = x.len().min(8);
    buf[..n].copy_from_slice(&x[..n]);
    // SAFETY: `buf` holds 8 floats.
    unsafe { _mm256_loadu_ps(buf.as_ptr()) }
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
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

/// Dense Q4 rows (groups a multiple of 32) against rearranged activations
/// ([`simd::q4_split_rows`]): 32 values per 16-byte load, the even and the odd codes
/// 8 lanes at a time. The decoded values are the reference's, only summed in another
/// order.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn q4_split_rows(w: Values<'_>, g: usize, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    let low = _mm_set1_epi8(0xF);
    let step = |(a0, a1): Acc2, (sc, mn), codes: &[u8; 16], xc: &[f32; 32]| {
        // SAFETY: `codes` holds 16 bytes and `xc` 32 floats.
        let v = unsafe { _mm_loadu_si128(codes.as_ptr().cast()) };
        let (even, odd) = (
            _mm_and_si128(v, low),
            _mm_and_si128(_mm_srli_epi16::<4>(v), low),
        );
        let dec = |c: __m128i| _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), mn);
        let (e0, e1) = (dec(even), dec(_mm_srli_si128::<8>(even)));
        let (o0, o1) = (dec(odd), dec(_mm_srli_si128::<8>(odd)));
        (
            _mm256_fmadd_ps(e1, loadx(xc, 8), _mm256_fmadd_ps(e0, loadx(xc, 0), a0)),
            _mm256_fmadd_ps(o1, loadx(xc, 24), _mm256_fmadd_ps(o0, loadx(xc, 16), a1)),
        )
    };
    let zero = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let params = |blk: &[u8]| q_params8::<true>(blk);
    simd::q4_split_rows(w, g, cols, r0, x, y, params, zero, step, |a| hsum2(a))
}

/// Dense rows of quantized values (Q8, Q4): per block, 8 codes at a time are decoded
/// (`q_unit8`) to exactly the reference's values; only the summation (8 lanes, two
/// accumulators, FMA) differs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn q_dense_rows<const Q4: bool>(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    simd::q_dense_rows::<_, _, _, 8>(
        w,
        cols,
        r0,
        x,
        y,
        |blk| q_params8::<Q4>(blk),
        |blk, off, (s, m)| q_unit8::<Q4>(blk, off, s, m),
        _mm256_setzero_ps(),
        |a, v, xs| _mm256_fmadd_ps(v, loadx(xs, 0), a),
        |a0, a1| hsum(_mm256_add_ps(a0, a1)),
    )
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn dense_rows_d<const D: u8>(w: &[u8], cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    simd::dense_rows::<D>(w, cols, r0, x, y, |row, x| dot::<D>(row, x))
}

/// `row · x` for one row of `x.len()` values of storage `D`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn dot<const D: u8>(row: &[u8], x: &[f32]) -> f32 {
    let ds = size(D);
    let n = x.len();
    assert_eq!(row.len(), n * ds);
    let p = row.as_ptr();
    // Four independent accumulators hide the FMA latency.
    let mut a0 = _mm256_setzero_ps();
    let mut a1 = _mm256_setzero_ps();
    let mut a2 = _mm256_setzero_ps();
    let mut a3 = _mm256_setzero_ps();
    let mut c = 0;
    while c + 32 <= n {
        // SAFETY: c + 32 <= n and `row` holds n values.
        let (w0, w1, w2, w3) = unsafe {
            (
                load8::<D>(p.add(c * ds)),
                load8::<D>(p.add((c + 8) * ds)),
                load8::<D>(p.add((c + 16) * ds)),
                load8::<D>(p.add((c + 24) * ds)),
            )
        };
        a0 = _mm256_fmadd_ps(w0, loadx(x, c), a0);
        a1 = _mm256_fmadd_ps(w1, loadx(x, c + 8), a1);
        a2 = _mm256_fmadd_ps(w2, loadx(x, c + 16), a2);
        a3 = _mm256_fmadd_ps(w3, loadx(x, c + 24), a3);
        c += 32;
    }
    while c + 8 <= n {
        // SAFETY: c + 8 <= n and `row` holds n values.
        let w0 = unsafe { load8::<D>(p.add(c * ds)) };
        a0 = _mm256_fmadd_ps(w0, loadx(x, c), a0);
        c += 8;
    }
    if c < n {
        let w0 = load8_partial::<D>(&row[c * ds..]);
        a1 = _mm256_fmadd_ps(w0, loadx_partial(&x[c..]), a1);
    }
    hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)))
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn dense_t_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        w.dtype,
        dense_t_rows_d(w.bytes, cols, r0, x, y),
        (scalar::KERNELS.dense_t_rows)(w, cols, r0, x, y)
    )
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
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
        let (r0b, rest) = q.split_at(rb);
        let (r1b, rest) = rest.split_at(rb);
        let (r2b, r3b) = rest.split_at(rb);
        let (x0, x1, x2, x3) = (
            _mm256_set1_ps(xs[0]),
            _mm256_set1_ps(xs[1]),
            _mm256_set1_ps(xs[2]),
            _mm256_set1_ps(xs[3]),
        );
        let mut c = 0;
        while c + 8 <= cols {
            let ys = &mut y[c..c + 8];
            // SAFETY: c + 8 <= cols, each row slice holds `cols` values and `ys` 8
            // floats.
            unsafe {
                let mut acc = _mm256_loadu_ps(ys.as_ptr());
                acc = _mm256_fmadd_ps(load8::<D>(r0b.as_ptr().add(c * ds)), x0, acc);
                acc = _mm256_fmadd_ps(load8::<D>(r1b.as_ptr().add(c * ds)), x1, acc);
                acc = _mm256_fmadd_ps(load8::<D>(r2b.as_ptr().add(c * ds)), x2, acc);
                acc = _mm256_fmadd_ps(load8::<D>(r3b.as_ptr().add(c * ds)), x3, acc);
                _mm256_storeu_ps(ys.as_mut_ptr(), acc);
            }
            c += 8;
        }
        if c < cols {
            let mut acc = loadx_partial(&y[c..]);
            acc = _mm256_fmadd_ps(load8_partial::<D>(&r0b[c * ds..]), x0, acc);
            acc = _mm256_fmadd_ps(load8_partial::<D>(&r1b[c * ds..]), x1, acc);
            acc = _mm256_fmadd_ps(load8_partial::<D>(&r2b[c * ds..]), x2, acc);
            acc = _mm256_fmadd_ps(load8_partial::<D>(&r3b[c * ds..]), x3, acc);
            store_partial(&mut y[c..], acc);
        }
    }
    for (row, &xi) in quads.remainder().chunks_exact(rb).zip(xq.remainder()) {
        let xv = _mm256_set1_ps(xi);
        let mut c = 0;
        while c + 8 <= cols {
            let ys = &mut y[c..c + 8];
            // SAFETY: c + 8 <= cols, `row` holds `cols` values and `ys` 8 floats.
            unsafe {
                let acc = _mm256_loadu_ps(ys.as_ptr());
                let acc = _mm256_fmadd_ps(load8::<D>(row.as_ptr().add(c * ds)), xv, acc);
                _mm256_storeu_ps(ys.as_mut_ptr(), acc);
            }
            c += 8;
        }
        if c < cols {
            let acc = loadx_partial(&y[c..]);
            let acc = _mm256_fmadd_ps(load8_partial::<D>(&row[c * ds..]), xv, acc);
            store_partial(&mut y[c..], acc);
        }
    }
}

/// Stores the first `min(8, y.len())` lanes of `v` into `y`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn store_partial(y: &mut [f32], v: __m256) {
    let mut buf = [0f32; 8];
    // SAFETY: `buf` holds 8 floats.
    unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), v) };
    let n = y.len().min(8);
    y[..n].copy_from_slice(&buf[..n]);
}

/// A 16-byte aligned `pshufb` control, so one aligned load reads it.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Bytes16([u8; 16]);

/// For a mask byte `m`: the byte shuffle that moves the packed 16-bit values of the
/// byte's set bits to their columns (value `e` to column `l` where `e` = set bits below
/// `l`) and zeroes the other columns (control byte 0x80). On 16-bit values this is one
/// in-lane `pshufb` instead of a lane-crossing `vpermps` plus a mask on f32 lanes,
/// which on Zen 2 costs several uops more per 8 columns.
static EXPAND16: [Bytes16; 256] = {
    let mut t = [Bytes16([0x80; 16]); 256];
    let mut m = 0;
    while m < 256 {
        let mut l = 0;
        while l < 8 {
            if m & (1 << l) != 0 {
                let e = ((m as u32) & ((1u32 << l) - 1)).count_ones() as u8;
                t[m].0[2 * l] = 2 * e;
                t[m].0[2 * l + 1] = 2 * e + 1;
            }
            l += 1;
        }
        m += 1;
    }
    t
};

/// 8 values of 16-bit storage `D` starting at `p`, expanded to the set bits of mask
/// byte `b` (zeros elsewhere), as `f32` lanes.
///
/// # Safety
/// 8 values (16 bytes) must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn expand8_16<const D: u8>(p: *const u8, b: usize) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; the table row is 16-byte
    // aligned.
    let e = unsafe {
        _mm_shuffle_epi8(
            _mm_loadu_si128(p.cast()),
            _mm_load_si128(EXPAND16[b].0.as_ptr().cast()),
        )
    };
    if D == F16 {
        _mm256_cvtph_ps(e)
    } else {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(e)))
    }
}

/// A 32-byte aligned table row, so one aligned vector load reads it.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Lanes8([i32; 8]);

/// For a mask byte `m`: lane `l` holds the index among the byte's set bits of bit `l`
/// (the number of set bits below it), i.e. which packed value lands in column `l`.
static EXPAND: [Lanes8; 256] = {
    let mut t = [Lanes8([0; 8]); 256];
    let mut m = 0;
    while m < 256 {
        let mut l = 0;
        while l < 8 {
            t[m].0[l] = (m & ((1 << l) - 1)).count_ones() as i32;
            l += 1;
        }
        m += 1;
    }
    t
};

/// For a mask byte `m`: all ones in lane `l` when bit `l` is set (one load is cheaper
/// than broadcasting and comparing the byte).
static KEEP: [Lanes8; 256] = {
    let mut t = [Lanes8([0; 8]); 256];
    let mut m = 0;
    while m < 256 {
        let mut l = 0;
        while l < 8 {
            t[m].0[l] = if m & (1 << l) != 0 { -1 } else { 0 };
            l += 1;
        }
        m += 1;
    }
    t
};

/// Two accumulators.
type Acc2 = (__m256, __m256);

/// Sum of two accumulators' lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn hsum2(a: Acc2) -> f32 {
    hsum(_mm256_add_ps(a.0, a.1))
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        m.values.dtype,
        bitmask_rows_d(m, r0, x, y),
        q_bitmask_rows(m, r0, x, y)
    )
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn bitmask_rows_d<const D: u8>(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    let ds = size(D);
    let vals = m.values.bytes;
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let mut k = m.row_start[r] as usize;
        prefetch::bitmask_row(m, r, k * ds, bitmask_count(m, r) * ds);
        let mut acc = (_mm256_setzero_ps(), _mm256_setzero_ps());
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

/// Multiply-accumulates one 64-column mask word: the packed values from index `k` of
/// `vals` expanded to the set bits of `bits`, times `xs`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
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
        let b0 = usize::from((bits >> (16 * j)) as u8);
        let b1 = usize::from((bits >> (16 * j + 8)) as u8);
        let k1 = k + b0.count_ones() as usize;
        if D != F32 {
            // SAFETY: as below.
            let (w0, w1, x0, x1) = unsafe {
                (
                    expand8_16::<D>(vals.as_ptr().add(k * ds), b0),
                    expand8_16::<D>(vals.as_ptr().add(k1 * ds), b1),
                    _mm256_loadu_ps(xs.as_ptr().add(16 * j)),
                    _mm256_loadu_ps(xs.as_ptr().add(16 * j + 8)),
                )
            };
            // Unset columns hold an exact zero weight; x is not masked (see `Kernels`).
            acc.0 = _mm256_fmadd_ps(w0, x0, acc.0);
            acc.1 = _mm256_fmadd_ps(w1, x1, acc.1);
            k = k1 + b1.count_ones() as usize;
            continue;
        }
        // SAFETY: k ≤ k1 ≤ k + popcount(bits) and the assert above bounds 8 values from
        // there by vals.len(); `xs` holds 64 floats; table rows are 32-byte aligned.
        let (v0, v1, i0, i1, keep0, keep1, x0, x1) = unsafe {
            (
                load8::<D>(vals.as_ptr().add(k * ds)),
                load8::<D>(vals.as_ptr().add(k1 * ds)),
                _mm256_load_si256(EXPAND[b0].0.as_ptr().cast()),
                _mm256_load_si256(EXPAND[b1].0.as_ptr().cast()),
                _mm256_load_ps(KEEP[b0].0.as_ptr().cast()),
                _mm256_load_ps(KEEP[b1].0.as_ptr().cast()),
                _mm256_loadu_ps(xs.as_ptr().add(16 * j)),
                _mm256_loadu_ps(xs.as_ptr().add(16 * j + 8)),
            )
        };
        let w0 = _mm256_and_ps(_mm256_permutevar8x32_ps(v0, i0), keep0);
        let w1 = _mm256_and_ps(_mm256_permutevar8x32_ps(v1, i1), keep1);
        // Zero the unset columns of x too, so a non-finite activation at a pruned
        // position is skipped exactly as the scalar loop skips it.
        acc.0 = _mm256_fmadd_ps(w0, _mm256_and_ps(x0, keep0), acc.0);
        acc.1 = _mm256_fmadd_ps(w1, _mm256_and_ps(x1, keep1), acc.1);
        k = k1 + b1.count_ones() as usize;
    }
    acc
}

/// The rest of a bitmask row from column `c` (value index `k`): a last partial word,
/// or words near the end of the values, through zero-padded copies. Kept out of line
/// so the copies do not cost the main loop its registers.
#[cold]
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
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
        let bits = bits_at(m.mask, r * m.cols + c) & low_bits(n);
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

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn csr_rows(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        m.values.dtype,
        csr_rows_d(m, r0, x, y),
        q_csr_rows(m, r0, x, y)
    )
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn csr_rows_d<const D: u8>(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    let ds = size(D);
    let nb = csr_blocks(cols);
    let (idx, vals) = (m.col_idx, m.values.bytes);
    // Index and value loads may run up to 7 entries past a block (the extra lanes are
    // masked off); `total` bounds them by both arrays.
    let total = idx.len().min(vals.len() / ds);
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let first = u32_at(m.block_ptr, r * nb) as usize;
        let count = csr_count(m, nb, r);
        prefetch::csr_row(m, r, first, count, first * ds, count * ds);
        let mut acc = _mm256_setzero_ps();
        for (b, xb) in x.chunks(256).enumerate() {
            let lo = u32_at(m.block_ptr, r * nb + b) as usize;
            let hi = u32_at(m.block_ptr, r * nb + b + 1) as usize;
            assert!(lo <= hi && hi <= total, "block pointers out of range");
            let mut k = lo;
            while k < hi {
                if k + 8 > total {
                    acc = csr_tail::<D>(m, k, hi, xb, acc);
                    break;
                }
                let live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                    _mm256_set1_epi32((hi - k).min(8) as i32),
                    iota,
                ));
                // Scalar loads beat `vgatherdps` on AMD Zen 2 (286 against 360 µs on
                // the 50% 576×1536 benchmark). Clamping keeps every index inside the
                // block without a branch, whatever the bytes say (a last block may be
                // narrower than 256 columns, and the last 8-entry load may run past
                // the block).
                let ib = u64::from_le_bytes(idx[k..k + 8].try_into().unwrap());
                let lim = xb.len() - 1;
                let at = |s: u32| xb[((ib >> s) as u8 as usize).min(lim)];
                let g = _mm256_and_ps(
                    _mm256_setr_ps(at(0), at(8), at(16), at(24), at(32), at(40), at(48), at(56)),
                    live,
                );
                // SAFETY: k + 8 <= total, so 8 values are readable at k.
                let w = _mm256_and_ps(unsafe { load8::<D>(vals.as_ptr().add(k * ds)) }, live);
                acc = _mm256_fmadd_ps(w, g, acc);
                k += 8;
            }
        }
        *yi += hsum(acc);
    }
}

/// Entries `k..hi` of a block-CSR block near the end of the arrays, through
/// zero-padded copies (out of line, like `bitmask_tail`).
#[cold]
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn csr_tail<const D: u8>(
    m: &CsrRef<'_>,
    mut k: usize,
    hi: usize,
    xb: &[f32],
    mut acc: __m256,
) -> __m256 {
    let ds = size(D);
    while k < hi {
        let take = (hi - k).min(8);
        let mut g = [0f32; 8];
        for (gj, &c) in g.iter_mut().zip(&m.col_idx[k..k + take]) {
            *gj = xb[usize::from(c)];
        }
        let w = load8_partial::<D>(&m.values.bytes[k * ds..(k + take) * ds]);
        acc = _mm256_fmadd_ps(w, loadx_partial(&g), acc);
        k += take;
    }
    acc
}

/// For a 2:4 meta byte (two groups, each in its own 128-bit lane of 8 loaded
/// columns): `vpermilps` indices that put each group's two kept columns in lanes 0-1
/// of its half (lanes 2-3 are unused).
static PICK: [Lanes8; 256] = {
    let mut t = [Lanes8([0; 8]); 256];
    let mut m = 0;
    while m < 256 {
        t[m].0 = [
            (m & 3) as i32,
            ((m >> 2) & 3) as i32,
            0,
            0,
            ((m >> 4) & 3) as i32,
            ((m >> 6) & 3) as i32,
            0,
            0,
        ];
        m += 1;
    }
    t
};

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn two_four_rows(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        m.values.dtype,
        two_four_rows_d(m, r0, x, y),
        q_two_four_rows(m, r0, x, y)
    )
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn two_four_rows_d<const D: u8>(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert!(cols.is_multiple_of(4), "2:4 needs cols % 4 == 0");
    assert_eq!(x.len(), cols, "x.len() != cols");
    let ds = size(D);
    let groups = cols / 4;
    for (i, yi) in y.iter_mut().enumerate() {
        let first = (r0 + i) * groups;
        prefetch::two_four_row(m, first, groups, ds);
        let v = &m.values.bytes[2 * first * ds..2 * (first + groups) * ds];
        let mut acc = (_mm256_setzero_ps(), _mm256_setzero_ps());
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
        *yi += hsum2(acc);
    }
}

/// Multiply-accumulates 64 columns (16 groups) of a 2:4 row: meta nibbles `bits`,
/// 32 values `w`, activations `xs`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn two_four_word<const D: u8>(bits: u64, w: &[u8], xs: &[f32; 64], mut acc: Acc2) -> Acc2 {
    let ds = size(D);
    assert_eq!(w.len(), 32 * ds);
    for j in 0..4 {
        let b0 = usize::from((bits >> (16 * j)) as u8);
        let b1 = usize::from((bits >> (16 * j + 8)) as u8);
        // SAFETY: `w` holds 32 values (8 from 8·j) and `xs` 64 floats (16 from 16·j);
        // table rows are 32-byte aligned.
        let (wv, xa, xb, ia, ib) = unsafe {
            (
                load8_groups::<D>(w.as_ptr().add(8 * j * ds)),
                _mm256_loadu_ps(xs.as_ptr().add(16 * j)),
                _mm256_loadu_ps(xs.as_ptr().add(16 * j + 8)),
                _mm256_load_si256(PICK[b0].0.as_ptr().cast()),
                _mm256_load_si256(PICK[b1].0.as_ptr().cast()),
            )
        };
        // In-lane picks (cheaper than lane-crossing permutes): groups 0 and 1 from
        // `xa`, 2 and 3 from `xb`, interleaved as [g0 g2 | g1 g3] like `wv`.
        let xg = _mm256_shuffle_ps::<0b01_00_01_00>(
            _mm256_permutevar_ps(xa, ia),
            _mm256_permutevar_ps(xb, ib),
        );
        if j % 2 == 0 {
            acc.0 = _mm256_fmadd_ps(wv, xg, acc.0);
        } else {
            acc.1 = _mm256_fmadd_ps(wv, xg, acc.1);
        }
    }
    acc
}

/// The 8 values of four 2:4 groups at `p` as `f32`, in group order [g0 g2 | g1 g3]
/// (two values per group), matching the in-lane picks of `two_four_word`.
///
/// # Safety
/// `p .. p + 8·size(D)` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn load8_groups<const D: u8>(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 8 values are readable at `p`.
    unsafe {
        match D {
            F32 => _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_loadu_pd(
                p.cast(),
            ))),
            F16 => _mm256_cvtph_ps(_mm_shuffle_epi32::<0b11_01_10_00>(_mm_loadu_si128(
                p.cast(),
            ))),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_shuffle_epi32::<0b11_01_10_00>(_mm_loadu_si128(p.cast())),
            ))),
        }
    }
}

/// The last `cols − c` (< 64) columns of a 2:4 row through zero-padded copies: the
/// padding's values are 0, so whatever its meta nibbles pick adds nothing.
#[cold]
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn two_four_tail<const D: u8>(
    m: &TwoFourRef<'_>,
    first: usize,
    c: usize,
    v: &[u8],
    x: &[f32],
    acc: Acc2,
) -> Acc2 {
    let ds = size(D);
    let n = m.cols - c;
    let bits = bits_at(m.meta, 4 * (first + c / 4)) & low_bits(n);
    let mut xs = [0f32; 64];
    xs[..n].copy_from_slice(&x[c..]);
    let mut w = [0u8; 32 * 4];
    w[..n / 2 * ds].copy_from_slice(&v[c / 2 * ds..]);
    two_four_word::<D>(bits, &w[..32 * ds], &xs, acc)
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn to_f32(v: Values<'_>, start: usize, out: &mut [f32]) {
    by_dtype!(
        v.dtype,
        to_f32_d(v.bytes, start, out),
        q_decode(v.bytes, v.dtype, start, out)
    )
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn to_f32_d<const D: u8>(b: &[u8], start: usize, out: &mut [f32]) {
    let ds = size(D);
    let b = b
        .get(start * ds..(start + out.len()) * ds)
        .expect("to_f32 range out of bounds");
    let mut chunks = out.chunks_exact_mut(8);
    let mut j = 0;
    for o in &mut chunks {
        // SAFETY: `b` holds out.len() values and j + 8 <= out.len(); `o` holds 8 floats.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), load8::<D>(b.as_ptr().add(j * ds))) };
        j += 8;
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        store_partial(rest, load8_partial::<D>(&b[j * ds..]));
    }
}

#[target_feature(enable = "avx2,fma,f16c,popcnt")]
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
        DType::F16 => {
            let mut xs = x.chunks_exact(8);
            let mut os = out.chunks_exact_mut(16);
            for (xc, oc) in (&mut xs).zip(&mut os) {
                // SAFETY: `xc` holds 8 floats and `oc` 16 bytes.
                unsafe {
                    let h =
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(xc.as_ptr()));
                    _mm_storeu_si128(oc.as_mut_ptr().cast(), h);
                }
            }
            scalar::from_f32(xs.remainder(), dtype, os.into_remainder());
        }
        DType::BF16 => {
            let mut xs = x.chunks_exact(8);
            let mut os = out.chunks_exact_mut(16);
            for (xc, oc) in (&mut xs).zip(&mut os) {
                // SAFETY: `xc` holds 8 floats and `oc` 16 bytes.
                unsafe {
                    let h = f32_to_bf16x8(_mm256_loadu_ps(xc.as_ptr()));
                    _mm_storeu_si128(oc.as_mut_ptr().cast(), h);
                }
            }
            scalar::from_f32(xs.remainder(), dtype, os.into_remainder());
        }
    }
}

/// 8 floats → 8 bf16, rounding to nearest even; NaNs become quiet NaNs (as
/// `scalar::f32_to_bf16`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn f32_to_bf16x8(v: __m256) -> __m128i {
    let bits = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
        _mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)),
        lsb,
    ));
    let nan = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
    let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    let r = _mm256_blendv_epi8(rounded, nan, is_nan);
    // Every lane is below 0x10000, so the unsigned saturating pack is exact.
    _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
}

// ---- Quantized values (Q8, Q4; format 1.1) ------------------------------------------
//
// A run's values are decoded 8 at a time (a group is a multiple of 16, so 8 values from
// an 8-aligned position never cross a block) to exactly the scalar reference's values:
// `s·q` is exact in `f32` (an f16 scale times a code of at most 8 bits), and Q4's
// `s·q + m` rounds once whether the FMA or a multiply and an add computes it. Only the
// order of the `f32` sums differs from the scalar kernels. The sparse kernels decode a
// row's run into a `QWindow` and run the `f32` paths of the float kernels on it.

/// The block's scale and (Q4) minimum as 8 equal `f32` lanes each (F16C's conversion is
/// exact, and quietens a NaN as the scalar decoder does).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn q_params8<const Q4: bool>(blk: &[u8]) -> (__m256, __m256) {
    let lanes =
        |i: usize| _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([blk[i], blk[i + 1]])));
    (lanes(0), if Q4 { lanes(2) } else { _mm256_setzero_ps() })
}

/// Values `off..off + 8` of the block `blk` (`off` a multiple of 8 below the group),
/// with the block's scale `s` and (Q4) minimum `m` as lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn q_unit8<const Q4: bool>(blk: &[u8], off: usize, s: __m256, m: __m256) -> __m256 {
    if Q4 {
        // 4 bytes = 8 codes, the earlier code in the low nibble.
        let b = &blk[4 + off / 2..4 + off / 2 + 4];
        let v = _mm256_set1_epi32(i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let q = _mm256_and_si256(
            _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
            _mm256_set1_epi32(0xF),
        );
        _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(q), m)
    } else {
        let b = &blk[2 + off..2 + off + 8];
        let v = i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        _mm256_mul_ps(
            s,
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v))),
        )
    }
}

/// Run values `start..start + out.len()` of the quantized run `run` (its first block at
/// `run[0]`) into `out`, 8 at a time.
///
/// # Panics
/// When the values lie past the run's bytes.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn q_decode(run: &[u8], dt: DType, start: usize, out: &mut [f32]) {
    by_q4!(dt, q_decode_q(run, dt, start, out))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn q_decode_q<const Q4: bool>(run: &[u8], dt: DType, start: usize, out: &mut [f32]) {
    simd::q_decode::<_, _, 8>(
        run,
        dt,
        start,
        out,
        |blk| q_params8::<Q4>(blk),
        |blk, off, (s, m)| q_unit8::<Q4>(blk, off, s, m),
        // SAFETY: `o` holds 8 floats.
        |o, v| unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) },
    )
}

/// Quantized bitmask rows: each row's run is decoded into a window, and each 64-column
/// word runs the `f32` word kernel on the window's values.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn q_bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    simd::q_bitmask_rows(
        m,
        r0,
        x,
        y,
        |run, dt, s, o| q_decode(run, dt, s, o),
        (_mm256_setzero_ps(), _mm256_setzero_ps()),
        |bits, v, xs, acc| bitmask_word::<F32>(bits, f32_bytes(v), 0, xs, acc),
        |acc| hsum2(acc),
    )
}

/// Quantized block-CSR rows: values from the row's window, `x` by clamped scalar loads
/// as in `csr_rows_d`.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn q_csr_rows(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let step = |acc, ib: u64, xb: &[f32], v: &[f32], live: usize| {
        let live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(live as i32), iota));
        // Clamped into the block whatever the bytes say (see `csr_rows_d`).
        let lim = xb.len() - 1;
        let at = |s: u32| xb[((ib >> s) as u8 as usize).min(lim)];
        let g = _mm256_and_ps(
            _mm256_setr_ps(at(0), at(8), at(16), at(24), at(32), at(40), at(48), at(56)),
            live,
        );
        // The lanes past the block (or past the run) are masked off.
        let w = _mm256_and_ps(loadx(v, 0), live);
        _mm256_fmadd_ps(w, g, acc)
    };
    let decode = |run: &[u8], dt, s, o: &mut [f32]| q_decode(run, dt, s, o);
    simd::q_csr_rows(m, r0, x, y, decode, _mm256_setzero_ps(), step, |a| hsum(a))
}

/// Quantized 2:4 rows: each 64 columns' 32 values from the row's window, through the
/// `f32` word kernel.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn q_two_four_rows(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let word = |bits, v: &[f32; 32], xs: &[f32; 64], acc| {
        two_four_word::<F32>(bits, f32_bytes(v), xs, acc)
    };
    let decode = |run: &[u8], dt, s, o: &mut [f32]| q_decode(run, dt, s, o);
    let zero = (_mm256_setzero_ps(), _mm256_setzero_ps());
    simd::q_two_four_rows(m, r0, x, y, decode, zero, word, |a| hsum2(a))
}
