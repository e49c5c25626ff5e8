//! Where the budget goes: per-linear sparsities learned from the calibration loss.
//!
//! Instead of one Bernoulli per weight (the paper's REINFORCE, whose gradient is noise
//! at any affordable number of steps), the allocation has two variables: a slope of the
//! sparsity over depth and an offset between attention and MLP layers,
//!
//! ```text
//! s_l = s + slope·(depth_l − ½) + offset·(+½ for MLP, −½ for attention) + shift
//! ```
//!
//! with `shift` set so the exact cost meets the budget. Each candidate setting is
//! scored directly: the model is pruned with Wanda's rule (a cheap proxy of the final
//! pruner: seconds for the whole model) at those sparsities and its calibration loss
//! measured with cap-device's forward pass; a coordinate search over a small grid keeps
//! the best. Direct loss evaluations of a few variables have no estimator variance to
//! fight, so a handful of them decide what millions of Bernoulli samples cannot.

use super::error::Result;
use cap_device::model::{Block, DenseLinear, Model};
use rayon::prelude::*;
use serde::Serialize;

use cap_format::DType;

use super::budget::CostModel;
use super::qvalues::{Quantizer, quantize_kept};
use super::sparsegpt::kept;

/// The allocation variables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Allocation2 {
    /// Sparsity change from the first block to the last.
    pub slope: f64,
    /// Sparsity of MLP layers minus that of attention layers.
    pub mlp_offset: f64,
    /// Share of each linear's kept parameters spent on a low-rank part (CAP's `L`),
    /// fit to what the sparse part leaves; 0 when the measured loss says it does not pay.
    pub lowrank: f64,
    /// Which linears get more bits per value (`--values auto`; always
    /// [`Bits::Uniform`] otherwise).
    pub bits: Bits,
    /// `--values auto`: quantization groups half the run's (`--group`) size: a scale
    /// (and minimum) per half as many values, which costs bytes and, where the weights
    /// hold a grid of that size already (a source quantized in blocks of 32), can be
    /// lossless.
    pub finer_groups: bool,
}

impl Allocation2 {
    /// The value type of linear `k` of a block (0..7) when the run's type is `base`.
    pub fn values(&self, k: usize, base: DType) -> DType {
        let base = match base {
            DType::Q4 { group } if self.finer_groups && cap_format::valid_group(group / 2) => {
                DType::Q4 { group: group / 2 }
            }
            d => d,
        };
        self.bits.values(k, base)
    }
}

/// Value types per linear under `--values auto`: the base type is q4, and a plan lifts
/// some linears to q8 (or all to f16). Fewer bits keep more weights in the same bytes;
/// which wins, per role, is measured by the calibration loss like the other variables.
/// The roles follow llama.cpp's k-quant mixes, which give `attn_v` and `ffn_down` more
/// bits than the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bits {
    /// Every linear in the run's value type.
    #[default]
    Uniform,
    /// The value (`v`) and down projections in q8, the rest q4.
    VDownQ8,
    /// The attention projections (`q`, `k`, `v`, `o`) in q8, the MLP in q4.
    AttentionQ8,
    /// Every linear in q8.
    AllQ8,
    /// Every linear in f16.
    AllF16,
}

impl Bits {
    /// The plans `--values auto` tries after [`Bits::Uniform`].
    pub const SEARCHED: [Bits; 4] = [Bits::VDownQ8, Bits::AttentionQ8, Bits::AllQ8, Bits::AllF16];

    /// The value type of linear `k` of a block (0..7: q, k, v, o, gate, up, down) when the
    /// run's type is `base` (q4 under `--values auto`, whose groups the q8 plans share).
    pub fn values(self, k: usize, base: DType) -> DType {
        let q8 = DType::Q8 {
            group: base.group() as u16,
        };
        match self {
            Bits::Uniform => base,
            Bits::VDownQ8 if k == 2 || k == 6 => q8,
            Bits::AttentionQ8 if k < 4 => q8,
            Bits::AllQ8 => q8,
            Bits::AllF16 => DType::F16,
            _ => base,
        }
    }
}

/// What one linear keeps: sparsity of its sparse part, rank of its low-rank part and
/// the value type they are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Keep {
    /// Sparsity of `S` (kept entries: [`kept`]).
    pub sparsity: f64,
    /// Rank of `L`.
    pub rank: usize,
    /// Value type of the kept values.
    pub values: DType,
}

/// Splits a linear kept at sparsity `s` between `L` and `S`: `lowrank` of its kept
/// parameters go to whole singular directions (`m + n` each), the rest stay sparse.
pub fn split(m: usize, n: usize, s: f64, lowrank: f64, values: DType) -> Keep {
    let total = (1.0 - s) * (m * n) as f64;
    let rank = ((lowrank * total) / (m + n) as f64).floor().max(0.0) as usize;
    let rank = rank.min(m.min(n));
    let sparse = (total - (rank * (m + n)) as f64).max(0.0);
    Keep {
        sparsity: (1.0 - sparse / (m * n) as f64).clamp(0.0, 1.0),
        rank,
        values,
    }
}

/// One scored setting, for the report.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Trial {
    /// The setting.
    pub alloc: Allocation2,
    /// Calibration loss (mean NLL, nats) of the proxy-pruned model.
    pub loss: f64,
}

const MAX_SPARSITY: f64 = 0.99;

/// What each linear keeps under `a` (block order, 7 per block), shifted so the total
/// exact cost is within `limit`; each linear priced in its value type under `a.bits`
/// (the run's type `cost.dtype` as the base).
pub fn sparsities(
    shapes: &[(usize, usize)],
    n_blocks: usize,
    a: &Allocation2,
    cost: &CostModel,
    limit: u64,
) -> Vec<Keep> {
    let costs: Vec<CostModel> = (0..shapes.len())
        .map(|i| CostModel {
            dtype: a.values(i % 7, cost.dtype),
            ..*cost
        })
        .collect();
    let raw: Vec<f64> = (0..shapes.len())
        .map(|i| {
            let (b, k) = (i / 7, i % 7);
            let depth = if n_blocks > 1 {
                b as f64 / (n_blocks - 1) as f64
            } else {
                0.5
            };
            let mlp = if k >= 4 { 0.5 } else { -0.5 };
            a.slope * (depth - 0.5) + a.mlp_offset * mlp
        })
        .collect();
    let at = |shift: f64| -> Vec<Keep> {
        raw.iter()
            .zip(shapes)
            .zip(&costs)
            .map(|((r, &(m, n)), c)| {
                split(
                    m,
                    n,
                    (r + shift).clamp(0.0, MAX_SPARSITY),
                    a.lowrank,
                    c.dtype,
                )
            })
            .collect()
    };
    let total = |sp: &[Keep]| -> u64 {
        shapes
            .iter()
            .zip(sp)
            .zip(&costs)
            .map(|((&(m, n), k), c)| c.cost(m, n, k.rank, kept(m, n, k.sparsity)))
            .sum()
    };
    // Cost falls as the shift rises; find the smallest shift that fits.
    let (mut lo, mut hi) = (-1.0f64, 1.0f64);
    if total(&at(lo)) <= limit {
        return at(lo);
    }
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if total(&at(mid)) <= limit {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    at(hi)
}

/// `model` with every block linear pruned by Wanda's rule (per output row, by
/// `|W_ij|·‖X_j‖`) at its `keep` sparsity, plus, for a rank above 0, the truncated SVD
/// of what pruning removed in activation-scaled coordinates (`(W − S)·diag(‖X‖)`, the
/// directions that matter most for the outputs), unscaled; `norms` are the input norms
/// in block order.
pub fn wanda_pruned(
    model: &Model<DenseLinear>,
    norms: &[&[f32]],
    keep: &[Keep],
) -> Model<DenseLinear> {
    let mut m = model.clone();
    let mut ls: Vec<&mut DenseLinear> = m.blocks.iter_mut().flat_map(|b| b.linears_mut()).collect();
    ls.par_iter_mut()
        .enumerate()
        .for_each(|(i, l)| wanda_prune_linear(l, norms[i], &keep[i]));
    m
}

/// Block `b` pruned as [`wanda_pruned`] prunes it, `norms` and `keep` its seven
/// linears' (block order).
pub fn wanda_pruned_block(
    b: &Block<DenseLinear>,
    norms: &[&[f32]],
    keep: &[Keep],
) -> Block<DenseLinear> {
    let mut b = b.clone();
    let mut ls = b.linears_mut();
    ls.par_iter_mut()
        .enumerate()
        .for_each(|(i, l)| wanda_prune_linear(l, norms[i], &keep[i]));
    b
}

/// One linear of [`wanda_pruned`]: each row's lowest `|W|·‖x‖` set to zero, the kept
/// weights rounded for a quantized type, and a low-rank part fitted to what was
/// removed when `keep` has one.
fn wanda_prune_linear(l: &mut DenseLinear, norm: &[f32], keep: &Keep) {
    let (rows, cols) = (l.out_features, l.in_features);
    let prune = ((keep.sparsity * cols as f64).ceil() as usize).min(cols);
    let orig = (keep.rank > 0).then(|| l.weight.clone());
    let mut idx: Vec<usize> = Vec::with_capacity(cols);
    for r in 0..rows {
        let row = &mut l.weight[r * cols..(r + 1) * cols];
        idx.clear();
        idx.extend(0..cols);
        let score = |j: usize| row[j].abs() * norm[j];
        if prune > 0 && prune < cols {
            idx.select_nth_unstable_by(prune, |&a, &b| {
                score(a).total_cmp(&score(b)).then(a.cmp(&b))
            });
        }
        for &j in &idx[..prune] {
            row[j] = 0.0;
        }
    }
    // Quantized values: the kept weights rounded to nearest (the proxy of the GPTQ
    // the final pruning runs), so the loss sees what fewer bits cost.
    if keep.values.is_quantized() {
        let mask: Vec<bool> = l.weight.iter().map(|&x| x != 0.0).collect();
        // Round to nearest cannot fail for a quantized type.
        let _ = quantize_kept(
            &mut l.weight,
            Some(&mask),
            rows,
            cols,
            &[],
            keep.values,
            Quantizer::Rtn,
        );
    }
    if let Some(orig) = orig {
        let d: Vec<f32> = norm.iter().map(|&x| x.max(1e-6)).collect();
        let resid: Vec<f32> = (0..rows * cols)
            .map(|x| (orig[x] - l.weight[x]) * d[x % cols])
            .collect();
        if let Some((u, sigma, v)) = super::lowrank::truncated(&resid, rows, cols, keep.rank) {
            let k = sigma.len();
            if keep.values.is_quantized() {
                add_quantized_factors(&mut l.weight, &u, &sigma, &v, &d, keep.values);
            } else {
                for r in 0..rows {
                    for c in 0..cols {
                        let mut acc = 0f32;
                        for t in 0..k {
                            acc += u[r * k + t] * sigma[t] * v[c * k + t];
                        }
                        l.weight[r * cols + c] += acc / d[c];
                    }
                }
            }
        }
    }
}

/// Adds `U·Σ·Vᵀ` (unscaled by `d`) to the row-major `w` as the writer stores it with
/// quantized values: `A = √Σ·Vᵀ/d` (`k × cols`) and `B = U·√Σ` (`rows × k`), each row
/// rounded to nearest in `values`, so the loss sees what the factors' bits cost.
fn add_quantized_factors(
    w: &mut [f32],
    u: &[f32],
    sigma: &[f32],
    v: &[f32],
    d: &[f32],
    values: DType,
) {
    let (k, cols) = (sigma.len(), d.len());
    let rows = w.len() / cols.max(1);
    let mut a = vec![0f32; k * cols];
    let mut b = vec![0f32; rows * k];
    for (t, &s) in sigma.iter().enumerate() {
        let s = s.max(0.0).sqrt();
        for c in 0..cols {
            a[t * cols + c] = s * v[c * k + t] / d[c];
        }
        for r in 0..rows {
            b[r * k + t] = s * u[r * k + t];
        }
    }
    // Round to nearest cannot fail for a quantized type; on an error the factors stay
    // unrounded (the loss is then a little optimistic, never wrong in sign).
    let _ = quantize_kept(&mut a, None, k, cols, &[], values, Quantizer::Rtn);
    let _ = quantize_kept(&mut b, None, rows, k, &[], values, Quantizer::Rtn);
    for r in 0..rows {
        for t in 0..k {
            let br = b[r * k + t];
            for c in 0..cols {
                w[r * cols + c] += br * a[t * cols + c];
            }
        }
    }
}

/// Coordinate search over the slope, then the MLP offset, then the low-rank share
/// (unless `lowrank` fixes it), on small grids; `loss`
/// scores a setting. (A finer second round picked settings with a lower calibration
/// loss but a higher held-out perplexity: 29.95 against 29.60 at ratio 0.5. The grid
/// is as fine as the calibration data supports.) Returns the best setting and every trial.
pub fn search(
    lowrank: Option<f64>,
    choose_bits: bool,
    mut loss: impl FnMut(&Allocation2) -> Result<f64>,
) -> Result<(Allocation2, Vec<Trial>)> {
    let mut trials = Vec::new();
    let mut best = Allocation2 {
        lowrank: lowrank.unwrap_or(0.0),
        ..Allocation2::default()
    };
    let mut best_loss = loss(&best)?;
    trials.push(Trial {
        alloc: best,
        loss: best_loss,
    });
    type Set = fn(Allocation2, f64) -> Allocation2;
    // Does a low-rank part pay? Measured, not assumed (unless the caller fixed it).
    let shares: &[f64] = if lowrank.is_some() { &[] } else { &[0.1, 0.2] };
    // The value types first: they move the most bytes. The group size (finer or
    // not), then the bits plan (its grid is the plans' indices).
    let (finer, plans): (&[f64], &[f64]) = if choose_bits {
        (&[1.0], &[0.0, 1.0, 2.0, 3.0])
    } else {
        (&[], &[])
    };
    let coordinates: [(&[f64], Set); 5] = [
        (finer, |a, v| Allocation2 {
            finer_groups: v > 0.0,
            ..a
        }),
        (plans, |a, v| Allocation2 {
            bits: Bits::SEARCHED[v as usize],
            ..a
        }),
        (&[-0.2, -0.1, 0.1, 0.2], |a, v| Allocation2 {
            slope: v,
            ..a
        }),
        (&[-0.1, -0.05, 0.05, 0.1], |a, v| Allocation2 {
            mlp_offset: v,
            ..a
        }),
        (shares, |a, v| Allocation2 { lowrank: v, ..a }),
    ];
    for (values, set) in coordinates {
        let base = best;
        for &v in values {
            let a = set(base, v);
            let l = loss(&a)?;
            trials.push(Trial { alloc: a, loss: l });
            if l < best_loss {
                (best, best_loss) = (a, l);
            }
        }
    }
    Ok((best, trials))
}
