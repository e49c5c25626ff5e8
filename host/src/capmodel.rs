//! Opens a `.cap` file on the host the way the board does: memory-mapped, verified,
//! and run in place by `cap-device`'s loader and kernels, so what `eval` and
//! `compress` measure is what the board computes. The opening itself is
//! [`cap_device::open`], the same code the `cap-device` binary runs.

use cap_format::DType;

pub use cap_device::open::{OpenError, map, model, parse_verified, tokenizer};

/// Little-endian raw values of `dtype` as `f32` (a trailing partial value is ignored).
/// For a quantized `dtype`, `bytes` is read as one run: every code of every whole
/// block, the zero padding of a partial last group included (the caller trims).
pub fn raw_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::Q8 { .. } | DType::Q4 { .. } => {
            let mut out = vec![0.0; bytes.len() / dtype.size() * dtype.group()];
            // Cannot fail: `out` holds exactly the values of the whole blocks.
            let _ = cap_format::dequantize(bytes, dtype, &mut out);
            out
        }
    }
}
