//! The CPU kernel tables against independent references.
//!
//! 1. Every table (scalar first) against exact `f64` sums of the matrix decoded by
//!    `cap_format::sparse::decode_sparse` (sparse) or read value by value with an
//!    arithmetic f16/bf16 decoder that shares no code with the kernels (dense).
//! 2. Every SIMD table of `available()` against the scalar table.
//! 3. The sparse row decoder of the tiled GEMM path (`SparseRef::decode_rows`) against
//!    the matrix it encodes, value for value.
//!
//! Shapes are awkward on purpose: column counts around the vector widths and the
//! 64-bit mask words, row sub-ranges that start past row 0, bitmask rows that start
//! inside a byte (odd `cols`), every part misaligned by one byte, all three dtypes,
//! f16 subnormals and ±0, densities 0, 0.1, 0.5 and 1. Randomness comes from a fixed
//! LCG, so runs are reproducible.

mod common;

use cap_format::sparse::{SparseKind, decode_sparse, encode_sparse};
use cap_format::{CsrView, SparseView};
use cap_kernels::cpu::{
    self, BitmaskRef, CsrRef, DType, Isa, Kernels, SparseRef, TwoFourRef, Values,
};
use common::Lcg;

const COLS: [usize; 20] = [
    1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257, 300, 513,
];
const DENSITIES: [f64; 4] = [0.0, 0.1, 0.5, 1.0];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Relative error allowed per summed term, against `Σ|terms|`. Recursive `f32`
/// summation of `n` terms (in any order, products rounded or fused) errs by at most
/// `n·u·Σ|terms|` to first order, with `u = EPSILON/2` the unit roundoff; allowing
/// `EPSILON` per term leaves a factor 2 for the second-order terms.
const GAMMA_PER_TERM: f64 = f32::EPSILON as f64;
/// Absolute error allowed per term: half the spacing of `f32` subnormals, the rounding
/// error of an operation whose result is subnormal (where the relative bound fails).
const SUBNORMAL_ERR: f64 = 1.0 / (1u128 << 100) as f64 / (1u64 << 50) as f64;

/// Allowed `|got − exact|` for a sum of `n_terms` terms with `Σ|terms| = abs`.
fn bound(n_terms: usize, abs: f64) -> f64 {
    (n_terms as f64 + 1.0) * (GAMMA_PER_TERM * abs + SUBNORMAL_ERR)
}

/// Exact value of f16 bits, by arithmetic on the fields (not bit reinterpretation).
fn f16_value(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let man = f64::from(h & 0x3ff);
    match exp {
        0 => sign * man * 2f64.powi(-24),
        0x1f if man == 0.0 => sign * f64::INFINITY,
        0x1f => f64::NAN,
        _ => sign * (1024.0 + man) * 2f64.powi(exp - 25),
    }
}

/// Exact value of bf16 bits: bf16 is by definition the upper half of an `f32`.
fn bf16_value(b: u16) -> f64 {
    f64::from(f32::from_bits(u32::from(b) << 16))
}

/// Value `i` of raw little-endian `bytes` of `dtype`, exactly.
fn value(dtype: DType, bytes: &[u8], i: usize) -> f64 {
    match dtype {
        DType::F32 => f64::from(f32::from_le_bytes(
            bytes[4 * i..4 * i + 4].try_into().unwrap(),
        )),
        DType::F16 => f16_value(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
        DType::BF16 => bf16_value(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
        // Quantized values are tested in `quantized_kernels.rs`.
        DType::Q8 { .. } | DType::Q4 { .. } => unreachable!("float dtypes only here"),
    }
}

/// Random bits of a finite non-zero `dtype` value with magnitude about 2^-20..2^6,
/// subnormals included one time in 10.
fn nonzero_bits(rng: &mut Lcg, dtype: DType) -> u32 {
    let sign = rng.below(2);
    let sub = rng.below(10) == 0;
    match dtype {
        DType::F16 => {
            let body = if sub {
                1 + rng.below(1023)
            } else {
                ((1 + rng.below(20)) << 10) | rng.below(1024)
            };
            (sign << 15) | body
        }
        DType::BF16 => {
            let body = if sub {
                1 + rng.below(127)
            } else {
                ((107 + rng.below(26)) << 7) | rng.below(128)
            };
            (sign << 15) | body
        }
        DType::F32 => {
            let body = if sub {
                1 + rng.below(0x7f_ffff)
            } else {
                ((107 + rng.below(26)) << 23) | rng.below(0x80_0000)
            };
            (sign << 31) | body
        }
        // Quantized values are tested in `quantized_kernels.rs`.
        DType::Q8 { .. } | DType::Q4 { .. } => unreachable!("float dtypes only here"),
    }
}

/// A random `rows×cols` matrix of `dtype`, raw bytes: each element non-zero with
/// probability `density`, else +0 or −0.
fn random_matrix(rng: &mut Lcg, dtype: DType, rows: usize, cols: usize, density: f64) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * cols * dtype.size());
    for _ in 0..rows * cols {
        let bits = if rng.unit() < density {
            nonzero_bits(rng, dtype)
        } else {
            rng.below(2) << (8 * dtype.size() - 1)
        };
        out.extend_from_slice(&bits.to_le_bytes()[..dtype.size()]);
    }
    out
}

/// A random 2:4 matrix: in each group of 4, two random positions hold values, of which
/// each is dropped again with probability `1 − density·2` clipped (so groups with 0, 1
/// and 2 non-zeros all occur).
fn random_two_four(rng: &mut Lcg, dtype: DType, rows: usize, cols: usize, density: f64) -> Vec<u8> {
    let ds = dtype.size();
    let mut out = vec![0u8; rows * cols * ds];
    let keep = (2.0 * density).min(1.0);
    for g in 0..rows * cols / 4 {
        let a = rng.below(4) as usize;
        let b = (a + 1 + rng.below(3) as usize) % 4;
        for j in [a, b] {
            if rng.unit() < keep {
                let bits = nonzero_bits(rng, dtype);
                let i = 4 * g + j;
                out[i * ds..(i + 1) * ds].copy_from_slice(&bits.to_le_bytes()[..ds]);
            }
        }
    }
    out
}

/// `b` copied to an odd address: the kernels must not assume any alignment.
fn misaligned(b: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(b.len() + 1);
    v.push(0xa5);
    v.extend_from_slice(b);
    v
}

/// Exact `y0[i] + Σ_c W[r0+i, c]·x[c]` and `|y0[i]| + Σ_c |W[r0+i, c]·x[c]|`.
fn reference_rows(
    dtype: DType,
    dense: &[u8],
    cols: usize,
    r0: usize,
    x: &[f32],
    y0: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    y0.iter()
        .enumerate()
        .map(|(i, &y)| {
            let (mut s, mut a) = (f64::from(y), f64::from(y).abs());
            for (c, &xc) in x.iter().enumerate() {
                let t = value(dtype, dense, (r0 + i) * cols + c) * f64::from(xc);
                s += t;
                a += t.abs();
            }
            (s, a)
        })
        .unzip()
}

/// Asserts `got` is within `bound` of `want` (and of `scalar`, when given, within
/// twice the bound: both are within it of the exact value).
fn check(
    what: &str,
    got: &[f32],
    want: &[f64],
    abs: &[f64],
    n_terms: usize,
    scalar: Option<&[f32]>,
) {
    for i in 0..got.len() {
        let tol = bound(n_terms, abs[i]);
        let err = (f64::from(got[i]) - want[i]).abs();
        assert!(
            err <= tol,
            "{what}: y[{i}] = {} but exact {} (error {err:e} > bound {tol:e})",
            got[i],
            want[i]
        );
        if let Some(s) = scalar {
            let d = (f64::from(got[i]) - f64::from(s[i])).abs();
            assert!(
                d <= 2.0 * tol,
                "{what}: y[{i}] = {} but scalar {} (difference {d:e} > {:e})",
                got[i],
                s[i],
                2.0 * tol
            );
        }
    }
}

/// Rows of the sub-range tested for a given case: 1..=5, starting past row 0.
fn shapes() -> impl Iterator<Item = (usize, usize, usize)> {
    COLS.iter()
        .flat_map(|&cols| (1..=5).map(move |rows| (cols, rows, 1 + (cols + rows) % 3)))
}

fn tables() -> Vec<Kernels> {
    let t = cpu::available();
    assert_eq!(t[0].isa, Isa::Scalar, "scalar comes first");
    t
}

/// Runs `kernel` from every table on the same inputs; checks each against the exact
/// reference and the SIMD ones against scalar.
fn run_all(
    what: &str,
    y0: &[f32],
    want: &[f64],
    abs: &[f64],
    n_terms: usize,
    mut kernel: impl FnMut(&Kernels, &mut [f32]),
) {
    let mut scalar_y: Option<Vec<f32>> = None;
    for k in tables() {
        let mut y = y0.to_vec();
        kernel(&k, &mut y);
        let what = format!("{what} [{}]", k.isa.name());
        check(&what, &y, want, abs, n_terms, scalar_y.as_deref());
        if k.isa == Isa::Scalar {
            scalar_y = Some(y);
        }
    }
}

#[test]
fn dense_rows_match_exact_sums() {
    let mut rng = Lcg(1);
    for dtype in DTYPES {
        for (cols, rows, r0) in shapes() {
            let total = r0 + rows + 2;
            let dense = random_matrix(&mut rng, dtype, total, cols, 0.9);
            let x: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
            let y0: Vec<f32> = (0..rows).map(|_| rng.x()).collect();
            let (want, abs) = reference_rows(dtype, &dense, cols, r0, &x, &y0);
            let w = misaligned(&dense);
            let what = format!("dense {dtype:?} cols {cols} rows {r0}+{rows}");
            run_all(&what, &y0, &want, &abs, cols + 1, |k, y| {
                let v = Values {
                    dtype,
                    bytes: &w[1..],
                };
                (k.dense_rows)(v, cols, r0, &x, y)
            });
        }
    }
}

#[test]
fn dense_t_rows_match_exact_sums() {
    let mut rng = Lcg(2);
    for dtype in DTYPES {
        // Row counts around the 4-row blocks of the SIMD kernels.
        for (cols, rows, r0) in shapes().chain(
            COLS.iter()
                .flat_map(|&c| [7usize, 8, 13].into_iter().map(move |r| (c, r, 2))),
        ) {
            let total = r0 + rows + 2;
            let dense = random_matrix(&mut rng, dtype, total, cols, 0.9);
            let x: Vec<f32> = (0..rows).map(|_| rng.x()).collect();
            let y0: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
            let (want, abs): (Vec<f64>, Vec<f64>) = (0..cols)
                .map(|c| {
                    let (mut s, mut a) = (f64::from(y0[c]), f64::from(y0[c]).abs());
                    for (i, &xi) in x.iter().enumerate() {
                        let t = value(dtype, &dense, (r0 + i) * cols + c) * f64::from(xi);
                        s += t;
                        a += t.abs();
                    }
                    (s, a)
                })
                .unzip();
            let w = misaligned(&dense);
            let what = format!("dense_t {dtype:?} cols {cols} rows {r0}+{rows}");
            run_all(&what, &y0, &want, &abs, rows + 1, |k, y| {
                let v = Values {
                    dtype,
                    bytes: &w[1..],
                };
                (k.dense_t_rows)(v, cols, r0, &x, y)
            });
        }
    }
}

/// Encodes `dense` as `kind`, decodes it back with the reference decoder (which must
/// agree with `dense` value by value) and returns the parts, misaligned.
fn encode_checked(
    kind: SparseKind,
    dtype: DType,
    rows: usize,
    cols: usize,
    dense: &[u8],
) -> Vec<Vec<u8>> {
    let (sparse, parts) = encode_sparse(kind, rows as u32, cols as u32, dtype, dense).unwrap();
    let vals = |b| Values { dtype, bytes: b };
    let view = match kind {
        SparseKind::Bitmask => SparseView::Bitmask {
            mask: &parts[0],
            values: vals(&parts[1]),
        },
        SparseKind::BlockCsr => SparseView::BlockCsr(CsrView {
            block_ptr: &parts[0],
            col_idx: &parts[1],
            values: vals(&parts[2]),
        }),
        SparseKind::TwoFour => SparseView::TwoFour {
            values: vals(&parts[0]),
            meta: &parts[1],
        },
    };
    let decoded = decode_sparse(rows as u32, cols as u32, sparse, &view).unwrap();
    for i in 0..rows * cols {
        assert_eq!(value(dtype, &decoded, i), value(dtype, dense, i));
    }
    parts.iter().map(|p| misaligned(p)).collect()
}

/// Runs the sparse kernel of `kind` for every shape, dtype and density.
fn sparse_case(kind: SparseKind, seed: u64) {
    let mut rng = Lcg(seed);
    for dtype in DTYPES {
        for density in DENSITIES {
            for (cols, rows, r0) in shapes() {
                if kind == SparseKind::TwoFour && cols % 4 != 0 {
                    continue;
                }
                let total = r0 + rows + 2;
                let dense = match kind {
                    SparseKind::TwoFour => random_two_four(&mut rng, dtype, total, cols, density),
                    _ => random_matrix(&mut rng, dtype, total, cols, density),
                };
                let parts = encode_checked(kind, dtype, total, cols, &dense);
                let x: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
                let y0: Vec<f32> = (0..rows).map(|_| rng.x()).collect();
                let (want, abs) = reference_rows(dtype, &dense, cols, r0, &x, &y0);
                let what =
                    format!("{kind:?} {dtype:?} density {density} cols {cols} rows {r0}+{rows}");
                let vals = |b| Values { dtype, bytes: b };
                let starts = match kind {
                    SparseKind::Bitmask => cpu::bitmask_row_starts(&parts[0][1..], total, cols),
                    _ => Vec::new(),
                };
                let m = match kind {
                    SparseKind::Bitmask => SparseRef::Bitmask(BitmaskRef {
                        cols,
                        mask: &parts[0][1..],
                        row_start: &starts,
                        values: vals(&parts[1][1..]),
                    }),
                    SparseKind::BlockCsr => SparseRef::Csr(CsrRef {
                        cols,
                        block_ptr: &parts[0][1..],
                        col_idx: &parts[1][1..],
                        values: vals(&parts[2][1..]),
                    }),
                    SparseKind::TwoFour => SparseRef::TwoFour(TwoFourRef {
                        cols,
                        values: vals(&parts[0][1..]),
                        meta: &parts[1][1..],
                    }),
                };
                run_all(&what, &y0, &want, &abs, cols + 1, |k, y| {
                    m.mul_rows(k, r0, &x, y)
                });
                check_decoded_rows(&what, &m, dtype, &dense, r0, rows);
            }
        }
    }
}

/// The tiled path's row decoder, with every table's `to_f32`, gives the rows of the
/// matrix value for value (zeros where nothing is stored).
fn check_decoded_rows(
    what: &str,
    m: &SparseRef<'_>,
    dtype: DType,
    dense: &[u8],
    r0: usize,
    rows: usize,
) {
    let cols = m.cols();
    for k in tables() {
        // Filled with a value no matrix holds, so a position left unwritten shows.
        let mut tile = vec![f32::NAN; rows * cols];
        let mut buf = vec![f32::NAN; cols];
        m.decode_rows(&k, r0, &mut tile, &mut buf);
        for (i, &got) in tile.iter().enumerate() {
            let want = value(dtype, dense, r0 * cols + i);
            assert!(
                f64::from(got) == want,
                "{what} [{}]: decoded row {}, column {}: {got} instead of {want}",
                k.isa.name(),
                r0 + i / cols,
                i % cols
            );
        }
    }
}

#[test]
fn bitmask_rows_match_decoded_sums() {
    sparse_case(SparseKind::Bitmask, 3);
}

#[test]
fn csr_rows_match_decoded_sums() {
    sparse_case(SparseKind::BlockCsr, 4);
}

#[test]
fn two_four_rows_match_decoded_sums() {
    sparse_case(SparseKind::TwoFour, 5);
}

#[test]
fn bitmask_row_starts_count_bits_before_each_row() {
    let mut rng = Lcg(6);
    for (rows, cols) in [
        (1usize, 1usize),
        (3, 7),
        (5, 13),
        (4, 64),
        (3, 65),
        (7, 129),
        (2, 300),
    ] {
        // One byte more than needed, all ones, to check bits past rows·cols are ignored.
        let n = rows * cols;
        let mut mask: Vec<u8> = (0..n.div_ceil(8)).map(|_| rng.next() as u8).collect();
        mask.push(0xff);
        let starts = cpu::bitmask_row_starts(&mask, rows, cols);
        assert_eq!(starts.len(), rows + 1);
        let mut count = 0u32;
        for (r, &start) in starts.iter().enumerate() {
            assert_eq!(start, count, "rows {rows} cols {cols} row {r}");
            for i in r * cols..((r + 1) * cols).min(n) {
                count += u32::from(mask[i / 8] >> (i % 8) & 1);
            }
        }
    }
    // Bits past the end of a short mask count as zero.
    assert_eq!(cpu::bitmask_row_starts(&[0xff], 2, 8), vec![0, 8, 8]);
}

/// Expected `f32` of f16 bits: the exact value, or for a NaN the quiet NaN with the
/// same sign and payload (what F16C, `fcvtl` and `half` produce).
fn f16_expected(h: u16) -> f32 {
    let v = f16_value(h);
    if v.is_nan() {
        f32::from_bits((u32::from(h & 0x8000) << 16) | 0x7fc0_0000 | (u32::from(h & 0x3ff) << 13))
    } else {
        v as f32
    }
}

#[test]
fn to_f32_is_exact_for_every_f16_and_bf16() {
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    let buf = misaligned(&all);
    for k in tables() {
        for dtype in [DType::F16, DType::BF16] {
            let v = Values {
                dtype,
                bytes: &buf[1..],
            };
            // The whole range at once, then short runs at odd starts for the tails.
            let mut out = vec![0f32; 65536];
            (k.to_f32)(v, 0, &mut out);
            let runs = (0..=17).map(|len| (1000 + 37 * len, len));
            for (start, len) in std::iter::once((0, 65536)).chain(runs) {
                let mut o = vec![f32::NAN; len];
                (k.to_f32)(v, start, &mut o);
                for (j, got) in o.iter().enumerate() {
                    let h = (start + j) as u16;
                    let want = match dtype {
                        DType::F16 => f16_expected(h),
                        _ => f32::from_bits(u32::from(h) << 16),
                    };
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{} {dtype:?} {h:#06x}",
                        k.isa.name()
                    );
                }
            }
        }
        // f32 is a copy, bits and all (NaN payloads included).
        let mut rng = Lcg(7);
        let bits: Vec<u32> = (0..1000).map(|_| rng.next()).collect();
        let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let buf = misaligned(&raw);
        for (start, len) in [(0, 1000), (3, 13), (990, 10)] {
            let mut o = vec![0f32; len];
            let v = Values {
                dtype: DType::F32,
                bytes: &buf[1..],
            };
            (k.to_f32)(v, start, &mut o);
            for (j, got) in o.iter().enumerate() {
                assert_eq!(got.to_bits(), bits[start + j], "{} f32", k.isa.name());
            }
        }
    }
}

/// `from_f32` of `xs` into `dtype` by table `k`, written at an odd address.
fn convert(k: &Kernels, xs: &[f32], dtype: DType) -> Vec<u16> {
    let mut buf = vec![0u8; xs.len() * dtype.size() + 1];
    (k.from_f32)(xs, dtype, &mut buf[1..]);
    buf[1..]
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Round-to-nearest-even expectations for a 16-bit format whose non-negative finite
/// values are `value(b)` for `b` in `0..=max_finite` (value increasing with `b`):
/// every value itself, the midpoints to the next value (ties to the even pattern),
/// one `f32` ulp either side of each midpoint, and the negatives of all of them.
fn rounding_cases(max_finite: u16, value: impl Fn(u16) -> f64) -> Vec<(f32, u16)> {
    let mut cases = Vec::new();
    let next = |b: u16| {
        if b == max_finite {
            // The value the next pattern would have without overflow: one more ulp.
            2.0 * value(b) - value(b - 1)
        } else {
            value(b + 1)
        }
    };
    for b in 0..=max_finite {
        let lo = value(b);
        let mid = ((lo + next(b)) / 2.0) as f32;
        assert_eq!(
            f64::from(mid),
            (lo + next(b)) / 2.0,
            "midpoint is exact in f32"
        );
        let even = if b % 2 == 0 { b } else { b + 1 };
        cases.push((lo as f32, b));
        cases.push((mid, even));
        cases.push((f32::from_bits(mid.to_bits() - 1), b));
        cases.push((f32::from_bits(mid.to_bits() + 1), b + 1));
    }
    let neg: Vec<(f32, u16)> = cases.iter().map(|&(x, b)| (-x, b | 0x8000)).collect();
    cases.extend(neg);
    cases
}

#[test]
fn from_f32_rounds_to_nearest_even() {
    let f16_cases = rounding_cases(0x7bff, f16_value);
    let bf16_cases = rounding_cases(0x7f7f, bf16_value);
    let specials = [
        (f32::INFINITY, 0x7c00u16, 0x7f80u16),
        (f32::NEG_INFINITY, 0xfc00, 0xff80),
        (f32::MAX, 0x7c00, 0x7f80),
        (65_519.996, 0x7bff, 0x4780),
        (65_520.0, 0x7c00, 0x4780),
        (1e-30, 0, 0x0da2),
        (-1e-30, 0x8000, 0x8da2),
        (f32::from_bits(1), 0, 0),
        (2f32.powi(-25), 0, 0x3300),
        (2f32.powi(-25) * 1.0001, 1, 0x3300),
    ];
    for k in tables() {
        let name = k.isa.name();
        let (xs, want): (Vec<f32>, Vec<u16>) = f16_cases.iter().copied().unzip();
        assert_eq!(convert(&k, &xs, DType::F16), want, "{name} f16 rounding");
        let (xs, want): (Vec<f32>, Vec<u16>) = bf16_cases.iter().copied().unzip();
        assert_eq!(convert(&k, &xs, DType::BF16), want, "{name} bf16 rounding");
        for (x, h, b) in specials {
            assert_eq!(convert(&k, &[x], DType::F16), [h], "{name} f16 of {x:e}");
            assert_eq!(convert(&k, &[x], DType::BF16), [b], "{name} bf16 of {x:e}");
        }
        // NaNs stay NaN, quiet, with their sign and the top of their payload.
        for bits in [
            0x7fc0_0000u32,
            0xffc0_0000,
            0x7f80_0001,
            0x7fa0_2000,
            0xff81_2345,
        ] {
            let x = f32::from_bits(bits);
            let h = convert(&k, &[x], DType::F16)[0];
            let want_h = ((bits >> 16) & 0x8000) as u16 | 0x7e00 | ((bits >> 13) & 0x3ff) as u16;
            assert_eq!(h, want_h, "{name} f16 of NaN {bits:#x}");
            let b = convert(&k, &[x], DType::BF16)[0];
            assert_eq!(
                b,
                (bits >> 16) as u16 | 0x40,
                "{name} bf16 of NaN {bits:#x}"
            );
        }
        // f32 is copied.
        let xs = [1.5f32, -0.0, f32::from_bits(0x7fa0_0001), 3e-42];
        let mut out = [0u8; 17];
        (k.from_f32)(&xs, DType::F32, &mut out[1..]);
        let back: Vec<u32> = out[1..]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(back, xs.map(f32::to_bits), "{name} f32 copy");
    }
}

#[test]
fn f16_roundtrips_through_f32() {
    for k in tables() {
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        let mut f = vec![0f32; 65536];
        let v = Values {
            dtype: DType::F16,
            bytes: &all,
        };
        (k.to_f32)(v, 0, &mut f);
        let back = convert(&k, &f, DType::F16);
        for h in 0..=u16::MAX {
            // A signalling NaN comes back quiet; everything else exactly.
            let want = if h & 0x7c00 == 0x7c00 && h & 0x3ff != 0 {
                h | 0x200
            } else {
                h
            };
            assert_eq!(back[usize::from(h)], want, "{} {h:#06x}", k.isa.name());
        }
    }
}

#[test]
fn simd_from_f32_matches_scalar_on_random_bits() {
    let mut rng = Lcg(8);
    let xs: Vec<f32> = (0..100_003).map(|_| f32::from_bits(rng.next())).collect();
    let scalar = cpu::scalar();
    for dtype in [DType::F16, DType::BF16] {
        let want = convert(&scalar, &xs, dtype);
        for k in tables() {
            for len in [0usize, 1, 7, 8, 9, 15, 17, 100_003] {
                assert_eq!(
                    convert(&k, &xs[..len], dtype),
                    want[..len],
                    "{} {dtype:?} len {len}",
                    k.isa.name()
                );
            }
        }
    }
}

#[test]
fn the_chosen_table_is_available_and_reported() {
    let all = tables();
    let chosen = cpu::kernels();
    assert!(all.iter().any(|k| k.isa == chosen.isa));
    assert_eq!(Isa::Scalar.name(), "scalar");
    assert_eq!(Isa::Avx2.name(), "avx2");
    assert_eq!(Isa::Avx512.name(), "avx512");
    assert_eq!(Isa::Neon.name(), "neon");
    let features = cpu::cpu_features();
    if all.iter().any(|k| k.isa == Isa::Avx2) {
        for f in ["avx2", "fma", "f16c"] {
            assert!(features.contains(&f), "{features:?}");
        }
    }
    if cfg!(target_arch = "aarch64") {
        assert!(all.iter().any(|k| k.isa == Isa::Neon));
        assert!(features.contains(&"neon"), "{features:?}");
    }
}

/// Where the CPU has AVX-512 (F, BW, VL), its table is available, after AVX2's, and
/// every test in this file and in `quantized_kernels.rs` runs it against the scalar
/// reference (they iterate over `available()`); elsewhere this says plainly that those
/// checks were skipped.
#[test]
fn avx512_table_is_available_where_the_cpu_has_it() {
    let all = tables();
    #[cfg(target_arch = "x86_64")]
    let has = std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let has = false;
    if !has {
        println!("skipped: no AVX-512 on this CPU");
        assert!(all.iter().all(|k| k.isa != Isa::Avx512));
        return;
    }
    let isas: Vec<Isa> = all.iter().map(|k| k.isa).collect();
    assert_eq!(isas, [Isa::Scalar, Isa::Avx2, Isa::Avx512]);
    let features = cpu::cpu_features();
    for f in ["avx512f", "avx512bw", "avx512vl"] {
        assert!(features.contains(&f), "{features:?}");
    }
    // Without CAP_FORCE_* the best table is chosen; `CAP_FORCE_ISA=avx2` (run this test
    // with it set) picks AVX2's.
    let force_isa = std::env::var("CAP_FORCE_ISA").ok();
    if std::env::var_os("CAP_FORCE_SCALAR").is_none() {
        let want = match force_isa.as_deref() {
            Some("avx2") => Isa::Avx2,
            Some("scalar") => Isa::Scalar,
            _ => Isa::Avx512,
        };
        assert_eq!(cpu::kernels().isa, want);
    }
}

/// What a kernel did with inconsistent input: panicked, or returned this `y[0]`.
#[derive(Debug, PartialEq)]
enum Outcome {
    Panicked,
    Returned(f32),
}

/// Runs a kernel that writes one output into a zeroed `y`, catching a panic.
fn outcome(f: impl FnOnce(&mut [f32])) -> Outcome {
    let mut y = [0f32];
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut y))) {
        Ok(()) => Outcome::Returned(y[0]),
        Err(_) => Outcome::Panicked,
    }
}

/// Checks that a kernel over inconsistent data, with `x` all ones and every stored
/// value `v`, panicked or returned a sum of at most `max_terms` stored values: `n·v`
/// for a whole `n` (exact in `f32` here). A byte read from outside the buffers would
/// show as some other number.
fn assert_sane(what: &str, k: &Kernels, got: Outcome, v: f32, max_terms: usize) {
    if let Outcome::Returned(y) = got {
        let n = y / v;
        assert!(
            n.fract() == 0.0 && (0.0..=max_terms as f32).contains(&n),
            "{what} [{}]: returned {y}, not a sum of at most {max_terms} stored values {v}",
            k.isa.name()
        );
    }
}

/// Inconsistent index data must panic or give some sum, never read out of bounds.
/// (Without a sanitizer this only catches gross overruns; the kernels' bounds come from
/// checked slicing, see their SAFETY comments.)
#[test]
fn inconsistent_sparse_data_never_reads_out_of_bounds() {
    let cols = 300;
    let x = vec![1f32; cols];
    let vals = vec![0x3cu8; 64];
    // Every stored value: f16 0x3c3c = 1 + 60/1024.
    let v = 1.0 + 60.0 / 1024.0;
    for k in tables() {
        // Block pointers past the values; column indices past the last block's width.
        let ptr: Vec<u8> = [0u32, 40, 10_000]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        let idx = vec![255u8; 64];
        let m = CsrRef {
            cols,
            block_ptr: &ptr,
            col_idx: &idx,
            values: Values {
                dtype: DType::F16,
                bytes: &vals,
            },
        };
        let got = outcome(|y| (k.csr_rows)(&m, 0, &x, y));
        assert_sane("csr, pointers past the values", &k, got, v, cols);
        let ptr2: Vec<u8> = [0u32, 0, 32].iter().flat_map(|p| p.to_le_bytes()).collect();
        let m2 = CsrRef {
            block_ptr: &ptr2,
            ..m
        };
        // Indices 255 in the 44-column last block: clamped by SIMD, a panic in scalar.
        let got = outcome(|y| (k.csr_rows)(&m2, 0, &x, y));
        if k.isa == Isa::Scalar {
            assert_eq!(
                got,
                Outcome::Panicked,
                "scalar csr, index past the last block"
            );
        }
        assert_sane("csr, index past the last block", &k, got, v, cols);
        // Row starts past the values, and a full mask with too few values.
        let mask = vec![0xffu8; 300];
        let starts = [20u32, 10_000];
        let b = BitmaskRef {
            cols,
            mask: &mask,
            row_start: &starts,
            values: Values {
                dtype: DType::F16,
                bytes: &vals,
            },
        };
        let got = outcome(|y| (k.bitmask_rows)(&b, 0, &x, y));
        assert_sane("bitmask, starts past the values", &k, got, v, cols);
        // 2:4 with too few values and meta.
        let t = TwoFourRef {
            cols,
            values: Values {
                dtype: DType::F16,
                bytes: &vals,
            },
            meta: &[0xff; 3],
        };
        let got = outcome(|y| (k.two_four_rows)(&t, 0, &x, y));
        assert_sane("2:4, too few values and meta", &k, got, v, cols);
    }
}
