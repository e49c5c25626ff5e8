//! The reader's and the accounting's typed errors.

use core::fmt;

use crate::DType;

/// A region of the file named in bounds errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// The data region holding the tensor sections.
    Data,
    /// The postcard-encoded manifest.
    Manifest,
}

/// Everything that can be wrong with a `.cap` file or a tensor description.
///
/// Small and `Copy` so the no_std runtime can match on it; the host adds context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The input is shorter than the part of the header needed next.
    TruncatedHeader {
        /// Bytes available.
        len: usize,
    },
    /// The first 8 bytes are not [`crate::MAGIC`].
    BadMagic,
    /// The file's major version is not the one this reader implements.
    UnsupportedMajorVersion {
        /// Major version in the file.
        found_major: u16,
        /// Minor version in the file.
        found_minor: u16,
        /// Major version this reader implements.
        supported_major: u16,
        /// Newest minor version this reader knows.
        supported_minor: u16,
    },
    /// The file's manifest uses something this reader cannot decode (a value type or
    /// encoding variant, a parameter outside this reader's limits) and the file's minor
    /// version is newer than the newest this reader knows: the likely cause, named
    /// instead of a bare decode error.
    NewerMinorVersion {
        /// Major version (this reader's).
        major: u16,
        /// Minor version in the file.
        found_minor: u16,
        /// Newest minor version this reader knows.
        supported_minor: u16,
    },
    /// The header's CRC-32 does not match its first 60 bytes.
    HeaderChecksum {
        /// Value stored in the header.
        stored: u32,
        /// Value computed over the bytes.
        computed: u32,
    },
    /// The header sets required-feature flag bits this reader does not know.
    UnknownFlags {
        /// The unknown bits.
        flags: u32,
    },
    /// The alignment is not a power of two within `MIN_ALIGNMENT..=MAX_ALIGNMENT`.
    BadAlignment {
        /// The alignment in the header.
        alignment: u32,
    },
    /// The header declares more tensors than [`crate::MAX_TENSORS`].
    TooManyTensors {
        /// Declared count.
        count: u64,
    },
    /// An offset + length computation overflowed `u64` (or `usize`).
    SizeOverflow,
    /// A region is not where the layout rules put it (data after the header,
    /// manifest right after the data).
    RegionOrder,
    /// A region starts at a misaligned offset or has a misaligned length.
    MisalignedRegion {
        /// Which region.
        region: Region,
    },
    /// A region extends past the end of the input.
    OutOfBounds {
        /// Which region.
        region: Region,
        /// Where it ends.
        end: u64,
        /// Input length.
        file_len: u64,
    },
    /// Bytes follow the manifest.
    TrailingBytes {
        /// Count of extra bytes.
        extra: u64,
    },
    /// The manifest is longer than [`crate::MAX_MANIFEST_LEN`].
    ManifestTooLarge {
        /// Declared length.
        len: u64,
    },
    /// The manifest's CRC-32 does not match.
    ManifestChecksum {
        /// Value stored in the header.
        stored: u32,
        /// Value computed over the manifest bytes.
        computed: u32,
    },
    /// The manifest is not valid postcard for [`crate::Manifest`].
    ManifestDecode,
    /// The manifest decoded but did not use all of its bytes.
    ManifestTrailingBytes,
    /// The header's tensor count differs from the manifest's directory length.
    TensorCountMismatch {
        /// Count in the header.
        header: u32,
        /// Entries in the manifest.
        manifest: u64,
    },
    /// An extension list holds more than [`crate::MAX_EXTENSIONS`] records.
    TooManyExtensions,
    /// A tensor name is empty or longer than [`crate::MAX_NAME_LEN`].
    BadName {
        /// Directory index.
        index: usize,
    },
    /// Two tensors have the same name.
    DuplicateName {
        /// Directory index of the second occurrence (in name order).
        index: usize,
    },
    /// Rows or columns are zero or above [`crate::MAX_DIM`].
    BadShape {
        /// Rows.
        rows: u32,
        /// Columns.
        cols: u32,
    },
    /// The encoding's parameters are impossible for the shape.
    InvalidEncoding {
        /// What is wrong.
        reason: &'static str,
    },
    /// A directory entry's section length differs from the length its encoding
    /// implies.
    SectionLength {
        /// Directory index.
        index: usize,
        /// Length implied by the encoding and the file alignment.
        expected: u64,
        /// Length in the directory.
        found: u64,
    },
    /// A tensor section does not start at a multiple of the file alignment.
    MisalignedTensor {
        /// Directory index.
        index: usize,
        /// Offset in the directory (relative to the data region).
        offset: u64,
    },
    /// A tensor section extends past the data region.
    TensorOutOfBounds {
        /// Directory index.
        index: usize,
    },
    /// Two tensor sections overlap.
    Overlap {
        /// Directory index of the section that starts first.
        first: usize,
        /// Directory index of the section that starts inside it.
        second: usize,
    },
    /// A tensor section's CRC-32 does not match.
    TensorChecksum {
        /// Directory index.
        index: usize,
        /// Value in the directory.
        stored: u32,
        /// Value computed over the section.
        computed: u32,
    },
    /// A byte outside every section (header padding, gaps) is not zero.
    NonZeroPadding {
        /// Absolute file offset of the byte.
        offset: u64,
    },
    /// A sparse section's index structure is inconsistent (mask popcount, row
    /// pointers, 2:4 metadata).
    BadSparseStructure {
        /// Directory index.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Quantized values are inconsistent: the recorded group count differs from the
    /// one the sparse structure implies, or a partial group's unused codes are not 0.
    BadQuantizedValues {
        /// Directory index.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A typed view was asked for with the wrong element type.
    WrongDType {
        /// Element type asked for.
        wanted: DType,
        /// Element type stored.
        stored: DType,
    },
    /// A typed view was asked for, but the bytes are not aligned for the element type
    /// in memory (the buffer itself is misaligned).
    MisalignedView,
    /// No tensor with that name or index.
    NotFound,
    /// Typed views reinterpret little-endian bytes; this host is big-endian.
    BigEndianHost,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FormatError::*;
        match *self {
            TruncatedHeader { len } => write!(f, "truncated header: only {len} bytes"),
            BadMagic => write!(f, "not a .cap file (bad magic)"),
            UnsupportedMajorVersion {
                found_major,
                found_minor,
                supported_major,
                supported_minor,
            } => write!(
                f,
                "unsupported .cap format version {found_major}.{found_minor}: this reader \
                 implements version {supported_major}.{supported_minor} (major {supported_major} only)"
            ),
            NewerMinorVersion {
                major,
                found_minor,
                supported_minor,
            } => write!(
                f,
                "file is format {major}.{found_minor}, this reader knows up to \
                 {major}.{supported_minor}: it may use value types or encodings this reader lacks"
            ),
            HeaderChecksum { stored, computed } => write!(
                f,
                "header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            UnknownFlags { flags } => write!(f, "unknown required-feature flags {flags:#x}"),
            BadAlignment { alignment } => write!(f, "bad alignment {alignment}"),
            TooManyTensors { count } => write!(
                f,
                "{count} tensors declared, limit is {}",
                crate::MAX_TENSORS
            ),
            SizeOverflow => write!(f, "size or offset arithmetic overflows"),
            RegionOrder => write!(f, "regions are not in header/data/manifest order"),
            MisalignedRegion { region } => write!(f, "{region:?} region is misaligned"),
            OutOfBounds {
                region,
                end,
                file_len,
            } => write!(
                f,
                "{region:?} region ends at {end}, past the end of the file ({file_len} bytes)"
            ),
            TrailingBytes { extra } => write!(f, "{extra} bytes after the manifest"),
            ManifestTooLarge { len } => write!(
                f,
                "manifest of {len} bytes exceeds the limit of {}",
                crate::MAX_MANIFEST_LEN
            ),
            ManifestChecksum { stored, computed } => write!(
                f,
                "manifest checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            ManifestDecode => write!(f, "manifest is not valid postcard"),
            ManifestTrailingBytes => write!(f, "manifest has trailing bytes"),
            TensorCountMismatch { header, manifest } => write!(
                f,
                "header declares {header} tensors, manifest lists {manifest}"
            ),
            TooManyExtensions => write!(f, "too many extension records"),
            BadName { index } => write!(f, "tensor {index}: empty or over-long name"),
            DuplicateName { index } => write!(f, "tensor {index}: duplicate name"),
            BadShape { rows, cols } => write!(f, "bad shape {rows}x{cols}"),
            InvalidEncoding { reason } => write!(f, "invalid encoding: {reason}"),
            SectionLength {
                index,
                expected,
                found,
            } => write!(
                f,
                "tensor {index}: section is {found} bytes, its encoding needs {expected}"
            ),
            MisalignedTensor { index, offset } => {
                write!(f, "tensor {index}: offset {offset} is misaligned")
            }
            TensorOutOfBounds { index } => {
                write!(f, "tensor {index}: section past the data region")
            }
            Overlap { first, second } => {
                write!(f, "tensor sections {first} and {second} overlap")
            }
            TensorChecksum {
                index,
                stored,
                computed,
            } => write!(
                f,
                "tensor {index}: checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            NonZeroPadding { offset } => write!(f, "non-zero padding byte at offset {offset}"),
            BadSparseStructure { index, reason } => write!(f, "tensor {index}: {reason}"),
            BadQuantizedValues { index, reason } => write!(f, "tensor {index}: {reason}"),
            WrongDType { wanted, stored } => {
                write!(f, "asked for {wanted:?} values, stored as {stored:?}")
            }
            MisalignedView => write!(f, "buffer is not aligned for a typed view"),
            NotFound => write!(f, "no such tensor"),
            BigEndianHost => write!(f, "typed views need a little-endian host"),
        }
    }
}

impl core::error::Error for FormatError {}
