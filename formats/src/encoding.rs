//! Tensor encodings, their byte layout, and the exact byte accounting.
//!
//! Every tensor section is a sequence of *parts* (factor A, mask, values, ...). Each
//! part starts at a multiple of [`PART_ALIGN`] from the section start, the gaps are
//! zero, and the section is padded with zeros to the file alignment. [`TensorLayout`]
//! computes that layout; the writer, the reader and [`encoded_bytes`] all use it, so
//! the accounting is exact by construction (and tested against written files).

use serde::{Deserialize, Serialize};

use crate::{DType, FormatError, MAX_DIM, MIN_ALIGNMENT, PART_ALIGN};

/// Width of a column block in the block-CSR encoding: column indices are stored as
/// one byte within a 256-column block.
pub const CSR_BLOCK_COLS: u32 = 256;

/// A sparse encoding (the `S` of `W ≈ B·A + S`), with the parameters that fix its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sparse {
    /// One bit per position (row-major, LSB first) + the non-zeros packed in
    /// row-major order. Parts: `Mask` (`ceil(rows·cols/8)` bytes), `SparseValues`.
    Bitmask {
        /// Number of set bits / stored values.
        nnz: u64,
        /// Value type.
        dtype: DType,
    },
    /// Compressed rows with one-byte indices within 256-column blocks. Parts:
    /// `BlockPtr` (`rows·ceil(cols/256)+1` little-endian u32: the values of
    /// row `r`, block `b` are `ptr[r·nb+b]..ptr[r·nb+b+1]`), `ColIdx` (one u8 per
    /// non-zero: column − 256·b), `SparseValues`.
    BlockCsr {
        /// Number of stored values (at most `u32::MAX`).
        nnz: u64,
        /// Value type.
        dtype: DType,
    },
    /// 2:4 structured sparsity: in each group of 4 consecutive columns of a row,
    /// exactly 2 values are stored (zeros where a group holds fewer). Needs
    /// `cols % 4 == 0`. Parts: `SparseValues` (`rows·cols/2` values), `Meta` (one
    /// nibble per group, row-major, low nibble first: bits 0-1 = first index,
    /// bits 2-3 = second index, first < second; `ceil(rows·cols/8)` bytes).
    TwoFour {
        /// Value type.
        dtype: DType,
    },
    /// [`Sparse::Bitmask`] with quantized values (format 1.1): the same parts, the
    /// values stored as `groups` blocks of `dtype` (each row's kept values in groups of
    /// `dtype.group()`, the last partial). The group count depends on how the kept
    /// values fall into rows, so the encoding records it to fix the section length.
    QBitmask {
        /// Number of set bits / stored values.
        nnz: u64,
        /// Blocks stored: `Σ_r ceil(k_r/group)` over the rows' kept counts `k_r`.
        groups: u64,
        /// Value type, [`DType::Q8`] or [`DType::Q4`].
        dtype: DType,
    },
    /// [`Sparse::BlockCsr`] with quantized values (format 1.1): as [`Sparse::QBitmask`].
    QBlockCsr {
        /// Number of stored values (at most `u32::MAX`).
        nnz: u64,
        /// Blocks stored: `Σ_r ceil(k_r/group)`.
        groups: u64,
        /// Value type, [`DType::Q8`] or [`DType::Q4`].
        dtype: DType,
    },
}

impl Sparse {
    /// The encoding's short name: `"bitmask"`, `"block-csr"` or `"2:4"`.
    pub const fn name(self) -> &'static str {
        match self {
            Sparse::Bitmask { .. } | Sparse::QBitmask { .. } => "bitmask",
            Sparse::BlockCsr { .. } | Sparse::QBlockCsr { .. } => "block-csr",
            Sparse::TwoFour { .. } => "2:4",
        }
    }

    /// Stored values (kept entries; `rows·cols/2` for 2:4, which needs the shape).
    pub const fn nnz(self, rows: u32, cols: u32) -> u64 {
        match self {
            Sparse::Bitmask { nnz, .. }
            | Sparse::BlockCsr { nnz, .. }
            | Sparse::QBitmask { nnz, .. }
            | Sparse::QBlockCsr { nnz, .. } => nnz,
            Sparse::TwoFour { .. } => rows as u64 * cols as u64 / 2,
        }
    }

    /// The sparse encoding of this shape and kind with `nnz` values of `dtype` whose
    /// rows hold `groups` quantization groups in all: [`Sparse::QBitmask`] /
    /// [`Sparse::QBlockCsr`] for a quantized `dtype`, else the float variant (and
    /// `groups` is ignored). `bitmask` picks the bitmask over block-CSR.
    pub const fn with_values(bitmask: bool, nnz: u64, groups: u64, dtype: DType) -> Sparse {
        match (bitmask, dtype.is_quantized()) {
            (true, false) => Sparse::Bitmask { nnz, dtype },
            (false, false) => Sparse::BlockCsr { nnz, dtype },
            (true, true) => Sparse::QBitmask { nnz, groups, dtype },
            (false, true) => Sparse::QBlockCsr { nnz, groups, dtype },
        }
    }

    /// Value type of the stored non-zeros.
    pub const fn dtype(self) -> DType {
        match self {
            Sparse::Bitmask { dtype, .. }
            | Sparse::BlockCsr { dtype, .. }
            | Sparse::TwoFour { dtype }
            | Sparse::QBitmask { dtype, .. }
            | Sparse::QBlockCsr { dtype, .. } => dtype,
        }
    }
}

/// How a tensor is stored. On disk (postcard) the variant index is the tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Encoding {
    /// Plain row-major values. Part: `Values` (`rows·cols` values).
    Dense {
        /// Value type.
        dtype: DType,
    },
    /// Low-rank factors, `W ≈ B·A`, so `y = B·(A·x)`. Parts: `FactorA` (`rank×cols`,
    /// row-major), `FactorB` (`rows×rank`, row-major).
    LowRank {
        /// Rank, `1..=min(rows, cols)`.
        rank: u32,
        /// Factor value type.
        dtype: DType,
    },
    /// A sparse matrix alone.
    Sparse(Sparse),
    /// Low-rank plus sparse, `W ≈ B·A + S`: the low-rank parts, then the sparse parts.
    Composite {
        /// Rank, `1..=min(rows, cols)`.
        rank: u32,
        /// Factor value type.
        factor_dtype: DType,
        /// The sparse part.
        sparse: Sparse,
    },
}

/// The name with its parameters: `bitmask nnz=1200 f16`, `2:4 bf16`.
impl core::fmt::Display for Sparse {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Sparse::Bitmask { nnz, dtype } | Sparse::BlockCsr { nnz, dtype } => {
                write!(f, "{} nnz={nnz} {dtype}", self.name())
            }
            Sparse::TwoFour { dtype } => write!(f, "{} {dtype}", self.name()),
            Sparse::QBitmask { nnz, groups, dtype } | Sparse::QBlockCsr { nnz, groups, dtype } => {
                write!(f, "{} nnz={nnz} groups={groups} {dtype}", self.name())
            }
        }
    }
}

impl Encoding {
    /// The encoding's short name, the one every report uses (tables, JSON, `info`):
    /// `"dense"`, `"low-rank"`, `"bitmask"`, `"block-csr"`, `"2:4"`, or
    /// `"low-rank+"` and the sparse part's name. [`Encoding`]'s `Display` adds the
    /// parameters.
    pub const fn name(&self) -> &'static str {
        match self {
            Encoding::Dense { .. } => "dense",
            Encoding::LowRank { .. } => "low-rank",
            Encoding::Sparse(s) => s.name(),
            Encoding::Composite { sparse, .. } => match sparse {
                Sparse::Bitmask { .. } | Sparse::QBitmask { .. } => "low-rank+bitmask",
                Sparse::BlockCsr { .. } | Sparse::QBlockCsr { .. } => "low-rank+block-csr",
                Sparse::TwoFour { .. } => "low-rank+2:4",
            },
        }
    }
}

impl Encoding {
    /// The value types it stores: (factors or dense values, sparse or dense values). A
    /// dense or low-rank encoding has one type, given twice; a sparse one its values'
    /// type twice; a composite one its factors' and its sparse values'.
    pub const fn dtypes(&self) -> (DType, DType) {
        match *self {
            Encoding::Dense { dtype } | Encoding::LowRank { dtype, .. } => (dtype, dtype),
            Encoding::Sparse(s) => (s.dtype(), s.dtype()),
            Encoding::Composite {
                factor_dtype,
                sparse,
                ..
            } => (factor_dtype, sparse.dtype()),
        }
    }

    /// The oldest minor format version that can hold this encoding: 1 when any of its
    /// value types is quantized, else 0 (see [`DType::min_minor`]).
    pub const fn min_minor(&self) -> u16 {
        let (a, b) = self.dtypes();
        let (a, b) = (a.min_minor(), b.min_minor());
        if a > b { a } else { b }
    }
}

/// [`Encoding::name`] with the parameters: `dense bf16`, `low-rank r=64 f16`,
/// `block-csr nnz=5000 f16`, `low-rank r=8 f16 + bitmask nnz=1200 bf16`.
impl core::fmt::Display for Encoding {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Encoding::Dense { dtype } => write!(f, "{} {dtype}", self.name()),
            Encoding::LowRank { rank, dtype } => write!(f, "{} r={rank} {dtype}", self.name()),
            Encoding::Sparse(s) => write!(f, "{s}"),
            Encoding::Composite {
                rank,
                factor_dtype,
                sparse,
            } => write!(f, "low-rank r={rank} {factor_dtype} + {sparse}"),
        }
    }
}

/// Shape and encoding: everything that determines a section's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorDesc {
    /// Rows (output features).
    pub rows: u32,
    /// Columns (input features).
    pub cols: u32,
    /// Encoding with its parameters.
    pub encoding: Encoding,
}

/// What a part of a section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PartKind {
    /// Dense values.
    Values,
    /// Low-rank factor A (`rank×cols`).
    FactorA,
    /// Low-rank factor B (`rows×rank`).
    FactorB,
    /// Bitmask bits.
    Mask,
    /// Block-CSR block pointers (u32).
    BlockPtr,
    /// Block-CSR in-block column indices (u8).
    ColIdx,
    /// Sparse non-zero values.
    SparseValues,
    /// 2:4 index nibbles.
    Meta,
}

/// One part: where it lies relative to the section start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Part {
    /// What it holds.
    pub kind: PartKind,
    /// Offset from the section start (a multiple of [`PART_ALIGN`]).
    pub offset: u64,
    /// Length in bytes (no padding).
    pub len: u64,
}

/// Most parts a section has (composite low-rank + block-CSR: A, B, ptr, idx, values).
pub const MAX_PARTS: usize = 5;

/// The byte layout of one tensor section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorLayout {
    parts: [Part; MAX_PARTS],
    count: usize,
    /// Section length: parts, gaps and trailing padding to the file alignment.
    pub total: u64,
}

const fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

fn align_up(x: u64, a: u64) -> Result<u64, FormatError> {
    debug_assert!(a.is_power_of_two());
    x.checked_add(a - 1)
        .map(|v| v & !(a - 1))
        .ok_or(FormatError::SizeOverflow)
}

fn mul(a: u64, b: u64) -> Result<u64, FormatError> {
    a.checked_mul(b).ok_or(FormatError::SizeOverflow)
}

/// Checks a quantized sparse part's recorded group count against what any split of
/// `nnz` kept values over `rows` rows can give: each non-empty row `r` holds
/// `ceil(k_r/g)` groups, so the total lies between `ceil(nnz/g)` (all in one row) and
/// `min(nnz, floor((nnz + rows·(g-1))/g))` (every group as short as possible). The
/// exact count is checked against the index structure by `TensorView::verify`.
fn check_groups(rows: u64, nnz: u64, groups: u64, g: u64) -> Result<(), FormatError> {
    let hi = nnz.min(rows.saturating_mul(g - 1).saturating_add(nnz) / g);
    if groups < nnz.div_ceil(g) || groups > hi {
        return Err(FormatError::InvalidEncoding {
            reason: "quantization group count impossible for nnz and rows",
        });
    }
    Ok(())
}

impl TensorLayout {
    /// Computes the layout of `desc` in a file with the given alignment, validating
    /// the shape and the encoding's parameters.
    pub fn compute(desc: &TensorDesc, alignment: u32) -> Result<TensorLayout, FormatError> {
        if !crate::header::valid_alignment(alignment) {
            return Err(FormatError::BadAlignment { alignment });
        }
        let (rows, cols) = (u64::from(desc.rows), u64::from(desc.cols));
        if desc.rows == 0 || desc.cols == 0 || desc.rows > MAX_DIM || desc.cols > MAX_DIM {
            return Err(FormatError::BadShape {
                rows: desc.rows,
                cols: desc.cols,
            });
        }
        let n = mul(rows, cols)?;
        let mut l = TensorLayout {
            parts: [Part {
                kind: PartKind::Values,
                offset: 0,
                len: 0,
            }; MAX_PARTS],
            count: 0,
            total: 0,
        };
        let mut end = 0u64;
        let mut push = |l: &mut TensorLayout, kind, len: u64| -> Result<(), FormatError> {
            let offset = align_up(end, PART_ALIGN)?;
            end = offset.checked_add(len).ok_or(FormatError::SizeOverflow)?;
            l.parts[l.count] = Part { kind, offset, len };
            l.count += 1;
            Ok(())
        };
        let check_rank = |rank: u32| {
            if rank == 0 || rank > desc.rows.min(desc.cols) {
                Err(FormatError::InvalidEncoding {
                    reason: "rank must be in 1..=min(rows, cols)",
                })
            } else {
                Ok(u64::from(rank))
            }
        };
        // Bytes of `runs` row-aligned runs of `len` values each (dense rows, factor
        // rows, 2:4 rows): quantized types round each run up to whole blocks.
        let runs = |dtype: DType, runs: u64, len: u64| -> Result<u64, FormatError> {
            dtype.validate()?;
            mul(runs, dtype.run_bytes(len))
        };
        let sparse = match desc.encoding {
            Encoding::Dense { dtype } => {
                push(&mut l, PartKind::Values, runs(dtype, rows, cols)?)?;
                None
            }
            Encoding::LowRank { rank, dtype } => {
                let r = check_rank(rank)?;
                push(&mut l, PartKind::FactorA, runs(dtype, r, cols)?)?;
                push(&mut l, PartKind::FactorB, runs(dtype, rows, r)?)?;
                None
            }
            Encoding::Sparse(s) => Some(s),
            Encoding::Composite {
                rank,
                factor_dtype,
                sparse,
            } => {
                let r = check_rank(rank)?;
                push(&mut l, PartKind::FactorA, runs(factor_dtype, r, cols)?)?;
                push(&mut l, PartKind::FactorB, runs(factor_dtype, rows, r)?)?;
                Some(sparse)
            }
        };
        let bad = |reason| FormatError::InvalidEncoding { reason };
        // Value bytes of a bitmask or block-CSR part: `nnz` elements of a float type,
        // or `groups` blocks of a quantized one.
        let sparse_values = |nnz: u64, groups: Option<u64>, dtype: DType| {
            dtype.validate()?;
            match (groups, dtype.is_quantized()) {
                (None, false) => mul(nnz, dtype.size() as u64),
                (Some(groups), true) => {
                    check_groups(rows, nnz, groups, dtype.group() as u64)?;
                    mul(groups, dtype.size() as u64)
                }
                (None, true) => Err(bad(
                    "quantized sparse values need the QBitmask/QBlockCsr variant",
                )),
                (Some(_), false) => Err(bad("QBitmask/QBlockCsr values must be quantized")),
            }
        };
        match sparse {
            None => {}
            Some(Sparse::Bitmask { nnz, dtype } | Sparse::QBitmask { nnz, dtype, .. }) => {
                if nnz > n {
                    return Err(bad("nnz exceeds rows*cols"));
                }
                let groups = match sparse {
                    Some(Sparse::QBitmask { groups, .. }) => Some(groups),
                    _ => None,
                };
                let values = sparse_values(nnz, groups, dtype)?;
                push(&mut l, PartKind::Mask, ceil_div(n, 8))?;
                push(&mut l, PartKind::SparseValues, values)?;
            }
            Some(Sparse::BlockCsr { nnz, dtype } | Sparse::QBlockCsr { nnz, dtype, .. }) => {
                if nnz > n || nnz > u64::from(u32::MAX) {
                    return Err(bad("nnz exceeds rows*cols or u32::MAX"));
                }
                let groups = match sparse {
                    Some(Sparse::QBlockCsr { groups, .. }) => Some(groups),
                    _ => None,
                };
                let values = sparse_values(nnz, groups, dtype)?;
                let nb = ceil_div(cols, u64::from(CSR_BLOCK_COLS));
                let ptrs = mul(rows, nb)?
                    .checked_add(1)
                    .ok_or(FormatError::SizeOverflow)?;
                push(&mut l, PartKind::BlockPtr, mul(ptrs, 4)?)?;
                push(&mut l, PartKind::ColIdx, nnz)?;
                push(&mut l, PartKind::SparseValues, values)?;
            }
            Some(Sparse::TwoFour { dtype }) => {
                if cols % 4 != 0 {
                    return Err(bad("2:4 needs cols to be a multiple of 4"));
                }
                // Every row keeps exactly cols/2 values, so its groups are fixed.
                push(&mut l, PartKind::SparseValues, runs(dtype, rows, cols / 2)?)?;
                push(&mut l, PartKind::Meta, ceil_div(n, 8))?;
            }
        }
        l.total = align_up(end, u64::from(alignment))?;
        Ok(l)
    }

    /// The parts, in file order.
    pub fn parts(&self) -> &[Part] {
        &self.parts[..self.count]
    }

    /// The part of the given kind, if this layout has one.
    pub fn part(&self, kind: PartKind) -> Option<Part> {
        self.parts().iter().copied().find(|p| p.kind == kind)
    }
}

/// Exact bytes `desc` occupies in a file with alignment `alignment`: every part, the
/// zero gaps between parts and the trailing padding to the next section.
pub fn encoded_bytes_aligned(desc: &TensorDesc, alignment: u32) -> Result<u64, FormatError> {
    TensorLayout::compute(desc, alignment).map(|l| l.total)
}

/// Exact bytes `desc` occupies in a file written with the default (minimum)
/// alignment, [`MIN_ALIGNMENT`]. This is the number the budget search should use.
pub fn encoded_bytes(desc: &TensorDesc) -> Result<u64, FormatError> {
    encoded_bytes_aligned(desc, MIN_ALIGNMENT)
}

/// Quantization groups of sparse rows holding `nnz_per_row[r]` kept values each:
/// `Σ_r ceil(k_r/group)` for a quantized `dtype` (the `groups` of
/// [`Sparse::QBitmask`] / [`Sparse::QBlockCsr`]), 0 for a float type.
pub fn row_groups(nnz_per_row: &[u32], dtype: DType) -> u64 {
    if !dtype.is_quantized() {
        return 0;
    }
    let g = dtype.group() as u64;
    nnz_per_row.iter().map(|&k| u64::from(k).div_ceil(g)).sum()
}

/// Chooses the smallest sparse encoding (at the default alignment) for a
/// `rows×cols` sparse matrix with `nnz_per_row[r]` non-zeros in row `r`.
///
/// The row counts cannot tell whether a pattern is 2:4, so the caller says so with
/// `is_2_4`; 2:4 is considered only when it is set and consistent with the counts
/// (`cols % 4 == 0`, no row above `cols/2`). Ties go to the earlier of 2:4
/// (regular, cheapest to decode), bitmask, block-CSR. Compare the result with [`Encoding::Dense`] via [`encoded_bytes`]
/// to decide whether sparsity pays at all.
pub fn smallest_sparse_encoding(
    rows: u32,
    cols: u32,
    nnz_per_row: &[u32],
    dtype: DType,
    is_2_4: bool,
) -> Result<(Encoding, u64), FormatError> {
    if nnz_per_row.len() != rows as usize {
        return Err(FormatError::InvalidEncoding {
            reason: "nnz_per_row.len() != rows",
        });
    }
    if nnz_per_row.iter().any(|&k| k > cols) {
        return Err(FormatError::InvalidEncoding {
            reason: "a row has more non-zeros than columns",
        });
    }
    let nnz: u64 = nnz_per_row.iter().map(|&k| u64::from(k)).sum();
    let groups = row_groups(nnz_per_row, dtype);
    let mut candidates = [
        (is_2_4 && cols.is_multiple_of(4) && nnz_per_row.iter().all(|&k| k <= cols / 2))
            .then_some(Sparse::TwoFour { dtype }),
        Some(Sparse::with_values(true, nnz, groups, dtype)),
        (nnz <= u64::from(u32::MAX)).then_some(Sparse::with_values(false, nnz, groups, dtype)),
    ]
    .into_iter()
    .flatten();
    let first = candidates.next().ok_or(FormatError::SizeOverflow)?;
    let size = |s: Sparse| {
        encoded_bytes(&TensorDesc {
            rows,
            cols,
            encoding: Encoding::Sparse(s),
        })
    };
    let mut best = (Encoding::Sparse(first), size(first)?);
    for s in candidates {
        let b = size(s)?;
        if b < best.1 {
            best = (Encoding::Sparse(s), b);
        }
    }
    Ok(best)
}
