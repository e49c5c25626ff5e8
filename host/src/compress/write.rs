//! Encoding kept items into cap-format tensors, and re-stamping a written file's
//! manifest (to add the perplexity measured on the file itself).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cap_format::manifest::Manifest;
use cap_format::sparse::{SparseKind, encode_sparse};
use cap_format::{CapFile, CapWriter, DType, Encoding, Sparse, TensorDesc, WriterOptions};

use super::budget::CostModel;
use super::build::factored;
use super::select::Selection;
use crate::rpca::Decomposition;

/// Little-endian bytes of `values` in `dtype` (rounded to nearest for f16/bf16).
pub fn to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::new();
    extend_bytes(&mut out, values, dtype);
    out
}

/// Appends the little-endian bytes of `values` in `dtype` to `out` (one conversion
/// for `pack` and `compress`).
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

/// A kept sparse value in `dtype`, never zero: a value that rounds to ±0 (or is 0)
/// becomes the smallest positive magnitude of the type with its sign, so the
/// stored pattern, and with it the byte count, is exactly the selection.
fn nonzero_bits(x: f32, dtype: DType) -> [u8; 4] {
    let mut b = [0u8; 4];
    match dtype {
        DType::F32 => {
            let v = if x == 0.0 { f32::from_bits(1) } else { x };
            b.copy_from_slice(&v.to_le_bytes());
        }
        DType::F16 => {
            let mut h = half::f16::from_f32(x).to_bits();
            if h & 0x7FFF == 0 {
                h = (h & 0x8000) | 1;
            }
            b[..2].copy_from_slice(&h.to_le_bytes());
        }
        DType::BF16 => {
            let mut h = half::bf16::from_f32(x).to_bits();
            if h & 0x7FFF == 0 {
                h = (h & 0x8000) | 1;
            }
            b[..2].copy_from_slice(&h.to_le_bytes());
        }
    }
    b
}

/// The kept entries of `S` as a dense row-major matrix of raw `dtype` values.
fn sparse_dense_bytes(d: &Decomposition, sel: &Selection, dtype: DType) -> Vec<u8> {
    let ds = dtype.size();
    let mut out = vec![0u8; d.rows * d.cols * ds];
    for row in 0..d.rows {
        for e in d.s.row_ptr[row] as usize..d.s.row_ptr[row + 1] as usize {
            if sel.entries[e] {
                let at = (row * d.cols + d.s.col[e] as usize) * ds;
                out[at..at + ds].copy_from_slice(&nonzero_bits(d.s.val[e], dtype)[..ds]);
            }
        }
    }
    out
}

fn sparse_parts(
    d: &Decomposition,
    sel: &Selection,
    s: Sparse,
    dtype: DType,
) -> Result<Vec<Vec<u8>>> {
    let kind = match s {
        Sparse::Bitmask { .. } => SparseKind::Bitmask,
        Sparse::BlockCsr { .. } => SparseKind::BlockCsr,
        Sparse::TwoFour { .. } => SparseKind::TwoFour,
    };
    let dense = sparse_dense_bytes(d, sel, dtype);
    let (got, parts) = encode_sparse(kind, d.rows as u32, d.cols as u32, dtype, &dense)?;
    if got != s {
        bail!("sparse encoding produced {got:?}, expected {s:?}");
    }
    Ok(parts)
}

/// Encodes the kept items of `d` in the encoding `cost` chooses; returns the
/// descriptor, the parts in layout order and the exact section bytes.
pub fn encode_linear(
    d: &Decomposition,
    sel: &Selection,
    cost: &CostModel,
) -> Result<(TensorDesc, Vec<Vec<u8>>, u64)> {
    let (encoding, bytes) = cost.encoding(d.rows, d.cols, sel.rank(), sel.nnz());
    let f = factored(d, sel);
    let dtype = cost.dtype;
    let parts = match encoding {
        Encoding::Dense { .. } => vec![to_bytes(&f.to_dense(), dtype)],
        Encoding::LowRank { .. } => vec![to_bytes(&f.a, dtype), to_bytes(&f.b, dtype)],
        Encoding::Sparse(s) => sparse_parts(d, sel, s, dtype)?,
        Encoding::Composite { sparse, .. } => {
            let mut p = vec![to_bytes(&f.a, dtype), to_bytes(&f.b, dtype)];
            p.extend(sparse_parts(d, sel, sparse, dtype)?);
            p
        }
    };
    let desc = TensorDesc {
        rows: d.rows as u32,
        cols: d.cols as u32,
        encoding,
    };
    Ok((desc, parts, bytes))
}

/// Copies the `.cap` file `src` to `out` (atomically) with `manifest` in place of its
/// own (the tensor directory is rebuilt from the copied sections).
pub fn restamp(src: &Path, out: &Path, mut manifest: Manifest) -> Result<PathBuf> {
    let bytes = std::fs::read(src).with_context(|| format!("{}: cannot read", src.display()))?;
    let file = CapFile::parse(&bytes).with_context(|| format!("{}: invalid", src.display()))?;
    let opts = WriterOptions {
        alignment: file.header().alignment,
    };
    let mut w = CapWriter::create(out, opts)
        .with_context(|| format!("{}: cannot create", out.display()))?;
    for i in 0..file.len() {
        let t = file.tensor(i)?;
        let name = &file.manifest().tensors[i].name;
        let parts: Vec<&[u8]> = t
            .layout
            .parts()
            .iter()
            .map(|p| t.part(p.kind).unwrap_or(&[]))
            .collect();
        let desc = TensorDesc {
            rows: t.rows,
            cols: t.cols,
            encoding: t.encoding,
        };
        w.add_tensor(name, &desc, &parts)
            .with_context(|| format!("{}: writing tensor {name}", out.display()))?;
    }
    manifest.tensors.clear();
    w.finish(manifest)
        .with_context(|| format!("{}: finishing the file", out.display()))
}
