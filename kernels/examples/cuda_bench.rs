//! Times the CUDA matrix-vector kernels with the weights resident on the GPU, as a
//! decode step sees them, and prints one JSON object per case (and a summary line).
//!
//! `cargo run --release -p cap-kernels --features cuda --example cuda_bench [-- REPS]`
//!
//! For each shape and encoding: the mean seconds per launch over `REPS` (default 200)
//! back-to-back launches after one warm-up, the bytes the kernel must read (values,
//! indices, masks, `x`), and their rate. Each result is also checked: `y` after the
//! warm-up must equal the scalar CPU kernel's within the `f32` reordering bound the
//! GPU tests use, so a fast wrong kernel does not pass as a benchmark.
use std::process::ExitCode;

use cap_format::sparse::{SparseKind, encode_sparse, quantize_sparse};
use cap_format::{extend_rows, to_bytes};
use cap_kernels::cpu::{self, BitmaskRef, CsrRef, DType, SparseRef, TwoFourRef, Values};
use cap_kernels::cuda::{self, CudaError, Gpu};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Lcg, matrix};

/// The stored parts of `w` as `kind` with `dt` values (one part for dense).
fn parts(w: &[f32], rows: usize, cols: usize, kind: Option<SparseKind>, dt: DType) -> Vec<Vec<u8>> {
    let (r, c) = (rows as u32, cols as u32);
    match kind {
        None if dt.is_quantized() => {
            let mut q = Vec::new();
            extend_rows(&mut q, w, cols, dt);
            vec![q]
        }
        None => vec![to_bytes(w, dt)],
        Some(k) if dt.is_quantized() => {
            let (s, p) = encode_sparse(k, r, c, DType::F32, &to_bytes(w, DType::F32))
                .expect("encode_sparse");
            quantize_sparse(r, c, s, p, dt).expect("quantize_sparse").1
        }
        Some(k) => {
            encode_sparse(k, r, c, dt, &to_bytes(w, dt))
                .expect("encode_sparse")
                .1
        }
    }
}

/// One case: launches `reps` times, checks the warm-up against the CPU, prints JSON.
fn case(
    gpu: &Gpu,
    rng: &mut Lcg,
    (rows, cols): (usize, usize),
    kind: Option<SparseKind>,
    dt: DType,
    reps: u32,
) -> Result<f64, CudaError> {
    let two_four = kind == Some(SparseKind::TwoFour);
    let density = if kind.is_some() && !two_four {
        0.5
    } else {
        1.0
    };
    let w = matrix(rng, rows, cols, density, two_four);
    let p = parts(&w, rows, cols, kind, dt);
    let rs = if kind == Some(SparseKind::Bitmask) {
        cpu::bitmask_row_starts(&p[0], rows, cols)
    } else {
        Vec::new()
    };
    let x: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
    let scalar = cpu::scalar();
    let mut want = vec![0.0f32; rows];
    let mut dense = vec![0.0f32; rows * cols];
    let values = |i: usize| Values {
        dtype: dt,
        bytes: &p[i],
    };
    let sparse = kind.map(|k| match k {
        SparseKind::Bitmask => SparseRef::Bitmask(BitmaskRef {
            cols,
            mask: &p[0],
            row_start: &rs,
            values: values(1),
        }),
        SparseKind::BlockCsr => SparseRef::Csr(CsrRef {
            cols,
            block_ptr: &p[0],
            col_idx: &p[1],
            values: values(2),
        }),
        SparseKind::TwoFour => SparseRef::TwoFour(TwoFourRef {
            cols,
            values: values(0),
            meta: &p[1],
        }),
    });
    match &sparse {
        None => {
            (scalar.dense_rows)(values(0), cols, 0, &x, &mut want);
            cpu::rows_to_f32(&scalar, values(0), cols, 0, &mut dense);
        }
        Some(m) => {
            m.mul_rows(&scalar, 0, &x, &mut want);
            let mut buf = vec![0.0; cols];
            m.decode_rows(&scalar, 0, &mut dense, &mut buf);
        }
    }
    let run = |g: &Gpu, y: &mut [f32]| match &sparse {
        None => g.dense_rows(values(0), cols, 0, &x, y),
        Some(SparseRef::Bitmask(b)) => g.bitmask_rows(b, 0, &x, y),
        Some(SparseRef::Csr(c)) => g.csr_rows(c, 0, &x, y),
        Some(SparseRef::TwoFour(t)) => g.two_four_rows(t, 0, &x, y),
    };
    let mut got = vec![0.0f32; rows];
    run(gpu, &mut got)?;
    // The GPU tests' bound: both sums are f32 reorderings of the same products.
    let mut worst = 0.0f64;
    for r in 0..rows {
        let a: f64 = dense[r * cols..(r + 1) * cols]
            .iter()
            .zip(&x)
            .map(|(&w, &xc)| (f64::from(w) * f64::from(xc)).abs())
            .sum();
        let bound = 2.0 * (cols as f64 + 1.0) * f64::from(f32::EPSILON) * a + 1e-30;
        let err = (f64::from(got[r]) - f64::from(want[r])).abs();
        worst = worst.max(err / bound);
    }
    if worst > 1.0 {
        return Err(CudaError::Shape(format!(
            "{kind:?} {dt} {rows}x{cols}: GPU differs from the CPU by {worst:.2}× the bound"
        )));
    }
    let mut y = vec![0.0f32; rows];
    let s = gpu.time_matvec(reps, |g| run(g, &mut y))?;
    let bytes: usize = p.iter().map(Vec::len).sum::<usize>() + rs.len() * 4 + cols * 4 + rows * 8;
    let enc = match kind {
        None => "dense",
        Some(SparseKind::Bitmask) => "bitmask50",
        Some(SparseKind::BlockCsr) => "csr50",
        Some(SparseKind::TwoFour) => "two_four",
    };
    println!(
        "{{\"rows\":{rows},\"cols\":{cols},\"encoding\":\"{enc}\",\"dtype\":\"{dt}\",\"us\":{:.2},\"bytes\":{bytes},\"gb_per_s\":{:.1},\"worst_err_over_bound\":{worst:.3}}}",
        s * 1e6,
        bytes as f64 / s / 1e9
    );
    Ok(s)
}

fn main() -> ExitCode {
    let reps: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let gpu = match cuda::probe() {
        Err(u) => {
            eprintln!("cuda_bench: {u}");
            return ExitCode::FAILURE;
        }
        Ok(_) => match Gpu::new() {
            Ok(g) => g,
            Err(e) => {
                eprintln!("cuda_bench: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    eprintln!("cuda_bench: {}", gpu.info());
    let mut rng = Lcg(2026);
    let q8 = DType::Q8 { group: 32 };
    let q4 = DType::Q4 { group: 32 };
    let mut failed = 0;
    // SmolLM2's MLP (576 → 1536: launch-bound on a big GPU), a 7B model's square
    // projection and its MLP.
    for shape in [(1536, 576), (4096, 4096), (11008, 4096)] {
        let encodings: [(Option<SparseKind>, &[DType]); 4] = [
            (None, &[DType::F32, DType::F16, DType::BF16, q8, q4]),
            (Some(SparseKind::Bitmask), &[DType::F16, q8, q4]),
            (Some(SparseKind::BlockCsr), &[DType::F16]),
            (Some(SparseKind::TwoFour), &[DType::F16, q4]),
        ];
        for (kind, dts) in encodings {
            for &dt in dts {
                if let Err(e) = case(&gpu, &mut rng, shape, kind, dt, reps) {
                    eprintln!("cuda_bench: {e}");
                    failed += 1;
                }
            }
        }
    }
    if failed > 0 {
        eprintln!("cuda_bench: {failed} case(s) failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
