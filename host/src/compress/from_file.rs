//! Stage "candidates" read from a file (`--from FILE.cap`): the kept entries of a file
//! this model was compressed to, each block linear as a candidate holding exactly its
//! stored entries, so that the stages after pruning (`--distill-epochs`) can refine a
//! file without pruning again (a 33k-token run prunes for 20 minutes and more).
//!
//! The mask of each layer is its stored structure (bitmask, block-CSR or 2:4), not
//! its non-zero values: an entry stored as an exact zero stays an entry. It is found
//! by decoding the structure with every value replaced by one, through the same
//! decoder the runtime uses, so every sparse encoding is read by one path.

use std::path::Path;

use cap_device::caplinear::CapLinear;
use cap_device::model::DenseLinear;
use cap_format::reader::Values;
use cap_format::{CapFile, DType};
use cap_kernels::cpu::{self, SparseRef};

use super::candidate::Candidate;
use super::error::{CompressError, Result, step_error};
use super::sparsegpt::masked_candidate;

/// The compression record's method name of a file (empty when it has none).
pub fn method_of(file: &CapFile<'_>) -> String {
    file.manifest()
        .compression
        .as_ref()
        .map(|c| c.method.clone())
        .unwrap_or_default()
}

/// One candidate per block linear of `linears` (file names and shapes, in order) from
/// the parsed and verified `file` at `path`, which must have been compressed from the
/// model whose sha256 is `source_sha256` (hex).
pub fn candidates(
    path: &Path,
    file: &CapFile<'_>,
    source_sha256: &str,
    linears: &[(String, &DenseLinear)],
) -> Result<Vec<Candidate>> {
    let want = crate::pack::parse_sha256(source_sha256).map_err(step_error)?;
    if file.manifest().provenance.source_sha256 != want {
        return Err(CompressError::Invalid(format!(
            "--from {}: compressed from another model ({}), not --model",
            path.display(),
            file.manifest().provenance.source_file
        )));
    }
    linears
        .iter()
        .map(|(name, l)| {
            let view = file.tensor_by_name(name).map_err(|e| {
                CompressError::Invalid(format!("--from {}: {name}: {e}", path.display()))
            })?;
            let layer = CapLinear::from_view(&view)?;
            let shape = (l.out_features, l.in_features);
            if (layer.rows, layer.cols) != shape {
                return Err(CompressError::Invalid(format!(
                    "--from {}: {name} is {}×{}, the model's is {}×{}",
                    path.display(),
                    layer.rows,
                    layer.cols,
                    shape.0,
                    shape.1
                )));
            }
            candidate(&layer).map_err(|why| {
                CompressError::Invalid(format!("--from {}: {name}: {why}", path.display()))
            })
        })
        .collect()
}

/// The candidate of one stored layer: its dense matrix, or its sparse part's entries
/// (values decoded to `f32`, which float types are exactly).
fn candidate(l: &CapLinear<'_>) -> std::result::Result<Candidate, String> {
    let (rows, cols) = (l.rows, l.cols);
    if l.low_rank.is_some() {
        return Err("has a low-rank part; refining low-rank factors is not supported".into());
    }
    let float = |v: &Values<'_>| match v.dtype.is_quantized() {
        true => Err(format!(
            "stores {} values; only float (f32, f16, bf16) values can be refined",
            v.dtype
        )),
        false => Ok(()),
    };
    let k = cpu::scalar();
    if let Some(w) = &l.dense {
        float(w)?;
        let mut out = vec![0.0f32; rows * cols];
        cpu::rows_to_f32(&k, *w, cols, 0, &mut out);
        return Ok(Candidate::dense(out, rows, cols));
    }
    let Some(part) = &l.sparse else {
        return Err("stores no weights".into());
    };
    let s = part.as_ref(cols);
    let values = match &s {
        SparseRef::Bitmask(m) => m.values,
        SparseRef::Csr(m) => m.values,
        SparseRef::TwoFour(m) => m.values,
    };
    float(&values)?;
    let n = values.bytes.len() / values.dtype.size();
    let mut w = vec![0.0f32; rows * cols];
    let mut buf = vec![0.0f32; cols];
    s.decode_rows(&k, 0, &mut w, &mut buf);
    // The structure alone: the same decoder over `n` ones.
    let ones: Vec<u8> = (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let ones = Values {
        dtype: DType::F32,
        bytes: &ones,
    };
    let structure = match s {
        SparseRef::Bitmask(m) => SparseRef::Bitmask(cpu::BitmaskRef { values: ones, ..m }),
        SparseRef::Csr(m) => SparseRef::Csr(cpu::CsrRef { values: ones, ..m }),
        SparseRef::TwoFour(m) => SparseRef::TwoFour(cpu::TwoFourRef { values: ones, ..m }),
    };
    let mut marks = vec![0.0f32; rows * cols];
    structure.decode_rows(&k, 0, &mut marks, &mut buf);
    let mask: Vec<bool> = marks.iter().map(|&m| m != 0.0).collect();
    Ok(masked_candidate(&w, &mask, rows, cols))
}
