//! Writes the cases of `scripts/cuda-emu.sh`: inputs of every CUDA kernel on awkward
//! sizes with the scalar CPU kernels' outputs (the same cases as the GPU tests in
//! `tests/cuda.rs`), for `scripts/cuda-emu/emu.cpp`, which runs the CUDA C on the CPU.
//!
//! `cargo run --release -p cap-kernels --example cuda_emu_cases -- OUT.bin`
use cap_format::sparse::{SparseKind, encode_sparse, quantize_sparse};
use cap_format::{extend_rows, to_bytes};
use cap_kernels::cpu::{self, BitmaskRef, CsrRef, DType, SparseRef, TwoFourRef, Values};
use cap_kernels::ops;
use std::io::Write;

// The tests' generator (reproducible inputs).
#[path = "../tests/common/mod.rs"]
mod common;
use common::{Lcg, matrix};

/// The case file: a text header line per case, then length-prefixed arrays.
struct Out(Vec<u8>);
impl Out {
    fn head(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(b'\n');
    }
    fn arr(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn f32s(&mut self, v: &[f32]) {
        self.arr(&to_bytes(v, DType::F32));
    }
    fn u32s(&mut self, v: &[u32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.arr(&b);
    }
}

fn code(dt: DType) -> (u32, &'static str) {
    match dt {
        DType::F32 => (0, "f32"),
        DType::F16 => (1, "f16"),
        DType::BF16 => (2, "bf16"),
        DType::Q8 { .. } => (3, "q8"),
        DType::Q4 { .. } => (4, "q4"),
    }
}

fn by_ranges(rows: usize, mut f: impl FnMut(usize, &mut [f32])) -> Vec<f32> {
    let mut y = vec![0.0f32; rows];
    let (a, b) = (rows / 3, rows / 3 + rows / 2);
    for (lo, hi) in [(0, a), (a, b), (b, rows)] {
        f(lo, &mut y[lo..hi]);
    }
    y
}

fn row_blocks(counts: impl Iterator<Item = usize>, g: usize) -> Vec<u32> {
    let mut v = vec![0u32];
    let mut acc = 0;
    for c in counts {
        acc += c.div_ceil(g);
        v.push(acc as u32);
    }
    v
}

fn main() {
    let scalar = cpu::scalar();
    let mut rng = Lcg(7);
    let mut o = Out(Vec::new());
    let dts = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8 { group: 16 },
        DType::Q8 { group: 64 },
        DType::Q4 { group: 32 },
        DType::Q4 { group: 256 },
        // Not a power of two: the kernels' value-at-a-time path (powers of two read
        // whole units of codes).
        DType::Q8 { group: 48 },
        DType::Q4 { group: 80 },
    ];
    let rows_l = [1usize, 5, 37];
    let cols_l = [1usize, 3, 31, 32, 33, 255, 256, 257, 1031];
    let cols_24 = [4usize, 32, 36, 256, 260, 1028];
    let mut n = 0;
    for dt in dts {
        let (c, name) = code(dt);
        for rows in rows_l {
            for cols in cols_l {
                let w = matrix(&mut rng, rows, cols, 1.0, false);
                let bytes = if dt.is_quantized() {
                    let mut q = Vec::new();
                    extend_rows(&mut q, &w, cols, dt);
                    q
                } else {
                    to_bytes(&w, dt)
                };
                let v = Values {
                    dtype: dt,
                    bytes: &bytes,
                };
                let x: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
                let want = by_ranges(rows, |r0, y| (scalar.dense_rows)(v, cols, r0, &x, y));
                let mut dense = vec![0.0; rows * cols];
                cpu::rows_to_f32(&scalar, v, cols, 0, &mut dense);
                o.head(&format!("dense {name} {c} {} {rows} {cols}", dt.group()));
                o.arr(&bytes);
                o.f32s(&x);
                o.f32s(&want);
                o.f32s(&dense);
                n += 1;
            }
        }
        for kind in [
            SparseKind::Bitmask,
            SparseKind::BlockCsr,
            SparseKind::TwoFour,
        ] {
            let tf = kind == SparseKind::TwoFour;
            let cl: &[usize] = if tf { &cols_24 } else { &cols_l };
            for rows in rows_l {
                for &cols in cl {
                    for density in [0.05, 0.5, 1.0] {
                        let w = matrix(&mut rng, rows, cols, density, tf);
                        let (r, cc) = (rows as u32, cols as u32);
                        let parts = if dt.is_quantized() {
                            let (s, p) =
                                encode_sparse(kind, r, cc, DType::F32, &to_bytes(&w, DType::F32))
                                    .unwrap();
                            quantize_sparse(r, cc, s, p, dt).unwrap().1
                        } else {
                            encode_sparse(kind, r, cc, dt, &to_bytes(&w, dt)).unwrap().1
                        };
                        let rs = if kind == SparseKind::Bitmask {
                            cpu::bitmask_row_starts(&parts[0], rows, cols)
                        } else {
                            Vec::new()
                        };
                        let m = match kind {
                            SparseKind::Bitmask => SparseRef::Bitmask(BitmaskRef {
                                cols,
                                mask: &parts[0],
                                row_start: &rs,
                                values: Values {
                                    dtype: dt,
                                    bytes: &parts[1],
                                },
                            }),
                            SparseKind::BlockCsr => SparseRef::Csr(CsrRef {
                                cols,
                                block_ptr: &parts[0],
                                col_idx: &parts[1],
                                values: Values {
                                    dtype: dt,
                                    bytes: &parts[2],
                                },
                            }),
                            SparseKind::TwoFour => SparseRef::TwoFour(TwoFourRef {
                                cols,
                                values: Values {
                                    dtype: dt,
                                    bytes: &parts[0],
                                },
                                meta: &parts[1],
                            }),
                        };
                        let x: Vec<f32> = (0..cols).map(|_| rng.x()).collect();
                        let want = by_ranges(rows, |r0, y| m.mul_rows(&scalar, r0, &x, y));
                        let mut dense = vec![0.0; rows * cols];
                        let mut buf = vec![0.0; cols];
                        m.decode_rows(&scalar, 0, &mut dense, &mut buf);
                        let g = dt.group();
                        match kind {
                            SparseKind::Bitmask => {
                                let rb =
                                    row_blocks(rs.windows(2).map(|w| (w[1] - w[0]) as usize), g);
                                o.head(&format!("bitmask {name} {c} {g} {rows} {cols}"));
                                o.arr(&parts[0]);
                                o.u32s(&rs);
                                o.u32s(&rb);
                                o.arr(&parts[1]);
                            }
                            SparseKind::BlockCsr => {
                                let nb = cols.div_ceil(256);
                                let ptr: Vec<u32> = parts[0]
                                    .chunks_exact(4)
                                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                                    .collect();
                                let rb = row_blocks(
                                    (0..rows).map(|r| (ptr[(r + 1) * nb] - ptr[r * nb]) as usize),
                                    g,
                                );
                                o.head(&format!("csr {name} {c} {g} {rows} {cols}"));
                                o.u32s(&ptr);
                                o.arr(&parts[1]);
                                o.u32s(&rb);
                                o.arr(&parts[2]);
                            }
                            SparseKind::TwoFour => {
                                o.head(&format!("two_four {name} {c} {g} {rows} {cols}"));
                                o.arr(&parts[0]);
                                o.arr(&parts[1]);
                            }
                        }
                        o.f32s(&x);
                        o.f32s(&want);
                        o.f32s(&dense);
                        n += 1;
                    }
                }
            }
        }
    }
    // Ops.
    for (rows, d) in [(1usize, 1usize), (3, 64), (2, 576), (5, 1031)] {
        let x: Vec<f32> = (0..rows * d).map(|_| rng.signed()).collect();
        let w: Vec<f32> = (0..d).map(|_| rng.signed()).collect();
        let u: Vec<f32> = (0..rows * d).map(|_| rng.signed()).collect();
        let mut rn = vec![0.0; rows * d];
        ops::rms_norm(&mut rn, &x, &w, 1e-5);
        let mut sm = x.clone();
        for r in sm.chunks_mut(d) {
            ops::softmax(r);
        }
        let mut si = x.clone();
        ops::silu_mul(&mut si, &u);
        let mut ge = x.clone();
        ops::gelu_tanh_mul(&mut ge, &u);
        o.head(&format!("ops {rows} {d}"));
        o.f32s(&x);
        o.f32s(&w);
        o.f32s(&u);
        o.f32s(&rn);
        o.f32s(&sm);
        o.f32s(&si);
        o.f32s(&ge);
        n += 1;
    }
    {
        let mut row = vec![f32::NEG_INFINITY; 7];
        row.extend([1.0, f32::NEG_INFINITY, 2.0, 0.5, -1.0, 3.0, 0.0]);
        let mut want = row.clone();
        for r in want.chunks_mut(7) {
            ops::softmax(r);
        }
        o.head("softmax 2 7");
        o.f32s(&row);
        o.f32s(&want);
        n += 1;
    }
    for (heads, hd) in [(3usize, 64usize), (1, 2)] {
        let half = hd / 2;
        let x: Vec<f32> = (0..heads * hd).map(|_| rng.signed()).collect();
        let ang: Vec<f32> = (0..half).map(|_| rng.signed() * 3.0).collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) = ang.iter().map(|a| (a.cos(), a.sin())).unzip();
        let mut want = x.clone();
        for h in want.chunks_mut(hd) {
            ops::rope_rotate_half(h, &cos, &sin);
        }
        o.head(&format!("rope {heads} {hd}"));
        o.f32s(&x);
        o.f32s(&cos);
        o.f32s(&sin);
        o.f32s(&want);
        n += 1;
    }
    for (nh, nkv, hd, cap, first, keys) in [
        (1usize, 1usize, 2usize, 1usize, 0usize, 1usize),
        (9, 3, 64, 40, 0, 37),
        (4, 1, 256, 300, 44, 300),
        (14, 2, 64, 1031, 1000, 1031),
    ] {
        let q: Vec<f32> = (0..nh * hd).map(|_| rng.signed()).collect();
        let k: Vec<f32> = (0..nkv * cap * hd).map(|_| rng.signed()).collect();
        let v: Vec<f32> = (0..nkv * cap * hd).map(|_| rng.signed()).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut want = vec![0.0f32; nh * hd];
        for h in 0..nh {
            let g = h / (nh / nkv);
            let base = g * cap * hd;
            let kb = to_bytes(&k[base + first * hd..base + keys * hd], DType::F32);
            let vb = to_bytes(&v[base + first * hd..base + keys * hd], DType::F32);
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
        o.head(&format!(
            "attention {nh} {nkv} {hd} {cap} {first} {keys} {scale:e}"
        ));
        o.f32s(&q);
        o.f32s(&k);
        o.f32s(&v);
        o.f32s(&want);
        n += 1;
    }
    let path = std::env::args()
        .nth(1)
        .expect("usage: cuda_emu_cases OUT.bin");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&o.0))
        .expect("writing the cases");
    eprintln!("{n} cases, {} bytes, in {path}", o.0.len());
}
