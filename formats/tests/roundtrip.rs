//! Round trips over random shapes, ranks, densities, encodings and alignments;
//! exact byte accounting against written files; determinism; versioning.
mod common;

use cap_format::*;
use common::*;

fn random_file(rng: &mut Rng) -> (Vec<NamedTensor>, u32) {
    let alignment = [64u32, 128, 4096][rng.below(3) as usize];
    let n = rng.range(1, 5) as usize;
    let mut tensors = Vec::new();
    for i in 0..n {
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        let rows = rng.range(1, 300) as u32;
        let mut cols = rng.range(1, 700) as u32;
        if matches!(kind, Kind::TwoFour | Kind::CompositeTwoFour) {
            cols = cols.div_ceil(4) * 4;
        }
        let density = [0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 1.0][rng.below(7) as usize];
        let (d, p) = gen_tensor(rng, rows, cols, kind, density);
        tensors.push((format!("t{i}.{kind:?}"), d, p));
    }
    (tensors, alignment)
}

#[test]
fn random_round_trips() {
    let mut rng = Rng(0xCA9);
    for case in 0..150 {
        let (tensors, alignment) = random_file(&mut rng);
        let file = write_mem(&tensors, sample_manifest(case % 2 == 0), alignment);
        aligned(&file, |bytes| {
            let f = CapFile::parse(bytes).unwrap_or_else(|e| panic!("case {case}: {e}"));
            f.verify_all()
                .unwrap_or_else(|e| panic!("case {case}: {e}"));
            assert_eq!(f.len(), tensors.len());
            let mut total = 0u64;
            for (name, desc, parts) in &tensors {
                let t = f.tensor_by_name(name).unwrap();
                assert_eq!(
                    (t.rows, t.cols, t.encoding),
                    (desc.rows, desc.cols, desc.encoding)
                );
                // Exact accounting: the section the writer wrote has the predicted size.
                let predicted = encoded_bytes_aligned(desc, alignment).unwrap();
                assert_eq!(t.bytes().len() as u64, predicted, "case {case} {name}");
                if alignment == MIN_ALIGNMENT {
                    assert_eq!(encoded_bytes(desc).unwrap(), predicted);
                }
                total += predicted;
                for (p, want) in t.layout.parts().iter().zip(parts) {
                    assert_eq!(
                        t.part(p.kind).unwrap(),
                        want.as_slice(),
                        "{name} {:?}",
                        p.kind
                    );
                }
                // Typed views succeed on aligned memory and return the right lengths.
                check_typed(&t, desc);
            }
            let h = f.header();
            assert_eq!(
                h.data_len, total,
                "case {case}: data region = sum of encoded_bytes"
            );
            assert_eq!(bytes.len() as u64, h.data_offset + total + h.manifest_len);
        });
    }
}

fn values_len(v: Values<'_>) -> usize {
    match v.dtype {
        DType::F32 => v.as_f32().unwrap().len(),
        _ => v.as_u16().unwrap().len(),
    }
}

fn check_typed(t: &TensorView<'_>, d: &TensorDesc) {
    let (r, c) = (d.rows as usize, d.cols as usize);
    let sparse = |s: SparseView<'_>| match s {
        SparseView::Bitmask { mask, values } => {
            assert_eq!(mask.len(), (r * c).div_ceil(8));
            values_len(values)
        }
        SparseView::BlockCsr(v) => {
            assert_eq!(v.block_ptr_u32().unwrap().len(), r * c.div_ceil(256) + 1);
            assert_eq!(v.col_idx.len(), values_len(v.values));
            values_len(v.values)
        }
        SparseView::TwoFour { values, .. } => {
            assert_eq!(values_len(values), r * c / 2);
            values_len(values)
        }
    };
    match (t.data().unwrap(), d.encoding) {
        (TensorData::Dense(v), _) => assert_eq!(values_len(v), r * c),
        (TensorData::LowRank { a, b }, Encoding::LowRank { rank, .. })
        | (TensorData::Composite { a, b, .. }, Encoding::Composite { rank, .. }) => {
            assert_eq!(values_len(a), rank as usize * c);
            assert_eq!(values_len(b), r * rank as usize);
        }
        (TensorData::Sparse(s), _) => {
            sparse(s);
        }
        other => panic!("mismatch {other:?}"),
    }
    if let TensorData::Composite { sparse: s, .. } = t.data().unwrap() {
        sparse(s);
    }
}

#[test]
fn every_encoding_accounted_exactly() {
    // One tensor of every kind at several awkward shapes, both alignments.
    let mut rng = Rng(7);
    for &kind in &KINDS {
        for &(rows, cols) in &[(1u32, 4u32), (3, 8), (17, 260), (64, 512), (5, 1028)] {
            for alignment in [64u32, 4096] {
                let (d, p) = gen_tensor(&mut rng, rows, cols, kind, 0.3);
                let file = write_mem(&[("x".into(), d, p)], sample_manifest(false), alignment);
                let f = CapFile::parse(&file).unwrap();
                f.verify_all().unwrap();
                assert_eq!(
                    f.header().data_len,
                    encoded_bytes_aligned(&d, alignment).unwrap()
                );
            }
        }
    }
}

#[test]
fn deterministic_output() {
    let mut a = Rng(5);
    let mut b = Rng(5);
    let (ta, al) = random_file(&mut a);
    let (tb, _) = random_file(&mut b);
    assert_eq!(
        write_mem(&ta, sample_manifest(true), al),
        write_mem(&tb, sample_manifest(true), al)
    );
}

#[test]
fn manifest_round_trips_with_every_field() {
    let file = small_file(64, true);
    let f = CapFile::parse(&file).unwrap();
    let mut m = f.manifest().clone();
    m.tensors.clear();
    assert_eq!(m, sample_manifest(true));
    let rs = RopeScaling::PerFrequency {
        factors: vec![1.0, 2.0],
    };
    let mut m2 = sample_manifest(false);
    m2.model.rope_scaling = rs.clone();
    let file = write_mem(&[], m2, 64);
    let f = CapFile::parse(&file).unwrap();
    assert_eq!(f.manifest().model.rope_scaling, rs);
    assert!(f.is_empty());
}

#[test]
fn newer_minor_version_with_unknown_extensions_is_read() {
    // A "1.1" writer adds information only as extension records (manifest-level and
    // per tensor) with tags this reader does not know.
    let file = small_file(64, true);
    let file = with_manifest(&file, |m| {
        m.extensions.push(Extension {
            tag: 0x8000_0001,
            data: vec![1, 2, 3, 4],
        });
        m.tensors[1].extensions.push(Extension {
            tag: 0x8000_0002,
            data: b"per-tensor quantization scales, say".to_vec(),
        });
    });
    let file = with_header(&file, |h| h.minor = FORMAT_MINOR + 1);
    let f = CapFile::parse(&file).unwrap();
    f.verify_all().unwrap();
    assert_eq!(f.header().minor, FORMAT_MINOR + 1);
    assert_eq!(f.manifest().extensions.len(), 1);
    assert_eq!(f.manifest().tensors[1].extensions[0].tag, 0x8000_0002);
    assert_eq!(f.tensor_by_name("q").unwrap().index, 1);
}

#[test]
fn writer_rejects_bad_input() {
    use std::io::Cursor;
    let mut w = StreamWriter::new(Cursor::new(Vec::new()), WriterOptions::default()).unwrap();
    let d = TensorDesc {
        rows: 2,
        cols: 2,
        encoding: Encoding::Dense { dtype: DType::F32 },
    };
    assert!(matches!(
        w.add_tensor("a", &d, &[&[0u8; 15]]),
        Err(WriteError::PartMismatch { .. })
    ));
    w.add_tensor("a", &d, &[&[0u8; 16]]).unwrap();
    assert!(matches!(
        w.add_tensor("a", &d, &[&[0u8; 16]]),
        Err(WriteError::DuplicateName(_))
    ));
    let bad = TensorDesc {
        encoding: Encoding::LowRank {
            rank: 3,
            dtype: DType::F16,
        },
        ..d
    };
    assert!(matches!(
        w.add_tensor("b", &bad, &[&[], &[]]),
        Err(WriteError::Format(FormatError::InvalidEncoding { .. }))
    ));
    assert!(StreamWriter::new(Cursor::new(Vec::new()), WriterOptions { alignment: 96 }).is_err());
}

#[test]
fn local_attention_record_round_trips_and_bad_ones_are_refused() {
    use cap_format::manifest::{LocalAttentionRecord, TAG_LOCAL_ATTENTION};
    let r = LocalAttentionRecord {
        window: 512,
        global_every: 6,
        rope_theta: 10_000.0,
    };
    let file = small_file(64, true);
    let file = with_manifest(&file, |m| m.extensions.push(r.to_extension()));
    let f = CapFile::parse(&file).unwrap();
    assert_eq!(
        LocalAttentionRecord::from_manifest(f.manifest()).unwrap(),
        Some(r)
    );
    let mut m = f.manifest().clone();
    assert_eq!(m.extensions[0].tag, TAG_LOCAL_ATTENTION);
    // Two records, a truncated one, trailing bytes: refused, never guessed.
    m.extensions.push(r.to_extension());
    assert!(LocalAttentionRecord::from_manifest(&m).is_err());
    m.extensions.truncate(1);
    m.extensions[0].data.pop();
    assert!(LocalAttentionRecord::from_manifest(&m).is_err());
    m.extensions[0] = r.to_extension();
    m.extensions[0].data.push(0);
    assert!(LocalAttentionRecord::from_manifest(&m).is_err());
    m.extensions.clear();
    assert_eq!(LocalAttentionRecord::from_manifest(&m).unwrap(), None);
}
