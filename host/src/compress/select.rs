//! Turning importance scores into kept sets under an exact budget.
//!
//! Every linear offers *items*: its singular directions (`σ_i` of `L`) and its sparse
//! entries (the non-zeros of `S`). A [`Selection`] says which are kept. Two rules pick
//! them: [`uniform`] keeps the same fraction of every group of items (the threshold
//! ablation and the one-shot baselines), [`global_top_k`] keeps the best-scored items
//! of the whole model (the final step of the learned allocation). Both meet the budget
//! under the exact cost of [`CostModel`], so the written file never exceeds it.

use rayon::prelude::*;

use super::budget::CostModel;
use super::candidate::Candidate;

/// The kept items of one linear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// One flag per singular value of the candidate's `L`.
    pub sigma: Vec<bool>,
    /// One flag per stored entry of the candidate's `S` (CSR order).
    pub entries: Vec<bool>,
}

impl Selection {
    /// Every item kept.
    pub fn all(d: &Candidate) -> Self {
        Selection {
            sigma: vec![true; d.rank()],
            entries: vec![true; d.entries()],
        }
    }
    /// Nothing kept.
    pub fn empty(d: &Candidate) -> Self {
        Selection {
            sigma: vec![false; d.rank()],
            entries: vec![false; d.entries()],
        }
    }
    /// Kept singular values.
    pub fn rank(&self) -> usize {
        self.sigma.iter().filter(|&&k| k).count()
    }
    /// Kept sparse entries.
    pub fn nnz(&self) -> u64 {
        self.entries.iter().filter(|&&k| k).count() as u64
    }
}

/// Exact cost of keeping `sel` of `d`.
pub fn selection_cost(cost: &CostModel, d: &Candidate, sel: &Selection) -> u64 {
    d.cost_model(cost)
        .cost(d.rows, d.cols, sel.rank(), sel.nnz())
}

/// Which kind of item a group holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// Singular directions of `L`.
    Sigma,
    /// Entries of `S`.
    Entry,
}

/// Items of one kind, most important first; [`uniform`] keeps a prefix of each group.
#[derive(Clone, Debug)]
pub struct Group {
    /// What the indices refer to.
    pub kind: ItemKind,
    /// Item indices in decreasing importance.
    pub order: Vec<u32>,
}

/// Sorts `idx` by decreasing `score` (ties: lower index first, so results are stable).
pub fn by_decreasing(score: impl Fn(u32) -> f32, mut idx: Vec<u32>) -> Vec<u32> {
    idx.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    idx
}

fn kept_counts(groups: &[Group], q: f64) -> (usize, u64) {
    let (mut rank, mut nnz) = (0usize, 0u64);
    for g in groups {
        let k = (q * g.order.len() as f64).floor() as usize;
        match g.kind {
            ItemKind::Sigma => rank += k,
            ItemKind::Entry => nnz += k as u64,
        }
    }
    (rank, nnz)
}

/// Keeps the same fraction `q` of every group of every linear (the first
/// `⌊q·len⌋` items of each), with the largest `q` whose exact total cost is within
/// `limit`. Returns the selections and `q`.
pub fn uniform(
    cands: &[&Candidate],
    groups: &[Vec<Group>],
    cost: &CostModel,
    limit: u64,
) -> (Vec<Selection>, f64) {
    let total = |q: f64| -> u64 {
        cands
            .iter()
            .zip(groups)
            .map(|(d, g)| {
                let (r, n) = kept_counts(g, q);
                cost.cost(d.rows, d.cols, r, n)
            })
            .sum()
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    if total(1.0) <= limit {
        lo = 1.0;
    } else {
        // 50 halvings resolve q far below one item of the largest group (2^-50 ≪ 1e-8).
        for _ in 0..50 {
            let mid = 0.5 * (lo + hi);
            if total(mid) <= limit {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    let sels = cands
        .iter()
        .zip(groups)
        .map(|(d, gs)| {
            let mut s = Selection::empty(d);
            for g in gs {
                let k = (lo * g.order.len() as f64).floor() as usize;
                let flags = match g.kind {
                    ItemKind::Sigma => &mut s.sigma,
                    ItemKind::Entry => &mut s.entries,
                };
                for &i in &g.order[..k] {
                    flags[i as usize] = true;
                }
            }
            s
        })
        .collect();
    (sels, lo)
}

/// Scores of one linear's items for [`global_top_k`]: `(score, tie-break)` for each
/// singular value and each sparse entry. Both must be ≥ 0 (NaN counts as 0).
pub struct Scores {
    /// Per singular value.
    pub sigma: Vec<(f32, f32)>,
    /// Per sparse entry.
    pub entries: Vec<(f32, f32)>,
}

/// Orders `(score, tie-break)` pairs of non-negative floats as one integer.
fn key((s, t): (f32, f32)) -> u64 {
    let bits = |x: f32| if x > 0.0 { x.to_bits() } else { 0 };
    (u64::from(bits(s)) << 32) | u64::from(bits(t))
}

/// Keeps every item whose `(score, tie-break)` is at least a global threshold, the
/// lowest threshold whose exact total cost is within `limit`.
pub fn global_top_k(
    cands: &[&Candidate],
    scores: &[Scores],
    cost: &CostModel,
    limit: u64,
) -> Vec<Selection> {
    let keys: Vec<(Vec<u64>, Vec<u64>)> = scores
        .par_iter()
        .map(|s| {
            (
                s.sigma.iter().map(|&p| key(p)).collect(),
                s.entries.iter().map(|&p| key(p)).collect(),
            )
        })
        .collect();
    let total = |tau: u64| -> u64 {
        cands
            .par_iter()
            .zip(keys.par_iter())
            .map(|(d, (ks, ke))| {
                let r = ks.iter().filter(|&&k| k >= tau).count();
                let n = ke.iter().filter(|&&k| k >= tau).count() as u64;
                cost.cost(d.rows, d.cols, r, n)
            })
            .sum()
    };
    // The smallest feasible threshold: cost falls as tau rises; tau = u64::MAX keeps at
    // most the items of the largest key, tau above everything keeps nothing.
    let (mut lo, mut hi) = (0u64, u64::MAX);
    if total(0) > limit {
        if total(u64::MAX) > limit {
            lo = u64::MAX;
            hi = u64::MAX;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if total(mid) <= limit {
                hi = mid;
            } else {
                lo = mid;
            }
        }
    } else {
        hi = 0;
    }
    let tau = hi;
    // If even tau = MAX overflows the budget (only possible for a budget below the
    // emptiest linears, which `resolve` rejects), keep nothing rather than overflow.
    let keep_nothing = total(tau) > limit;
    cands
        .iter()
        .zip(&keys)
        .map(|(d, (ks, ke))| {
            if keep_nothing {
                return Selection::empty(d);
            }
            Selection {
                sigma: ks.iter().map(|&k| k >= tau).collect(),
                entries: ke.iter().map(|&k| k >= tau).collect(),
            }
        })
        .collect()
}
