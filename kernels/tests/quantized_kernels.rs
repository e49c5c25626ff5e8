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
//!    kernels for quantized values (transposed dense and 2:4); their own kernels
//!    (dense, bitmask, block-CSR rows) decode bit-identical values but sum them in
//!    another order (vector lanes, FMA), so they are held to the `f32` summation bound
//!    against the scalar result, on rows with awkward kept counts (0, 1, below a group,
//!    not a multiple of it, every column) and odd column counts.
//! 4. The tiled path's decoders (`rows_to_f32`, `SparseRef::decode_rows`, `to_f32` from
//!    inside a run) against the dequantized matrix, value for value: every table decodes
//!    exactly.

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
                // The SIMD tables have their own dense kernels (other summation order):
                // the bound only, here and in `simd_quantized_rows_match_scalar`.
                if k.isa == cpu::Isa::Scalar {
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
                        // The SIMD bitmask, block-CSR and 2:4 kernels sum in another
                        // order and are held to the bound below.
                        if k.isa == cpu::Isa::Scalar {
                            assert_eq!(got, want, "{:?} {what}", k.isa);
                        }
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

/// Allowed `|simd − scalar|` for one output: both are `f32` sums of the same `n`
/// exactly decoded values times `x` (the SIMD kernels' values are bit-identical to the
/// reference's; only the order of the additions and FMA's single rounding differ), and
/// each errs from the exact sum by at most about `n·u·Σ|terms|` (`u = EPSILON/2`), so
/// they differ by at most `n·EPSILON·Σ|terms|`; `(n + 1)·EPSILON` leaves room for
/// second-order terms. Relative to `Σ|terms|` that is about 1e-5 for the hundreds of
/// terms here (relative to the result itself no bound exists: the sum may cancel).
fn simd_bound(n: usize, abs: f64) -> f64 {
    (n as f64 + 1.0) * f64::from(f32::EPSILON) * abs + 1e-30
}

/// A `ROWS×cols` matrix whose rows keep exactly `counts[r]` (clipped to `cols`)
/// non-zeros at random columns.
fn matrix_with_counts(rng: &mut Lcg, cols: usize, counts: &[usize; ROWS]) -> Vec<f32> {
    let mut w = vec![0.0f32; ROWS * cols];
    for (row, &n) in w.chunks_mut(cols).zip(counts) {
        let mut order: Vec<usize> = (0..cols).collect();
        // Fisher-Yates, then keep the first `n` columns.
        for i in (1..cols).rev() {
            order.swap(i, rng.below(i as u32 + 1) as usize);
        }
        for &c in &order[..n.min(cols)] {
            row[c] = rng.signed() + 3e-3;
        }
    }
    w
}

#[test]
fn simd_quantized_rows_match_scalar() {
    let mut rng = Lcg(31);
    let scalar = cpu::scalar();
    let mut worst = 0.0f64;
    let mut cases = 0;
    for dt in DTYPES {
        let g = dt.group();
        for cols in [1usize, 7, 33, 65, 127, 200, 257, 515, 1031] {
            // Kept counts: none, one, below a group, a group, just past it, not a
            // multiple, random, every column.
            let rnd = rng.below(cols as u32 + 1) as usize;
            let counts = [0, 1, g - 1, g, g + 1, 2 * g + 5, rnd, cols, 3];
            for kind in [
                SparseKind::Bitmask,
                SparseKind::BlockCsr,
                SparseKind::TwoFour,
            ] {
                if kind == SparseKind::TwoFour && cols % 4 != 0 {
                    continue;
                }
                let w = if kind == SparseKind::TwoFour {
                    matrix(&mut rng, ROWS, cols, 0.6, true)
                } else {
                    matrix_with_counts(&mut rng, cols, &counts)
                };
                let (qp, _, deq) = sparse_pair(&w, cols, kind, dt);
                let rs = cpu::bitmask_row_starts(&qp[0], ROWS, cols);
                let qm = sparse_ref(kind, cols, &qp, dt, &rs);
                let x: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
                let want = by_ranges(ROWS, |r0, y| qm.mul_rows(&scalar, r0, &x, y));
                // Dense rows of the same (dequantized, requantized) values.
                let mut dq = Vec::new();
                extend_rows(&mut dq, &deq, cols, dt);
                let dv = Values {
                    dtype: dt,
                    bytes: &dq,
                };
                let dense_want = by_ranges(ROWS, |r0, y| (scalar.dense_rows)(dv, cols, r0, &x, y));
                let dense_deq = dequantize_rows(&dq, dt, ROWS, cols).unwrap();
                for k in tables().into_iter().skip(1) {
                    let got = by_ranges(ROWS, |r0, y| qm.mul_rows(&k, r0, &x, y));
                    let dense_got = by_ranges(ROWS, |r0, y| (k.dense_rows)(dv, cols, r0, &x, y));
                    for (what, got, want, vals) in [
                        ("sparse", &got, &want, &deq),
                        ("dense", &dense_got, &dense_want, &dense_deq),
                    ] {
                        for (r, row) in vals.chunks(cols).enumerate() {
                            let n = row.iter().filter(|v| **v != 0.0).count();
                            let abs: f64 = row
                                .iter()
                                .zip(&x)
                                .map(|(&v, &xc)| (f64::from(v) * f64::from(xc)).abs())
                                .sum();
                            let d = (f64::from(got[r]) - f64::from(want[r])).abs();
                            assert!(
                                d <= simd_bound(n.max(1), abs),
                                "{:?} {what} {kind:?} {dt} cols {cols} row {r}: {} vs {}",
                                k.isa,
                                got[r],
                                want[r]
                            );
                            if n == 0 {
                                assert_eq!(got[r], 0.0, "{:?} {what} empty row", k.isa);
                            }
                            if abs > 0.0 {
                                worst = worst.max(d / abs);
                            }
                        }
                    }
                    cases += 1;
                }
            }
        }
    }
    println!("{cases} SIMD cases; worst |simd − scalar| / Σ|terms| = {worst:.2e}");
}

#[test]
fn to_f32_decodes_any_stretch_of_a_run() {
    let mut rng = Lcg(41);
    for dt in DTYPES {
        let n = 3 * dt.group() + 21;
        let v: Vec<f32> = (0..n).map(|_| rng.signed()).collect();
        let q = to_bytes(&v, dt);
        let deq = dequantize_rows(&q, dt, 1, n).unwrap();
        let run = Values {
            dtype: dt,
            bytes: &q,
        };
        for k in tables() {
            for start in [
                0,
                1,
                7,
                8,
                9,
                15,
                16,
                17,
                dt.group() - 1,
                dt.group() + 3,
                n - 1,
            ] {
                for len in [0, 1, 5, 8, 9, 16, 33, n - start] {
                    let len = len.min(n - start);
                    let mut out = vec![f32::NAN; len];
                    (k.to_f32)(run, start, &mut out);
                    assert_eq!(
                        out,
                        deq[start..start + len],
                        "{:?} {dt} start {start} len {len}",
                        k.isa
                    );
                }
            }
        }
    }
}

/// Inconsistent index data over quantized values must panic or give some finite sum,
/// never read out of bounds (the SIMD kernels slice each row's run and decode into a
/// stack window; without a sanitizer this only catches gross overruns).
#[test]
fn inconsistent_quantized_data_panics_or_sums() {
    let cols = 300;
    let x = vec![1f32; cols];
    for dt in [DType::Q8 { group: 16 }, DType::Q4 { group: 32 }] {
        // Two blocks: scale 1.0 (f16 0x3c00), minimum 0, codes 1.
        let mut vals = Vec::new();
        for _ in 0..2 {
            vals.extend_from_slice(&[0x00, 0x3c]);
            if dt.group() == 32 {
                vals.extend_from_slice(&[0, 0]);
                vals.extend(std::iter::repeat_n(0x11u8, 16));
            } else {
                vals.extend(std::iter::repeat_n(1u8, 16));
            }
        }
        let values = Values {
            dtype: dt,
            bytes: &vals,
        };
        let mask = vec![0xffu8; 300];
        let ptr = |p: &[u32]| -> Vec<u8> { p.iter().flat_map(|v| v.to_le_bytes()).collect() };
        let idx = vec![255u8; 64];
        for k in tables() {
            let run = |f: &dyn Fn(&mut [f32])| {
                let mut y = [0f32];
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut y)));
                if r.is_ok() {
                    assert!(y[0].is_finite() && y[0].abs() <= 600.0, "{:?} {dt}", k.isa);
                }
            };
            for starts in [[0u32, 300], [20, 10], [0, 20], [40, 41]] {
                let b = BitmaskRef {
                    cols,
                    mask: &mask,
                    row_start: &starts,
                    values,
                };
                run(&|y| (k.bitmask_rows)(&b, 0, &x, y));
            }
            for p in [[0u32, 40, 10_000], [0, 0, 20], [10, 5, 20], [0, 30, 64]] {
                let bp = ptr(&p);
                let m = CsrRef {
                    cols,
                    block_ptr: &bp,
                    col_idx: &idx,
                    values,
                };
                run(&|y| (k.csr_rows)(&m, 0, &x, y));
            }
        }
    }
}
