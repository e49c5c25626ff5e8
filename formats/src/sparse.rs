//! Reference encoders and decoders for the sparse encodings (`no_std` + `alloc`).
//!
//! They convert between a dense row-major matrix of raw little-endian values and the
//! parts of SPEC.md §5 (and from a CSR matrix to the parts, [`encode_sparse_csr`]), so packers need not re-implement the bit layouts, and kernels
//! have a reference to test against. An element counts as non-zero unless it is +0 or
//! −0 (all bits zero apart from the sign).

use alloc::vec;
use alloc::vec::Vec;

use crate::encoding::CSR_BLOCK_COLS;
use crate::reader::SparseView;
use crate::{DType, Encoding, FormatError, Sparse, TensorDesc, TensorLayout};

/// Which sparse encoding to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SparseKind {
    /// [`Sparse::Bitmask`].
    Bitmask,
    /// [`Sparse::BlockCsr`].
    BlockCsr,
    /// [`Sparse::TwoFour`] (fails if a group of 4 holds more than 2 non-zeros).
    TwoFour,
}

fn is_zero(v: &[u8]) -> bool {
    // Little-endian: the sign bit is the top bit of the last byte.
    let (last, rest) = v.split_last().unwrap_or((&0, &[]));
    last & 0x7F == 0 && rest.iter().all(|&b| b == 0)
}

/// The value size and entry count of a `rows×cols` matrix of float `dtype` values given
/// to a sparse encoder (quantized values are an error: the encoders take floats).
fn float_input(rows: u32, cols: u32, dtype: DType) -> Result<(usize, usize), FormatError> {
    if dtype.is_quantized() {
        return Err(FormatError::InvalidEncoding {
            reason: "sparse encoders take float values; quantize the parts with quantize_sparse",
        });
    }
    let n = (rows as usize)
        .checked_mul(cols as usize)
        .ok_or(FormatError::SizeOverflow)?;
    Ok((dtype.size(), n))
}

/// Encodes a dense `rows×cols` matrix (`dense` = raw little-endian values of `dtype`,
/// row-major) as `kind`. Returns the encoding and its parts in layout order, ready for
/// `add_tensor` (check: each part has the length [`TensorLayout`] gives).
pub fn encode_sparse(
    kind: SparseKind,
    rows: u32,
    cols: u32,
    dtype: DType,
    dense: &[u8],
) -> Result<(Sparse, Vec<Vec<u8>>), FormatError> {
    let (ds, n) = float_input(rows, cols, dtype)?;
    if dense.len() != n.checked_mul(ds).ok_or(FormatError::SizeOverflow)? {
        return Err(FormatError::InvalidEncoding {
            reason: "dense input length is not rows*cols*dtype size",
        });
    }
    let row_len = cols as usize * ds;
    // Every column is an entry; the zeros among them are dropped by `encode_rows`.
    encode_rows(kind, rows, cols, dtype, |r| {
        dense[r * row_len..(r + 1) * row_len]
            .chunks_exact(ds)
            .enumerate()
    })
}

/// Checks a CSR matrix against its shape: `rows + 1` non-decreasing row pointers from
/// 0 to the entry count, columns strictly increasing within each row and below `cols`,
/// `values` one `dtype` value per entry.
fn check_csr(
    rows: u32,
    cols: u32,
    ds: usize,
    row_ptr: &[u64],
    col: &[u32],
    values: &[u8],
) -> Result<(), FormatError> {
    let bad = |reason| Err(FormatError::InvalidEncoding { reason });
    if row_ptr.len() != rows as usize + 1 || row_ptr.first() != Some(&0) {
        return bad("CSR row pointers: not rows + 1 values starting at 0");
    }
    if row_ptr.last().copied() != Some(col.len() as u64) {
        return bad("CSR row pointers: the last is not the entry count");
    }
    if Some(values.len()) != col.len().checked_mul(ds) {
        return bad("CSR values: not one dtype value per entry");
    }
    for w in row_ptr.windows(2) {
        if w[0] > w[1] {
            return bad("CSR row pointers decrease");
        }
        let cs = &col[w[0] as usize..w[1] as usize];
        if cs.windows(2).any(|p| p[0] >= p[1]) || cs.last().is_some_and(|&c| c >= cols) {
            return bad("CSR columns: not increasing within a row, or out of range");
        }
    }
    Ok(())
}

/// Encodes a `rows×cols` matrix given in CSR form (`row_ptr`: `rows + 1` offsets into
/// `col`; `col`: increasing columns within each row; `values`: one raw little-endian
/// `dtype` value per entry) as `kind`, without building the dense matrix. The result
/// is byte-for-byte what [`encode_sparse`] gives for the same matrix written densely
/// (absent entries +0): an entry whose value is ±0 counts as absent, as it does there.
pub fn encode_sparse_csr(
    kind: SparseKind,
    rows: u32,
    cols: u32,
    dtype: DType,
    row_ptr: &[u64],
    col: &[u32],
    values: &[u8],
) -> Result<(Sparse, Vec<Vec<u8>>), FormatError> {
    let (ds, n) = float_input(rows, cols, dtype)?;
    n.checked_mul(ds).ok_or(FormatError::SizeOverflow)?;
    check_csr(rows, cols, ds, row_ptr, col, values)?;
    encode_rows(kind, rows, cols, dtype, |r| {
        (row_ptr[r] as usize..row_ptr[r + 1] as usize)
            .map(|e| (col[e] as usize, &values[e * ds..(e + 1) * ds]))
    })
}

/// The encoder both public entry points share, over a matrix given row by row:
/// `row(r)` yields row `r`'s stored entries as (column, raw value) with increasing
/// columns; a column it skips holds +0. Entries whose value is ±0 count as absent,
/// so a dense row (every column an entry) and its CSR form (only some) encode to the
/// same bytes. Callers have checked the shape (`rows·cols·dtype.size()` fits `usize`)
/// and the entries (columns in range).
fn encode_rows<'a, I>(
    kind: SparseKind,
    rows: u32,
    cols: u32,
    dtype: DType,
    row: impl Fn(usize) -> I,
) -> Result<(Sparse, Vec<Vec<u8>>), FormatError>
where
    I: Iterator<Item = (usize, &'a [u8])>,
{
    let ds = dtype.size();
    let (r_n, c) = (rows as usize, cols as usize);
    let n = r_n * c;
    let (sparse, parts) = match kind {
        SparseKind::Bitmask => {
            let mut mask = vec![0u8; n.div_ceil(8)];
            let mut out = Vec::new();
            for r in 0..r_n {
                for (j, v) in row(r) {
                    if !is_zero(v) {
                        let i = r * c + j;
                        mask[i / 8] |= 1 << (i % 8);
                        out.extend_from_slice(v);
                    }
                }
            }
            let nnz = (out.len() / ds) as u64;
            (Sparse::Bitmask { nnz, dtype }, vec![mask, out])
        }
        SparseKind::BlockCsr => {
            let bw = CSR_BLOCK_COLS as usize;
            let mut ptr: Vec<u8> = Vec::new();
            ptr.extend_from_slice(&0u32.to_le_bytes());
            let (mut idx, mut out) = (Vec::new(), Vec::new());
            for r in 0..r_n {
                let mut es = row(r).peekable();
                for b in 0..c.div_ceil(bw) {
                    while let Some((j, v)) = es.next_if(|&(j, _)| j < (b + 1) * bw) {
                        if !is_zero(v) {
                            idx.push((j - b * bw) as u8);
                            out.extend_from_slice(v);
                        }
                    }
                    let p = u32::try_from(idx.len()).map_err(|_| FormatError::SizeOverflow)?;
                    ptr.extend_from_slice(&p.to_le_bytes());
                }
            }
            let nnz = idx.len() as u64;
            (Sparse::BlockCsr { nnz, dtype }, vec![ptr, idx, out])
        }
        SparseKind::TwoFour => {
            if !cols.is_multiple_of(4) {
                return Err(FormatError::InvalidEncoding {
                    reason: "2:4 needs cols to be a multiple of 4",
                });
            }
            let mut meta = vec![0u8; (n / 4).div_ceil(2)];
            let mut out = Vec::with_capacity(n / 2 * ds);
            let zero = vec![0u8; ds];
            for r in 0..r_n {
                let mut es = row(r).peekable();
                for gi in 0..c / 4 {
                    // The group's four slots as the dense matrix holds them.
                    let mut slot: [&[u8]; 4] = [&zero, &zero, &zero, &zero];
                    while let Some((j, v)) = es.next_if(|&(j, _)| j < 4 * (gi + 1)) {
                        slot[j % 4] = v;
                    }
                    let mut kept = [0u8; 2];
                    let mut k = 0;
                    for (j, v) in slot.iter().enumerate() {
                        if !is_zero(v) {
                            if k == 2 {
                                return Err(FormatError::InvalidEncoding {
                                    reason: "more than 2 non-zeros in a group of 4",
                                });
                            }
                            kept[k] = j as u8;
                            k += 1;
                        }
                    }
                    // Pad to exactly two distinct increasing indices; the padding
                    // slots store whatever (±0) value the matrix holds there.
                    match k {
                        0 => kept = [0, 1],
                        1 => {
                            kept = if kept[0] == 3 {
                                [2, 3]
                            } else {
                                [kept[0], kept[0] + 1]
                            }
                        }
                        _ => {}
                    }
                    for &j in &kept {
                        out.extend_from_slice(slot[j as usize]);
                    }
                    let g = r * (c / 4) + gi;
                    meta[g / 2] |= (kept[0] | (kept[1] << 2)) << (4 * (g % 2));
                }
            }
            (Sparse::TwoFour { dtype }, vec![out, meta])
        }
    };
    Ok((sparse, parts))
}

/// The layout of a sparse tensor, checked against the parts of `view`: shapes and
/// parameters the layout rejects, and parts whose lengths differ from it, are errors
/// (which bounds what a decoder allocates by the input's size).
fn checked_layout(
    rows: u32,
    cols: u32,
    sparse: Sparse,
    view: &SparseView<'_>,
) -> Result<TensorLayout, FormatError> {
    let layout = TensorLayout::compute(
        &TensorDesc {
            rows,
            cols,
            encoding: Encoding::Sparse(sparse),
        },
        crate::MIN_ALIGNMENT,
    )?;
    let given: Vec<usize> = match *view {
        SparseView::Bitmask { mask, values } => vec![mask.len(), values.bytes.len()],
        SparseView::BlockCsr(v) => vec![v.block_ptr.len(), v.col_idx.len(), v.values.bytes.len()],
        SparseView::TwoFour { values, meta } => vec![values.bytes.len(), meta.len()],
    };
    let want = layout.parts().iter().map(|p| p.len);
    if given.len() != layout.parts().len() || want.zip(&given).any(|(w, &g)| w != g as u64) {
        return Err(FormatError::BadSparseStructure {
            index: 0,
            reason: "part lengths differ from the encoding's layout",
        });
    }
    Ok(layout)
}

/// Calls `f(i, k)` for every stored value of `view` in storage order: `i` is its
/// row-major position in the `rows × cols` matrix (checked to be in range), `k` its
/// index among the stored values. Inconsistent index data is an error.
fn for_each_stored(
    rows: u32,
    cols: u32,
    view: &SparseView<'_>,
    mut f: impl FnMut(usize, usize) -> Result<(), FormatError>,
) -> Result<(), FormatError> {
    let bad = |reason| FormatError::BadSparseStructure { index: 0, reason };
    let (rows, c) = (rows as usize, cols as usize);
    let n = rows * c;
    match *view {
        SparseView::Bitmask { mask, .. } => {
            let mut k = 0usize;
            for i in 0..n {
                if mask.get(i / 8).ok_or(bad("mask too short"))? >> (i % 8) & 1 == 1 {
                    f(i, k)?;
                    k += 1;
                }
            }
        }
        SparseView::BlockCsr(v) => {
            let nb = c.div_ceil(CSR_BLOCK_COLS as usize);
            for r in 0..rows {
                for b in 0..nb {
                    let lo = v
                        .block_ptr_at(r * nb + b)
                        .ok_or(bad("block pointers too short"))?;
                    let hi = v
                        .block_ptr_at(r * nb + b + 1)
                        .ok_or(bad("block pointers too short"))?;
                    for k in lo as usize..hi as usize {
                        let col = b * CSR_BLOCK_COLS as usize
                            + *v.col_idx.get(k).ok_or(bad("column indices too short"))? as usize;
                        if col >= c {
                            return Err(bad("column index out of range"));
                        }
                        f(r * c + col, k)?;
                    }
                }
            }
        }
        SparseView::TwoFour { meta, .. } => {
            for g in 0..n / 4 {
                let nib = meta.get(g / 2).ok_or(bad("meta too short"))? >> (4 * (g % 2)) & 0xF;
                for (s, j) in [nib & 3, nib >> 2].into_iter().enumerate() {
                    f(4 * g + j as usize, 2 * g + s)?;
                }
            }
        }
    }
    Ok(())
}

/// Decodes a sparse view of float values back to a dense row-major matrix of raw
/// little-endian values (`rows·cols·dtype.size()` bytes; quantized values are an
/// error, see [`decode_sparse_f32`]). Validates as it goes: inconsistent index data is
/// an error, never a panic (it need not have been verified first).
pub fn decode_sparse(
    rows: u32,
    cols: u32,
    sparse: Sparse,
    view: &SparseView<'_>,
) -> Result<Vec<u8>, FormatError> {
    checked_layout(rows, cols, sparse, view)?;
    if sparse.dtype().is_quantized() {
        return Err(FormatError::InvalidEncoding {
            reason: "decode_sparse returns raw float values; use decode_sparse_f32",
        });
    }
    let vals = match *view {
        SparseView::Bitmask { values, .. } | SparseView::TwoFour { values, .. } => values,
        SparseView::BlockCsr(v) => v.values,
    };
    let ds = sparse.dtype().size();
    let n = rows as usize * cols as usize;
    let mut out = vec![0u8; n.checked_mul(ds).ok_or(FormatError::SizeOverflow)?];
    for_each_stored(rows, cols, view, |i, k| {
        let v = vals
            .bytes
            .get(k * ds..(k + 1) * ds)
            .ok_or(FormatError::BadSparseStructure {
                index: 0,
                reason: "too few values",
            })?;
        out[i * ds..(i + 1) * ds].copy_from_slice(v);
        Ok(())
    })?;
    Ok(out)
}

/// Kept values per row of a sparse matrix given as its parts (`view`), bounds-checked:
/// bitmask rows count their set bits, block-CSR rows span their block pointers, 2:4
/// rows keep `cols/2`.
pub fn row_counts(rows: u32, cols: u32, view: &SparseView<'_>) -> Result<Vec<u32>, FormatError> {
    let bad = |reason| FormatError::BadSparseStructure { index: 0, reason };
    let (rows, c) = (rows as usize, cols as usize);
    let mut out = Vec::with_capacity(rows);
    match *view {
        SparseView::Bitmask { mask, .. } => {
            for r in 0..rows {
                let mut k = 0u32;
                for i in r * c..(r + 1) * c {
                    k += u32::from(mask.get(i / 8).ok_or(bad("mask too short"))? >> (i % 8) & 1);
                }
                out.push(k);
            }
        }
        SparseView::BlockCsr(v) => {
            let nb = cols.div_ceil(CSR_BLOCK_COLS) as usize;
            for r in 0..rows {
                let lo = v
                    .block_ptr_at(r * nb)
                    .ok_or(bad("block pointers too short"))?;
                let hi = v
                    .block_ptr_at((r + 1) * nb)
                    .ok_or(bad("block pointers too short"))?;
                out.push(hi.checked_sub(lo).ok_or(bad("block pointers decrease"))?);
            }
        }
        SparseView::TwoFour { .. } => out.resize(rows, cols / 2),
    }
    Ok(out)
}

/// The parts of `sparse` (in layout order, as the encoders return them) as a view.
fn view_of<'a>(sparse: Sparse, parts: &'a [Vec<u8>]) -> Result<SparseView<'a>, FormatError> {
    let values = |i: usize| -> Result<crate::Values<'a>, FormatError> {
        Ok(crate::Values {
            dtype: sparse.dtype(),
            bytes: parts.get(i).ok_or(FormatError::InvalidEncoding {
                reason: "too few parts for the sparse encoding",
            })?,
        })
    };
    let part = |i: usize| values(i).map(|v| v.bytes);
    Ok(match sparse {
        Sparse::Bitmask { .. } | Sparse::QBitmask { .. } => SparseView::Bitmask {
            mask: part(0)?,
            values: values(1)?,
        },
        Sparse::BlockCsr { .. } | Sparse::QBlockCsr { .. } => {
            SparseView::BlockCsr(crate::reader::CsrView {
                block_ptr: part(0)?,
                col_idx: part(1)?,
                values: values(2)?,
            })
        }
        Sparse::TwoFour { .. } => SparseView::TwoFour {
            values: values(0)?,
            meta: part(1)?,
        },
    })
}

/// Re-stores the values of a sparse matrix given as float parts (what
/// [`encode_sparse`] / [`encode_sparse_csr`] return) as quantized `dtype`, each row's
/// kept values one run quantized by the reference quantizer
/// ([`crate::values::quantize`]). Returns the quantized encoding ([`Sparse::QBitmask`],
/// [`Sparse::QBlockCsr`] with the group count, or [`Sparse::TwoFour`]) and its parts.
pub fn quantize_sparse(
    rows: u32,
    cols: u32,
    sparse: Sparse,
    parts: Vec<Vec<u8>>,
    dtype: DType,
) -> Result<(Sparse, Vec<Vec<u8>>), FormatError> {
    if sparse.dtype().is_quantized() || !dtype.is_quantized() {
        return Err(FormatError::InvalidEncoding {
            reason: "quantize_sparse turns float values into quantized ones",
        });
    }
    dtype.validate()?;
    let view = view_of(sparse, &parts)?;
    let counts = row_counts(rows, cols, &view)?;
    let vi = match sparse {
        Sparse::TwoFour { .. } => 0,
        Sparse::Bitmask { .. } | Sparse::QBitmask { .. } => 1,
        Sparse::BlockCsr { .. } | Sparse::QBlockCsr { .. } => 2,
    };
    let src = &parts[vi];
    let (sd, ds) = (sparse.dtype(), sparse.dtype().size());
    let total: u64 = counts.iter().map(|&k| u64::from(k)).sum();
    if total.checked_mul(ds as u64) != Some(src.len() as u64) {
        return Err(FormatError::InvalidEncoding {
            reason: "values part does not hold one value per kept entry",
        });
    }
    let mut out = Vec::new();
    let mut row = Vec::new();
    let mut at = 0usize;
    for &k in &counts {
        row.clear();
        let k = k as usize;
        row.resize(k, 0.0);
        crate::values::dequantize(&src[at * ds..(at + k) * ds], sd, &mut row)?;
        let q = crate::values::quantize(&row, dtype)?;
        crate::values::extend_quantized(&mut out, &q.codes, &q.scales, &q.mins, dtype)?;
        at += k;
    }
    let groups = crate::encoding::row_groups(&counts, dtype);
    let nnz = sparse.nnz(rows, cols);
    let q = match sparse {
        Sparse::TwoFour { .. } => Sparse::TwoFour { dtype },
        Sparse::Bitmask { .. } | Sparse::QBitmask { .. } => Sparse::QBitmask { nnz, groups, dtype },
        Sparse::BlockCsr { .. } | Sparse::QBlockCsr { .. } => {
            Sparse::QBlockCsr { nnz, groups, dtype }
        }
    };
    let mut parts = parts;
    parts[vi] = out;
    Ok((q, parts))
}

/// Decodes a sparse view of any value type to a dense row-major `f32` matrix (zeros
/// where nothing is stored; quantized values dequantized exactly as
/// [`crate::values::dequantize`], each row's kept values one run). Validates as it
/// goes, like [`decode_sparse`].
pub fn decode_sparse_f32(
    rows: u32,
    cols: u32,
    sparse: Sparse,
    view: &SparseView<'_>,
) -> Result<Vec<f32>, FormatError> {
    checked_layout(rows, cols, sparse, view)?;
    let bad = |reason| FormatError::BadSparseStructure { index: 0, reason };
    let vals = match *view {
        SparseView::Bitmask { values, .. } | SparseView::TwoFour { values, .. } => values,
        SparseView::BlockCsr(v) => v.values,
    };
    // Every stored value as f32, in storage order (row by row: a run per row).
    let dtype = sparse.dtype();
    let mut stored = Vec::new();
    let mut at = 0usize;
    for k in row_counts(rows, cols, view)? {
        // The run's bytes are checked before anything is allocated for it, so corrupt
        // counts cannot make this allocate more than the values part holds.
        let len = dtype.run_bytes(u64::from(k)) as usize;
        let run = vals
            .bytes
            .get(at..at.saturating_add(len))
            .ok_or(bad("too few values"))?;
        let from = stored.len();
        stored.resize(from + k as usize, 0.0);
        crate::values::dequantize(run, dtype, &mut stored[from..])
            .map_err(|_| bad("too few values"))?;
        at += len;
    }
    let n = (rows as usize)
        .checked_mul(cols as usize)
        .ok_or(FormatError::SizeOverflow)?;
    let mut out = vec![0.0f32; n];
    for_each_stored(rows, cols, view, |i, k| {
        out[i] = *stored.get(k).ok_or(bad("too few values"))?;
        Ok(())
    })?;
    Ok(out)
}
