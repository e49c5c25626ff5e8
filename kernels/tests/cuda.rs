//! The CUDA kernels (feature `cuda`): `cargo test -p cap-kernels --features cuda`.
//!
//! 1. Without a GPU (CI): every kernel compiles through NVRTC for sm_72 (Jetson
//!    Xavier), sm_87 (Jetson Orin) and sm_90 with register spills as errors; a broken
//!    kernel and a spilling kernel give errors carrying NVRTC's log; a refused
//!    architecture is an error; `probe` never panics. Needs libnvrtc on the loader's
//!    path (`scripts/fetch-nvrtc.sh`); without it these tests print that they were
//!    skipped, unless `CAP_REQUIRE_NVRTC=1`, which makes that a failure.
//! 2. With a GPU: each kernel against the scalar CPU kernel on awkward sizes (1 to 37
//!    rows, 1 to 1031 columns, partial quantization groups, empty and full sparse
//!    rows, rows split so kernels start past row 0). **These have not yet run on a
//!    GPU** (written on a machine without one); without a usable GPU they print why
//!    and pass, unless `CAP_REQUIRE_GPU=1`.
#![cfg(feature = "cuda")]

mod common;

use std::time::Instant;

use cap_format::sparse::{SparseKind, encode_sparse, quantize_sparse};
use cap_format::{extend_rows, to_bytes};
use cap_kernels::cpu::{self, BitmaskRef, CsrRef, DType, SparseRef, TwoFourRef, Values};
use cap_kernels::cuda::{self, CudaError, Gpu};
use cap_kernels::ops;
use common::{Lcg, matrix};

/// The architectures CI compiles for: Jetson AGX Xavier, Jetson Orin, Hopper.
const ARCHS: [&str; 3] = ["sm_72", "sm_87", "sm_90"];

fn env_is(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// Whether NVRTC can be used; prints that the test was skipped when not (a failure
/// under `CAP_REQUIRE_NVRTC=1`).
fn nvrtc_or_skip(test: &str) -> bool {
    if cuda::nvrtc_available() {
        return true;
    }
    assert!(
        !env_is("CAP_REQUIRE_NVRTC"),
        "{test}: CAP_REQUIRE_NVRTC=1 but no libnvrtc could be loaded (LD_LIBRARY_PATH={:?})",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    );
    eprintln!(
        "SKIPPED {test}: no libnvrtc could be loaded (run `bash scripts/fetch-nvrtc.sh` and put the folder it prints on LD_LIBRARY_PATH)"
    );
    false
}

#[test]
fn every_kernel_compiles_for_xavier_orin_and_hopper_without_spills() {
    if !nvrtc_or_skip("every_kernel_compiles") {
        return;
    }
    let (major, minor) = cuda::nvrtc_version().expect("nvrtcVersion");
    eprintln!("NVRTC {major}.{minor}");
    for arch in ARCHS {
        let t = Instant::now();
        let ptx = match cuda::compile(arch) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        eprintln!(
            "{arch}: compiled in {:.2} s, {} bytes of PTX{}",
            t.elapsed().as_secs_f64(),
            ptx.text.len(),
            if ptx.log.trim().is_empty() {
                String::new()
            } else {
                format!(", log:\n{}", ptx.log)
            }
        );
        assert_eq!(ptx.arch, arch);
        assert!(!ptx.log.contains("spill"), "{arch}: {}", ptx.log);
        assert!(
            ptx.text.contains(&format!(".target {arch}")),
            "{arch}: PTX targets something else"
        );
        for name in cuda::kernel_names() {
            assert!(
                ptx.text.contains(&format!(".entry {name}(")),
                "{arch}: no entry {name} in the PTX"
            );
        }
    }
}

#[test]
fn a_broken_kernel_is_an_error_with_nvrtcs_log() {
    if !nvrtc_or_skip("a_broken_kernel_is_an_error") {
        return;
    }
    let src = "extern \"C\" __global__ void cap_broken(float* y) { y[0] = undeclared_name; }";
    match cuda::compile_source(src, "sm_87") {
        Err(e @ CudaError::Compile { .. }) => {
            let CudaError::Compile { log, .. } = &e else {
                unreachable!()
            };
            assert!(
                log.contains(r#"error: identifier "undeclared_name" is undefined"#),
                "log: {log}"
            );
            assert!(e.to_string().contains(log.as_str()), "message: {e}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn a_spilling_kernel_is_an_error() {
    if !nvrtc_or_skip("a_spilling_kernel_is_an_error") {
        return;
    }
    // At most 32 registers a thread (`__maxnreg__`, CUDA 12.4+) for 96 values live at
    // once: ptxas spills, which only --warning-as-error turns from a warning into a
    // failure (checked by hand: without it this compiles, with "ptxas warning :
    // Registers are spilled to local memory").
    let src = r#"
extern "C" __global__ void __maxnreg__(32) cap_many_live_values(const float* x, float* y) {
    float v[96];
#pragma unroll
    for (int i = 0; i < 96; ++i) v[i] = x[threadIdx.x + i * 1024];
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < 96; ++i) acc += v[i] * v[95 - i] + v[(i * 7) % 96];
    y[threadIdx.x] = acc;
}
"#;
    match cuda::compile_source(src, "sm_87") {
        Err(CudaError::Compile { log, .. }) => {
            assert!(
                log.contains("Registers are spilled to local memory"),
                "log: {log}"
            );
        }
        other => panic!("expected a spill error, got {other:?}"),
    }
}

#[test]
fn architectures_older_than_xavier_are_refused() {
    for arch in ["sm_70", "sm_61", "compute_87", "87", "sm_8x"] {
        assert!(
            matches!(cuda::compile(arch), Err(CudaError::BadArch { .. })),
            "{arch}"
        );
    }
}

#[test]
fn a_missing_nvrtc_is_an_error_not_a_panic() {
    if cuda::nvrtc_available() {
        eprintln!("SKIPPED a_missing_nvrtc_is_an_error: libnvrtc is present");
        return;
    }
    assert!(matches!(
        cuda::compile("sm_87"),
        Err(CudaError::NvrtcMissing)
    ));
    assert!(matches!(
        cuda::nvrtc_version(),
        Err(CudaError::NvrtcMissing)
    ));
}

#[test]
fn probe_reports_a_gpu_or_one_line_why_not() {
    match cuda::probe() {
        Ok(g) => {
            assert!(g.compute_capability >= cuda::MIN_COMPUTE_CAPABILITY);
            eprintln!("probe: {g}");
        }
        Err(u) => {
            assert!(!u.reason.is_empty() && !u.reason.contains('\n'), "{u:?}");
            eprintln!("probe: {u}");
        }
    }
    let line = cuda::describe();
    assert!(!line.is_empty() && !line.contains('\n'), "{line}");
}

// ---- On a GPU (not yet run: no GPU where this was written) -------------------------

/// The GPU with the kernels loaded, or `None` after printing why the test is skipped
/// (a failure under `CAP_REQUIRE_GPU=1`).
fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match cuda::probe() {
        Ok(_) => match Gpu::new() {
            Ok(g) => Some(g),
            Err(e) => panic!("{test}: a GPU was found but the kernels could not be loaded: {e}"),
        },
        Err(u) => {
            assert!(
                !env_is("CAP_REQUIRE_GPU"),
                "{test}: CAP_REQUIRE_GPU=1 but {u}"
            );
            eprintln!("SKIPPED {test}: {u}");
            None
        }
    }
}

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const QUANTS: [DType; 6] = [
    DType::Q8 { group: 16 },
    DType::Q8 { group: 64 },
    DType::Q4 { group: 32 },
    DType::Q4 { group: 256 },
    // Not a power of two: the kernels' value-at-a-time path (powers of two read
    // whole units of codes).
    DType::Q8 { group: 48 },
    DType::Q4 { group: 80 },
];
const ROWS: [usize; 3] = [1, 5, 37];
const COLS: [usize; 9] = [1, 3, 31, 32, 33, 255, 256, 257, 1031];
const COLS_2_4: [usize; 6] = [4, 32, 36, 256, 260, 1028];

fn all_dtypes() -> impl Iterator<Item = DType> {
    FLOATS.into_iter().chain(QUANTS)
}

/// `y = W·x` by `f(r0, y_rows)` over three row ranges (kernels start past row 0).
fn by_ranges(
    rows: usize,
    mut f: impl FnMut(usize, &mut [f32]) -> Result<(), CudaError>,
) -> Vec<f32> {
    let mut y = vec![0.0f32; rows];
    let (a, b) = (rows / 3, rows / 3 + rows / 2);
    for (lo, hi) in [(0, a), (a, b), (b, rows)] {
        if let Err(e) = f(lo, &mut y[lo..hi]) {
            panic!("rows {lo}..{hi}: {e}");
        }
    }
    y
}

/// GPU against CPU, row by row: both are `f32` sums of the same products in different
/// orders, so each is within `(cols + 1)·ε·Σ|w·x|` of the exact sum (`w` as decoded by
/// the CPU reference, `dense`), and they differ by at most twice that.
fn assert_close(gpu: &[f32], cpu_y: &[f32], dense: &[f32], cols: usize, x: &[f32], what: &str) {
    for (r, (&g, &c)) in gpu.iter().zip(cpu_y).enumerate() {
        let a: f64 = dense[r * cols..(r + 1) * cols]
            .iter()
            .zip(x)
            .map(|(&w, &xc)| (f64::from(w) * f64::from(xc)).abs())
            .sum();
        let bound = 2.0 * (cols as f64 + 1.0) * f64::from(f32::EPSILON) * a + 1e-30;
        assert!(
            (f64::from(g) - f64::from(c)).abs() <= bound,
            "{what} row {r}: GPU {g} CPU {c} (bound {bound:e})"
        );
    }
}

/// `rows × cols` of `w` stored densely as `dt` (float rows, or quantized runs).
fn dense_bytes(w: &[f32], cols: usize, dt: DType) -> Vec<u8> {
    if dt.is_quantized() {
        let mut q = Vec::new();
        extend_rows(&mut q, w, cols, dt);
        q
    } else {
        to_bytes(w, dt)
    }
}

/// The stored matrix as the CPU reference decodes it, `rows × cols` `f32`.
fn decode_dense(v: Values<'_>, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * cols];
    cpu::rows_to_f32(&cpu::scalar(), v, cols, 0, &mut out);
    out
}

#[test]
fn gpu_dense_rows_match_the_scalar_kernel() {
    let Some(gpu) = gpu_or_skip("gpu_dense_rows") else {
        return;
    };
    let scalar = cpu::scalar();
    let mut rng = Lcg(101);
    for dt in all_dtypes() {
        for rows in ROWS {
            for cols in COLS {
                let w = matrix(&mut rng, rows, cols, 1.0, false);
                let bytes = dense_bytes(&w, cols, dt);
                let v = Values {
                    dtype: dt,
                    bytes: &bytes,
                };
                let x: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
                let want = by_ranges(rows, |r0, y| {
                    (scalar.dense_rows)(v, cols, r0, &x, y);
                    Ok(())
                });
                let got = by_ranges(rows, |r0, y| gpu.dense_rows(v, cols, r0, &x, y));
                let dense = decode_dense(v, rows, cols);
                assert_close(
                    &got,
                    &want,
                    &dense,
                    cols,
                    &x,
                    &format!("dense {dt} {rows}x{cols}"),
                );
            }
        }
    }
}

#[test]
fn gpu_f16_specials_decode_exactly_as_on_the_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_f16_specials") else {
        return;
    };
    // One value a row and x = 1, so y is the decoded value itself: no sum to reorder.
    // Subnormals (2^-24, the largest, a negative one), signed zeros, the largest
    // finite, the smallest normal, ±Inf and two NaNs with different payloads.
    let bits: [u16; 12] = [
        0x0001, 0x03ff, 0x8200, 0x0000, 0x8000, 0x7bff, 0xfbff, 0x0400, 0x7c00, 0xfc00, 0x7e01,
        0xfd55,
    ];
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let v = Values {
        dtype: DType::F16,
        bytes: &bytes,
    };
    let scalar = cpu::scalar();
    let mut want = vec![0.0f32; bits.len()];
    (scalar.dense_rows)(v, 1, 0, &[1.0], &mut want);
    let mut got = vec![0.0f32; bits.len()];
    gpu.dense_rows(v, 1, 0, &[1.0], &mut got)
        .unwrap_or_else(|e| panic!("{e}"));
    for ((&b, &g), &w) in bits.iter().zip(&got).zip(&want) {
        if w.is_nan() {
            // A NaN's payload does not survive the multiply-add on either side.
            assert!(g.is_nan(), "f16 {b:#06x}: GPU {g}, CPU NaN");
        } else {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "f16 {b:#06x}: GPU {g:e}, CPU {w:e}"
            );
        }
    }
}

#[test]
fn gpu_low_rank_rows_match_two_scalar_products() {
    let Some(gpu) = gpu_or_skip("gpu_low_rank_rows") else {
        return;
    };
    let scalar = cpu::scalar();
    let mut rng = Lcg(103);
    for dt in all_dtypes() {
        for (rows, cols, rank) in [(1, 1, 1), (37, 33, 5), (5, 1031, 3), (37, 257, 37)] {
            let a = matrix(&mut rng, rank, cols, 1.0, false);
            let b = matrix(&mut rng, rows, rank, 1.0, false);
            let (ab, bb) = (dense_bytes(&a, cols, dt), dense_bytes(&b, rank, dt));
            let (av, bv) = (
                Values {
                    dtype: dt,
                    bytes: &ab,
                },
                Values {
                    dtype: dt,
                    bytes: &bb,
                },
            );
            let x: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
            let mut t = vec![0.0f32; rank];
            (scalar.dense_rows)(av, cols, 0, &x, &mut t);
            let want = by_ranges(rows, |r0, y| {
                (scalar.dense_rows)(bv, rank, r0, &t, y);
                Ok(())
            });
            let got = by_ranges(rows, |r0, y| {
                gpu.low_rank_rows(av, bv, rank, cols, r0, &x, y)
            });
            // The bound of the outer product only; the inner t = A·x differs by its own
            // rounding, which |B|·|t| covers at this size within the factor 2 margin
            // only loosely, so allow the inner bound too.
            let (ad, bd) = (decode_dense(av, rank, cols), decode_dense(bv, rows, rank));
            for r in 0..rows {
                let mut inner = 0.0f64;
                for (k, &bk) in bd[r * rank..(r + 1) * rank].iter().enumerate() {
                    let ak: f64 = ad[k * cols..(k + 1) * cols]
                        .iter()
                        .zip(&x)
                        .map(|(&w, &xc)| (f64::from(w) * f64::from(xc)).abs())
                        .sum();
                    inner += f64::from(bk).abs() * (ak + f64::from(t[k]).abs());
                }
                let bound =
                    2.0 * ((cols + rank) as f64 + 2.0) * f64::from(f32::EPSILON) * inner + 1e-30;
                assert!(
                    (f64::from(got[r]) - f64::from(want[r])).abs() <= bound,
                    "low-rank {dt} {rows}x{cols} rank {rank} row {r}: GPU {} CPU {}",
                    got[r],
                    want[r]
                );
            }
        }
    }
}

/// Sparse parts of `w` as `kind` with values of `dt` (quantized: each row's kept
/// values one run, by the reference quantizer).
fn sparse_parts(w: &[f32], rows: usize, cols: usize, kind: SparseKind, dt: DType) -> Vec<Vec<u8>> {
    let (r, c) = (rows as u32, cols as u32);
    if dt.is_quantized() {
        let (s, parts) =
            encode_sparse(kind, r, c, DType::F32, &to_bytes(w, DType::F32)).expect("encode_sparse");
        quantize_sparse(r, c, s, parts, dt)
            .expect("quantize_sparse")
            .1
    } else {
        encode_sparse(kind, r, c, dt, &to_bytes(w, dt))
            .expect("encode_sparse")
            .1
    }
}

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

fn gpu_sparse_rows(
    gpu: &Gpu,
    m: &SparseRef<'_>,
    r0: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), CudaError> {
    match m {
        SparseRef::Bitmask(b) => gpu.bitmask_rows(b, r0, x, y),
        SparseRef::Csr(c) => gpu.csr_rows(c, r0, x, y),
        SparseRef::TwoFour(t) => gpu.two_four_rows(t, r0, x, y),
    }
}

#[test]
fn gpu_sparse_rows_match_the_scalar_kernels() {
    let Some(gpu) = gpu_or_skip("gpu_sparse_rows") else {
        return;
    };
    let scalar = cpu::scalar();
    let mut rng = Lcg(107);
    for kind in [
        SparseKind::Bitmask,
        SparseKind::BlockCsr,
        SparseKind::TwoFour,
    ] {
        let two_four = kind == SparseKind::TwoFour;
        let cols_list: &[usize] = if two_four { &COLS_2_4 } else { &COLS };
        for dt in all_dtypes() {
            for rows in ROWS {
                for &cols in cols_list {
                    for density in [0.05, 0.5, 1.0] {
                        let w = matrix(&mut rng, rows, cols, density, two_four);
                        let parts = sparse_parts(&w, rows, cols, kind, dt);
                        let rs = if kind == SparseKind::Bitmask {
                            cpu::bitmask_row_starts(&parts[0], rows, cols)
                        } else {
                            Vec::new()
                        };
                        let m = sparse_ref(kind, cols, &parts, dt, &rs);
                        let x: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
                        let want = by_ranges(rows, |r0, y| {
                            m.mul_rows(&scalar, r0, &x, y);
                            Ok(())
                        });
                        let got = by_ranges(rows, |r0, y| gpu_sparse_rows(&gpu, &m, r0, &x, y));
                        let mut dense = vec![0.0; rows * cols];
                        let mut buf = vec![0.0; cols];
                        m.decode_rows(&scalar, 0, &mut dense, &mut buf);
                        let what = format!("{kind:?} {dt} {rows}x{cols} density {density}");
                        assert_close(&got, &want, &dense, cols, &x, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn gpu_inconsistent_sparse_input_is_refused_before_launch() {
    let Some(gpu) = gpu_or_skip("gpu_inconsistent_sparse_input") else {
        return;
    };
    let mut rng = Lcg(109);
    let (rows, cols) = (5, 33);
    let w = matrix(&mut rng, rows, cols, 0.5, false);
    let parts = sparse_parts(&w, rows, cols, SparseKind::Bitmask, DType::F32);
    let mut rs = cpu::bitmask_row_starts(&parts[0], rows, cols);
    rs[2] += 1;
    let m = BitmaskRef {
        cols,
        mask: &parts[0],
        row_start: &rs,
        values: Values {
            dtype: DType::F32,
            bytes: &parts[1],
        },
    };
    let x = vec![1.0; cols];
    let mut y = vec![0.0; rows];
    assert!(matches!(
        gpu.bitmask_rows(&m, 0, &x, &mut y),
        Err(CudaError::Shape(_))
    ));
    let short = Values {
        dtype: DType::F16,
        bytes: &[0u8; 10],
    };
    assert!(matches!(
        gpu.dense_rows(short, cols, 0, &x, &mut y),
        Err(CudaError::Shape(_))
    ));
}

/// Element-wise agreement within `tol` relative to `max(1, |cpu|)`.
fn assert_near(gpu: &[f32], cpu_v: &[f32], tol: f32, what: &str) {
    assert_eq!(gpu.len(), cpu_v.len(), "{what}");
    for (i, (&g, &c)) in gpu.iter().zip(cpu_v).enumerate() {
        assert!(
            (g - c).abs() <= tol * c.abs().max(1.0),
            "{what}[{i}]: GPU {g} CPU {c}"
        );
    }
}

#[test]
fn gpu_ops_match_the_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_ops") else {
        return;
    };
    let mut rng = Lcg(113);
    for (rows, d) in [(1, 1), (3, 64), (2, 576), (5, 1031)] {
        let x: Vec<f32> = (0..rows * d).map(|_| rng.signed()).collect();
        let w: Vec<f32> = (0..d).map(|_| rng.signed()).collect();
        let mut want = vec![0.0; rows * d];
        ops::rms_norm(&mut want, &x, &w, 1e-5);
        let mut got = vec![0.0; rows * d];
        gpu.rms_norm(&mut got, &x, &w, 1e-5).expect("rms_norm");
        assert_near(&got, &want, 1e-5, &format!("rms_norm {rows}x{d}"));

        let mut want = x.clone();
        for row in want.chunks_mut(d) {
            ops::softmax(row);
        }
        let mut got = x.clone();
        gpu.softmax(&mut got, d).expect("softmax");
        assert_near(&got, &want, 1e-5, &format!("softmax {rows}x{d}"));

        let u: Vec<f32> = (0..rows * d).map(|_| rng.signed()).collect();
        let (mut want, mut got) = (x.clone(), x.clone());
        ops::silu_mul(&mut want, &u);
        gpu.silu_mul(&mut got, &u).expect("silu_mul");
        assert_near(&got, &want, 1e-5, "silu_mul");
        let (mut want, mut got) = (x.clone(), x.clone());
        ops::gelu_tanh_mul(&mut want, &u);
        gpu.gelu_tanh_mul(&mut got, &u).expect("gelu_tanh_mul");
        assert_near(&got, &want, 1e-5, "gelu_tanh_mul");
    }
    // Softmax of a row that is all -inf, and of one with a -inf entry (masked).
    let mut row = vec![f32::NEG_INFINITY; 7];
    row.extend([1.0, f32::NEG_INFINITY, 2.0, 0.5, -1.0, 3.0, 0.0]);
    let mut want = row.clone();
    for r in want.chunks_mut(7) {
        ops::softmax(r);
    }
    gpu.softmax(&mut row, 7).expect("softmax -inf");
    assert_near(&row, &want, 1e-6, "softmax with -inf");
    // RoPE over 3 heads of 64 and 1 head of 2.
    for (heads, hd) in [(3, 64), (1, 2)] {
        let half = hd / 2;
        let x: Vec<f32> = (0..heads * hd).map(|_| rng.signed()).collect();
        let ang: Vec<f32> = (0..half).map(|_| rng.signed() * 3.0).collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) = ang.iter().map(|a| (a.cos(), a.sin())).unzip();
        let mut want = x.clone();
        for h in want.chunks_mut(hd) {
            ops::rope_rotate_half(h, &cos, &sin);
        }
        let mut got = x;
        gpu.rope_rotate_half(&mut got, &cos, &sin).expect("rope");
        assert_near(&got, &want, 1e-6, &format!("rope {heads}x{hd}"));
    }
}

#[test]
fn gpu_attention_matches_the_cpu_decode_path() {
    let Some(gpu) = gpu_or_skip("gpu_attention") else {
        return;
    };
    let scalar = cpu::scalar();
    let mut rng = Lcg(127);
    // (query heads, kv heads, head dim, capacity, first, keys)
    for (nh, nkv, hd, cap, first, keys) in [
        (1, 1, 2, 1, 0, 1),
        (9, 3, 64, 40, 0, 37),
        (4, 1, 256, 300, 44, 300),
        (14, 2, 64, 1031, 1000, 1031),
    ] {
        let q: Vec<f32> = (0..nh * hd).map(|_| rng.signed()).collect();
        let k: Vec<f32> = (0..nkv * cap * hd).map(|_| rng.signed()).collect();
        let v: Vec<f32> = (0..nkv * cap * hd).map(|_| rng.signed()).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        // The CPU decode path (forward.rs decode_head): scores, scale, softmax, p·V.
        let mut want = vec![0.0f32; nh * hd];
        for h in 0..nh {
            let g = h / (nh / nkv);
            let base = g * cap * hd;
            let kv_bytes =
                |c: &[f32]| to_bytes(&c[base + first * hd..base + keys * hd], DType::F32);
            let (kb, vb) = (kv_bytes(&k), kv_bytes(&v));
            let mut s = vec![0.0f32; keys - first];
            (scalar.dense_rows)(
                Values {
                    dtype: DType::F32,
                    bytes: &kb,
                },
                hd,
                0,
                &q[h * hd..(h + 1) * hd],
                &mut s,
            );
            s.iter_mut().for_each(|x| *x *= scale);
            ops::softmax(&mut s);
            (scalar.dense_t_rows)(
                Values {
                    dtype: DType::F32,
                    bytes: &vb,
                },
                hd,
                0,
                &s,
                &mut want[h * hd..(h + 1) * hd],
            );
        }
        let got = gpu
            .attention_decode(&q, &k, &v, (nh, nkv, hd), cap, (first, keys), scale)
            .expect("attention_decode");
        assert_near(
            &got,
            &want,
            1e-4,
            &format!("attention {nh}/{nkv}x{hd} keys {first}..{keys}"),
        );
    }
}
