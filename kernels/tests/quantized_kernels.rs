//! The kernels over quantized values (Q8, Q4; format 1.1) against references.
//!
//! 1. The scalar table on a quantized matrix against the scalar table on the same
//!    matrix dequantized by `cap_format` and stored as `f32` with the same structure:
//!    the scalar kernels sum the same products in the same order, so the results are
//!    bit-identical (dense, transposed dense, bitmask, block-CSR, 2:4; rows split at
//!    awkward places so the kernels must find a row's first block themselves).
//! 2. Every table against exact `f64` sums of the dequantized matrix, within the usual
//!    `f32` summation bound.
//! 3. Every SIMD table against the scalar table: exactly where they run the scalar
//!    kernels for quantized values (all but AVX2's dense rows in this version); AVX2's
//!    dense kernel is held to the `f64` bound of 2.
//! 4. The tiled path's decoders (`rows_to_f32`, `SparseRef::decode_rows`, `to_f32` from
//!    inside a run) against the dequantized matrix, value for value.

mod common;

use cap_format::sparse::{SparseKind, decode_sparse_f32, encode_sparse, quantize_sparse};
use cap_format::{CsrView, SparseView, dequantize_rows, extend_rows, to_bytes};
use cap_kernels::cpu::{self, BitmaskRef, CsrRef, DType, Kernels, SparseRef, TwoFourRef, Values};
use common::Lcg;

const DTYPES: [DType; 5] = [
    DType::Q8 { group: 16 },
    DType::Q8 { group: 64 },
    DType::Q4 { group: 16 },
    DType::Q4 { group: 32 },
    DType::Q4 { group: 256 },
];
const COLS: [usize; 9] = [4, 16, 17, 32, 33, 100, 256, 260, 520];
const ROWS: usize = 9;

/// A matrix with about `density` non-zeros (at most 2 per group of 4 for 2:4).
fn matrix(rng: &mut Lcg, rows: usize, cols: usize, density: f64, two_four: bool) -> Vec<f32> {
    let mut w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            if rng.unit() < density {
                rng.signed() + 3e-3
            } else {
                0.0
            }
        })
        .collect();
    if two_four {
        for g in w.chunks_mut(4) {
            let mut kept = 0;
            for v in g.iter_mut().filter(|v| **v != 0.0) {
                kept += 1;
                if kept > 2 {
                    *v = 0.0;
                }
            }
        }
    }
    w
}

/// Exact `f64` sums `Σ_c W[r, c]·x[c]` and the bound an `f32` sum of them may miss by.
fn exact(w: &[f32], cols: usize, x: &[f32]) -> Vec<(f64, f64)> {
    w.chunks(cols)
        .map(|row| {
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for (&v, &xc) in row.iter().zip(x) {
                s += f64::from(v) * f64::from(xc);
                a += (f64::from(v) * f64::from(xc)).abs();
            }
            (s, (cols as f64 + 1.0) * f64::from(f32::EPSILON) * a + 1e-30)
        })
        .collect()
}

/// `y = W·x` by `f`, computed in three row ranges (so kernels start past row 0).
fn by_ranges(rows: usize, f: impl Fn(usize, &mut [f32])) -> Vec<f32> {
    let mut y = vec![0.0f32; rows];
    let (a, b) = (rows / 3, rows / 3 + rows / 2);
    for (lo, hi) in [(0, a), (a, b), (b, rows)] {
        f(lo, &mut y[lo..hi]);
    }
    y
}

fn tables() -> Vec<Kernels> {
    cpu::available()
}

#[test]
fn dense_quantized_kernels_match_the_dequantized_matrix() {
    let mut rng = Lcg(11);
    let scalar = cpu::scalar();
    for dt in DTYPES {
        for cols in COLS {
            let w = matrix(&mut rng, ROWS, cols, 1.0, false);
            let mut q = Vec::new();
            extend_rows(&mut q, &w, cols, dt);
            let deq = dequantize_rows(&q, dt, ROWS, cols).unwrap();
            let qv = Values {
                dtype: dt,
                bytes: &q,
            };
            let f32b = to_bytes(&deq, DType::F32);
            let fv = Values {
                dtype: DType::F32,
                bytes: &f32b,
            };
            let x: Vec<f32> = (0..cols).map(|_| rng.signed()).collect();
            let want = by_ranges(ROWS, |r0, y| (scalar.dense_rows)(fv, cols, r0, &x, y));
            let ex = exact(&deq, cols, &x);
            for k in tables() {
                let got = by_ranges(ROWS, |r0, y| (k.dense_rows)(qv, cols, r0, &x, y));
                // AVX2 has its own dense kernel (other summation order): bound only.
                if k.isa != cpu::Isa::Avx2 {
                    assert_eq!(got, want, "{:?} dense {dt} cols {cols}", k.isa);
                }
                for (r, (&g, &(e, b))) in got.iter().zip(&ex).enumerate() {
                    assert!((f64::from(g) - e).abs() <= b, "{dt} {cols} row {r}");
                }
                // Transposed: y[c] += Σ_i x[i]·W[r0+i, c] over rows 2..7.
                let xt: Vec<f32> = (0..5).map(|_| rng.signed()).collect();
                let (mut a, mut b2) = (vec![0.0; cols], vec![0.0; cols]);
                (k.dense_t_rows)(qv, cols, 2, &xt, &mut a);
                (scalar.dense_t_rows)(fv, cols, 2, &xt, &mut b2);
                assert_eq!(a, b2, "{:?} dense_t {dt} cols {cols}", k.isa);
                // The tiled path's decoder: rows 3..8 and one row from inside a run.
                let mut tile = vec![0.0; 5 * cols];
                cpu::rows_to_f32(&k, qv, cols, 3, &mut tile);
                assert_eq!(
                    tile,
                    deq[3 * cols..8 * cols],
                    "{:?} rows_to_f32 {dt}",
                    k.isa
                );
                let rb = dt.run_bytes(cols as u64) as usize;
                let row4 = Values {
                    dtype: dt,
                    bytes: &q[4 * rb..5 * rb],
                };
                let start = cols / 3;
                let mut part = vec![0.0; cols - start];
                (k.to_f32)(row4, start, &mut part);
                assert_eq!(
                    part,
                    deq[4 * cols + start..5 * cols],
                    "{:?} to_f32 {dt}",
                    k.isa
                );
            }
        }
    }
}

/// The sparse parts of `w` with values of `dt`, the same structure with the
/// dequantized values stored as `f32`, and the dequantized dense matrix.
fn sparse_pair(
    w: &[f32],
    cols: usize,
    kind: SparseKind,
    dt: DType,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<f32>) {
    let (rows, c) = (ROWS as u32, cols as u32);
    let (s, fparts) = encode_sparse(kind, rows, c, DType::F32, &to_bytes(w, DType::F32)).unwrap();
    let (qs, qparts) = quantize_sparse(rows, c, s, fparts.clone(), dt).unwrap();
    let view = view(kind, &qparts, dt);
    let deq = decode_sparse_f32(rows, c, qs, &view).unwrap();
    // The f32 structure with every stored slot's dequantized value, read from the
    // decoded matrix at the slot's position (2:4's padding slots included).
    let vi = match kind {
        SparseKind::TwoFour => 0,
        SparseKind::Bitmask => 1,
        SparseKind::BlockCsr => 2,
    };
    let fview = view_f32(kind, &fparts);
    let positions = positions(kind, cols, &fview);
    let vals: Vec<f32> = positions.iter().map(|&i| deq[i]).collect();
    let mut f = fparts;
    f[vi] = to_bytes(&vals, DType::F32);
    (qparts, f, deq)
}

fn view<'a>(kind: SparseKind, p: &'a [Vec<u8>], dtype: DType) -> SparseView<'a> {
    match kind {
        SparseKind::Bitmask => SparseView::Bitmask {
            mask: &p[0],
            values: Values {
                dtype,
                bytes: &p[1],
            },
        },
        SparseKind::BlockCsr => SparseView::BlockCsr(CsrView {
            block_ptr: &p[0],
            col_idx: &p[1],
            values: Values {
                dtype,
                bytes: &p[2],
            },
        }),
        SparseKind::TwoFour => SparseView::TwoFour {
            values: Values {
                dtype,
                bytes: &p[0],
            },
            meta: &p[1],
        },
    }
}

fn view_f32(kind: SparseKind, p: &[Vec<u8>]) -> SparseView<'_> {
    view(kind, p, DType::F32)
}

/// Row-major positions of the stored slots, in storage order.
fn positions(kind: SparseKind, cols: usize, v: &SparseView<'_>) -> Vec<usize> {
    let mut out = Vec::new();
    match *v {
        SparseView::Bitmask { mask, .. } => {
            for i in 0..ROWS * cols {
                if mask[i / 8] >> (i % 8) & 1 == 1 {
                    out.push(i);
                }
            }
        }
        SparseView::BlockCsr(c) => {
            let nb = cols.div_ceil(256);
            for r in 0..ROWS {
                for b in 0..nb {
                    let (lo, hi) = (
                        c.block_ptr_at(r * nb + b).unwrap(),
                        c.block_ptr_at(r * nb + b + 1).unwrap(),
                    );
                    for e in lo..hi {
                        out.push(r * cols + b * 256 + c.col_idx[e as usize] as usize);
                    }
                }
            }
        }
        SparseView::TwoFour { meta, .. } => {
            for g in 0..ROWS * cols / 4 {
                let nib = meta[g / 2] >> (4 * (g % 2)) & 0xF;
                out.push(4 * g + (nib & 3) as usize);
                out.push(4 * g + (nib >> 2) as usize);
            }
        }
    }
    let _ = kind;
    out
}

/// The kernels' view of sparse parts (`row_start` computed for a bitmask).
fn sparse_ref<'a>(
    kind: SparseKind,
    cols: usize,
    p: &'a [Vec<u8>],
    dtype: DType,
    row_start: &'a [u32],
) -> SparseRef<'a> {
    match kind {
        SparseKind::Bitmask => SparseRef::Bitmask(BitmaskRef {
            cols,
            mask: &p[0],
            row_start,
            values: Values {
                dtype,
                bytes: &p[1],
            },
        }),
        SparseKind::BlockCsr => SparseRef::Csr(CsrRef {
            cols,
            block_ptr: &p[0],
            col_idx: &p[1],
            values: Values {
                dtype,
                bytes: &p[2],
            },
        }),
        SparseKind::TwoFour => SparseRef::TwoFour(TwoFourRef {
            cols,
            values: Values {
                dtype,
                bytes: &p[0],
            },
            meta: &p[1],
        }),
    }
}

#[test]
fn sparse_quantized_kernels_match_the_dequantized_matrix() {
    let mut rng = Lcg(23);
    let scalar = cpu::scalar();
    let mut seen = 0;
    for dt in DTYPES {
        for cols in COLS {
            for density in [0.0, 0.1, 0.5, 1.0] {
                for kind in [
                    SparseKind::Bitmask,
                    SparseKind::BlockCsr,
                    SparseKind::TwoFour,
                ] {
                    let two_four = kind == SparseKind::TwoFour;
                    if two_four && cols % 4 != 0 {
                        continue;
                    }
                    let w = matrix(&mut rng, ROWS, cols, density, two_four);
                    let (qp, fp, deq) = sparse_pair(&w, cols, kind, dt);
                    let rs = cpu::bitmask_row_starts(&qp[0], ROWS, cols);
                    let qm = sparse_ref(kind, cols, &qp, dt, &rs);
                    let fm = sparse_ref(kind, cols, &fp, DType::F32, &rs);
                    let x: Vec<f32> = (0..cols).map(|_| rng.signed()).collect();
                    let want = by_ranges(ROWS, |r0, y| fm.mul_rows(&scalar, r0, &x, y));
                    let ex = exact(&deq, cols, &x);
                    let what = format!("{kind:?} {dt} cols {cols} density {density}");
                    for k in tables() {
                        let got = by_ranges(ROWS, |r0, y| qm.mul_rows(&k, r0, &x, y));
                        assert_eq!(got, want, "{:?} {what}", k.isa);
                        for (r, (&g, &(e, b))) in got.iter().zip(&ex).enumerate() {
                            assert!((f64::from(g) - e).abs() <= b, "{what} row {r}");
                        }
                        // The tiled path's decoder, in tiles starting past row 0.
                        let mut tile = vec![0.0; ROWS * cols];
                        let mut buf = vec![0.0; cols];
                        for (r0, n) in [(0, 2), (2, 5), (7, 2)] {
                            qm.decode_rows(&k, r0, &mut tile[r0 * cols..(r0 + n) * cols], &mut buf);
                        }
                        assert_eq!(tile, deq, "{:?} decode_rows {what}", k.isa);
                    }
                    seen += 1;
                }
            }
        }
    }
    assert!(seen > 400, "{seen} cases");
}

#[test]
fn from_f32_quantizes_one_run_like_the_format() {
    let mut rng = Lcg(5);
    for dt in DTYPES {
        let x: Vec<f32> = (0..100).map(|_| rng.signed()).collect();
        let want = to_bytes(&x, dt);
        for k in tables() {
            let mut out = vec![0u8; want.len()];
            (k.from_f32)(&x, dt, &mut out);
            assert_eq!(out, want, "{:?} {dt}", k.isa);
        }
    }
}
