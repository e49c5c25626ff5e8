//! The catalogue of hand-made corrupt files (each asserting its exact error),
//! every single-bit flip, and truncation at every offset.
mod common;

use cap_format::*;
use common::*;

fn parse_err(file: &[u8]) -> FormatError {
    CapFile::parse(file).map(|_| ()).unwrap_err()
}

fn full_err(file: &[u8]) -> FormatError {
    CapFile::parse(file)
        .and_then(|f| f.verify_all())
        .unwrap_err()
}

fn base() -> Vec<u8> {
    small_file(64, false)
}

#[test]
fn the_base_file_is_valid() {
    let f = base();
    assert_eq!(fuzzing::fuzz_one(&f), Ok(()));
    // The reference CRC agrees with the library's.
    let h = Header::decode(&f).unwrap();
    assert_eq!(crc32fast_hash(&f[..60]), h.header_crc32);
}

#[test]
fn bad_magic() {
    let mut f = base();
    f[1] = b'X';
    assert_eq!(parse_err(&f), FormatError::BadMagic);
    assert_eq!(parse_err(b"GGUF\x03\0\0\0"), FormatError::BadMagic);
}

#[test]
fn future_major_version() {
    let f = with_header(&base(), |h| {
        h.major = FORMAT_MAJOR + 1;
        h.minor = 3;
    });
    let e = parse_err(&f);
    assert_eq!(
        e,
        FormatError::UnsupportedMajorVersion {
            found_major: FORMAT_MAJOR + 1,
            found_minor: 3,
            supported_major: FORMAT_MAJOR,
            supported_minor: FORMAT_MINOR,
        }
    );
    let msg = e.to_string();
    assert!(msg.contains(&format!("{}.3", FORMAT_MAJOR + 1)), "{msg}");
    assert!(
        msg.contains(&format!("{FORMAT_MAJOR}.{FORMAT_MINOR}")),
        "{msg}"
    );
}

#[test]
fn truncated_header() {
    let f = base();
    assert_eq!(
        parse_err(&f[..40]),
        FormatError::TruncatedHeader { len: 40 }
    );
    assert_eq!(parse_err(&f[..5]), FormatError::TruncatedHeader { len: 5 });
    assert_eq!(parse_err(&[]), FormatError::TruncatedHeader { len: 0 });
}

#[test]
fn header_checksum() {
    let mut f = base();
    f[33] ^= 0x10; // data_len
    assert!(matches!(parse_err(&f), FormatError::HeaderChecksum { .. }));
}

#[test]
fn unknown_flags_and_bad_alignment() {
    assert_eq!(
        parse_err(&with_header(&base(), |h| h.flags = 4)),
        FormatError::UnknownFlags { flags: 4 }
    );
    assert_eq!(
        parse_err(&with_header(&base(), |h| h.alignment = 96)),
        FormatError::BadAlignment { alignment: 96 }
    );
    assert_eq!(
        parse_err(&with_header(&base(), |h| h.alignment = 32)),
        FormatError::BadAlignment { alignment: 32 }
    );
}

#[test]
fn tensor_count_overflow() {
    let f = with_header(&base(), |h| h.tensor_count = MAX_TENSORS + 1);
    assert_eq!(
        parse_err(&f),
        FormatError::TooManyTensors {
            count: u64::from(MAX_TENSORS) + 1
        }
    );
    let f = with_header(&base(), |h| h.tensor_count = u32::MAX);
    assert!(matches!(parse_err(&f), FormatError::TooManyTensors { .. }));
    let f = with_header(&base(), |h| h.tensor_count = 2);
    assert_eq!(
        parse_err(&f),
        FormatError::TensorCountMismatch {
            header: 2,
            manifest: 3
        }
    );
}

#[test]
fn regions_past_the_end_and_out_of_order() {
    let b = base();
    let len = b.len() as u64;
    let f = with_header(&b, |h| h.manifest_len += 1);
    assert_eq!(
        parse_err(&f),
        FormatError::OutOfBounds {
            region: Region::Manifest,
            end: len + 1,
            file_len: len
        }
    );
    let f = with_header(&b, |h| {
        h.data_len += 1 << 20;
        h.manifest_offset += 1 << 20;
    });
    assert!(matches!(
        parse_err(&f),
        FormatError::OutOfBounds {
            region: Region::Data,
            ..
        }
    ));
    let f = with_header(&b, |h| h.manifest_offset += 1);
    assert_eq!(parse_err(&f), FormatError::RegionOrder);
    let f = with_header(&b, |h| h.data_offset = 0);
    assert_eq!(parse_err(&f), FormatError::RegionOrder);
    let f = with_header(&b, |h| h.data_len += 8);
    assert_eq!(
        parse_err(&f),
        FormatError::MisalignedRegion {
            region: Region::Data
        }
    );
    let mut f = b.clone();
    f.extend_from_slice(&[0, 0, 0]);
    assert_eq!(parse_err(&f), FormatError::TrailingBytes { extra: 3 });
    let f = with_header(&b, |h| h.manifest_len = MAX_MANIFEST_LEN + 1);
    assert!(matches!(
        parse_err(&f),
        FormatError::ManifestTooLarge { .. }
    ));
}

#[test]
fn size_overflow() {
    // Region arithmetic overflowing u64.
    let f = with_header(&base(), |h| h.data_len = u64::MAX - 63);
    assert_eq!(parse_err(&f), FormatError::SizeOverflow);
    // A tensor offset whose end overflows u64.
    let f = with_manifest(&base(), |m| m.tensors[0].offset = u64::MAX - 63);
    assert_eq!(parse_err(&f), FormatError::SizeOverflow);
}

#[test]
fn tensor_offset_past_the_end() {
    let b = base();
    let data_len = Header::decode(&b).unwrap().data_len;
    let f = with_manifest(&b, |m| m.tensors[2].offset = data_len);
    assert_eq!(parse_err(&f), FormatError::TensorOutOfBounds { index: 2 });
}

#[test]
fn overlapping_sections() {
    let f = with_manifest(&base(), |m| m.tensors[2].offset = m.tensors[1].offset);
    let e = parse_err(&f);
    assert!(
        e == FormatError::Overlap {
            first: 1,
            second: 2
        } || e
            == FormatError::Overlap {
                first: 2,
                second: 1
            },
        "{e:?}"
    );
}

#[test]
fn misaligned_offset() {
    let f = with_manifest(&base(), |m| m.tensors[1].offset += 8);
    let off = CapFile::parse(&base()).unwrap().manifest().tensors[1].offset + 8;
    assert_eq!(
        parse_err(&f),
        FormatError::MisalignedTensor {
            index: 1,
            offset: off
        }
    );
}

#[test]
fn duplicate_name() {
    let f = with_manifest(&base(), |m| m.tensors[2].name = m.tensors[0].name.clone());
    assert!(matches!(parse_err(&f), FormatError::DuplicateName { .. }));
}

#[test]
fn bad_names_shapes_encodings_lengths() {
    let f = with_manifest(&base(), |m| m.tensors[0].name.clear());
    assert_eq!(parse_err(&f), FormatError::BadName { index: 0 });
    let f = with_manifest(&base(), |m| {
        m.tensors[0].name = "x".repeat(MAX_NAME_LEN + 1)
    });
    assert_eq!(parse_err(&f), FormatError::BadName { index: 0 });
    let f = with_manifest(&base(), |m| m.tensors[0].rows = 0);
    assert_eq!(parse_err(&f), FormatError::BadShape { rows: 0, cols: 8 });
    let f = with_manifest(&base(), |m| m.tensors[0].cols = MAX_DIM + 1);
    assert!(matches!(parse_err(&f), FormatError::BadShape { .. }));
    let f = with_manifest(&base(), |m| {
        m.tensors[1].encoding = Encoding::LowRank {
            rank: 0,
            dtype: DType::F16,
        }
    });
    assert!(matches!(parse_err(&f), FormatError::InvalidEncoding { .. }));
    let f = with_manifest(&base(), |m| {
        m.tensors[0].encoding = Encoding::Sparse(Sparse::TwoFour { dtype: DType::F16 });
        m.tensors[0].cols = 6;
    });
    assert!(matches!(parse_err(&f), FormatError::InvalidEncoding { .. }));
    let f = with_manifest(&base(), |m| m.tensors[0].len += 64);
    assert!(matches!(
        parse_err(&f),
        FormatError::SectionLength { index: 0, .. }
    ));
    let f = with_manifest(&base(), |m| {
        m.extensions = vec![
            Extension {
                tag: 1,
                data: vec![]
            };
            MAX_EXTENSIONS + 1
        ]
    });
    assert_eq!(parse_err(&f), FormatError::TooManyExtensions);
}

#[test]
fn manifest_checksum_decode_and_trailing() {
    let b = base();
    let mut f = b.clone();
    let last = f.len() - 1;
    f[last] ^= 1;
    assert!(matches!(
        parse_err(&f),
        FormatError::ManifestChecksum { .. }
    ));
    // Garbage manifest with a correct checksum.
    let (h, data, _) = split(&b);
    let mut g = b[..(h.manifest_offset as usize)].to_vec();
    let junk = [0xFFu8; 16];
    g.extend_from_slice(&junk);
    let g = with_header(&g, |h| {
        h.manifest_len = 16;
        h.manifest_crc32 = crc32fast_hash(&junk);
    });
    assert_eq!(parse_err(&g), FormatError::ManifestDecode);
    // A valid manifest followed by one extra byte (inside the checksummed region).
    let mut mb = encode_manifest(&split(&b).2).unwrap();
    mb.push(0);
    let mut g = b[..(h.manifest_offset as usize)].to_vec();
    g.extend_from_slice(&mb);
    let g = with_header(&g, |hh| {
        hh.manifest_len = mb.len() as u64;
        hh.manifest_crc32 = crc32fast_hash(&mb);
    });
    assert_eq!(parse_err(&g), FormatError::ManifestTrailingBytes);
    let _ = data;
}

#[test]
fn tensor_checksum_and_padding_found_by_verify() {
    let b = base();
    let h = Header::decode(&b).unwrap();
    let mut f = b.clone();
    f[h.data_offset as usize + 1] ^= 0x80;
    assert!(CapFile::parse(&f).is_ok(), "checksums are lazy");
    assert!(matches!(
        full_err(&f),
        FormatError::TensorChecksum { index: 0, .. }
    ));
    // Alignment 4096 leaves padding between the header and the data region.
    let mut f = small_file(4096, false);
    f[100] = 1;
    assert_eq!(full_err(&f), FormatError::NonZeroPadding { offset: 100 });
}

#[test]
fn bad_sparse_structure_with_valid_checksum() {
    // Tensor 2 is composite bitmask: clear one mask bit and fix the section CRC.
    let b = base();
    let f = CapFile::parse(&b).unwrap();
    let t = f.tensor(2).unwrap();
    let mask = t.layout.part(PartKind::Mask).unwrap();
    let start = (f.header().data_offset + f.manifest().tensors[2].offset) as usize;
    let mut g = b.clone();
    let at = start + mask.offset as usize;
    let byte = (0..mask.len as usize).find(|&k| g[at + k] != 0).unwrap();
    g[at + byte] &= g[at + byte] - 1;
    let crc = crc32fast_hash(&g[start..start + t.bytes().len()]);
    let g = with_manifest(&g, |m| m.tensors[2].crc32 = crc);
    assert!(matches!(
        full_err(&g),
        FormatError::BadSparseStructure { index: 2, .. }
    ));
}

#[test]
fn typed_views_misaligned_or_wrong_dtype() {
    let b = base();
    // Put the file at an odd address: parsing works, typed views refuse.
    let mut shifted = vec![0u8; b.len() + 1];
    shifted[1..].copy_from_slice(&b);
    let f = CapFile::parse(&shifted[1..]).unwrap();
    f.verify_all().unwrap();
    let t = f.tensor(0).unwrap();
    let TensorData::Dense(v) = t.data().unwrap() else {
        panic!()
    };
    let r = if v.dtype == DType::F32 {
        v.as_f32().map(|_| ())
    } else {
        v.as_u16().map(|_| ())
    };
    assert_eq!(r, Err(FormatError::MisalignedView));
    let wrong = if v.dtype == DType::F32 {
        v.as_u16().map(|_| ())
    } else {
        v.as_f32().map(|_| ())
    };
    assert!(matches!(wrong, Err(FormatError::WrongDType { .. })));
    assert_eq!(f.tensor(99).map(|_| ()), Err(FormatError::NotFound));
    assert_eq!(
        f.tensor_by_name("nope").map(|_| ()),
        Err(FormatError::NotFound)
    );
}

#[test]
fn every_single_bit_flip_is_detected() {
    for alignment in [64, 128] {
        let f = small_file(alignment, false);
        let mut checked = 0;
        for byte in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[byte] ^= 1 << bit;
                assert!(
                    CapFile::parse(&g).and_then(|f| f.verify_all()).is_err(),
                    "flip at byte {byte} bit {bit} went undetected"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, f.len() * 8);
    }
}

#[test]
fn truncation_at_every_offset_is_rejected() {
    let f = small_file(64, true);
    for len in 0..f.len() {
        assert!(
            CapFile::parse(&f[..len]).is_err(),
            "prefix of {len} bytes parsed"
        );
    }
}
