//! The reference sparse encoders/decoders: dense -> parts -> file -> parts -> dense.
mod common;

use cap_format::*;
use common::*;

/// What a random test matrix looks like: its shape, dtype and the share of entries
/// drawn non-zero; with `two_four`, at most 2 non-zeros per group of 4.
struct Fill {
    rows: u32,
    cols: u32,
    dtype: DType,
    density: f64,
    two_four: bool,
}

impl Fill {
    /// A matrix for encoding as `kind` (2:4 gets at most 2 non-zeros per group of 4).
    fn new(kind: SparseKind, rows: u32, cols: u32, dtype: DType, density: f64) -> Self {
        let two_four = kind == SparseKind::TwoFour;
        Fill {
            rows,
            cols,
            dtype,
            density,
            two_four,
        }
    }

    /// The matrix's bytes, all +0.
    fn zeros(&self) -> Vec<u8> {
        vec![0u8; self.rows as usize * self.cols as usize * self.dtype.size()]
    }
}

/// The three encodings in turn, one per test case.
fn kind_of(case: usize) -> SparseKind {
    [
        SparseKind::Bitmask,
        SparseKind::BlockCsr,
        SparseKind::TwoFour,
    ][case % 3]
}

/// A random dense matrix (raw bytes) filled as `fill` says, with no −0 values.
fn dense(rng: &mut Rng, fill: &Fill) -> Vec<u8> {
    let (ds, density) = (fill.dtype.size(), fill.density);
    let mut out = fill.zeros();
    for (i, v) in out.chunks_exact_mut(ds).enumerate() {
        let keep = if fill.two_four {
            let j = i % 4;
            let g = (i / 4) as u64;
            // Deterministic 2-of-4 choice per group, then thinned by density.
            let (a, b) = ((g % 3) as usize, 3 - (g % 2) as usize);
            (j == a || j == b) && rng.f64() < density.max(0.5) * 2.0 - 0.5
        } else {
            rng.f64() < density
        };
        if keep {
            v.copy_from_slice(&rng.bytes(ds));
            v[ds - 1] = (v[ds - 1] & 0x7F) | 0x01; // non-zero, positive sign
        }
    }
    out
}

#[test]
fn encode_write_read_decode_round_trip() {
    let mut rng = Rng(0x5BA25E);
    for case in 0..120 {
        let dtype = rng.dtype();
        let rows = rng.range(1, 40) as u32;
        let cols = rng.range(1, 600) as u32 * 4;
        let kind = kind_of(case);
        let density = [0.0, 0.05, 0.3, 0.5, 1.0][rng.below(5) as usize];
        let fill = Fill::new(kind, rows, cols, dtype, density);
        let d = dense(&mut rng, &fill);
        let (s, parts) = encode_sparse(kind, rows, cols, dtype, &d).unwrap();
        let desc = TensorDesc {
            rows,
            cols,
            encoding: Encoding::Sparse(s),
        };
        let file = write_mem(&[("w".into(), desc, parts)], sample_manifest(false), 64);
        let f = CapFile::parse(&file).unwrap();
        f.verify_all()
            .unwrap_or_else(|e| panic!("case {case} {kind:?}: {e}"));
        let t = f.tensor(0).unwrap();
        assert_eq!(t.bytes().len() as u64, encoded_bytes(&desc).unwrap());
        let TensorData::Sparse(view) = t.data().unwrap() else {
            panic!()
        };
        assert_eq!(
            decode_sparse(rows, cols, s, &view).unwrap(),
            d,
            "case {case} {kind:?}"
        );
    }
}

#[test]
fn encoder_rejects_bad_input() {
    let d = vec![1u8; 2 * 4 * 2];
    assert!(
        encode_sparse(SparseKind::TwoFour, 2, 4, DType::F16, &d).is_err(),
        "4 of 4 kept"
    );
    assert!(encode_sparse(SparseKind::Bitmask, 2, 4, DType::F16, &d[1..]).is_err());
    assert!(encode_sparse(SparseKind::TwoFour, 1, 6, DType::F16, &[0; 12]).is_err());
    // −0 counts as zero.
    let neg_zero = [0x00, 0x80, 0x00, 0x3C];
    let (s, _) = encode_sparse(SparseKind::Bitmask, 1, 2, DType::F16, &neg_zero).unwrap();
    assert_eq!(
        s,
        Sparse::Bitmask {
            nnz: 1,
            dtype: DType::F16
        }
    );
}

#[test]
fn decoder_rejects_inconsistent_views() {
    let s = Sparse::Bitmask {
        nnz: 3,
        dtype: DType::F32,
    };
    let view = SparseView::Bitmask {
        mask: &[0xFF],
        values: Values {
            dtype: DType::F32,
            bytes: &[0; 12],
        },
    };
    // Part lengths: mask ok (1 byte for 1x8), values 12 = 3*4 ok, but popcount 8 > 3.
    assert!(decode_sparse(1, 8, s, &view).is_err());
    // Huge declared shape with tiny parts: refused before allocating.
    assert!(decode_sparse(1 << 24, 1 << 24, s, &view).is_err());
}

/// A random CSR matrix (`row_ptr`, `col`, raw values) filled as `fill` says, and the
/// same matrix written densely (absent entries +0). Some stored entries are +0 or −0:
/// both encoders must treat them as absent.
fn csr(rng: &mut Rng, fill: &Fill) -> (Vec<u64>, Vec<u32>, Vec<u8>, Vec<u8>) {
    let (cols, ds) = (fill.cols as usize, fill.dtype.size());
    let mut dense = fill.zeros();
    let (mut row_ptr, mut col, mut vals) = (vec![0u64], Vec::new(), Vec::new());
    for r in 0..fill.rows as usize {
        let mut in_group = 0;
        for c in 0..cols {
            if c % 4 == 0 {
                in_group = 0;
            }
            if rng.f64() >= fill.density {
                continue;
            }
            let mut v = rng.bytes(ds);
            match rng.below(6) {
                0 => v.iter_mut().for_each(|b| *b = 0),
                1 => {
                    v.iter_mut().for_each(|b| *b = 0);
                    v[ds - 1] = 0x80;
                }
                _ if fill.two_four && in_group == 2 => continue,
                _ => {
                    v[ds - 1] |= 0x01;
                    in_group += 1;
                }
            }
            let at = (r * cols + c) * ds;
            dense[at..at + ds].copy_from_slice(&v);
            col.push(c as u32);
            vals.extend_from_slice(&v);
        }
        row_ptr.push(col.len() as u64);
    }
    (row_ptr, col, vals, dense)
}

#[test]
fn the_csr_encoder_writes_the_dense_encoders_bytes() {
    let mut rng = Rng(0xC5E);
    for case in 0..150 {
        let dtype = rng.dtype();
        let kind = kind_of(case);
        let rows = rng.range(1, 30) as u32;
        let cols = if kind == SparseKind::TwoFour {
            rng.range(1, 100) as u32 * 4
        } else {
            rng.range(1, 300) as u32
        };
        let density = [0.0, 0.05, 0.3, 0.7, 1.0][rng.below(5) as usize];
        let fill = Fill::new(kind, rows, cols, dtype, density);
        let (row_ptr, col, vals, d) = csr(&mut rng, &fill);
        let want = encode_sparse(kind, rows, cols, dtype, &d).unwrap();
        let got = encode_sparse_csr(kind, rows, cols, dtype, &row_ptr, &col, &vals).unwrap();
        assert_eq!(got, want, "case {case} {kind:?} {rows}x{cols} {dtype:?}");
    }
}

#[test]
fn the_csr_encoder_rejects_inconsistent_csr() {
    let k = SparseKind::Bitmask;
    let v = [0u8, 0x3C, 0, 0x3C];
    let e =
        |rp: &[u64], c: &[u32], v: &[u8]| encode_sparse_csr(k, 2, 4, DType::F16, rp, c, v).is_err();
    assert!(!e(&[0, 1, 2], &[3, 0], &v));
    assert!(e(&[0, 1], &[3, 0], &v), "too few row pointers");
    assert!(e(&[0, 2, 1], &[3, 0], &v), "decreasing row pointers");
    assert!(e(&[0, 1, 2], &[4, 0], &v), "column out of range");
    assert!(e(&[0, 2, 2], &[3, 0], &v), "columns not increasing");
    assert!(e(&[0, 1, 2], &[3, 0], &v[..2]), "too few values");
    assert!(
        encode_sparse_csr(
            SparseKind::TwoFour,
            1,
            4,
            DType::F16,
            &[0, 3],
            &[0, 1, 2],
            &[1; 6]
        )
        .is_err(),
        "three non-zeros in a group of 4"
    );
}

#[test]
fn values_round_to_nearest_in_the_stored_dtype() {
    let x = [1.0f32, -0.0, 65504.0, 1.0 + 1.0 / 4096.0];
    assert_eq!(to_bytes(&x, DType::F32).len(), 16);
    assert_eq!(
        to_bytes(&x, DType::F16),
        [0x00, 0x3C, 0x00, 0x80, 0xFF, 0x7B, 0x00, 0x3C]
    );
    assert_eq!(to_bytes(&x[..2], DType::BF16), [0x80, 0x3F, 0x00, 0x80]);
    let mut out = vec![7u8];
    extend_bytes(&mut out, &x[..1], DType::F16);
    assert_eq!(out, [7, 0x00, 0x3C]);
}
