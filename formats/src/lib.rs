//! `cap-format`: the `.cap` file format.
//!
//! A `.cap` file holds one compressed model: a fixed 64-byte little-endian header, a
//! data region of tensor sections (each aligned, each with its own CRC-32), and a
//! postcard-encoded [`Manifest`] (architecture, tokenizer, tensor directory,
//! compression record, provenance) at the end. `formats/SPEC.md` is the single source
//! of truth for the byte layout; this crate implements it:
//!
//! * [`encoding`]: how every tensor encoding (dense, low-rank, bitmask / block-CSR /
//!   2:4 sparse, composite) is laid out, and the exact byte accounting
//!   ([`encoded_bytes`], [`smallest_sparse_encoding`]) the budget search relies on.
//! * [`reader`]: a validating, zero-copy, `no_std` reader ([`CapFile::parse`]) that
//!   never panics on any input.
//! * [`sparse`]: reference encoders/decoders between dense values and the sparse
//!   parts (and from a CSR matrix straight to the parts), so packers and kernels share
//!   one implementation of the bit layouts.
//! * [`values`]: `f32` to the stored bytes of a [`DType`], the one rounding rule.
//! * `writer` (feature `std`): a streaming, deterministic, atomic writer.
//!
//! The reader and the accounting need only `alloc`; the writer needs `std`.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod encoding;
pub mod error;
pub mod fuzzing;
pub mod header;
pub mod manifest;
#[cfg(feature = "std")]
pub mod output;
pub mod reader;
pub mod sparse;
pub mod values;
#[cfg(feature = "std")]
pub mod writer;

pub use encoding::{
    Encoding, Part, PartKind, Sparse, TensorDesc, TensorLayout, encoded_bytes,
    encoded_bytes_aligned, row_groups, smallest_sparse_encoding,
};
pub use error::{FormatError, Region};
pub use header::{FORMAT_MAJOR, FORMAT_MINOR, HEADER_LEN, Header, MAGIC};
pub use manifest::{
    Budget, BudgetKind, Compression, Extension, LayerCompression, Manifest, ModelConfig,
    PerplexityProtocol, PerplexityRecord, Provenance, RopeScaling, SpacePrefix, TensorEntry,
    Tokenizer, TokenizerKind, decode_manifest, encode_manifest,
};
#[cfg(feature = "std")]
pub use output::{OutputError, output_target, temporary_path};
pub use reader::{CapFile, CsrView, SparseView, TensorData, TensorView, Values};
pub use sparse::{
    SparseKind, decode_sparse, decode_sparse_f32, encode_sparse, encode_sparse_csr,
    quantize_sparse, row_counts,
};
pub use values::{
    QuantizedRun, dequantize, dequantize_rows, extend_bytes, extend_quantized, extend_rows,
    quantize, to_bytes, write_run,
};
#[cfg(feature = "std")]
pub use writer::{CapWriter, StreamWriter, WriteError, WriterOptions};

/// Whether a stored checksum matches the computed one. Always a plain comparison,
/// except in fuzzing builds (`--cfg fuzzing`, set by cargo-fuzz), where it accepts
/// any value so the fuzzer can reach the structural checks behind the checksums.
pub(crate) const fn checksum_matches(stored: u32, computed: u32) -> bool {
    stored == computed || cfg!(fuzzing)
}

/// Element type of a stored tensor's values.
///
/// On disk (postcard) the variant index is the tag: `F32` = 0, `F16` = 1, `BF16` = 2,
/// `Q8` = 3, `Q4` = 4 (the quantized types were appended in format 1.1, so the tags of
/// the float types, and files that use only them, are unchanged).
///
/// The quantized types store values in *blocks* of `group` values (SPEC.md §5,
/// "Quantized values"): groups run along each row (along each row's kept values for
/// the sparse encodings), a row's last group may be partial, and each block is
/// `[f16 scale][f16 min, Q4 only][codes]`, the codes of a partial group padded with
/// zeros to a full block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
    /// Symmetric 8-bit: per group one f16 scale `s` and `group` i8 codes `q`;
    /// value = `s·q`. Block: 2 + `group` bytes.
    Q8 {
        /// Values per group: a multiple of 16 in 16..=256 ([`valid_group`]).
        group: u16,
    },
    /// Asymmetric 4-bit: per group one f16 scale `s`, one f16 minimum `m` and `group`
    /// unsigned 4-bit codes `q` (0..=15, two per byte, the earlier value in the low
    /// nibble); value = `s·q + m`. Block: 4 + `group/2` bytes.
    Q4 {
        /// Values per group: a multiple of 16 in 16..=256 ([`valid_group`]).
        group: u16,
    },
}

/// Smallest quantization group ([`DType::Q8`], [`DType::Q4`]).
pub const MIN_GROUP: u16 = 16;
/// Largest quantization group.
pub const MAX_GROUP: u16 = 256;

/// Whether `g` is a group size the format allows: a multiple of 16 in
/// [`MIN_GROUP`]`..=`[`MAX_GROUP`]. Multiples of 16 keep a Q4 block's codes a whole
/// number of 8-byte words and every block a multiple of 2 bytes (so each f16 scale is
/// 2-byte aligned); below 16 the 2-4 bytes of scale per group cost more than a bit
/// per value, above 256 one outlier spoils too many values.
pub const fn valid_group(g: u16) -> bool {
    g >= MIN_GROUP && g <= MAX_GROUP && g.is_multiple_of(16)
}

impl DType {
    /// Size of one storage unit in bytes: one element for the float types, one block
    /// of [`DType::group`] values for the quantized types.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8 { group } => 2 + group as usize,
            DType::Q4 { group } => 4 + group as usize / 2,
        }
    }

    /// Values per storage unit: 1 for the float types, the group size for the
    /// quantized ones.
    pub const fn group(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8 { group } | DType::Q4 { group } => group as usize,
        }
    }

    /// Whether values are stored as quantized blocks ([`DType::Q8`], [`DType::Q4`]).
    pub const fn is_quantized(self) -> bool {
        matches!(self, DType::Q8 { .. } | DType::Q4 { .. })
    }

    /// Bytes of `count` values stored in one row-aligned run (a dense row, or one
    /// sparse row's kept values): `count` elements, or `ceil(count/group)` blocks.
    pub const fn run_bytes(self, count: u64) -> u64 {
        count.div_ceil(self.group() as u64) * self.size() as u64
    }

    /// The oldest minor format version that has this type (0 for the float types, 1
    /// for the quantized ones); the writer stamps the newest such version of a file's
    /// tensors, so files without quantized values stay byte-identical to 1.0 files.
    pub const fn min_minor(self) -> u16 {
        if self.is_quantized() { 1 } else { 0 }
    }

    /// Checks the type's parameter (the group size of a quantized type).
    pub const fn validate(self) -> Result<(), FormatError> {
        match self {
            DType::Q8 { group } | DType::Q4 { group } if !valid_group(group) => {
                Err(FormatError::InvalidEncoding {
                    reason: "quantization group must be a multiple of 16 in 16..=256",
                })
            }
            _ => Ok(()),
        }
    }

    /// Lower-case name for reports: `"f32"`, `"f16"`, `"bf16"`, `"q8"` or `"q4"`
    /// (`Display` adds a quantized type's group: `q4/g32`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8 { .. } => "q8",
            DType::Q4 { .. } => "q4",
        }
    }
}

/// Writes [`DType::name`]; quantized types add their group: `q8/g64`.
impl core::fmt::Display for DType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DType::Q8 { group } | DType::Q4 { group } => write!(f, "{}/g{group}", self.name()),
            _ => f.write_str(self.name()),
        }
    }
}

/// Smallest alignment of a tensor section (and of the data region) in bytes: one
/// cache line on every target board, and the widest vector load we use (AVX-512 /
/// two NEON q-register pairs). Writers may choose any larger power of two.
pub const MIN_ALIGNMENT: u32 = 64;

/// Largest alignment a reader accepts: a 2 MiB huge page. Anything larger can only
/// be a corrupt header and would make padding dominate the file.
pub const MAX_ALIGNMENT: u32 = 1 << 21;

/// Alignment of each part (factor, mask, index array, values) inside a tensor
/// section, relative to the section start. Fixed at 64 so the byte accounting does
/// not depend on the file alignment except for the section's trailing padding.
pub const PART_ALIGN: u64 = 64;

/// Most tensors one file may hold. A 405B-parameter LLaMA has about 1,100 tensors; a
/// million bounds the directory (and the reader's index allocations) generously.
pub const MAX_TENSORS: u32 = 1 << 20;

/// Largest manifest a reader accepts, in bytes. The biggest part is the tokenizer: a
/// 256k vocabulary with scores and merges is under 10 MiB of postcard. Decoding
/// allocates up to about 50 bytes per manifest byte in the worst case (an empty
/// string is 1 byte on the wire and a 24-byte `String` in memory, and `Vec` growth
/// can double that), so 32 MiB bounds a hostile manifest to about 1.6 GiB.
pub const MAX_MANIFEST_LEN: u64 = 32 << 20;

/// Longest tensor name in bytes (GGUF allows 64; Hugging Face names stay below 100).
pub const MAX_NAME_LEN: usize = 256;

/// Largest row or column count of a tensor: 2^24 is 64x the largest vocabulary in
/// use (256k) and keeps `rows * cols * 4` far below `u64::MAX`.
pub const MAX_DIM: u32 = 1 << 24;

/// Most extension records in one extension list (manifest-level or per tensor).
pub const MAX_EXTENSIONS: usize = 4096;
