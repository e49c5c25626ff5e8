//! AVX-512 kernels (x86-64; F, BW and VL on top of the AVX2 table's features), 16
//! `f32` lanes.
//!
//! Only the entries where 16 lanes and mask registers pay have their own kernels:
//! dense rows of every dtype (f32, f16, bf16, Q8, Q4), the quantized bitmask rows and
//! the quantized `to_f32`. Everything else is the AVX2 table's
//! kernel (sound to call: this table is only handed out when the AVX2 table's
//! features were detected too).
//!
//! The quantized bitmask kernel expands packed values into their column lanes with
//! `vexpandps` under a 16-bit mask and accumulates with a masked FMA, so pruned
//! columns are skipped exactly (as in the scalar loop). The quantized kernels
//! decode 16 values at a time (a group is a multiple of 16, so 16 values from a
//! 16-aligned position never cross a block) to exactly the scalar reference's values
//! (see the quantized section of `x86.rs`). As everywhere, vector loads read from
//! slices whose lengths were checked just before, or from zero-padded stack copies.

use core::arch::x86_64::*;

use super::super::simd::{self, BF16, F16, F32, size};
use super::super::{BitmaskRef, DType, Isa, Kernels, Values};

/// Whether this CPU has AVX-512 F, BW and VL besides the AVX2 table's features (at run
/// time with `std`, else from the compile-time target features).
fn detected() -> bool {
    #[cfg(feature = "std")]
    {
        super::detected()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(feature = "std"))]
    {
        super::detected()
            && cfg!(all(
                target_feature = "avx512f",
                target_feature = "avx512bw",
                target_feature = "avx512vl"
            ))
    }
}

/// The AVX-512 table when this CPU can run it.
pub(in crate::cpu) fn table() -> Option<Kernels> {
    detected().then_some(KERNELS)
}

/// The AVX-512 table. Private entry points only: holding this table means the
/// features were detected (see [`table`]).
pub(in crate::cpu) const KERNELS: Kernels = Kernels {
    isa: Isa::Avx512,
    dense_rows: entry::dense_rows,
    // Not worth their own 16-lane kernels yet: the AVX2 table's (whose features
    // `detected` includes).
    dense_t_rows: super::KERNELS.dense_t_rows,
    bitmask_rows: entry::bitmask_rows,
    // A 16-lane `vgatherdps` version of the quantized block-CSR kernel measured slower
    // than AVX2's clamped scalar loads (706 against 569 µs, 50% Q8 576×1536 on a Xeon
    // with AVX-512), so block-CSR stays AVX2's for every dtype.
    csr_rows: super::KERNELS.csr_rows,
    two_four_rows: super::KERNELS.two_four_rows,
    to_f32: entry::to_f32,
    from_f32: super::KERNELS.from_f32,
};

/// Plain `fn` wrappers for the table.
mod entry {
    use super::*;

    macro_rules! entries {
        ($($name:ident($($a:ident: $t:ty),*);)*) => {$(
            pub(super) fn $name($($a: $t),*) {
                // SAFETY: only reachable through `KERNELS`, which `table` returns only
                // when avx512f, avx512bw, avx512vl and the AVX2 table's features were
                // detected (or are compile-time features without std).
                unsafe { super::$name($($a),*) }
            }
        )*};
    }

    entries! {
        dense_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]);
        bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]);
        to_f32(v: Values<'_>, start: usize, out: &mut [f32]);
    }
}

/// 16 values of storage `D` at `p` as `f32` lanes.
///
/// # Safety
/// `p .. p + 16·size(D)` must be readable (no alignment needed).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
unsafe fn load16<const D: u8>(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 16 values are readable at `p`; loadu has no
    // alignment requirement.
    unsafe {
        match D {
            F32 => _mm512_loadu_ps(p.cast()),
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p.cast()),
            ))),
        }
    }
}

/// Up to 16 values of storage `D` (`b.len()/size(D)` of them), the rest 0.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn load16_partial<const D: u8>(b: &[u8]) -> __m512 {
    let mut buf = [0u8; 64];
    let n = b.len().min(16 * size(D));
    buf[..n].copy_from_slice(&b[..n]);
    // SAFETY: `buf` holds 64 bytes, the most 16 values of any storage take.
    unsafe { load16::<D>(buf.as_ptr()) }
}

/// 16 floats from `x[i..i+16]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn loadx16(x: &[f32], i: usize) -> __m512 {
    let s = &x[i..i + 16];
    // SAFETY: `s` has exactly 16 elements.
    unsafe { _mm512_loadu_ps(s.as_ptr()) }
}

/// Up to 16 floats of `x` (all of it when shorter), the rest 0.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn loadx16_partial(x: &[f32]) -> __m512 {
    let mut buf = [0f32; 16];
    let n = x.len().min(16);
    buf[..n].copy_from_slice(&x[..n]);
    loadx16(&buf, 0)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
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
/// ([`simd::q4_split_rows`]): 32 values per 16-byte load, 16 lanes each of the even
/// and the odd codes. The decoded values, `s·q + m`, are the reference's (exact:
/// `s·q` fits `f32`'s mantissa), only summed in another order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn q4_split_rows(w: Values<'_>, g: usize, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    let low = _mm_set1_epi8(0xF);
    let step = |(a0, a1): (__m512, __m512), (sc, mn), codes: &[u8; 16], xc: &[f32; 32]| {
        // SAFETY: `codes` holds 16 bytes and `xc` 32 floats.
        let (v, xe, xo) = unsafe {
            (
                _mm_loadu_si128(codes.as_ptr().cast()),
                _mm512_loadu_ps(xc.as_ptr()),
                _mm512_loadu_ps(xc.as_ptr().add(16)),
            )
        };
        let even = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, low)));
        let odd = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
            _mm_srli_epi16::<4>(v),
            low,
        )));
        (
            _mm512_fmadd_ps(_mm512_fmadd_ps(sc, even, mn), xe, a0),
            _mm512_fmadd_ps(_mm512_fmadd_ps(sc, odd, mn), xo, a1),
        )
    };
    simd::q4_split_rows(
        w,
        g,
        cols,
        r0,
        x,
        y,
        |blk| q_params16::<true>(blk),
        (_mm512_setzero_ps(), _mm512_setzero_ps()),
        step,
        |(a0, a1)| _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)),
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn dense_rows_d<const D: u8>(w: &[u8], cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    simd::dense_rows::<D>(w, cols, r0, x, y, |row, x| dot::<D>(row, x))
}

/// `row · x` for one row of `x.len()` values of storage `D`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn dot<const D: u8>(row: &[u8], x: &[f32]) -> f32 {
    let ds = size(D);
    let n = x.len();
    assert_eq!(row.len(), n * ds);
    let p = row.as_ptr();
    // Four independent accumulators hide the FMA latency.
    let mut a0 = _mm512_setzero_ps();
    let mut a1 = _mm512_setzero_ps();
    let mut a2 = _mm512_setzero_ps();
    let mut a3 = _mm512_setzero_ps();
    let mut c = 0;
    while c + 64 <= n {
        // SAFETY: c + 64 <= n and `row` holds n values.
        let (w0, w1, w2, w3) = unsafe {
            (
                load16::<D>(p.add(c * ds)),
                load16::<D>(p.add((c + 16) * ds)),
                load16::<D>(p.add((c + 32) * ds)),
                load16::<D>(p.add((c + 48) * ds)),
            )
        };
        a0 = _mm512_fmadd_ps(w0, loadx16(x, c), a0);
        a1 = _mm512_fmadd_ps(w1, loadx16(x, c + 16), a1);
        a2 = _mm512_fmadd_ps(w2, loadx16(x, c + 32), a2);
        a3 = _mm512_fmadd_ps(w3, loadx16(x, c + 48), a3);
        c += 64;
    }
    while c + 16 <= n {
        // SAFETY: c + 16 <= n and `row` holds n values.
        let w0 = unsafe { load16::<D>(p.add(c * ds)) };
        a0 = _mm512_fmadd_ps(w0, loadx16(x, c), a0);
        c += 16;
    }
    if c < n {
        let w0 = load16_partial::<D>(&row[c * ds..]);
        a1 = _mm512_fmadd_ps(w0, loadx16_partial(&x[c..]), a1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)))
}

/// The block's scale and (Q4) minimum as 16 equal `f32` lanes each (exact, as in
/// `q_params8`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn q_params16<const Q4: bool>(blk: &[u8]) -> (__m512, __m512) {
    let lanes =
        |i: usize| _mm512_cvtph_ps(_mm256_set1_epi16(i16::from_le_bytes([blk[i], blk[i + 1]])));
    (lanes(0), if Q4 { lanes(2) } else { _mm512_setzero_ps() })
}

/// Values `off..off + 16` of the block `blk` (`off` a multiple of 16 below the
/// group), with the block's scale `s` and (Q4) minimum `m` as lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn q_unit16<const Q4: bool>(blk: &[u8], off: usize, s: __m512, m: __m512) -> __m512 {
    if Q4 {
        // 8 bytes = 16 codes: interleaving the low and high nibbles puts them in order.
        let b = &blk[4 + off / 2..4 + off / 2 + 8];
        let v = _mm_cvtsi64_si128(i64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]));
        let low = _mm_set1_epi8(0xF);
        let codes = _mm_unpacklo_epi8(
            _mm_and_si128(v, low),
            _mm_and_si128(_mm_srli_epi16::<4>(v), low),
        );
        _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), m)
    } else {
        let b: &[u8; 16] = blk[2 + off..2 + off + 16].try_into().unwrap();
        // SAFETY: `b` holds 16 bytes.
        let v = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
        _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)))
    }
}

/// Dense rows of quantized values: 32 decoded values per step, two accumulators.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn q_dense_rows<const Q4: bool>(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    simd::q_dense_rows::<_, _, _, 16>(
        w,
        cols,
        r0,
        x,
        y,
        |blk| q_params16::<Q4>(blk),
        |blk, off, (s, m)| q_unit16::<Q4>(blk, off, s, m),
        _mm512_setzero_ps(),
        |a, v, xs| _mm512_fmadd_ps(v, loadx16(xs, 0), a),
        |a0, a1| _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)),
    )
}

/// Run values `start..start + out.len()` of the quantized run `run` into `out`, 16 at a
/// time.
///
/// # Panics
/// When the values lie past the run's bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn q_decode(run: &[u8], dt: DType, start: usize, out: &mut [f32]) {
    by_q4!(dt, q_decode_q(run, dt, start, out))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn q_decode_q<const Q4: bool>(run: &[u8], dt: DType, start: usize, out: &mut [f32]) {
    simd::q_decode::<_, _, 16>(
        run,
        dt,
        start,
        out,
        |blk| q_params16::<Q4>(blk),
        |blk, off, (s, m)| q_unit16::<Q4>(blk, off, s, m),
        // SAFETY: `o` holds 16 floats.
        |o, v| unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) },
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn to_f32(v: Values<'_>, start: usize, out: &mut [f32]) {
    if v.dtype.is_quantized() {
        q_decode(v.bytes, v.dtype, start, out)
    } else {
        super::to_f32(v, start, out)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    if m.values.dtype.is_quantized() {
        q_bitmask_rows(m, r0, x, y)
    } else {
        super::bitmask_rows(m, r0, x, y)
    }
}

/// Quantized bitmask rows: each row's run is decoded into a window; per 16 columns the
/// packed values are expanded to the mask's lanes and multiplied-accumulated under the
/// same mask.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn q_bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    simd::q_bitmask_rows(
        m,
        r0,
        x,
        y,
        |run, dt, s, o| q_decode(run, dt, s, o),
        (_mm512_setzero_ps(), _mm512_setzero_ps()),
        |bits, v, xs, acc| bitmask_word(bits, v, xs, acc),
        |(a0, a1)| _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)),
    )
}

/// One 64-column mask word over packed `f32` values `v` (at least popcount + 16 of
/// them, the last 16 past the word's own possibly leftovers: never in a mask lane).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c,popcnt")]
fn bitmask_word(bits: u64, v: &[f32], xs: &[f32; 64], acc: (__m512, __m512)) -> (__m512, __m512) {
    let (mut a0, mut a1) = acc;
    let mut k = 0;
    for j in 0..4 {
        let b = (bits >> (16 * j)) as u16;
        // `k` ≤ popcount(bits), so 16 floats from `k` lie inside `v` (checked).
        let w = _mm512_maskz_expand_ps(b, loadx16(v, k));
        let xv = loadx16(xs, 16 * j);
        // Lanes outside the mask keep the accumulator: pruned columns are skipped
        // exactly, whatever their activation.
        if j % 2 == 0 {
            a0 = _mm512_mask3_fmadd_ps(w, xv, a0, b);
        } else {
            a1 = _mm512_mask3_fmadd_ps(w, xv, a1, b);
        }
        k += b.count_ones() as usize;
    }
    (a0, a1)
}
