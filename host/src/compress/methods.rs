//! The methods' names and settings, what the one-shot baselines offer to keep (a
//! [`Candidate`] per linear) and how they rank those items.
//!
//! * `cap`: RPCA's `L + S` (stage 1); items are the singular directions of `L` and the
//!   non-zeros of `S`.
//! * `magnitude`: `W` itself (kept dense) with every entry an item, ranked by `|W_ij|`
//!   within the whole matrix.
//! * `wanda`: the same items ranked by `|W_ij|·‖X_j‖₂` within each output row (Sun et
//!   al., 2023), with `‖X_j‖` from the calibration inputs of the dense model.
//! * `svd`: `W`'s exact SVD; items are its singular directions, ranked by `σ_i`.
//! * `sparsegpt`: the kept entries of SparseGPT's pruned `W` (see [`super::sparsegpt`]);
//!   the pruning itself decides what is kept.

use super::error::{CompressError, Result};
use faer::{MatRef, Par};
use rayon::prelude::*;
use serde::Serialize;

use super::candidate::{Candidate, Factors};
use super::select::{Group, ItemKind, Scores, by_decreasing};
use crate::rpca::svd::thin_svd;

/// A compression method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// CAP: RPCA split `W = L + S`, then a global allocation of σ's and entries.
    Cap,
    /// Magnitude pruning, uniform sparsity per matrix.
    Magnitude,
    /// Wanda: `|W|·‖X‖` per output row, uniform sparsity per row.
    Wanda,
    /// Truncated SVD (low rank only), uniform rank fraction per matrix.
    Svd,
    /// SparseGPT: OBS pruning with error compensation, uniform sparsity, block by block.
    Sparsegpt,
    /// ADMM pruning with a gradual mask and an exact masked refit, block by block.
    Admm,
}

impl Method {
    /// The name written into the file's compression record.
    pub fn name(self) -> &'static str {
        match self {
            Method::Cap => "cap",
            Method::Magnitude => "magnitude",
            Method::Wanda => "wanda",
            Method::Svd => "svd",
            Method::Sparsegpt => "sparsegpt",
            Method::Admm => "admm",
        }
    }
}

/// Which CAP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// cap's method: the budget allocated across layers from measured calibration
    /// losses, each layer pruned by ADMM with an exact refit of what it keeps.
    #[default]
    Cap,
    /// The paper as described: RPCA `L + S`, then `--allocation`.
    Paper,
}

/// How the paper's variant allocates the budget among its items.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Allocation {
    /// Learned keep-probabilities (REINFORCE), then a global top-K.
    Reinforce,
    /// The same fraction of the largest σ's and |S| entries in every matrix (ablation).
    Threshold,
}

/// `W` as a candidate with every entry an item (kept dense, never turned into CSR).
pub fn sparse_candidate(w: &[f32], rows: usize, cols: usize) -> Candidate {
    Candidate::dense(w.to_vec(), rows, cols)
}

/// `W`'s exact thin SVD as a candidate with no sparse part.
pub fn svd_candidate(w: &[f32], rows: usize, cols: usize) -> Result<Candidate> {
    let a = MatRef::from_row_major_slice(w, rows, cols);
    let svd = thin_svd(a, Par::Seq)
        .ok_or_else(|| CompressError::Numerical("SVD did not converge".into()))?;
    let k = svd.s.len();
    let u = (0..rows * k).map(|x| svd.u[(x / k, x % k)]).collect();
    let v = (0..cols * k).map(|x| svd.v[(x / k, x % k)]).collect();
    Ok(Candidate::low_rank(
        Factors {
            u,
            sigma: svd.s,
            v,
            codes: None,
        },
        rows,
        cols,
    ))
}

/// SVD candidates of many matrices, in parallel.
pub fn svd_candidates(ws: &[(&[f32], usize, usize)]) -> Result<Vec<Candidate>> {
    ws.par_iter()
        .map(|&(w, r, c)| svd_candidate(w, r, c))
        .collect()
}

/// The importance groups [`super::select::uniform`] keeps prefixes of, for a one-shot
/// method or the threshold ablation. `in_norm` (input-channel norms) is needed by
/// `wanda` only.
pub fn uniform_groups(method: Method, d: &Candidate, in_norm: Option<&[f32]>) -> Vec<Group> {
    let sigma = || Group {
        kind: ItemKind::Sigma,
        order: (0..d.rank() as u32).collect(), // σ is already non-increasing
    };
    let values = d.entry_values();
    let all_entries = || {
        by_decreasing(
            |i| values[i as usize].abs(),
            (0..values.len() as u32).collect(),
        )
    };
    match method {
        Method::Svd => vec![sigma()],
        Method::Magnitude | Method::Sparsegpt | Method::Admm => vec![Group {
            kind: ItemKind::Entry,
            order: all_entries(),
        }],
        Method::Cap => vec![
            sigma(),
            Group {
                kind: ItemKind::Entry,
                order: all_entries(),
            },
        ],
        Method::Wanda => {
            let norm = in_norm.unwrap_or(&[]);
            (0..d.rows)
                .map(|r| {
                    let range = d.row_entries(r);
                    let (a, b) = (range.start as u32, range.end as u32);
                    let score = |i: u32| {
                        let j = d.entry_col(i as usize);
                        values[i as usize].abs() * norm.get(j).copied().unwrap_or(1.0)
                    };
                    Group {
                        kind: ItemKind::Entry,
                        order: by_decreasing(score, (a..b).collect()),
                    }
                })
                .collect()
        }
    }
}

/// Scores for [`super::select::global_top_k`] from keep-probabilities, ties broken by
/// magnitude (`σ_i` or `|S_ij|`).
pub fn probability_scores(d: &Candidate, p_sigma: &[f32], p_entries: &[f32]) -> Scores {
    Scores {
        sigma: p_sigma
            .iter()
            .zip(d.sigma())
            .map(|(&p, &s)| (p, s.abs()))
            .collect(),
        entries: p_entries
            .iter()
            .zip(d.entry_values())
            .map(|(&p, &v)| (p, v.abs()))
            .collect(),
    }
}
