//! Opens a `.cap` file on the host the way the board does: memory-mapped, verified,
//! and run in place by `cap-device`'s loader and kernels, so what `eval` and
//! `compress` measure is what the board computes.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use cap_device::load::{self, CapModel};
use cap_device::tokenizer::Tokenizer;
use cap_format::manifest::Manifest;
use cap_format::{CapFile, DType};
use memmap2::Mmap;

/// Maps `path` read-only.
pub fn map(path: &Path) -> Result<Mmap> {
    load::map_file(path).with_context(|| format!("{}: cannot open", path.display()))
}

/// Parses `bytes` and verifies every checksum and sparse structure.
pub fn parse_verified<'a>(path: &Path, bytes: &'a [u8]) -> Result<CapFile<'a>> {
    let file = CapFile::parse(bytes)
        .with_context(|| format!("{}: not a valid .cap file", path.display()))?;
    file.verify_all()
        .with_context(|| format!("{}: checksum verification failed", path.display()))?;
    Ok(file)
}

/// The model of a parsed file, borrowing its bytes.
pub fn model<'a>(path: &Path, file: &CapFile<'a>) -> Result<CapModel<'a>> {
    load::model(file).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// The tokenizer a file carries.
pub fn tokenizer(path: &Path, m: &Manifest) -> Result<Tokenizer> {
    load::tokenizer(m).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Little-endian raw values of `dtype` as `f32` (a trailing partial value is ignored).
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
    }
}
