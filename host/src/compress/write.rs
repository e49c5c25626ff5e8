//! Stage "write": every candidate's kept items encoded straight into cap-format
//! tensors (a dense layer as dense values, a sparse one from its CSR), written with
//! the dense tensors into a first, unmeasured file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cap_device::model::{DenseLinear, Model};
use cap_format::manifest::Manifest;
use cap_format::sparse::{SparseKind, encode_sparse_csr};
use cap_format::{DType, Encoding, Sparse, TensorDesc, to_bytes};

use super::budget::CostModel;
use super::candidate::Candidate;
use super::error::{CompressError, Result};
use super::run::LayerRow;
use super::select::Selection;
use crate::pack::write_model;

/// A kept sparse value in `dtype`, never zero: a value that rounds to ±0 (or is 0)
/// becomes the smallest magnitude of the type with its sign, so the stored pattern,
/// and with it the byte count, is exactly the selection.
fn nonzero_bits(x: f32, dtype: DType, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => {
            let v = if x == 0.0 { f32::from_bits(1) } else { x };
            out.extend_from_slice(&v.to_le_bytes());
        }
        DType::F16 | DType::BF16 => {
            let mut h = if dtype == DType::F16 {
                half::f16::from_f32(x).to_bits()
            } else {
                half::bf16::from_f32(x).to_bits()
            };
            if h & 0x7FFF == 0 {
                h = (h & 0x8000) | 1;
            }
            out.extend_from_slice(&h.to_le_bytes());
        }
        // `sparse_parts` rejects quantized value types before calling this.
        DType::Q8 { .. } | DType::Q4 { .. } => {}
    }
}

/// The kept entries of `c` encoded as `s`, from their CSR form.
fn sparse_parts(c: &Candidate, sel: &Selection, s: Sparse, dtype: DType) -> Result<Vec<Vec<u8>>> {
    if dtype.is_quantized() {
        // The format and the kernels have quantized values (format 1.1); choosing and
        // writing them is the host's next step, not done here yet.
        return Err(CompressError::Internal(format!(
            "compress does not write {dtype} values yet"
        )));
    }
    let kind = match s {
        Sparse::Bitmask { .. } | Sparse::QBitmask { .. } => SparseKind::Bitmask,
        Sparse::BlockCsr { .. } | Sparse::QBlockCsr { .. } => SparseKind::BlockCsr,
        Sparse::TwoFour { .. } => SparseKind::TwoFour,
    };
    let (row_ptr, col, val) = c.kept_csr(sel);
    let mut values = Vec::with_capacity(val.len() * dtype.size());
    for &x in &val {
        nonzero_bits(x, dtype, &mut values);
    }
    let (rows, cols) = (c.rows as u32, c.cols as u32);
    let (got, parts) = encode_sparse_csr(kind, rows, cols, dtype, &row_ptr, &col, &values)?;
    if got != s {
        return Err(CompressError::Internal(format!(
            "sparse encoding produced {got:?}, expected {s:?}"
        )));
    }
    Ok(parts)
}

/// Encodes the kept items of `c` in the encoding `cost` chooses; returns the
/// descriptor, the parts in layout order and the exact section bytes.
pub fn encode_linear(
    c: &Candidate,
    sel: &Selection,
    cost: &CostModel,
) -> Result<(TensorDesc, Vec<Vec<u8>>, u64)> {
    let (encoding, bytes) = cost.encoding(c.rows, c.cols, sel.rank(), sel.nnz());
    let dtype = cost.dtype;
    let factors = || {
        let (a, b, _) = c.kept_factors(sel);
        vec![to_bytes(&a, dtype), to_bytes(&b, dtype)]
    };
    let parts = match encoding {
        Encoding::Dense { .. } => vec![to_bytes(&c.kept_dense(sel), dtype)],
        Encoding::LowRank { .. } => factors(),
        Encoding::Sparse(s) => sparse_parts(c, sel, s, dtype)?,
        Encoding::Composite { sparse, .. } => {
            let mut p = factors();
            p.extend(sparse_parts(c, sel, sparse, dtype)?);
            p
        }
    };
    let desc = TensorDesc {
        rows: c.rows as u32,
        cols: c.cols as u32,
        encoding,
    };
    Ok((desc, parts, bytes))
}

/// Deletes a file when dropped (the unmeasured intermediate).
pub struct RemoveOnDrop(PathBuf);

impl RemoveOnDrop {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The file next to `out` that holds the unmeasured model until it is re-stamped.
pub fn unmeasured_path(out: &Path) -> RemoveOnDrop {
    let mut p = out.to_path_buf().into_os_string();
    p.push(format!(".unmeasured-{}", std::process::id()));
    RemoveOnDrop(PathBuf::from(p))
}

/// What [`write`] wrote.
pub struct Written {
    /// The unmeasured file (deleted when dropped).
    pub file: RemoveOnDrop,
    /// Per compressed linear, in file order.
    pub rows: Vec<LayerRow>,
}

/// Writes `model` to a file next to `out` with `manifest`: the dense tensors in
/// `cost.dtype`, the linear named `names[i]` as the kept items `sels[i]` of `cands[i]`.
pub fn write(
    model: &Model<DenseLinear>,
    out: &Path,
    manifest: Manifest,
    names: &[String],
    cands: &[Candidate],
    sels: &[Selection],
    cost: &CostModel,
) -> Result<Written> {
    let by_name: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let file = unmeasured_path(out);
    let mut rows = Vec::with_capacity(cands.len());
    write_model(
        model,
        file.path(),
        cost.dtype,
        manifest,
        &mut |sink, name, _| {
            let i = *by_name
                .get(name)
                .ok_or_else(|| CompressError::Internal(format!("{name}: not a block linear")))?;
            let (c, s) = (&cands[i], &sels[i]);
            let (desc, parts, bytes) = encode_linear(c, s, cost)?;
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            sink.add_parts(name, &desc, &refs, (c.rows * c.cols) as u64)?;
            rows.push(LayerRow {
                name: name.to_string(),
                shape: [c.rows, c.cols],
                rank: [s.rank(), c.rank()],
                nnz: [s.nnz(), c.entries() as u64],
                encoding: desc.encoding.name().into(),
                bytes,
                cost: cost.cost(c.rows, c.cols, s.rank(), s.nnz()),
            });
            Ok(())
        },
    )
    .map_err(super::error::step_error)?;
    Ok(Written { file, rows })
}
