//! Conversion of `f32` values to the stored little-endian bytes of a [`DType`]
//! (`no_std`): the one conversion every writer of `.cap` sections uses, so a value is
//! rounded the same way whether `pack` or `compress` stores it.

use alloc::vec::Vec;

use crate::DType;

/// Appends the little-endian bytes of `values` in `dtype` to `out` (f16 and bf16 are
/// rounded to nearest, ties to even).
pub fn extend_bytes(out: &mut Vec<u8>, values: &[f32], dtype: DType) {
    out.reserve(values.len() * dtype.size());
    for &x in values {
        match dtype {
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
        }
    }
}

/// Little-endian bytes of `values` in `dtype` (see [`extend_bytes`]).
pub fn to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::new();
    extend_bytes(&mut out, values, dtype);
    out
}
