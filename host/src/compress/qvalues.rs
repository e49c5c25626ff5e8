//! The seam between the host's quantizers ([`super::quantize`]) and cap-format's
//! quantized value types ([`DType::Q8`], [`DType::Q4`]).
//!
//! The conventions agree, so results pass through unchanged (checked by the tests
//! below against the format's own decoder):
//!
//! * `Q8 { group }` is the host's symmetric 8-bit grid: codes in `−127..=127`, value
//!   `s·q`, one `f16` scale per group.
//! * `Q4 { group }` is the host's asymmetric 4-bit grid: codes in `0..=15`, value
//!   `s·q + m` (the host's `min + scale·c`, the same `f32` product and sum), one `f16`
//!   scale and one `f16` minimum per group.
//! * Groups: each row's kept values in column order cut into runs of `group`, the
//!   last partial (`⌈k/G⌉` per row) — a dense row, a low-rank factor's row, or a
//!   sparse row's kept values in storage order (bitmask and block-CSR both store a
//!   row's values in column order).
//!
//! The host's quantizer accepts any group; the format only multiples of 16 in
//! `16..=256`, which [`check_values`] enforces before anything runs.

use cap_format::{DType, extend_quantized};
use serde::Serialize;

use super::error::{CompressError, Result};
use super::quantize::{DEFAULT_DAMP, QuantSpec, Quantized, quantize_gptq, quantize_rtn};

/// How the kept values of a linear are quantized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Quantizer {
    /// GPTQ with the layer's input Hessian where the method has one (`cap`,
    /// `sparsegpt`, `admm`), else round-to-nearest.
    #[default]
    Gptq,
    /// Round-to-nearest everywhere.
    Rtn,
}

impl Quantizer {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Quantizer::Gptq => "gptq",
            Quantizer::Rtn => "rtn",
        }
    }
}

/// The host quantizer's setting for a quantized `dtype` (`None` for a float type).
pub fn spec_of(dtype: DType) -> Option<QuantSpec> {
    match dtype {
        DType::Q8 { group } => Some(QuantSpec {
            bits: 8,
            group: usize::from(group),
            symmetric: true,
        }),
        DType::Q4 { group } => Some(QuantSpec {
            bits: 4,
            group: usize::from(group),
            symmetric: false,
        }),
        DType::F32 | DType::F16 | DType::BF16 => None,
    }
}

/// Checks the linears' value type: a quantized type's group must be one the format
/// allows (a multiple of 16 in 16..=256).
pub fn check_values(dtype: DType) -> Result<()> {
    dtype.validate().map_err(|_| {
        CompressError::Invalid(format!(
            "--group {}: a quantization group must be a multiple of 16 in {}..={} (64 is the default)",
            dtype.group(),
            cap_format::MIN_GROUP,
            cap_format::MAX_GROUP
        ))
    })
}

fn spec(dtype: DType) -> Result<QuantSpec> {
    spec_of(dtype)
        .ok_or_else(|| CompressError::Internal(format!("{dtype} is not a quantized value type")))
}

/// Appends `q`'s rows as runs of `dtype` blocks (row `r`'s codes with its groups'
/// scales and minimums), exactly what the file stores for those values.
pub fn extend_runs(out: &mut Vec<u8>, q: &Quantized, dtype: DType) -> Result<()> {
    if spec_of(dtype) != Some(q.spec) {
        return Err(CompressError::Internal(format!(
            "values quantized as {:?} cannot be stored as {dtype}",
            q.spec
        )));
    }
    let mut codes = Vec::new();
    for r in 0..q.rows {
        let (a, b) = (q.row_ptr[r], q.row_ptr[r + 1]);
        let (ga, gb) = (q.group_ptr[r], q.group_ptr[r + 1]);
        codes.clear();
        // Q8 codes are in −127..=127, Q4 codes in 0..=15: both fit `i8` unchanged.
        codes.extend((a..b).map(|i| q.codes.get(i) as i8));
        let mins = if q.spec.symmetric {
            &[][..]
        } else {
            &q.mins[ga..gb]
        };
        extend_quantized(out, &codes, &q.scales[ga..gb], mins, dtype)?;
    }
    Ok(())
}

/// A row-major `rows × cols` matrix (a dense layer or a low-rank factor) stored as
/// `dtype`: rounded to nearest, each row one run.
pub fn rtn_rows(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Result<Vec<u8>> {
    let q = quantize_rtn(values, rows, cols, None, spec(dtype)?)?;
    let mut out = Vec::with_capacity(dtype.run_bytes(cols as u64) as usize * rows);
    extend_runs(&mut out, &q, dtype)?;
    Ok(out)
}

/// The kept values of sparse rows (`row_ptr`: `rows + 1` offsets into `values`, each
/// row's values in column order) stored as `dtype`: rounded to nearest, each row one
/// run.
pub fn rtn_sparse_rows(row_ptr: &[u64], values: &[f32], dtype: DType) -> Result<Vec<u8>> {
    let s = spec(dtype)?;
    let mut out = Vec::new();
    for w in row_ptr.windows(2) {
        let run = &values[w[0] as usize..w[1] as usize];
        let q = quantize_rtn(run, 1, run.len(), None, s)?;
        extend_runs(&mut out, &q, dtype)?;
    }
    Ok(out)
}

/// Quantizes the kept weights of the row-major `rows × cols` weight `w` (where `mask`
/// is true, or all) to `dtype` right after pruning, and replaces `w` by what the
/// stored values decode to (so later blocks see the quantized layer's outputs).
/// GPTQ with the layer's input Hessian `h` when `quantizer` asks for it, else
/// round-to-nearest. `None` (and `w` untouched) for a float `dtype`. The result's
/// `values` are dropped (they are `w`).
pub fn quantize_kept(
    w: &mut [f32],
    mask: Option<&[bool]>,
    rows: usize,
    cols: usize,
    h: &[f32],
    dtype: DType,
    quantizer: Quantizer,
) -> Result<Option<Box<Quantized>>> {
    let Some(s) = spec_of(dtype) else {
        return Ok(None);
    };
    let mut q = match quantizer {
        Quantizer::Gptq => quantize_gptq(w, rows, cols, mask, h, s, DEFAULT_DAMP)?,
        Quantizer::Rtn => quantize_rtn(w, rows, cols, mask, s)?,
    };
    w.copy_from_slice(&q.values);
    q.values = Vec::new();
    Ok(Some(Box::new(q)))
}

/// GPTQ of a low-rank part's stored factors `A` (`k × cols`, applied first, to `x`)
/// and `B` (`rows × k`, applied to `A·x`) in `dtype`: `A` against the layer's input
/// Hessian `h`, then `B` against the Hessian of its own input, `A_q·H·A_qᵀ`, so `B`
/// compensates what rounding `A` lost. `a` and `b` become the values the codes
/// decode to. `None` (nothing changed) for a float `dtype`, for round to nearest
/// (the writer's), or for a rank of 0.
#[allow(clippy::too_many_arguments)]
pub fn quantize_factors(
    a: &mut [f32],
    b: &mut [f32],
    k: usize,
    rows: usize,
    cols: usize,
    h: &[f32],
    dtype: DType,
    quantizer: Quantizer,
) -> Result<Option<(Quantized, Quantized)>> {
    let Some(s) = spec_of(dtype) else {
        return Ok(None);
    };
    if quantizer != Quantizer::Gptq || k == 0 {
        return Ok(None);
    }
    let mut qa = quantize_gptq(a, k, cols, None, h, s, DEFAULT_DAMP)?;
    a.copy_from_slice(&qa.values);
    qa.values = Vec::new();
    // H_B = A_q·H·A_qᵀ (k × k), in f64: k·cols² products, small beside the layer's
    // own GPTQ (rows·cols²).
    let mut t = vec![0f64; k * cols];
    for i in 0..k {
        let ai = &a[i * cols..(i + 1) * cols];
        let ti = &mut t[i * cols..(i + 1) * cols];
        for (c, &x) in ai.iter().enumerate() {
            if x != 0.0 {
                let hc = &h[c * cols..(c + 1) * cols];
                for (o, &hv) in ti.iter_mut().zip(hc) {
                    *o += f64::from(x) * f64::from(hv);
                }
            }
        }
    }
    let mut hb = vec![0f32; k * k];
    for i in 0..k {
        for j in 0..k {
            let aj = &a[j * cols..(j + 1) * cols];
            let d: f64 = t[i * cols..(i + 1) * cols]
                .iter()
                .zip(aj)
                .map(|(&x, &y)| x * f64::from(y))
                .sum();
            hb[i * k + j] = d as f32;
        }
    }
    let mut qb = quantize_gptq(b, rows, k, None, &hb, s, DEFAULT_DAMP)?;
    b.copy_from_slice(&qb.values);
    qb.values = Vec::new();
    Ok(Some((qa, qb)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cap_device::rng::XorShift64Star;

    fn normal(rng: &mut XorShift64Star, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32 * 0.05).collect()
    }

    /// What the host quantizer computes is what the format decodes, bit for bit, for
    /// dense rows with a partial last group and for sparse rows, GPTQ and RTN, Q8 and Q4.
    #[test]
    fn host_codes_decode_to_the_host_values_through_the_format() {
        let mut rng = XorShift64Star::new(7);
        let (rows, cols) = (9, 80);
        let w = normal(&mut rng, rows * cols);
        let x = normal(&mut rng, 200 * cols);
        let mut h = vec![0f32; cols * cols];
        for t in 0..200 {
            let xr = &x[t * cols..(t + 1) * cols];
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += xr[i] * xr[j];
                }
            }
        }
        let mask: Vec<bool> = (0..rows * cols)
            .map(|i| !rng.next_u64().is_multiple_of(3) || i % 7 == 0)
            .collect();
        for dtype in [DType::Q8 { group: 32 }, DType::Q4 { group: 16 }] {
            for quantizer in [Quantizer::Gptq, Quantizer::Rtn] {
                for m in [None, Some(mask.as_slice())] {
                    let mut wq = w.clone();
                    let q = quantize_kept(&mut wq, m, rows, cols, &h, dtype, quantizer)
                        .unwrap()
                        .unwrap();
                    let mut bytes = Vec::new();
                    extend_runs(&mut bytes, &q, dtype).unwrap();
                    let mut at = 0;
                    for r in 0..rows {
                        let kept: Vec<usize> = (0..cols)
                            .filter(|&c| m.is_none_or(|m| m[r * cols + c]))
                            .collect();
                        let mut dec = vec![0f32; kept.len()];
                        cap_format::dequantize(&bytes[at..], dtype, &mut dec).unwrap();
                        for (&c, &d) in kept.iter().zip(&dec) {
                            assert_eq!(
                                d.to_bits(),
                                wq[r * cols + c].to_bits(),
                                "{dtype} r{r} c{c}"
                            );
                        }
                        at += dtype.run_bytes(kept.len() as u64) as usize;
                    }
                    assert_eq!(at, bytes.len());
                }
            }
        }
        // The RTN helpers store the same runs.
        let dtype = DType::Q4 { group: 32 };
        let b = rtn_rows(&w, rows, cols, dtype).unwrap();
        let back = cap_format::dequantize_rows(&b, dtype, rows, cols).unwrap();
        let q = quantize_rtn(&w, rows, cols, None, spec_of(dtype).unwrap()).unwrap();
        assert_eq!(back, q.values);
        let row_ptr: Vec<u64> = (0..=rows as u64).map(|r| r * cols as u64).collect();
        assert_eq!(rtn_sparse_rows(&row_ptr, &w, dtype).unwrap(), b);
    }

    /// GPTQ of low-rank factors: the codes decode (through the format) to the values
    /// `quantize_factors` leaves in `a` and `b`, and the layer's output error on the
    /// calibration inputs, ‖(B·A − B_q·A_q)·Xᵀ‖², is below that of rounding each
    /// factor to nearest (what the writer does otherwise), on inputs with correlated
    /// columns (where a Hessian carries information) at 4 and 8 bits.
    #[test]
    fn gptq_factors_decode_exactly_and_beat_round_to_nearest() {
        let mut rng = XorShift64Star::new(11);
        let (rows, cols, k, n) = (48, 64, 8, 512);
        let a0 = normal(&mut rng, k * cols);
        let b0 = normal(&mut rng, rows * k);
        // Correlated inputs: x = z·M.
        let mix = normal(&mut rng, cols * cols);
        let z = normal(&mut rng, n * cols);
        let mut x = vec![0f32; n * cols];
        for t in 0..n {
            for j in 0..cols {
                x[t * cols + j] = (0..cols).map(|i| z[t * cols + i] * mix[i * cols + j]).sum();
            }
        }
        let mut h = vec![0f32; cols * cols];
        for t in 0..n {
            let xr = &x[t * cols..(t + 1) * cols];
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += xr[i] * xr[j];
                }
            }
        }
        // ‖(B0·A0 − B·A)·Xᵀ‖² in f64.
        let err = |a: &[f32], b: &[f32]| -> f64 {
            let mut e = 0.0;
            for t in 0..n {
                let xr = &x[t * cols..(t + 1) * cols];
                let ax = |m: &[f32]| -> Vec<f64> {
                    (0..k)
                        .map(|i| {
                            (0..cols)
                                .map(|j| f64::from(m[i * cols + j]) * f64::from(xr[j]))
                                .sum()
                        })
                        .collect()
                };
                let (h0, h1) = (ax(&a0), ax(a));
                for r in 0..rows {
                    let y0: f64 = (0..k).map(|i| f64::from(b0[r * k + i]) * h0[i]).sum();
                    let y1: f64 = (0..k).map(|i| f64::from(b[r * k + i]) * h1[i]).sum();
                    e += (y0 - y1).powi(2);
                }
            }
            e
        };
        for dtype in [DType::Q4 { group: 16 }, DType::Q8 { group: 32 }] {
            let (mut a, mut b) = (a0.clone(), b0.clone());
            let (qa, qb) =
                quantize_factors(&mut a, &mut b, k, rows, cols, &h, dtype, Quantizer::Gptq)
                    .unwrap()
                    .unwrap();
            for (q, m, r, c) in [(&qa, &a, k, cols), (&qb, &b, rows, k)] {
                let mut bytes = Vec::new();
                extend_runs(&mut bytes, q, dtype).unwrap();
                let back = cap_format::dequantize_rows(&bytes, dtype, r, c).unwrap();
                let same = back
                    .iter()
                    .zip(m.iter())
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{dtype}: codes decode to other values");
            }
            let ra = cap_format::dequantize_rows(
                &rtn_rows(&a0, k, cols, dtype).unwrap(),
                dtype,
                k,
                cols,
            )
            .unwrap();
            let rb = cap_format::dequantize_rows(
                &rtn_rows(&b0, rows, k, dtype).unwrap(),
                dtype,
                rows,
                k,
            )
            .unwrap();
            let (eg, er) = (err(&a, &b), err(&ra, &rb));
            assert!(eg < er, "{dtype}: GPTQ {eg} not below RTN {er}");
            eprintln!("{dtype}: output error GPTQ/RTN = {:.3}", eg / er);
        }
        // Round to nearest and float types leave the factors to the writer.
        let (mut a, mut b) = (a0.clone(), b0.clone());
        let q4 = DType::Q4 { group: 16 };
        assert!(
            quantize_factors(&mut a, &mut b, k, rows, cols, &h, q4, Quantizer::Rtn)
                .unwrap()
                .is_none()
        );
        assert!(
            quantize_factors(
                &mut a,
                &mut b,
                k,
                rows,
                cols,
                &h,
                DType::F16,
                Quantizer::Gptq
            )
            .unwrap()
            .is_none()
        );
        assert_eq!((a, b), (a0, b0));
    }

    #[test]
    fn groups_the_format_rejects_are_one_clear_error() {
        let e = check_values(DType::Q4 { group: 10 })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--group 10") && e.contains("multiple of 16"),
            "{e}"
        );
        check_values(DType::Q8 { group: 64 }).unwrap();
        check_values(DType::F16).unwrap();
    }
}
