//! The scalar reference kernels: plain loops, one `f32` accumulator per output, the
//! definition every SIMD table is tested against. Also the exact bit-level f16/bf16
//! conversions the other tables use for their tails.

use super::{
    BitmaskRef, CsrRef, DType, Isa, Kernels, TwoFourRef, Values, bits_at, csr_blocks, low_bits,
    u32_at,
};

/// The scalar table.
pub(super) const KERNELS: Kernels = Kernels {
    isa: Isa::Scalar,
    dense_rows,
    dense_t_rows,
    bitmask_rows,
    csr_rows,
    two_four_rows,
    to_f32,
    from_f32,
};

/// f16 bits → `f32`, exactly: every f16 (subnormals included) is an `f32`. Infinities
/// stay infinite; a NaN keeps its sign and payload and comes back quiet, as the
/// hardware converters (F16C, `fcvtl`) and `half` make it.
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from(h >> 10) & 0x1f;
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: man·2^-24, a product of exact factors, so exact.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// `f32` → f16 bits, rounding to nearest with ties to even (`half::f16::from_f32`):
/// overflow gives ±inf, tiny values round to subnormals or ±0, a NaN stays a quiet NaN
/// with the top of its payload.
#[inline]
pub fn f32_to_f16(value: f32) -> u16 {
    let x = value.to_bits();
    let sign = (x >> 16) & 0x8000;
    let exp = (x >> 23) & 0xff;
    let man = x & 0x007f_ffff;
    if exp == 0xff {
        let quiet = if man == 0 { 0 } else { 0x0200 };
        return (sign | 0x7c00 | quiet | (man >> 13)) as u16;
    }
    let half_exp = exp as i32 - 127 + 15;
    if half_exp >= 0x1f {
        return (sign | 0x7c00) as u16;
    }
    if half_exp <= 0 {
        // Subnormal result (or zero): shift the significand, implicit bit included.
        let shift = (14 - half_exp) as u32;
        if shift > 24 {
            return sign as u16;
        }
        let m = man | 0x0080_0000;
        let half_man = m >> shift;
        let round_bit = 1u32 << (shift - 1);
        // Round up above the halfway point, or at it when the result would be odd.
        let up = (m & round_bit) != 0 && (m & (3 * round_bit - 1)) != 0;
        return (sign | (half_man + u32::from(up))) as u16;
    }
    let base = sign | ((half_exp as u32) << 10) | (man >> 13);
    let up = (man & 0x1000) != 0 && (man & 0x2fff) != 0;
    // A carry out of the significand correctly bumps the exponent (up to inf).
    (base + u32::from(up)) as u16
}

/// bf16 bits → `f32`: the upper half of the `f32` bits, exact (NaNs unchanged).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `f32` → bf16 bits, rounding to nearest with ties to even
/// (`half::bf16::from_f32`); a NaN stays a quiet NaN.
#[inline]
pub fn f32_to_bf16(value: f32) -> u16 {
    let x = value.to_bits();
    if value.is_nan() {
        return ((x >> 16) | 0x0040) as u16;
    }
    // Adding 0x7fff plus the result's lowest bit carries exactly when the dropped half
    // is above 0x8000, or equal to it with an odd result.
    ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

/// How one storage type decodes; the kernels are generic over it so the dtype match
/// happens once per call, not per element.
pub(super) trait Elem {
    /// Bytes per value.
    const SIZE: usize;
    /// Value `i` of raw little-endian bytes `b`.
    fn get(b: &[u8], i: usize) -> f32;
}

/// `f32` storage.
pub(super) struct F32;
/// f16 storage.
pub(super) struct F16;
/// bf16 storage.
pub(super) struct Bf16;

impl Elem for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn get(b: &[u8], i: usize) -> f32 {
        let s = &b[4 * i..4 * i + 4];
        f32::from_le_bytes([s[0], s[1], s[2], s[3]])
    }
}

impl Elem for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(b: &[u8], i: usize) -> f32 {
        f16_to_f32(u16::from_le_bytes([b[2 * i], b[2 * i + 1]]))
    }
}

impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn get(b: &[u8], i: usize) -> f32 {
        bf16_to_f32(u16::from_le_bytes([b[2 * i], b[2 * i + 1]]))
    }
}

/// Calls `$f::<E>(args)` with the `Elem` type of `$dtype`, or `$q` for a quantized
/// type (whose values are addressed by run and block, not by a flat index).
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($a:expr),* $(,)?), $q:expr) => {
        match $dtype {
            DType::F32 => $f::<F32>($($a),*),
            DType::F16 => $f::<F16>($($a),*),
            DType::BF16 => $f::<Bf16>($($a),*),
            DType::Q8 { .. } | DType::Q4 { .. } => $q,
        }
    };
}

/// Raw bytes of rows `r0..r0+n` of a dense matrix with `cols` columns.
#[inline]
pub(super) fn dense_block(w: &[u8], ds: usize, cols: usize, r0: usize, n: usize) -> &[u8] {
    let row = cols * ds;
    w.get(r0 * row..(r0 + n) * row)
        .expect("rows out of range of the dense matrix")
}

fn dense_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        w.dtype,
        dense_rows_e(w.bytes, cols, r0, x, y),
        q_dense_rows(w, cols, r0, x, y)
    )
}

fn dense_rows_e<E: Elem>(w: &[u8], cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), cols, "x.len() != cols");
    let block = dense_block(w, E::SIZE, cols, r0, y.len());
    if cols == 0 {
        return;
    }
    for (yi, row) in y.iter_mut().zip(block.chunks_exact(cols * E::SIZE)) {
        let mut acc = 0.0f32;
        for (c, &xc) in x.iter().enumerate() {
            acc += E::get(row, c) * xc;
        }
        *yi += acc;
    }
}

fn dense_t_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        w.dtype,
        dense_t_rows_e(w.bytes, cols, r0, x, y),
        q_dense_t_rows(w, cols, r0, x, y)
    )
}

fn dense_t_rows_e<E: Elem>(w: &[u8], cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(y.len(), cols, "y.len() != cols");
    let block = dense_block(w, E::SIZE, cols, r0, x.len());
    for (c, yc) in y.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for (i, &xi) in x.iter().enumerate() {
            acc += xi * E::get(block, i * cols + c);
        }
        *yc += acc;
    }
}

fn bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        m.values.dtype,
        bitmask_rows_e(m, r0, x, y),
        q_bitmask_rows(m, r0, x, y)
    )
}

fn bitmask_rows_e<E: Elem>(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let mut k = m.row_start[r] as usize;
        let mut acc = 0.0f32;
        for c in (0..cols).step_by(64) {
            let mut bits = bits_at(m.mask, r * cols + c) & low_bits(cols - c);
            while bits != 0 {
                let j = bits.trailing_zeros() as usize;
                acc += E::get(m.values.bytes, k) * x[c + j];
                k += 1;
                bits &= bits - 1;
            }
        }
        *yi += acc;
    }
}

fn csr_rows(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        m.values.dtype,
        csr_rows_e(m, r0, x, y),
        q_csr_rows(m, r0, x, y)
    )
}

fn csr_rows_e<E: Elem>(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    let nb = csr_blocks(cols);
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let mut acc = 0.0f32;
        for (b, xb) in x.chunks(256).enumerate() {
            let lo = u32_at(m.block_ptr, r * nb + b) as usize;
            let hi = u32_at(m.block_ptr, r * nb + b + 1) as usize;
            for k in lo..hi {
                acc += E::get(m.values.bytes, k) * xb[usize::from(m.col_idx[k])];
            }
        }
        *yi += acc;
    }
}

fn two_four_rows(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    by_dtype!(
        m.values.dtype,
        two_four_rows_e(m, r0, x, y),
        q_two_four_rows(m, r0, x, y)
    )
}

fn two_four_rows_e<E: Elem>(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert!(cols.is_multiple_of(4), "2:4 needs cols % 4 == 0");
    assert_eq!(x.len(), cols, "x.len() != cols");
    let groups = cols / 4;
    for (i, yi) in y.iter_mut().enumerate() {
        let first = (r0 + i) * groups;
        let mut acc = 0.0f32;
        for (g, xg) in x.chunks_exact(4).enumerate() {
            let ga = first + g;
            let nib = (m.meta[ga / 2] >> (4 * (ga % 2))) & 0xf;
            acc += E::get(m.values.bytes, 2 * ga) * xg[usize::from(nib & 3)];
            acc += E::get(m.values.bytes, 2 * ga + 1) * xg[usize::from(nib >> 2)];
        }
        *yi += acc;
    }
}

fn to_f32(v: Values<'_>, start: usize, out: &mut [f32]) {
    by_dtype!(
        v.dtype,
        to_f32_e(v.bytes, start, out),
        q_to_f32(v, start, out)
    )
}

fn to_f32_e<E: Elem>(b: &[u8], start: usize, out: &mut [f32]) {
    let b = b
        .get(start * E::SIZE..(start + out.len()) * E::SIZE)
        .expect("to_f32 range out of bounds");
    for (j, o) in out.iter_mut().enumerate() {
        *o = E::get(b, j);
    }
}

/// The reference conversion; the SIMD tables use it for f32 and for their tails.
/// A quantized `dtype` stores `x` as one run (the reference quantizer, total as
/// `cap_format::extend_bytes` is) in the `out.len() / dtype.size()` blocks of `out`.
pub(super) fn from_f32(x: &[f32], dtype: DType, out: &mut [u8]) {
    if dtype.is_quantized() {
        cap_format::values::write_run(x, dtype, out);
        return;
    }
    let n = out.len() / dtype.size();
    let x = &x[..n];
    match dtype {
        DType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f32_to_f16(v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
        }
        // Handled above.
        DType::Q8 { .. } | DType::Q4 { .. } => {}
    }
}

// ---- Quantized values (format 1.1) -------------------------------------------------
//
// A quantized value array is a sequence of runs (a dense row, a factor row, a sparse
// row's kept values), each `ceil(k/group)` blocks (`cap_format::DType::Q8` / `Q4`).
// Values are found by run and position in the run, so every kernel first finds its
// row's first block. The value is `s·q` (Q8) or `s·q + m` (Q4) in `f32`, exactly
// `cap_format::dequantize`, and each kernel sums `value·x` in the same order as the
// float kernel above it: the scalar result for a quantized matrix is bit-identical to
// the scalar result for its dequantized `f32` copy.

/// The block's scale and (Q4) minimum.
#[inline(always)]
fn q_params(blk: &[u8], dt: DType) -> (f32, f32) {
    let s = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
    let m = match dt {
        DType::Q4 { .. } => f16_to_f32(u16::from_le_bytes([blk[2], blk[3]])),
        _ => 0.0,
    };
    (s, m)
}

/// Value `k` (within its block `blk`) given the block's parameters.
#[inline(always)]
fn q_code_value(blk: &[u8], dt: DType, k: usize, s: f32, m: f32) -> f32 {
    match dt {
        DType::Q4 { .. } => s * f32::from((blk[4 + k / 2] >> (4 * (k % 2))) & 0xF) + m,
        _ => s * f32::from(blk[2 + k] as i8),
    }
}

/// Value `j` of the run whose first block starts at `b[0]`.
#[inline(always)]
fn q_value(b: &[u8], dt: DType, j: usize) -> f32 {
    let g = dt.group();
    let blk = &b[(j / g) * dt.size()..(j / g + 1) * dt.size()];
    let (s, m) = q_params(blk, dt);
    q_code_value(blk, dt, j % g, s, m)
}

/// Calls `f(j, value)` for the first `k` values of the run at `b[0]`, a block at a time
/// (each scale decoded once).
#[inline(always)]
fn q_run(b: &[u8], dt: DType, k: usize, mut f: impl FnMut(usize, f32)) {
    let (g, bs) = (dt.group(), dt.size());
    let b = b
        .get(..k.div_ceil(g) * bs)
        .expect("quantized run past the end of the values");
    for (bi, blk) in b.chunks_exact(bs).enumerate() {
        let (s, m) = q_params(blk, dt);
        let j0 = bi * g;
        for kk in 0..g.min(k - j0) {
            f(j0 + kk, q_code_value(blk, dt, kk, s, m));
        }
    }
}

/// Index of the first block of row `r0` of a sparse part whose row `r` holds
/// `count(r)` kept values: `Σ_{r<r0} ceil(count(r)/group)`. Costs one pass over the
/// row pointers before `r0` per call (a few thousand integer reads for a large layer,
/// against its hundreds of thousands of values), which spares the format and the
/// loader a per-row block table.
#[inline]
pub(super) fn q_first_block(r0: usize, group: usize, count: impl Fn(usize) -> usize) -> usize {
    (0..r0).map(|r| count(r).div_ceil(group)).sum()
}

/// Raw bytes of rows `r0..r0 + n` of a dense matrix of quantized values (one run of
/// `cols` values a row), and the bytes of a row.
///
/// # Panics
/// When the rows lie outside `w`.
#[inline]
pub(super) fn q_dense_block(w: Values<'_>, cols: usize, r0: usize, n: usize) -> (&[u8], usize) {
    let rb = w.dtype.run_bytes(cols as u64) as usize;
    let block = w
        .bytes
        .get(r0 * rb..(r0 + n) * rb)
        .expect("rows out of range of the dense matrix");
    (block, rb)
}

fn q_dense_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), cols, "x.len() != cols");
    if cols == 0 {
        return;
    }
    let dt = w.dtype;
    let (block, rb) = q_dense_block(w, cols, r0, y.len());
    for (yi, row) in y.iter_mut().zip(block.chunks_exact(rb)) {
        let mut acc = 0.0f32;
        q_run(row, dt, cols, |j, v| acc += v * x[j]);
        *yi += acc;
    }
}

fn q_dense_t_rows(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(y.len(), cols, "y.len() != cols");
    let dt = w.dtype;
    let (block, rb) = q_dense_block(w, cols, r0, x.len());
    for (c, yc) in y.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for (i, &xi) in x.iter().enumerate() {
            acc += xi * q_value(&block[i * rb..], dt, c);
        }
        *yc += acc;
    }
}

fn q_bitmask_rows(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    let dt = m.values.dtype;
    let count = |r: usize| (m.row_start[r + 1] - m.row_start[r]) as usize;
    let mut blk = q_first_block(r0, dt.group(), count);
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let run = &m.values.bytes[blk * dt.size()..];
        let mut j = 0usize;
        let mut acc = 0.0f32;
        for c in (0..cols).step_by(64) {
            let mut bits = bits_at(m.mask, r * cols + c) & low_bits(cols - c);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                acc += q_value(run, dt, j) * x[c + b];
                j += 1;
                bits &= bits - 1;
            }
        }
        *yi += acc;
        blk += count(r).div_ceil(dt.group());
    }
}

fn q_csr_rows(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    let dt = m.values.dtype;
    let nb = csr_blocks(cols);
    let ptr = |i: usize| u32_at(m.block_ptr, i) as usize;
    let count = |r: usize| ptr((r + 1) * nb) - ptr(r * nb);
    let mut blk = q_first_block(r0, dt.group(), count);
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let run = &m.values.bytes[blk * dt.size()..];
        let first = ptr(r * nb);
        let mut acc = 0.0f32;
        for (b, xb) in x.chunks(256).enumerate() {
            for k in ptr(r * nb + b)..ptr(r * nb + b + 1) {
                acc += q_value(run, dt, k - first) * xb[usize::from(m.col_idx[k])];
            }
        }
        *yi += acc;
        blk += count(r).div_ceil(dt.group());
    }
}

fn q_two_four_rows(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = m.cols;
    assert!(cols.is_multiple_of(4), "2:4 needs cols % 4 == 0");
    assert_eq!(x.len(), cols, "x.len() != cols");
    let dt = m.values.dtype;
    let groups = cols / 4;
    // Every row stores cols/2 values: a fixed run length.
    let rb = dt.run_bytes((cols / 2) as u64) as usize;
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let run = &m.values.bytes[r * rb..];
        let mut acc = 0.0f32;
        for (g, xg) in x.chunks_exact(4).enumerate() {
            let ga = r * groups + g;
            let nib = (m.meta[ga / 2] >> (4 * (ga % 2))) & 0xf;
            acc += q_value(run, dt, 2 * g) * xg[usize::from(nib & 3)];
            acc += q_value(run, dt, 2 * g + 1) * xg[usize::from(nib >> 2)];
        }
        *yi += acc;
    }
}

/// Quantized `to_f32`: `v` is one run, `out[j]` its value `start + j`.
fn q_to_f32(v: Values<'_>, start: usize, out: &mut [f32]) {
    let dt = v.dtype;
    let g = dt.group();
    let b = v.bytes.get((start / g) * dt.size()..).unwrap_or(&[]);
    let skip = start % g;
    q_run(b, dt, skip + out.len(), |j, x| {
        if j >= skip {
            out[j - skip] = x;
        }
    });
}
