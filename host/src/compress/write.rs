//! Stage "write": every candidate's kept items encoded straight into cap-format
//! tensors (a dense layer as dense values, a sparse one from its CSR), written with
//! the dense tensors into a first, unmeasured file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cap_device::model::{DenseLinear, Model};
use cap_format::manifest::Manifest;
use cap_format::sparse::{SparseKind, encode_sparse_csr};
use cap_format::{DType, Encoding, Sparse, TensorDesc, row_groups, to_bytes};

use super::budget::{Accounting, CostModel};
use super::candidate::Candidate;
use super::error::{CompressError, Result};
use super::quantize::Quantized;
use super::qvalues::{extend_runs, rtn_rows, rtn_sparse_rows, spec_of};
use super::run::LayerRow;
use super::select::Selection;
use crate::pack::write_model;
use crate::tempfiles::Registration;

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
        // `sparse_parts` passes quantized values as `f32` first.
        DType::Q8 { .. } | DType::Q4 { .. } => {}
    }
}

/// Which index structure `s` has.
fn sparse_kind(s: Sparse) -> SparseKind {
    match s {
        Sparse::Bitmask { .. } | Sparse::QBitmask { .. } => SparseKind::Bitmask,
        Sparse::BlockCsr { .. } | Sparse::QBlockCsr { .. } => SparseKind::BlockCsr,
        Sparse::TwoFour { .. } => SparseKind::TwoFour,
    }
}

/// The method's own quantization of `c`'s entries, when it can be stored as it is: every
/// entry kept, quantized for `dtype`.
fn own_codes<'a>(c: &'a Candidate, sel: &Selection, dtype: DType) -> Option<&'a Quantized> {
    let q = c.quantized.as_deref()?;
    let all = sel.entries.iter().all(|&k| k) && q.codes.len() == c.entries();
    (all && spec_of(dtype) == Some(q.spec)).then_some(q)
}

/// The kept entries of a sparse part whose every group of 4 columns keeps exactly 2 (a
/// 2:4 mask, `--pattern 2:4`; no low-rank part), as the format's 2:4 encoding stores
/// them: the values (row-major, `cols / 2` per row in column order) and one meta
/// nibble per group (the two kept columns' offsets, lower first). `None` for any other
/// mask. Built from the mask, not the values, so a kept weight that is exactly zero
/// keeps its slot.
fn two_four_slots(c: &Candidate, sel: &Selection, counts: &[u32]) -> Option<(Vec<f32>, Vec<u8>)> {
    let half = c.cols / 2;
    // Cheap checks first: the kept count of every row (known) before the CSR copy.
    if sel.rank() > 0
        || c.dense.is_some()
        || !c.cols.is_multiple_of(4)
        || c.cols == 0
        || counts.iter().any(|&k| k as usize != half)
    {
        return None;
    }
    let (row_ptr, col, val) = c.kept_csr(sel);
    let groups = c.cols / 4;
    let mut meta = vec![0u8; (c.rows * groups).div_ceil(2)];
    for r in 0..c.rows {
        // `half` increasing columns (the counts say how many), two in each group of 4.
        let cols = &col[row_ptr[r] as usize..row_ptr[r + 1] as usize];
        for (g, p) in cols.chunks(2).enumerate() {
            let (a, b) = (p[0] as usize, p[1] as usize);
            if a / 4 != g || b / 4 != g || a >= b {
                return None;
            }
            let gi = r * groups + g;
            meta[gi / 2] |= ((a % 4) as u8 | ((b % 4) as u8) << 2) << (4 * (gi % 2));
        }
    }
    Some((val, meta))
}

/// `c` as a 2:4 section from its [`two_four_slots`]: the values in `dtype` (quantized:
/// the method's own codes when it quantized exactly these entries, which are the
/// slots in order, else each row's slots rounded to nearest as one run), then the
/// meta nibbles.
fn two_four_linear(
    c: &Candidate,
    sel: &Selection,
    (slots, meta): (Vec<f32>, Vec<u8>),
    dtype: DType,
) -> Result<(TensorDesc, Vec<Vec<u8>>, u64)> {
    let values = match own_codes(c, sel, dtype) {
        Some(q) => runs(q, dtype)?,
        None => matrix_bytes(&slots, c.rows, c.cols / 2, dtype)?,
    };
    let desc = TensorDesc {
        rows: c.rows as u32,
        cols: c.cols as u32,
        encoding: Encoding::Sparse(Sparse::TwoFour { dtype }),
    };
    let bytes = cap_format::encoded_bytes(&desc)?;
    Ok((desc, vec![values, meta], bytes))
}

/// The kept entries of `c` encoded as `s`, from their CSR form. Quantized values: the
/// index parts are built as for `f32` values, then the values part is replaced by
/// each row's kept values as one quantized run (the method's own codes when it made
/// them for exactly these entries, else rounded to nearest).
fn sparse_parts(c: &Candidate, sel: &Selection, s: Sparse, dtype: DType) -> Result<Vec<Vec<u8>>> {
    let kind = sparse_kind(s);
    let (row_ptr, col, val) = c.kept_csr(sel);
    let float = if dtype.is_quantized() {
        DType::F32
    } else {
        dtype
    };
    let mut values = Vec::with_capacity(val.len() * float.size());
    for &x in &val {
        nonzero_bits(x, float, &mut values);
    }
    let (rows, cols) = (c.rows as u32, c.cols as u32);
    let (got, mut parts) = encode_sparse_csr(kind, rows, cols, float, &row_ptr, &col, &values)?;
    let got = if dtype.is_quantized() {
        let counts: Vec<u32> = row_ptr.windows(2).map(|w| (w[1] - w[0]) as u32).collect();
        let nnz = got.nnz(rows, cols);
        let bitmask = kind == SparseKind::Bitmask;
        let q = match own_codes(c, sel, dtype) {
            Some(q) => runs(q, dtype)?,
            None => rtn_sparse_rows(&row_ptr, &val, dtype)?,
        };
        // The values are the last part of a bitmask and of a block-CSR section.
        match parts.last_mut() {
            Some(p) => *p = q,
            None => {
                return Err(CompressError::Internal(
                    "a sparse part without values".into(),
                ));
            }
        }
        Sparse::with_values(bitmask, nnz, row_groups(&counts, dtype), dtype)
    } else {
        got
    };
    if got != s {
        return Err(CompressError::Internal(format!(
            "sparse encoding produced {got:?}, expected {s:?}"
        )));
    }
    Ok(parts)
}

/// The method's own codes `q` as the format's runs (each row one run).
fn runs(q: &Quantized, dtype: DType) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    extend_runs(&mut out, q, dtype)?;
    Ok(out)
}

/// A row-major `rows × cols` matrix in `dtype` (quantized: each row one run, rounded
/// to nearest).
fn matrix_bytes(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Result<Vec<u8>> {
    if dtype.is_quantized() {
        rtn_rows(values, rows, cols, dtype)
    } else {
        Ok(to_bytes(values, dtype))
    }
}

/// Encodes the kept items of `c` in the encoding `cost` chooses for them, now that the
/// kept entries per row are known ([`CostModel::encoding_exact`]); returns the
/// descriptor, the parts in layout order and the exact section bytes.
pub fn encode_linear(
    c: &Candidate,
    sel: &Selection,
    cost: &CostModel,
) -> Result<(TensorDesc, Vec<Vec<u8>>, u64)> {
    let cost = &c.cost_model(cost);
    let dtype = cost.dtype;
    let counts = c.kept_row_counts(sel);
    let (encoding, bytes) = cost.encoding_exact(c.rows, c.cols, sel.rank(), &counts);
    // A 2:4 mask is written in the 2:4 encoding (its kernels are the faster ones, and
    // NVIDIA's sparse tensor cores run it) when that costs no more bytes than priced.
    if let Some(slots) = two_four_slots(c, sel, &counts) {
        let t = two_four_linear(c, sel, slots, dtype)?;
        if t.2 <= bytes {
            return Ok(t);
        }
    }
    let factors = || -> Result<Vec<Vec<u8>>> {
        // The method's own factor codes (GPTQ) while every direction is kept.
        let own = c
            .low_rank
            .as_ref()
            .and_then(|f| f.codes.as_deref())
            .filter(|q| sel.sigma.iter().all(|&k| k) && spec_of(dtype) == Some(q.0.spec));
        if let Some((qa, qb)) = own {
            return Ok(vec![runs(qa, dtype)?, runs(qb, dtype)?]);
        }
        let (a, b, k) = c.kept_factors(sel);
        Ok(vec![
            matrix_bytes(&a, k, c.cols, dtype)?,
            matrix_bytes(&b, c.rows, k, dtype)?,
        ])
    };
    let parts = match encoding {
        Encoding::Dense { .. } => {
            // The method's codes are the dense rows' runs when every position is an
            // entry (a dense candidate, or a mask that kept everything: CSR order is
            // then row-major) and no factor is added; rounding their values again would
            // quantize twice.
            let every_position = c.entries() == c.rows * c.cols;
            let own = own_codes(c, sel, dtype).filter(|_| every_position && sel.rank() == 0);
            vec![match own {
                Some(q) => runs(q, dtype)?,
                None => matrix_bytes(&c.kept_dense(sel), c.rows, c.cols, dtype)?,
            }]
        }
        Encoding::LowRank { .. } => factors()?,
        Encoding::Sparse(s) => sparse_parts(c, sel, s, dtype)?,
        Encoding::Composite { sparse, .. } => {
            let mut p = factors()?;
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

/// Deletes a file when dropped (the unmeasured intermediate), and on SIGINT/SIGTERM
/// while it lives (it is registered with [`crate::tempfiles`]).
pub struct RemoveOnDrop(PathBuf, #[allow(dead_code)] Registration);

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
    let p = PathBuf::from(p);
    let reg = crate::tempfiles::register(&p);
    RemoveOnDrop(p, reg)
}

/// What [`write`] wrote.
pub struct Written {
    /// The unmeasured file (deleted when dropped).
    pub file: RemoveOnDrop,
    /// Per compressed linear, in file order.
    pub rows: Vec<LayerRow>,
}

/// One compressed linear as the file stores it.
pub struct EncodedLinear {
    /// Its row of the report.
    pub row: LayerRow,
    /// Shape and encoding.
    pub desc: TensorDesc,
    /// The section's parts, in order.
    pub parts: Vec<Vec<u8>>,
}

/// The kept items `sel` of `c` (the linear `name`) encoded with values in `cost.dtype`.
pub fn encoded_linear(
    name: &str,
    c: &Candidate,
    sel: &Selection,
    cost: &CostModel,
) -> Result<EncodedLinear> {
    let (desc, parts, bytes) = encode_linear(c, sel, cost)?;
    let row = LayerRow {
        name: name.to_string(),
        shape: [c.rows, c.cols],
        rank: [sel.rank(), c.rank()],
        nnz: [sel.nnz(), c.entries() as u64],
        encoding: desc.encoding.name().into(),
        values: desc.encoding.dtypes().1.to_string(),
        bytes,
        // Exact: the bytes written, or the paper's parameters.
        cost: match cost.accounting {
            Accounting::Bytes => bytes,
            Accounting::Params => cost.cost(c.rows, c.cols, sel.rank(), sel.nnz()),
        },
    };
    Ok(EncodedLinear { row, desc, parts })
}

/// Writes `model` to a file next to `out` with `manifest`: the dense tensors in
/// `dense_dtype`, the linear named `names[i]` as the kept items `sels[i]` of
/// `cands[i]` with values in `cost.dtype`.
#[allow(clippy::too_many_arguments)]
pub fn write(
    model: &Model<DenseLinear>,
    out: &Path,
    manifest: Manifest,
    names: &[String],
    cands: &[Candidate],
    sels: &[Selection],
    cost: &CostModel,
    dense_dtype: DType,
) -> Result<Written> {
    let by_name: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    write_encoded(model, out, manifest, dense_dtype, &mut |name| {
        let i = *by_name
            .get(name)
            .ok_or_else(|| CompressError::Internal(format!("{name}: not a block linear")))?;
        encoded_linear(name, &cands[i], &sels[i], cost)
    })
}

/// Writes `model` to a file next to `out` with `manifest`: the dense tensors in
/// `dense_dtype`, each block linear as `linear(name)` encodes it (the model's own
/// linears are not read: a streamed run passes them without weights).
pub fn write_encoded(
    model: &Model<DenseLinear>,
    out: &Path,
    manifest: Manifest,
    dense_dtype: DType,
    linear: &mut dyn FnMut(&str) -> Result<EncodedLinear>,
) -> Result<Written> {
    let file = unmeasured_path(out);
    let mut rows = Vec::new();
    write_model(
        model,
        file.path(),
        dense_dtype,
        manifest,
        &mut |sink, name, l| {
            let e = linear(name)?;
            if e.desc.rows as usize != l.out_features || e.desc.cols as usize != l.in_features {
                return Err(CompressError::Internal(format!(
                    "{name}: encoded as {}×{}, the model has {}×{}",
                    e.desc.rows, e.desc.cols, l.out_features, l.in_features
                ))
                .into());
            }
            let refs: Vec<&[u8]> = e.parts.iter().map(|p| p.as_slice()).collect();
            let params = u64::from(e.desc.rows) * u64::from(e.desc.cols);
            sink.add_parts(name, &e.desc, &refs, params)?;
            rows.push(e.row);
            Ok(())
        },
    )
    .map_err(super::error::step_error)?;
    Ok(Written { file, rows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::qvalues::{Quantizer, quantize_kept};
    use crate::compress::sparsegpt::masked_candidate;
    use cap_device::rng::XorShift64Star;

    /// A mask that kept every position, quantized by GPTQ and written dense (cheaper
    /// than any sparse encoding when nothing is dropped): the file holds the method's
    /// own codes, so its values decode to exactly the candidate's values. Rounding them
    /// again to nearest (what the writer did before) re-derives each group's scale and
    /// minimum from the already-quantized values and moves some of them.
    #[test]
    fn a_fully_kept_quantized_mask_is_written_dense_with_its_own_codes() {
        let (rows, cols) = (6, 96);
        // A seed where some group's codes miss 0 or 15, so rounding again moves values.
        let mut rng = XorShift64Star::new(1);
        let mut w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
        let x: Vec<f32> = (0..64 * cols).map(|_| rng.normal() as f32).collect();
        let mut h = vec![0f32; cols * cols];
        for t in x.chunks_exact(cols) {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += t[i] * t[j];
                }
            }
        }
        let dtype = DType::Q4 { group: 32 };
        let mask = vec![true; rows * cols];
        let q = quantize_kept(&mut w, Some(&mask), rows, cols, &h, dtype, Quantizer::Gptq).unwrap();
        let mut c = masked_candidate(&w, &mask, rows, cols);
        c.quantized = q;
        let sel = Selection::all(&c);
        let cost = CostModel {
            accounting: Accounting::Bytes,
            dtype,
        };
        let (desc, parts, _) = encode_linear(&c, &sel, &cost).unwrap();
        assert_eq!(desc.encoding, Encoding::Dense { dtype });
        let stored = cap_format::dequantize_rows(&parts[0], dtype, rows, cols).unwrap();
        assert_eq!(stored, w, "the written values are not the candidate's");
        let again = rtn_rows(&w, rows, cols, dtype).unwrap();
        let again = cap_format::dequantize_rows(&again, dtype, rows, cols).unwrap();
        assert_ne!(again, w, "this case must be one that rounding twice spoils");
    }
}
