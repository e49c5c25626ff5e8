//! Dequantization of GGML tensor data to `f32`.
//!
//! Each routine reproduces llama.cpp's reference `dequantize_row_*` functions in
//! `ggml-quants.c` bit for bit: the same block layouts, the same `f16` → `f32` scale
//! conversion (exact, via the `half` crate), and the same order of the `f32` operations
//! (one product and, for types with a minimum, one separate addition or subtraction; no
//! fused multiply-add). Inputs are read with safe byte indexing on blocks whose length has
//! been checked up front, so no input can make these functions panic.
//!
//! Large tensors are split into runs of whole blocks and dequantized in parallel with
//! rayon; the result does not depend on the split.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Elements in one K-quant super-block (`QK_K` in ggml).
const QK_K: usize = 256;

/// Elements below which a tensor is dequantized on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// Elements per parallel work item (a multiple of every block size).
const CHUNK_ELEMS: usize = 1 << 14;

/// GGML tensor element types cap can read (ids as in ggml.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit IEEE float (id 0).
    F32,
    /// 16-bit IEEE float (id 1).
    F16,
    /// 32-element blocks: `f16` scale `d`, 4-bit quants; `x = d * (q - 8)` (id 2).
    Q4_0,
    /// 32-element blocks: `f16` scale `d` and minimum `m`, 4-bit quants; `x = d * q + m` (id 3).
    Q4_1,
    /// 32-element blocks: `f16` scale `d`, 5-bit quants; `x = d * (q - 16)` (id 6).
    Q5_0,
    /// 32-element blocks: `f16` scale `d` and minimum `m`, 5-bit quants; `x = d * q + m` (id 7).
    Q5_1,
    /// 32-element blocks: `f16` scale `d`, signed 8-bit quants; `x = d * q` (id 8).
    Q8_0,
    /// 256-element super-blocks of eight 32-element sub-blocks with 6-bit scales and
    /// minimums, 4-bit quants (id 12).
    Q4K,
    /// 256-element super-blocks of eight 32-element sub-blocks with 6-bit scales and
    /// minimums, 5-bit quants (id 13).
    Q5K,
    /// 256-element super-blocks of sixteen 16-element sub-blocks with 8-bit scales,
    /// 6-bit quants (id 14).
    Q6K,
    /// bfloat16 (id 30).
    BF16,
}

impl GgmlType {
    /// Every type cap can read.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::BF16,
    ];

    /// The type with GGML id `id` (`ggml_type` in ggml.h), if cap supports it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The GGML id of this type (inverse of [`GgmlType::from_id`]).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The name ggml gives this type ("F32", "Q4_1", "Q4_K", ...).
    pub fn name(self) -> &'static str {
        ggml_type_name(self.id())
    }

    /// Elements per block: 1 for the float types, 32 for `Q*_0`/`Q*_1`, 256 for K-quants.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block (`sizeof(block_*)` in ggml-common.h).
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4K => 2 + 2 + 12 + QK_K / 2,
            GgmlType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            GgmlType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes needed for n elements; None if n is not a multiple of the block size or overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let be = self.block_elems();
        if !n.is_multiple_of(be) {
            return None;
        }
        (n / be).checked_mul(self.block_bytes())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Name of a GGML type id cap does not support, for error messages (e.g. 10 -> "Q2_K",
/// 16 -> "IQ2_XXS"); "unknown" otherwise.
///
/// Supported ids get their names too (2 -> "Q4_0"), as do ids ggml has retired
/// (4 -> "Q4_2", 31 -> "Q4_0_4_4"), so a message can always say what a file contains.
pub fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2",
        5 => "Q4_3",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        31 => "Q4_0_4_4",
        32 => "Q4_0_4_8",
        33 => "Q4_0_8_8",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4",
        37 => "IQ4_NL_4_8",
        38 => "IQ4_NL_8_8",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => "unknown",
    }
}

/// Why a tensor could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DequantError {
    /// The element count does not fill a whole number of blocks.
    #[error("{ty} tensor of {n} elements: {n} is not a multiple of the {ty} block size {block}")]
    NotBlockMultiple {
        /// The tensor's type.
        ty: GgmlType,
        /// The element count asked for.
        n: usize,
        /// Elements per block of `ty`.
        block: usize,
    },
    /// The element count is so large that its byte size does not fit in `usize`.
    #[error("{ty} tensor of {n} elements: byte size overflows")]
    TooLarge {
        /// The tensor's type.
        ty: GgmlType,
        /// The element count asked for.
        n: usize,
    },
    /// The data is not exactly as long as `n` elements of the type need.
    #[error("{ty} tensor of {n} elements needs {expected} bytes of data, got {actual}")]
    WrongByteLength {
        /// The tensor's type.
        ty: GgmlType,
        /// The element count asked for.
        n: usize,
        /// Bytes that `n` elements of `ty` take.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
}

/// Dequantize `n` elements of type `ty` from `data` (exactly `ty.bytes_for(n)` bytes) into
/// `out` (len n).
///
/// `n` is `out.len()`. Errors (never panics) when `n` is not a whole number of blocks or
/// `data` has the wrong length; `out` is then left untouched.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let n = out.len();
    check_len(ty, data, n)?;
    if n >= PARALLEL_MIN_ELEMS {
        // CHUNK_ELEMS is a multiple of every block size, so each chunk is whole blocks.
        let chunk_bytes = CHUNK_ELEMS / ty.block_elems() * ty.block_bytes();
        data.par_chunks(chunk_bytes)
            .zip(out.par_chunks_mut(CHUNK_ELEMS))
            .for_each(|(d, o)| dequantize_blocks(ty, d, o));
    } else {
        dequantize_blocks(ty, data, out);
    }
    Ok(())
}

/// Checks that `n` elements of `ty` are whole blocks stored in exactly `data.len()` bytes.
fn check_len(ty: GgmlType, data: &[u8], n: usize) -> Result<(), DequantError> {
    let block = ty.block_elems();
    if !n.is_multiple_of(block) {
        return Err(DequantError::NotBlockMultiple { ty, n, block });
    }
    let expected = ty.bytes_for(n).ok_or(DequantError::TooLarge { ty, n })?;
    if data.len() != expected {
        return Err(DequantError::WrongByteLength {
            ty,
            n,
            expected,
            actual: data.len(),
        });
    }
    Ok(())
}

/// Dequantize `n` elements of type `ty` from `data` (exactly `ty.bytes_for(n)` bytes) into a
/// new vector.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    // Validate before allocating, so a bogus `n` cannot trigger a huge allocation.
    check_len(ty, data, n)?;
    let mut out = vec![0.0f32; n];
    dequantize_into(ty, data, &mut out)?;
    Ok(out)
}

/// Dequantizes whole blocks; `data.len() / block_bytes == out.len() / block_elems`
/// (checked by the caller; a mismatch would only leave elements unwritten).
fn dequantize_blocks(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    let be = ty.block_elems();
    let blocks = data.chunks_exact(bb).zip(out.chunks_exact_mut(be));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(x, y)| y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
        }
        GgmlType::F16 => f16_run(data, out),
        // As ggml_compute_bf16_to_fp32: the bf16 bits are the high half of the f32 bits.
        GgmlType::BF16 => blocks.for_each(|(x, y)| {
            y[0] = f32::from_bits(u32::from(u16::from_le_bytes([x[0], x[1]])) << 16)
        }),
        GgmlType::Q4_0 => blocks.for_each(|(x, y)| block_q4_0(x, y)),
        GgmlType::Q4_1 => blocks.for_each(|(x, y)| block_q4_1(x, y)),
        GgmlType::Q5_0 => blocks.for_each(|(x, y)| block_q5_0(x, y)),
        GgmlType::Q5_1 => blocks.for_each(|(x, y)| block_q5_1(x, y)),
        GgmlType::Q8_0 => blocks.for_each(|(x, y)| block_q8_0(x, y)),
        GgmlType::Q4K => blocks.for_each(|(x, y)| block_q4_k(x, y)),
        GgmlType::Q5K => blocks.for_each(|(x, y)| block_q5_k(x, y)),
        GgmlType::Q6K => blocks.for_each(|(x, y)| block_q6_k(x, y)),
    }
}

/// Converts little-endian `f16` values a stack buffer at a time, so `half` can use its
/// vectorised slice conversion (F16C where the CPU has it; exact, like the scalar one).
fn f16_run(data: &[u8], out: &mut [f32]) {
    const RUN: usize = 256;
    let mut buf = [f16::ZERO; RUN];
    for (x, y) in data.chunks(2 * RUN).zip(out.chunks_mut(RUN)) {
        let buf = &mut buf[..y.len()];
        for (h, b) in buf.iter_mut().zip(x.chunks_exact(2)) {
            *h = f16::from_le_bytes([b[0], b[1]]);
        }
        buf.convert_to_f32_slice(y);
    }
}

/// The little-endian `f16` at `x[i..i + 2]`, as `f32` (`GGML_FP16_TO_FP32`).
#[inline(always)]
fn f16_at(x: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([x[i], x[i + 1]]).to_f32()
}

/// `block_q4_0`: `d: f16, qs: [u8; 16]`; low nibbles are elements 0..16, high 16..32.
#[inline(always)]
fn block_q4_0(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let (qs, y) = (&x[2..18], &mut y[..32]);
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        lo[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1`: `d: f16, m: f16, qs: [u8; 16]`.
#[inline(always)]
fn block_q4_1(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let m = f16_at(x, 2);
    let (qs, y) = (&x[4..20], &mut y[..32]);
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        lo[j] = (qs[j] & 0x0F) as f32 * d + m;
        hi[j] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// `block_q5_0`: `d: f16, qh: [u8; 4], qs: [u8; 16]`; bit j of `qh` is bit 4 of element j.
#[inline(always)]
fn block_q5_0(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
    let (qs, y) = (&x[6..22], &mut y[..32]);
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) as u8 & 0x10;
        let xh1 = (qh >> (j + 12)) as u8 & 0x10;
        lo[j] = (((qs[j] & 0x0F) | xh0) as i32 - 16) as f32 * d;
        hi[j] = (((qs[j] >> 4) | xh1) as i32 - 16) as f32 * d;
    }
}

/// `block_q5_1`: `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`.
#[inline(always)]
fn block_q5_1(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let m = f16_at(x, 2);
    let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
    let (qs, y) = (&x[8..24], &mut y[..32]);
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        let xh0 = ((qh >> j) << 4) as u8 & 0x10;
        let xh1 = (qh >> (j + 12)) as u8 & 0x10;
        lo[j] = ((qs[j] & 0x0F) | xh0) as f32 * d + m;
        hi[j] = ((qs[j] >> 4) | xh1) as f32 * d + m;
    }
}

/// `block_q8_0`: `d: f16, qs: [i8; 32]`.
#[inline(always)]
fn block_q8_0(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    for (o, &q) in y[..32].iter_mut().zip(&x[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j` (0..8) from
/// the 12 packed bytes `q`.
#[inline(always)]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The scale and minimum of sub-blocks `2p` and `2p + 1` (the pair one 32-byte run
/// of `qs` holds) of a `q4_K` / `q5_K` super-block with super-scales `d` and `min`.
#[inline(always)]
fn sub_block_pair(p: usize, d: f32, min: f32, scales: &[u8]) -> [(f32, f32); 2] {
    [2 * p, 2 * p + 1].map(|j| {
        let (sc, m) = get_scale_min_k4(j, scales);
        (d * sc as f32, min * m as f32)
    })
}

/// `block_q4_K`: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Each 32-byte run of
/// `qs` holds two 32-element sub-blocks (low nibbles, then high nibbles).
#[inline(always)]
fn block_q4_k(x: &[u8], y: &mut [f32]) {
    k_quant_4_5(x, &x[16..144], None, y);
}

/// `block_q5_K`: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`. Bit
/// `2p` / `2p + 1` of `qh[l]` is the fifth bit of element `l` of sub-block `2p` / `2p + 1`.
#[inline(always)]
fn block_q5_k(x: &[u8], y: &mut [f32]) {
    k_quant_4_5(x, &x[48..176], Some(&x[16..48]), y);
}

/// The shared body of Q4_K and Q5_K (Q5_K is Q4_K plus a fifth bit per value from `qh`):
/// `x` starts with `d`, `dmin` and the 12 bytes of packed scales; `qs` holds the low
/// nibbles.
#[inline(always)]
fn k_quant_4_5(x: &[u8], qs: &[u8], qh: Option<&[u8]>, y: &mut [f32]) {
    let d = f16_at(x, 0);
    let min = f16_at(x, 2);
    let scales = &x[4..16];
    for (p, (q, y)) in qs
        .chunks_exact(32)
        .zip(y[..QK_K].chunks_exact_mut(64))
        .enumerate()
    {
        let [(d1, m1), (d2, m2)] = sub_block_pair(p, d, min, scales);
        let (u1, u2) = (1u8 << (2 * p), 2u8 << (2 * p));
        let high = |l: usize, u: u8| qh.map_or(0, |h| if h[l] & u != 0 { 16 } else { 0 });
        let (lo, hi) = y.split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * ((q[l] & 0x0F) + high(l, u1)) as f32 - m1;
            hi[l] = d2 * ((q[l] >> 4) + high(l, u2)) as f32 - m2;
        }
    }
}

/// `block_q6_K`: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. Each half
/// (128 elements) uses 64 bytes of `ql`, 32 of `qh` and 8 scales; `x = d * scale * (q - 32)`.
#[inline(always)]
fn block_q6_k(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 208);
    for (half, y) in y[..QK_K].chunks_exact_mut(128).enumerate() {
        let ql = &x[64 * half..64 * half + 64];
        let qh = &x[128 + 32 * half..128 + 32 * half + 32];
        let sc = &x[192 + 8 * half..192 + 8 * half + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_split_matches_serial() {
        // A tensor big enough to take the rayon path, with a ragged final chunk.
        for ty in GgmlType::ALL {
            let n = PARALLEL_MIN_ELEMS + 3 * QK_K;
            let len = ty.bytes_for(n).unwrap();
            let mut data: Vec<u8> = (0..len)
                .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
                .collect();
            // Keep f16/bf16/f32 patterns finite-ish: compare bit patterns, so NaNs are fine.
            data.iter_mut().step_by(7).for_each(|b| *b &= 0x3F);
            let par = dequantize(ty, &data, n).unwrap();
            let mut ser = vec![0.0f32; n];
            dequantize_blocks(ty, &data, &mut ser);
            let same = par
                .iter()
                .zip(&ser)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ty}");
        }
    }

    #[test]
    fn empty_tensor_is_fine() {
        for ty in GgmlType::ALL {
            assert_eq!(dequantize(ty, &[], 0).unwrap(), Vec::<f32>::new());
        }
    }

    #[test]
    fn huge_n_is_an_error_not_an_allocation() {
        let n = usize::MAX / 32 * 32;
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[], n),
            Err(DequantError::TooLarge { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::F32, &[], usize::MAX),
            Err(DequantError::TooLarge { .. })
        ));
    }
}
