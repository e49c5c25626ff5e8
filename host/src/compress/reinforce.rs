//! Stage 2 as the CAP paper describes it: one Bernoulli variable per item (singular
//! value of `L`, non-zero of `S`), keep-probabilities learned with REINFORCE on the
//! calibration loss of the model with sampled masks, a moving-average loss baseline,
//! and a projection of the probabilities back onto the budget after every step.
//!
//! The pieces are separate so they can be swapped: [`Policy::sample`] (what is
//! sampled), the `loss` closure of [`run`] (what is minimised), and
//! [`Policy::score_function_step`] (how the gradient is estimated).

use super::error::Result;
use cap_device::rng::SplitMix64;
use rayon::prelude::*;
use serde::Serialize;

use super::budget::CostModel;
use super::candidate::Candidate;
use super::select::Selection;

/// Settings of the REINFORCE search.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ReinforceOptions {
    /// Policy-gradient steps (one sampled mask each).
    pub steps: usize,
    /// Step size on the probabilities.
    pub lr: f64,
    /// Weight of the old value in the moving-average baseline.
    pub baseline_momentum: f64,
    /// Seed of the mask sampler.
    pub seed: u64,
}

impl Default for ReinforceOptions {
    fn default() -> Self {
        ReinforceOptions {
            steps: 16,
            lr: 0.002,
            baseline_momentum: 0.9,
            seed: 0,
        }
    }
}

/// One step of the search, for the log and the report.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepLog {
    /// Step number (from 1).
    pub step: usize,
    /// Calibration loss of the sampled model (mean NLL, nats).
    pub loss: f64,
    /// Baseline the loss was compared with.
    pub baseline: f64,
    /// Expected cost of the probabilities after the projection.
    pub expected_cost: f64,
    /// Mean keep-probability after the step.
    pub mean_p: f64,
    /// Items kept in the sample.
    pub sampled_items: u64,
}

/// Keep-probabilities of every item of every linear, with the linear cost model of
/// the relaxed budget.
pub struct Policy {
    /// Per linear: probabilities of its singular values, then of its entries.
    pub p: Vec<(Vec<f32>, Vec<f32>)>,
    /// Per linear: cost per singular value and per entry.
    costs: Vec<(f64, f64)>,
    /// Budget left for the items once every linear's fixed cost is paid.
    budget: f64,
}

/// Smallest `p·(1−p)` the score function divides by: keeps a step finite for
/// probabilities at the box's edges (where the item is then never resampled).
const MIN_VARIANCE: f32 = 1e-2;

impl Policy {
    /// Every item at the same probability, the largest whose expected cost fits
    /// `limit` (at most 1).
    pub fn uniform(cands: &[&Candidate], cost: &CostModel, limit: u64) -> Policy {
        let costs: Vec<(f64, f64)> = cands
            .iter()
            .map(|d| {
                let (cs, ce, _) = cost.marginal(d.rows, d.cols);
                (cs, ce)
            })
            .collect();
        let fixed: u64 = cands.iter().map(|d| cost.marginal(d.rows, d.cols).2).sum();
        let budget = limit.saturating_sub(fixed) as f64;
        let full: f64 = cands
            .iter()
            .zip(&costs)
            .map(|(d, (cs, ce))| d.rank() as f64 * cs + d.entries() as f64 * ce)
            .sum();
        let p0 = if full > 0.0 {
            (budget / full).min(1.0) as f32
        } else {
            1.0
        };
        Policy {
            p: cands
                .iter()
                .map(|d| (vec![p0; d.rank()], vec![p0; d.entries()]))
                .collect(),
            costs,
            budget,
        }
    }

    /// Expected cost of the items under the current probabilities.
    pub fn expected_cost(&self) -> f64 {
        self.p
            .par_iter()
            .zip(&self.costs)
            .map(|((ps, pe), (cs, ce))| {
                ps.iter().map(|&p| f64::from(p)).sum::<f64>() * cs
                    + pe.iter().map(|&p| f64::from(p)).sum::<f64>() * ce
            })
            .sum()
    }

    /// Mean probability over all items.
    pub fn mean_p(&self) -> f64 {
        let (s, n) = self
            .p
            .iter()
            .flat_map(|(a, b)| [a, b])
            .fold((0.0, 0usize), |(s, n), v| {
                (
                    s + v.iter().map(|&p| f64::from(p)).sum::<f64>(),
                    n + v.len(),
                )
            });
        s / n.max(1) as f64
    }

    /// Euclidean projection onto `{0 ≤ p ≤ 1, Σ c_i p_i ≤ budget}`:
    /// `p_i ← clip(p_i − μ c_i, 0, 1)` with the smallest `μ ≥ 0` that fits, found by
    /// bisection on `μ`.
    pub fn project(&mut self) {
        let cost_at = |mu: f64, p: &[(Vec<f32>, Vec<f32>)]| -> f64 {
            p.par_iter()
                .zip(&self.costs)
                .map(|((ps, pe), &(cs, ce))| {
                    let f = |v: &[f32], c: f64| -> f64 {
                        v.iter()
                            .map(|&x| (f64::from(x) - mu * c).clamp(0.0, 1.0))
                            .sum::<f64>()
                            * c
                    };
                    f(ps, cs) + f(pe, ce)
                })
                .sum()
        };
        for (ps, pe) in &mut self.p {
            ps.iter_mut()
                .chain(pe.iter_mut())
                .for_each(|x| *x = x.clamp(0.0, 1.0));
        }
        if cost_at(0.0, &self.p) <= self.budget {
            return;
        }
        let min_c = self
            .costs
            .iter()
            .flat_map(|&(a, b)| [a, b])
            .fold(f64::INFINITY, f64::min);
        let (mut lo, mut hi) = (0.0f64, 1.0 / min_c.max(f64::MIN_POSITIVE));
        // 60 halvings: μ to double precision, far below one item's probability step.
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if cost_at(mid, &self.p) <= self.budget {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let mu = hi;
        let costs = &self.costs;
        self.p
            .par_iter_mut()
            .zip(costs)
            .for_each(|((ps, pe), &(cs, ce))| {
                for x in ps.iter_mut() {
                    *x = (f64::from(*x) - mu * cs).clamp(0.0, 1.0) as f32;
                }
                for x in pe.iter_mut() {
                    *x = (f64::from(*x) - mu * ce).clamp(0.0, 1.0) as f32;
                }
            });
    }

    /// Draws one mask: item `i` kept with probability `p_i`, independently.
    pub fn sample(&self, seed: u64, step: usize) -> Vec<Selection> {
        self.p
            .par_iter()
            .enumerate()
            .map(|(l, (ps, pe))| {
                // One stream per (step, linear): sampling is parallel and reproducible.
                let mut rng = SplitMix64::new(
                    seed ^ (step as u64).wrapping_mul(0xA24B_AED4_963E_E407)
                        ^ (l as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25),
                );
                Selection {
                    sigma: ps.iter().map(|&p| rng.uniform_f32() < p).collect(),
                    entries: pe.iter().map(|&p| rng.uniform_f32() < p).collect(),
                }
            })
            .collect()
    }

    /// REINFORCE's score-function step for one sample `z` with advantage
    /// `loss − baseline`: `∂ log P(z)/∂p_i = (z_i − p_i)/(p_i(1 − p_i))`, so
    /// `p_i ← p_i − lr·advantage·(z_i − p_i)/(p_i(1 − p_i))` (clipped to [0, 1]).
    pub fn score_function_step(&mut self, z: &[Selection], advantage: f64, lr: f64) {
        let g = (lr * advantage) as f32;
        self.p.par_iter_mut().zip(z).for_each(|((ps, pe), s)| {
            let upd = |p: &mut f32, z: bool| {
                let zf = if z { 1.0 } else { 0.0 };
                let var = (*p * (1.0 - *p)).max(MIN_VARIANCE);
                *p = (*p - g * (zf - *p) / var).clamp(0.0, 1.0);
            };
            ps.iter_mut().zip(&s.sigma).for_each(|(p, &z)| upd(p, z));
            pe.iter_mut().zip(&s.entries).for_each(|(p, &z)| upd(p, z));
        });
    }
}

/// Runs the search: `loss(mask)` is the calibration loss of the model with only the
/// masked items kept; `on_step` sees every step. Returns the final probabilities and
/// the log.
pub fn run(
    cands: &[&Candidate],
    cost: &CostModel,
    limit: u64,
    opts: &ReinforceOptions,
    mut loss: impl FnMut(&[Selection]) -> Result<f64>,
    mut on_step: impl FnMut(&StepLog),
) -> Result<(Policy, Vec<StepLog>)> {
    let mut policy = Policy::uniform(cands, cost, limit);
    policy.project();
    let mut baseline: Option<f64> = None;
    let mut log = Vec::with_capacity(opts.steps);
    for step in 1..=opts.steps {
        let z = policy.sample(opts.seed, step);
        let sampled_items = z.iter().map(|s| s.rank() as u64 + s.nnz()).sum();
        let l = loss(&z)?;
        let b = *baseline.get_or_insert(l);
        policy.score_function_step(&z, l - b, opts.lr);
        policy.project();
        baseline = Some(opts.baseline_momentum * b + (1.0 - opts.baseline_momentum) * l);
        let entry = StepLog {
            step,
            loss: l,
            baseline: b,
            expected_cost: policy.expected_cost(),
            mean_p: policy.mean_p(),
            sampled_items,
        };
        on_step(&entry);
        log.push(entry);
    }
    Ok((policy, log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::budget::Accounting;
    use crate::compress::methods::sparse_candidate;
    use cap_format::DType;

    fn params() -> CostModel {
        CostModel {
            accounting: Accounting::Params,
            dtype: DType::F16,
        }
    }

    /// The projection lands on the budget (within the bisection's precision) and is
    /// the closed form `clip(p − μc)` for the μ it finds: with equal costs it subtracts
    /// the same amount from every unclipped probability.
    #[test]
    fn projection_meets_the_budget_and_shifts_uniformly() {
        let d = sparse_candidate(&[1.0; 12], 3, 4);
        let mut pol = Policy::uniform(&[&d], &params(), 12);
        pol.p[0].1 = vec![0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 1.0, 1.0];
        pol.budget = 3.0;
        pol.project();
        let p = &pol.p[0].1;
        let sum: f64 = p.iter().map(|&x| f64::from(x)).sum();
        assert!((sum - 3.0).abs() < 1e-5, "{sum}");
        // Σ max(p − μ, 0) = 3: for μ in [0.3, 0.4) the eight terms above μ sum to
        // 5.9 − 8μ, so μ = 0.3625.
        let mu = 1.0 - p[10];
        assert!((mu - 0.3625).abs() < 1e-6, "{mu}");
        for (orig, new) in [
            0.9f32, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 1.0, 1.0,
        ]
        .iter()
        .zip(p)
        {
            let want = (orig - mu).max(0.0);
            assert!((want - new).abs() < 1e-6, "{orig} → {new}, μ {mu}");
        }
    }

    /// The score-function step moves a probability towards a sample with negative
    /// advantage and away from one with positive advantage, by exactly
    /// `lr·|A|·|z − p|/(p(1 − p))`.
    #[test]
    fn score_function_step_has_the_closed_form() {
        let d = sparse_candidate(&[1.0; 2], 1, 2);
        let mut pol = Policy::uniform(&[&d], &params(), 2);
        pol.p[0].1 = vec![0.5, 0.5];
        let z = [Selection {
            sigma: vec![],
            entries: vec![true, false],
        }];
        pol.score_function_step(&z, -1.0, 0.1);
        // (1 − 0.5)/0.25 = 2 → +0.2; (0 − 0.5)/0.25 = −2 → −0.2.
        assert!((pol.p[0].1[0] - 0.7).abs() < 1e-6);
        assert!((pol.p[0].1[1] - 0.3).abs() < 1e-6);
    }

    /// Sampling is reproducible for a seed and keeps about `p` of the items.
    #[test]
    fn sampling_is_seeded_and_unbiased() {
        let d = sparse_candidate(&vec![1.0; 20_000], 100, 200);
        let mut pol = Policy::uniform(&[&d], &params(), 20_000);
        pol.p[0].1.iter_mut().for_each(|p| *p = 0.3);
        let a = pol.sample(7, 1);
        assert_eq!(a, pol.sample(7, 1));
        assert_ne!(a, pol.sample(7, 2));
        // Binomial(20000, 0.3): sd ≈ 65; 5 sd = 325.
        let k = a[0].nnz() as f64;
        assert!((k - 6000.0).abs() < 325.0, "{k}");
    }
}
