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

/// Calls `$f::<E>(args)` with the `Elem` type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($a:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<F32>($($a),*),
            DType::F16 => $f::<F16>($($a),*),
            DType::BF16 => $f::<Bf16>($($a),*),
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
    by_dtype!(w.dtype, dense_rows_e(w.bytes, cols, r0, x, y))
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
    by_dtype!(w.dtype, dense_t_rows_e(w.bytes, cols, r0, x, y))
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
    by_dtype!(m.values.dtype, bitmask_rows_e(m, r0, x, y))
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
    by_dtype!(m.values.dtype, csr_rows_e(m, r0, x, y))
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
    by_dtype!(m.values.dtype, two_four_rows_e(m, r0, x, y))
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
    by_dtype!(v.dtype, to_f32_e(v.bytes, start, out))
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
pub(super) fn from_f32(x: &[f32], dtype: DType, out: &mut [u8]) {
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
    }
}
