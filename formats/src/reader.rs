//! The validating zero-copy reader (`no_std` + `alloc`).
//!
//! [`CapFile::parse`] checks the header, every region bound, the manifest checksum,
//! every directory entry (shape, encoding, section length, alignment, bounds), overlaps
//! and duplicate names, all with checked arithmetic and before any allocation that
//! depends on a declared size. Section checksums are verified lazily
//! ([`TensorView::verify`]) or eagerly ([`CapFile::verify_all`]). No input makes it
//! panic.

use alloc::vec::Vec;
use core::ops::Range;

use crate::encoding::{CSR_BLOCK_COLS, Part, PartKind, Sparse, TensorLayout};
use crate::header::{HEADER_LEN, Header};
use crate::manifest::{Manifest, decode_manifest};
use crate::{
    DType, Encoding, FormatError, MAX_EXTENSIONS, MAX_MANIFEST_LEN, MAX_NAME_LEN, Region,
    TensorDesc,
};

fn to_usize(x: u64) -> Result<usize, FormatError> {
    usize::try_from(x).map_err(|_| FormatError::SizeOverflow)
}

fn range(start: u64, len: u64) -> Result<Range<usize>, FormatError> {
    let end = start.checked_add(len).ok_or(FormatError::SizeOverflow)?;
    Ok(to_usize(start)?..to_usize(end)?)
}

fn slice(bytes: &[u8], start: u64, len: u64) -> Result<&[u8], FormatError> {
    bytes
        .get(range(start, len)?)
        .ok_or(FormatError::SizeOverflow)
}

/// A parsed `.cap` file borrowing its bytes.
#[derive(Clone, Debug)]
pub struct CapFile<'a> {
    bytes: &'a [u8],
    header: Header,
    manifest: Manifest,
    layouts: Vec<TensorLayout>,
    /// Directory indices sorted by name (for lookup and the duplicate check).
    by_name: Vec<u32>,
    /// Directory indices sorted by offset (for the overlap and gap checks).
    by_offset: Vec<u32>,
}

impl<'a> CapFile<'a> {
    /// Parses and validates everything but the section checksums.
    pub fn parse(bytes: &'a [u8]) -> Result<CapFile<'a>, FormatError> {
        let h = Header::decode(bytes)?;
        let file_len = bytes.len() as u64;
        let align = u64::from(h.alignment);
        if h.data_offset < HEADER_LEN as u64 {
            return Err(FormatError::RegionOrder);
        }
        if h.data_offset % align != 0 || h.data_len % align != 0 {
            return Err(FormatError::MisalignedRegion {
                region: Region::Data,
            });
        }
        let data_end = h
            .data_offset
            .checked_add(h.data_len)
            .ok_or(FormatError::SizeOverflow)?;
        if h.manifest_offset != data_end {
            return Err(FormatError::RegionOrder);
        }
        if data_end > file_len {
            return Err(FormatError::OutOfBounds {
                region: Region::Data,
                end: data_end,
                file_len,
            });
        }
        if h.manifest_len > MAX_MANIFEST_LEN {
            return Err(FormatError::ManifestTooLarge {
                len: h.manifest_len,
            });
        }
        let manifest_end = h
            .manifest_offset
            .checked_add(h.manifest_len)
            .ok_or(FormatError::SizeOverflow)?;
        if manifest_end > file_len {
            return Err(FormatError::OutOfBounds {
                region: Region::Manifest,
                end: manifest_end,
                file_len,
            });
        }
        if manifest_end < file_len {
            return Err(FormatError::TrailingBytes {
                extra: file_len - manifest_end,
            });
        }
        let mbytes = slice(bytes, h.manifest_offset, h.manifest_len)?;
        let computed = crc32fast::hash(mbytes);
        if !crate::checksum_matches(h.manifest_crc32, computed) {
            return Err(FormatError::ManifestChecksum {
                stored: h.manifest_crc32,
                computed,
            });
        }
        // A newer minor version may add value types or encodings (appended enum
        // variants) that this reader cannot decode; say so rather than "not postcard".
        let newer = |e: FormatError| match e {
            FormatError::ManifestDecode | FormatError::InvalidEncoding { .. }
                if h.minor > crate::FORMAT_MINOR =>
            {
                FormatError::NewerMinorVersion {
                    major: h.major,
                    found_minor: h.minor,
                    supported_minor: crate::FORMAT_MINOR,
                }
            }
            e => e,
        };
        let manifest = decode_manifest(mbytes).map_err(newer)?;
        let n = manifest.tensors.len();
        if n != h.tensor_count as usize {
            return Err(FormatError::TensorCountMismatch {
                header: h.tensor_count,
                manifest: n as u64,
            });
        }
        if manifest.extensions.len() > MAX_EXTENSIONS {
            return Err(FormatError::TooManyExtensions);
        }
        let mut layouts = Vec::with_capacity(n);
        for (index, t) in manifest.tensors.iter().enumerate() {
            if t.name.is_empty() || t.name.len() > MAX_NAME_LEN {
                return Err(FormatError::BadName { index });
            }
            if t.extensions.len() > MAX_EXTENSIONS {
                return Err(FormatError::TooManyExtensions);
            }
            let desc = TensorDesc {
                rows: t.rows,
                cols: t.cols,
                encoding: t.encoding,
            };
            let layout = TensorLayout::compute(&desc, h.alignment).map_err(newer)?;
            if t.len != layout.total {
                return Err(FormatError::SectionLength {
                    index,
                    expected: layout.total,
                    found: t.len,
                });
            }
            if t.offset % align != 0 {
                return Err(FormatError::MisalignedTensor {
                    index,
                    offset: t.offset,
                });
            }
            let end = t
                .offset
                .checked_add(t.len)
                .ok_or(FormatError::SizeOverflow)?;
            if end > h.data_len {
                return Err(FormatError::TensorOutOfBounds { index });
            }
            layouts.push(layout);
        }
        let mut by_offset: Vec<u32> = (0..n as u32).collect();
        by_offset.sort_unstable_by_key(|&i| manifest.tensors[i as usize].offset);
        for w in by_offset.windows(2) {
            let (a, b) = (
                &manifest.tensors[w[0] as usize],
                &manifest.tensors[w[1] as usize],
            );
            // Bounds were checked above, so the sum cannot overflow.
            if a.offset + a.len > b.offset {
                return Err(FormatError::Overlap {
                    first: w[0] as usize,
                    second: w[1] as usize,
                });
            }
        }
        let mut by_name: Vec<u32> = (0..n as u32).collect();
        by_name.sort_unstable_by(|&a, &b| {
            manifest.tensors[a as usize]
                .name
                .cmp(&manifest.tensors[b as usize].name)
        });
        for w in by_name.windows(2) {
            if manifest.tensors[w[0] as usize].name == manifest.tensors[w[1] as usize].name {
                return Err(FormatError::DuplicateName {
                    index: w[1] as usize,
                });
            }
        }
        Ok(CapFile {
            bytes,
            header: h,
            manifest,
            layouts,
            by_name,
            by_offset,
        })
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The decoded manifest (tensor directory included).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.layouts.len()
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.layouts.is_empty()
    }

    /// The directory index of the tensor called `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.by_name
            .binary_search_by(|&i| self.manifest.tensors[i as usize].name.as_str().cmp(name))
            .ok()
            .map(|k| self.by_name[k] as usize)
    }

    /// A view of tensor `index` (checksum not verified; see [`TensorView::verify`]).
    pub fn tensor(&self, index: usize) -> Result<TensorView<'a>, FormatError> {
        let t = self
            .manifest
            .tensors
            .get(index)
            .ok_or(FormatError::NotFound)?;
        let layout = *self.layouts.get(index).ok_or(FormatError::NotFound)?;
        let start = self
            .header
            .data_offset
            .checked_add(t.offset)
            .ok_or(FormatError::SizeOverflow)?;
        Ok(TensorView {
            index,
            rows: t.rows,
            cols: t.cols,
            encoding: t.encoding,
            layout,
            crc32: t.crc32,
            bytes: slice(self.bytes, start, t.len)?,
        })
    }

    /// A view of the tensor called `name`.
    pub fn tensor_by_name(&self, name: &str) -> Result<TensorView<'a>, FormatError> {
        self.tensor(self.find(name).ok_or(FormatError::NotFound)?)
    }

    /// Verifies every section checksum and sparse index structure, and that every
    /// byte outside the sections (header padding, gaps) is zero. After this, every
    /// single-bit change anywhere in the file is detected.
    pub fn verify_all(&self) -> Result<(), FormatError> {
        let mut pos = HEADER_LEN as u64;
        let check_zero = |from: u64, to: u64| -> Result<(), FormatError> {
            let len = to.checked_sub(from).ok_or(FormatError::SizeOverflow)?;
            let gap = slice(self.bytes, from, len)?;
            match gap.iter().position(|&b| b != 0) {
                Some(k) => Err(FormatError::NonZeroPadding {
                    offset: from + k as u64,
                }),
                None => Ok(()),
            }
        };
        for &i in &self.by_offset {
            let t = &self.manifest.tensors[i as usize];
            let start = self.header.data_offset + t.offset;
            check_zero(pos, start)?;
            pos = start + t.len;
            self.tensor(i as usize)?.verify()?;
        }
        check_zero(pos, self.header.manifest_offset)
    }
}

/// A borrowed view of one tensor section.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// Directory index.
    pub index: usize,
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub cols: u32,
    /// Encoding.
    pub encoding: Encoding,
    /// Layout of the section's parts.
    pub layout: TensorLayout,
    /// CRC-32 stored in the directory.
    pub crc32: u32,
    bytes: &'a [u8],
}

/// Values of one dtype, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Values<'a> {
    /// Element type.
    pub dtype: DType,
    /// Raw little-endian bytes.
    pub bytes: &'a [u8],
}

#[cfg(target_endian = "little")]
fn cast<T: bytemuck::AnyBitPattern>(b: &[u8]) -> Result<&[T], FormatError> {
    bytemuck::try_cast_slice(b).map_err(|_| FormatError::MisalignedView)
}

#[cfg(target_endian = "big")]
fn cast<T: bytemuck::AnyBitPattern>(_: &[u8]) -> Result<&[T], FormatError> {
    Err(FormatError::BigEndianHost)
}

impl<'a> Values<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The values as `f32`; errors unless the dtype is F32 and the memory is aligned.
    pub fn as_f32(&self) -> Result<&'a [f32], FormatError> {
        if self.dtype != DType::F32 {
            return Err(FormatError::WrongDType {
                wanted: DType::F32,
                stored: self.dtype,
            });
        }
        cast(self.bytes)
    }

    /// The raw 16-bit values (f16 or bf16 bits); errors unless the dtype is 16-bit and
    /// the memory is aligned.
    pub fn as_u16(&self) -> Result<&'a [u16], FormatError> {
        if self.dtype.size() != 2 {
            return Err(FormatError::WrongDType {
                wanted: DType::F16,
                stored: self.dtype,
            });
        }
        cast(self.bytes)
    }
}

/// Block-CSR parts.
#[derive(Clone, Copy, Debug)]
pub struct CsrView<'a> {
    /// `rows·ceil(cols/256)+1` little-endian u32 block pointers, raw.
    pub block_ptr: &'a [u8],
    /// One u8 per non-zero: column within its 256-column block.
    pub col_idx: &'a [u8],
    /// The non-zeros.
    pub values: Values<'a>,
}

impl<'a> CsrView<'a> {
    /// The block pointers as `u32` (errors when the memory is misaligned).
    pub fn block_ptr_u32(&self) -> Result<&'a [u32], FormatError> {
        cast(self.block_ptr)
    }

    /// Block pointer `i`, read without alignment requirements.
    pub fn block_ptr_at(&self, i: usize) -> Option<u32> {
        let b = self
            .block_ptr
            .get(i.checked_mul(4)?..i.checked_mul(4)?.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The sparse part of a tensor.
#[derive(Clone, Copy, Debug)]
pub enum SparseView<'a> {
    /// Bitmask + packed values.
    Bitmask {
        /// `ceil(rows·cols/8)` bytes, row-major, LSB first.
        mask: &'a [u8],
        /// The non-zeros in row-major order.
        values: Values<'a>,
    },
    /// Block-CSR.
    BlockCsr(CsrView<'a>),
    /// 2:4.
    TwoFour {
        /// `rows·cols/2` values.
        values: Values<'a>,
        /// One nibble per group of 4.
        meta: &'a [u8],
    },
}

/// A tensor's parts, typed by encoding.
#[derive(Clone, Copy, Debug)]
pub enum TensorData<'a> {
    /// Dense row-major values.
    Dense(Values<'a>),
    /// Low-rank factors, `W ≈ B·A`.
    LowRank {
        /// `rank×cols`.
        a: Values<'a>,
        /// `rows×rank`.
        b: Values<'a>,
    },
    /// Sparse only.
    Sparse(SparseView<'a>),
    /// Low-rank + sparse.
    Composite {
        /// `rank×cols`.
        a: Values<'a>,
        /// `rows×rank`.
        b: Values<'a>,
        /// The sparse part.
        sparse: SparseView<'a>,
    },
}

impl<'a> TensorView<'a> {
    /// The whole section, padding included.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The bytes of the part of the given kind.
    pub fn part(&self, kind: PartKind) -> Option<&'a [u8]> {
        let p: Part = self.layout.part(kind)?;
        slice(self.bytes, p.offset, p.len).ok()
    }

    fn need(&self, kind: PartKind) -> Result<&'a [u8], FormatError> {
        self.part(kind).ok_or(FormatError::SizeOverflow)
    }

    fn sparse_view(&self, s: Sparse) -> Result<SparseView<'a>, FormatError> {
        let values = Values {
            dtype: s.dtype(),
            bytes: self.need(PartKind::SparseValues)?,
        };
        Ok(match s {
            Sparse::Bitmask { .. } | Sparse::QBitmask { .. } => SparseView::Bitmask {
                mask: self.need(PartKind::Mask)?,
                values,
            },
            Sparse::BlockCsr { .. } | Sparse::QBlockCsr { .. } => SparseView::BlockCsr(CsrView {
                block_ptr: self.need(PartKind::BlockPtr)?,
                col_idx: self.need(PartKind::ColIdx)?,
                values,
            }),
            Sparse::TwoFour { .. } => SparseView::TwoFour {
                values,
                meta: self.need(PartKind::Meta)?,
            },
        })
    }

    /// The parts, typed by encoding (no copying).
    pub fn data(&self) -> Result<TensorData<'a>, FormatError> {
        let factors = |dtype| -> Result<(Values<'a>, Values<'a>), FormatError> {
            Ok((
                Values {
                    dtype,
                    bytes: self.need(PartKind::FactorA)?,
                },
                Values {
                    dtype,
                    bytes: self.need(PartKind::FactorB)?,
                },
            ))
        };
        Ok(match self.encoding {
            Encoding::Dense { dtype } => TensorData::Dense(Values {
                dtype,
                bytes: self.need(PartKind::Values)?,
            }),
            Encoding::LowRank { dtype, .. } => {
                let (a, b) = factors(dtype)?;
                TensorData::LowRank { a, b }
            }
            Encoding::Sparse(s) => TensorData::Sparse(self.sparse_view(s)?),
            Encoding::Composite {
                factor_dtype,
                sparse,
                ..
            } => {
                let (a, b) = factors(factor_dtype)?;
                TensorData::Composite {
                    a,
                    b,
                    sparse: self.sparse_view(sparse)?,
                }
            }
        })
    }

    /// Verifies the section checksum, then the sparse index structure.
    pub fn verify(&self) -> Result<(), FormatError> {
        let computed = crc32fast::hash(self.bytes);
        if !crate::checksum_matches(self.crc32, computed) {
            return Err(FormatError::TensorChecksum {
                index: self.index,
                stored: self.crc32,
                computed,
            });
        }
        self.verify_quantized()?;
        let sparse = match self.encoding {
            Encoding::Sparse(s) | Encoding::Composite { sparse: s, .. } => s,
            _ => return Ok(()),
        };
        let bad = |reason| FormatError::BadSparseStructure {
            index: self.index,
            reason,
        };
        let n = u64::from(self.rows) * u64::from(self.cols);
        match (sparse, self.sparse_view(sparse)?) {
            (
                Sparse::Bitmask { nnz, .. } | Sparse::QBitmask { nnz, .. },
                SparseView::Bitmask { mask, .. },
            ) => {
                let ones: u64 = mask.iter().map(|b| u64::from(b.count_ones())).sum();
                if ones != nnz {
                    return Err(bad("mask popcount differs from nnz"));
                }
                let tail = (n % 8) as u32;
                if tail != 0 && mask.last().is_some_and(|&b| b >> tail != 0) {
                    return Err(bad("mask bits set past the last position"));
                }
            }
            (
                Sparse::BlockCsr { nnz, .. } | Sparse::QBlockCsr { nnz, .. },
                SparseView::BlockCsr(v),
            ) => {
                let nb = self.cols.div_ceil(CSR_BLOCK_COLS) as usize;
                let last_width = self.cols - (nb as u32 - 1) * CSR_BLOCK_COLS;
                let nptr = v.block_ptr.len() / 4;
                if v.block_ptr_at(0) != Some(0) || v.block_ptr_at(nptr - 1) != Some(nnz as u32) {
                    return Err(bad("block pointers must run from 0 to nnz"));
                }
                let mut prev = 0u32;
                for k in 1..nptr {
                    let p = v.block_ptr_at(k).ok_or(FormatError::SizeOverflow)?;
                    if p < prev {
                        return Err(bad("block pointers decrease"));
                    }
                    let width = if (k - 1) % nb == nb - 1 {
                        last_width
                    } else {
                        CSR_BLOCK_COLS
                    };
                    let idx = v
                        .col_idx
                        .get(prev as usize..p as usize)
                        .ok_or(FormatError::SizeOverflow)?;
                    if idx.windows(2).any(|w| w[0] >= w[1])
                        || idx.last().is_some_and(|&c| u32::from(c) >= width)
                    {
                        return Err(bad("column indices unsorted or out of range"));
                    }
                    prev = p;
                }
            }
            (Sparse::TwoFour { .. }, SparseView::TwoFour { meta, .. }) => {
                let groups = n / 4;
                for (g, nib) in meta.iter().flat_map(|&b| [b & 0xF, b >> 4]).enumerate() {
                    if (g as u64) < groups {
                        if nib & 3 >= nib >> 2 {
                            return Err(bad("2:4 indices must be strictly increasing"));
                        }
                    } else if nib != 0 {
                        return Err(bad("2:4 padding nibble is not zero"));
                    }
                }
            }
            _ => return Err(FormatError::SizeOverflow),
        }
        Ok(())
    }

    /// Kept values per row of the sparse part, from its index structure (mask bits or
    /// block pointers; 2:4 keeps `cols/2`). Bounds-checked: inconsistent structure is
    /// an error, never a panic.
    pub fn sparse_row_counts(&self) -> Result<Vec<u32>, FormatError> {
        let sparse = match self.encoding {
            Encoding::Sparse(s) | Encoding::Composite { sparse: s, .. } => s,
            _ => return Err(FormatError::NotFound),
        };
        crate::sparse::row_counts(self.rows, self.cols, &self.sparse_view(sparse)?).map_err(|e| {
            match e {
                FormatError::BadSparseStructure { reason, .. } => FormatError::BadSparseStructure {
                    index: self.index,
                    reason,
                },
                e => e,
            }
        })
    }

    /// For quantized values: the recorded group count of a sparse part equals the one
    /// its rows imply, and every partial group's unused codes are zero (so each value
    /// array has one byte representation, and the padding is as checked as the gaps).
    fn verify_quantized(&self) -> Result<(), FormatError> {
        let (rows, cols) = (self.rows, self.cols);
        let factors = |dtype, rank: u32| {
            self.check_runs(
                PartKind::FactorA,
                dtype,
                core::iter::repeat_n(cols, rank as usize),
            )?;
            self.check_runs(
                PartKind::FactorB,
                dtype,
                core::iter::repeat_n(rank, rows as usize),
            )
        };
        let sparse = match self.encoding {
            Encoding::Dense { dtype } => {
                return self.check_runs(
                    PartKind::Values,
                    dtype,
                    core::iter::repeat_n(cols, rows as usize),
                );
            }
            Encoding::LowRank { rank, dtype } => return factors(dtype, rank),
            Encoding::Sparse(s) => s,
            Encoding::Composite {
                rank,
                factor_dtype,
                sparse,
            } => {
                factors(factor_dtype, rank)?;
                sparse
            }
        };
        if !sparse.dtype().is_quantized() {
            return Ok(());
        }
        let counts = self.sparse_row_counts()?;
        self.check_runs(PartKind::SparseValues, sparse.dtype(), counts.into_iter())
    }

    /// Checks the part `kind` holding runs of `runs` values of a quantized `dtype`:
    /// exactly their blocks, with the unused codes of partial groups zero.
    fn check_runs(
        &self,
        kind: PartKind,
        dtype: DType,
        runs: impl Iterator<Item = u32>,
    ) -> Result<(), FormatError> {
        if !dtype.is_quantized() {
            return Ok(());
        }
        let bad = |reason| FormatError::BadQuantizedValues {
            index: self.index,
            reason,
        };
        let bytes = self.need(kind)?;
        let mut at = 0usize;
        for k in runs {
            let n = dtype.run_bytes(u64::from(k)) as usize;
            let run = bytes
                .get(at..at + n)
                .ok_or(bad("values shorter than the rows"))?;
            if !run_padding_is_zero(run, dtype, k as usize) {
                return Err(bad("unused codes of a partial group are not zero"));
            }
            at += n;
        }
        if at != bytes.len() {
            return Err(bad("group count differs from the rows' kept values"));
        }
        Ok(())
    }
}

/// Whether the unused codes of a run's partial last group are zero.
fn run_padding_is_zero(run: &[u8], dtype: DType, k: usize) -> bool {
    let g = dtype.group();
    let used = k % g;
    if used == 0 || run.is_empty() {
        return true;
    }
    let last = &run[run.len() - dtype.size()..];
    let codes = match dtype {
        DType::Q4 { .. } => {
            let c = &last[4..];
            // An odd count leaves the high nibble of its last byte unused.
            if used % 2 == 1 && c[used / 2] >> 4 != 0 {
                return false;
            }
            &c[used.div_ceil(2)..]
        }
        _ => &last[2 + used..],
    };
    codes.iter().all(|&b| b == 0)
}
