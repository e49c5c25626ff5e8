//! The fixed 64-byte file header.

use core::mem::{offset_of, size_of};

use crate::{FormatError, MAX_ALIGNMENT, MAX_TENSORS, MIN_ALIGNMENT};

/// The 8 magic bytes, `\x89CAP\r\n\x1a\n`: the high first byte catches 7-bit
/// transfers, CR LF and LF catch newline translation, 0x1A stops `type` on Windows
/// (the PNG trick).
pub const MAGIC: [u8; 8] = [0x89, b'C', b'A', b'P', b'\r', b'\n', 0x1A, b'\n'];

/// Major format version this crate reads and writes. A reader rejects any other.
pub const FORMAT_MAJOR: u16 = 1;

/// Newest minor format version this crate reads and writes. Readers accept any minor
/// version of their major and ignore extension records they do not know; a manifest
/// they cannot decode in a file of a newer minor version is reported as
/// [`FormatError::NewerMinorVersion`]. 1.1 added the quantized value types
/// ([`crate::DType::Q8`], [`crate::DType::Q4`]) and the sparse variants that carry
/// their group count; the writer stamps 1.1 only on files that use them (1.0
/// otherwise, byte-identical to what 1.0 writers wrote).
pub const FORMAT_MINOR: u16 = 1;

/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 64;

/// Required-feature flag bits this reader understands (none yet). A reader rejects
/// a file with any other bit set.
pub const KNOWN_FLAGS: u32 = 0;

/// The on-disk header, byte layout (all little-endian):
///
/// | offset | size | field            |
/// |-------:|-----:|------------------|
/// |      0 |    8 | `magic`          |
/// |      8 |    2 | `major`          |
/// |     10 |    2 | `minor`          |
/// |     12 |    4 | `flags`          |
/// |     16 |    4 | `alignment`      |
/// |     20 |    4 | `tensor_count`   |
/// |     24 |    8 | `data_offset`    |
/// |     32 |    8 | `data_len`       |
/// |     40 |    8 | `manifest_offset`|
/// |     48 |    8 | `manifest_len`   |
/// |     56 |    4 | `manifest_crc32` |
/// |     60 |    4 | `header_crc32` (CRC-32 of bytes 0..60) |
///
/// This `repr(C)` struct documents and size-checks the layout; [`Header::decode`]
/// and [`Header::encode`] convert explicitly, so host endianness never matters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// Format major version.
    pub major: u16,
    /// Format minor version.
    pub minor: u16,
    /// Required-feature flags; see [`KNOWN_FLAGS`].
    pub flags: u32,
    /// Alignment of the data region and of every tensor section (power of two).
    pub alignment: u32,
    /// Number of tensors in the manifest's directory.
    pub tensor_count: u32,
    /// Absolute offset of the data region.
    pub data_offset: u64,
    /// Length of the data region (a multiple of `alignment`).
    pub data_len: u64,
    /// Absolute offset of the manifest (= `data_offset + data_len`).
    pub manifest_offset: u64,
    /// Length of the manifest; the file ends right after it.
    pub manifest_len: u64,
    /// CRC-32 (IEEE) of the manifest bytes.
    pub manifest_crc32: u32,
    /// CRC-32 (IEEE) of header bytes 0..60.
    pub header_crc32: u32,
}

const _: () = {
    assert!(size_of::<Header>() == HEADER_LEN);
    assert!(offset_of!(Header, major) == 8);
    assert!(offset_of!(Header, minor) == 10);
    assert!(offset_of!(Header, flags) == 12);
    assert!(offset_of!(Header, alignment) == 16);
    assert!(offset_of!(Header, tensor_count) == 20);
    assert!(offset_of!(Header, data_offset) == 24);
    assert!(offset_of!(Header, data_len) == 32);
    assert!(offset_of!(Header, manifest_offset) == 40);
    assert!(offset_of!(Header, manifest_len) == 48);
    assert!(offset_of!(Header, manifest_crc32) == 56);
    assert!(offset_of!(Header, header_crc32) == 60);
};

fn u16_at(b: &[u8; HEADER_LEN], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8; HEADER_LEN], o: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(x)
}
fn u64_at(b: &[u8; HEADER_LEN], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

impl Header {
    /// Decodes and checks the header at the start of `bytes`: magic, major version
    /// (before the checksum, so a future layout still gets a version error), header
    /// CRC, flags, alignment and the tensor-count limit. Region bounds are checked by
    /// [`crate::CapFile::parse`], which knows the file length.
    pub fn decode(bytes: &[u8]) -> Result<Header, FormatError> {
        let truncated = FormatError::TruncatedHeader { len: bytes.len() };
        let magic: [u8; 8] = bytes
            .get(..8)
            .ok_or(truncated)?
            .try_into()
            .map_err(|_| truncated)?;
        if magic != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let v = bytes.get(8..12).ok_or(truncated)?;
        let (major, minor) = (
            u16::from_le_bytes([v[0], v[1]]),
            u16::from_le_bytes([v[2], v[3]]),
        );
        if major != FORMAT_MAJOR {
            return Err(FormatError::UnsupportedMajorVersion {
                found_major: major,
                found_minor: minor,
                supported_major: FORMAT_MAJOR,
                supported_minor: FORMAT_MINOR,
            });
        }
        let b: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .ok_or(truncated)?
            .try_into()
            .map_err(|_| truncated)?;
        let stored = u32_at(b, 60);
        let computed = crc32fast::hash(&b[..60]);
        if !crate::checksum_matches(stored, computed) {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        let h = Header {
            magic,
            major,
            minor: u16_at(b, 10),
            flags: u32_at(b, 12),
            alignment: u32_at(b, 16),
            tensor_count: u32_at(b, 20),
            data_offset: u64_at(b, 24),
            data_len: u64_at(b, 32),
            manifest_offset: u64_at(b, 40),
            manifest_len: u64_at(b, 48),
            manifest_crc32: u32_at(b, 56),
            header_crc32: stored,
        };
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(FormatError::UnknownFlags {
                flags: h.flags & !KNOWN_FLAGS,
            });
        }
        if !valid_alignment(h.alignment) {
            return Err(FormatError::BadAlignment {
                alignment: h.alignment,
            });
        }
        if h.tensor_count > MAX_TENSORS {
            return Err(FormatError::TooManyTensors {
                count: u64::from(h.tensor_count),
            });
        }
        Ok(h)
    }

    /// Encodes the header, computing `header_crc32` (the field's current value is
    /// ignored). Used by the writer, and by tests that craft corrupt files.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&self.magic);
        b[8..10].copy_from_slice(&self.major.to_le_bytes());
        b[10..12].copy_from_slice(&self.minor.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.alignment.to_le_bytes());
        b[20..24].copy_from_slice(&self.tensor_count.to_le_bytes());
        b[24..32].copy_from_slice(&self.data_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[56..60].copy_from_slice(&self.manifest_crc32.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Whether `a` is an alignment a file may use: a power of two in
/// [`MIN_ALIGNMENT`]`..=`[`MAX_ALIGNMENT`].
pub const fn valid_alignment(a: u32) -> bool {
    a.is_power_of_two() && a >= MIN_ALIGNMENT && a <= MAX_ALIGNMENT
}
