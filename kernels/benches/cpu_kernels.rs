//! Matrix-vector throughput of every CPU kernel table on SmolLM2-135M shapes
//! (576×1536 and 1536×576, f16 values): dense, 50%-dense bitmask and block-CSR, 2:4,
//! and the transposed dense kernel on one attention head's f16 value cache; then Q8 and
//! Q4 values (groups 64 and 32) dense, bitmask and block-CSR on 576×1536 (in cache)
//! and on 262144×576 (94 MB at Q4/g32: it streams from memory as a decoded token does).
//!
//! Reports GB/s of encoded weight bytes read (values plus mask / indices / pointers /
//! meta) and the speedup over the scalar table measured in the same run; one thread.
//! Decoding a token reads every weight once, so GB/s against the machine's memory
//! bandwidth says how close a kernel gets to the physical limit. Run with
//! `cargo bench -p cap-kernels --bench cpu_kernels`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use cap_format::sparse::{SparseKind, encode_sparse};
use cap_kernels::cpu::{self, BitmaskRef, CsrRef, DType, Kernels, TwoFourRef, Values};

/// Each measurement repeats the kernel for at least this long and keeps the best of
/// `ROUNDS` such batches (the least disturbed by other work on a shared machine).
const MIN_BATCH: Duration = Duration::from_millis(100);
const ROUNDS: usize = 5;

struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Seconds per call of `f`.
fn time(mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut n = 0u32;
        while start.elapsed() < MIN_BATCH {
            f();
            n += 1;
        }
        best = best.min(start.elapsed().as_secs_f64() / f64::from(n));
    }
    best
}

/// A `rows×cols` f16 matrix with `keep(r, c)` deciding the non-zeros.
fn matrix(
    rows: usize,
    cols: usize,
    rng: &mut Lcg,
    keep: impl Fn(usize, usize, f32) -> bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * cols * 2);
    for r in 0..rows {
        for c in 0..cols {
            let u = rng.unit();
            let v = if keep(r, c, u) {
                rng.unit() - 0.5 + 1e-3
            } else {
                0.0
            };
            out.extend_from_slice(&cpu::f32_to_f16(v).to_le_bytes());
        }
    }
    out
}

/// A 2:4 f16 matrix: two kept columns per group of 4, the pair changing with the row.
fn two_four_matrix(rows: usize, cols: usize, rng: &mut Lcg) -> Vec<u8> {
    matrix(rows, cols, rng, |r, c, _| {
        let a = (r * 7 + c / 4) % 4;
        let j = c % 4;
        j == a || j == (a + 1 + r % 3) % 4
    })
}

/// Times `run` for every table and prints one line per table.
fn report(label: &str, bytes: usize, tables: &[Kernels], mut run: impl FnMut(&Kernels)) {
    // Optional filter: `cargo bench -p cap-kernels --bench cpu_kernels -- bitmask`.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filter.is_empty() && !filter.iter().any(|f| label.contains(f.as_str())) {
        return;
    }
    let mut scalar = None;
    for k in tables {
        let s = time(|| run(k));
        let base = *scalar.get_or_insert(s);
        println!(
            "{label:<34} {:<7} {:>9.1} µs {:>7.2} GB/s {:>6.2}× scalar",
            k.isa.name(),
            s * 1e6,
            bytes as f64 / s / 1e9,
            base / s
        );
    }
}

fn main() {
    let tables = cpu::available();
    println!(
        "cap-kernels CPU kernels, one thread; features: {:?}; chosen: {}",
        cpu::cpu_features(),
        cpu::kernels().isa.name()
    );
    let mut rng = Lcg(42);
    let dt = DType::F16;
    // The last shape (48 MiB dense) does not fit in cache: it streams from memory as a
    // decoded token does.
    for (rows, cols) in [(576usize, 1536usize), (1536, 576), (16384, 1536)] {
        let x: Vec<f32> = (0..cols).map(|_| rng.unit() - 0.5).collect();
        let mut y = vec![0f32; rows];
        let shape = format!("{rows}x{cols}");

        let dense = matrix(rows, cols, &mut rng, |_, _, _| true);
        let w = Values {
            dtype: dt,
            bytes: &dense,
        };
        report(&format!("dense f16 {shape}"), dense.len(), &tables, |k| {
            (k.dense_rows)(w, cols, 0, black_box(&x), &mut y)
        });

        let half = matrix(rows, cols, &mut rng, |_, _, u| u < 0.5);
        let (_, p) =
            encode_sparse(SparseKind::Bitmask, rows as u32, cols as u32, dt, &half).unwrap();
        let starts = cpu::bitmask_row_starts(&p[0], rows, cols);
        let m = BitmaskRef {
            cols,
            mask: &p[0],
            row_start: &starts,
            values: Values {
                dtype: dt,
                bytes: &p[1],
            },
        };
        let bytes = p[0].len() + p[1].len() + 4 * starts.len();
        report(&format!("bitmask 50% f16 {shape}"), bytes, &tables, |k| {
            (k.bitmask_rows)(&m, 0, black_box(&x), &mut y)
        });

        let (_, p) =
            encode_sparse(SparseKind::BlockCsr, rows as u32, cols as u32, dt, &half).unwrap();
        let m = CsrRef {
            cols,
            block_ptr: &p[0],
            col_idx: &p[1],
            values: Values {
                dtype: dt,
                bytes: &p[2],
            },
        };
        let bytes = p[0].len() + p[1].len() + p[2].len();
        report(&format!("block-CSR 50% f16 {shape}"), bytes, &tables, |k| {
            (k.csr_rows)(&m, 0, black_box(&x), &mut y)
        });

        let tf = two_four_matrix(rows, cols, &mut rng);
        let (_, p) = encode_sparse(SparseKind::TwoFour, rows as u32, cols as u32, dt, &tf).unwrap();
        let m = TwoFourRef {
            cols,
            values: Values {
                dtype: dt,
                bytes: &p[0],
            },
            meta: &p[1],
        };
        let bytes = p[0].len() + p[1].len();
        report(&format!("2:4 f16 {shape}"), bytes, &tables, |k| {
            (k.two_four_rows)(&m, 0, black_box(&x), &mut y)
        });
    }

    // Quantized values (the compressor's default group of 64, and 32) on an in-cache
    // and an out-of-cache shape: dense, and 50%-dense bitmask and block-CSR, Q8 and Q4.
    for (rows, cols) in [(576usize, 1536usize), (262144, 576)] {
        let x: Vec<f32> = (0..cols).map(|_| rng.unit() - 0.5).collect();
        let mut y = vec![0f32; rows];
        let dense = matrix(rows, cols, &mut rng, |_, _, _| true);
        let half = matrix(rows, cols, &mut rng, |_, _, u| u < 0.5);
        let f32_of = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(2)
                .map(|h| cpu::f16_to_f32(u16::from_le_bytes([h[0], h[1]])))
                .collect()
        };
        for qt in [
            DType::Q8 { group: 64 },
            DType::Q4 { group: 64 },
            DType::Q4 { group: 32 },
        ] {
            let mut q = Vec::new();
            cap_format::extend_rows(&mut q, &f32_of(&dense), cols, qt);
            let w = Values {
                dtype: qt,
                bytes: &q,
            };
            report(
                &format!("dense {qt} {rows}x{cols}"),
                q.len(),
                &tables,
                |k| (k.dense_rows)(w, cols, 0, black_box(&x), &mut y),
            );
            for kind in [SparseKind::Bitmask, SparseKind::BlockCsr] {
                let (s, p) = encode_sparse(kind, rows as u32, cols as u32, dt, &half).unwrap();
                let (_, p) =
                    cap_format::sparse::quantize_sparse(rows as u32, cols as u32, s, p, qt)
                        .unwrap();
                let bytes: usize = p.iter().map(Vec::len).sum();
                let values = |b| Values {
                    dtype: qt,
                    bytes: b,
                };
                if kind == SparseKind::Bitmask {
                    let starts = cpu::bitmask_row_starts(&p[0], rows, cols);
                    let m = BitmaskRef {
                        cols,
                        mask: &p[0],
                        row_start: &starts,
                        values: values(&p[1]),
                    };
                    let bytes = bytes + 4 * starts.len();
                    report(
                        &format!("bitmask 50% {qt} {rows}x{cols}"),
                        bytes,
                        &tables,
                        |k| (k.bitmask_rows)(&m, 0, black_box(&x), &mut y),
                    );
                } else {
                    let m = CsrRef {
                        cols,
                        block_ptr: &p[0],
                        col_idx: &p[1],
                        values: values(&p[2]),
                    };
                    report(
                        &format!("block-CSR 50% {qt} {rows}x{cols}"),
                        bytes,
                        &tables,
                        |k| (k.csr_rows)(&m, 0, black_box(&x), &mut y),
                    );
                }
            }
            let tf = two_four_matrix(rows, cols, &mut rng);
            let (s, p) =
                encode_sparse(SparseKind::TwoFour, rows as u32, cols as u32, dt, &tf).unwrap();
            let (_, p) =
                cap_format::sparse::quantize_sparse(rows as u32, cols as u32, s, p, qt).unwrap();
            let m = TwoFourRef {
                cols,
                values: Values {
                    dtype: qt,
                    bytes: &p[0],
                },
                meta: &p[1],
            };
            report(
                &format!("2:4 {qt} {rows}x{cols}"),
                p[0].len() + p[1].len(),
                &tables,
                |k| (k.two_four_rows)(&m, 0, black_box(&x), &mut y),
            );
        }
    }

    // Attention p·V over one head's f16 value cache: 1024 positions × 64.
    let (pos, hd) = (1024usize, 64usize);
    let cache = matrix(pos, hd, &mut rng, |_, _, _| true);
    let p: Vec<f32> = (0..pos).map(|_| rng.unit() / pos as f32).collect();
    let mut o = vec![0f32; hd];
    let v = Values {
        dtype: dt,
        bytes: &cache,
    };
    report(
        &format!("dense_t f16 {pos}x{hd} (p·V)"),
        cache.len(),
        &tables,
        |k| (k.dense_t_rows)(v, hd, 0, black_box(&p), &mut o),
    );
    black_box(&o);
}
