//! The paper's variant of CAP: stage 1 splits every linear by RPCA into `L + S`
//! (cached), stage 2 keeps singular directions and sparse entries under the budget,
//! by learned keep-probabilities (REINFORCE, then a global top-K) or by the same
//! fraction in every matrix (the threshold ablation).

use std::sync::atomic::{AtomicU64, Ordering};

use cap_device::factored::FactoredLinear;
use cap_device::model::{DenseLinear, Head, Model};
use cap_device::tensors::{compressible, named_linears_mut};

use super::calibration::calibration_loss;
use super::candidate::Candidate;
use super::error::{CompressError, Result, step_error};
use super::methods::{Allocation, Method, probability_scores};
use super::reinforce;
use super::run::Event;
use super::select::{Selection, global_top_k};
use super::strategy::{Context, Notes, Strategy, select_uniform};
use crate::rpca::cache::load_cached;
use crate::rpca::model::{DecomposeOptions, decompose_model};

/// The paper's variant with its allocation.
pub struct Paper {
    allocation: Allocation,
}

impl Paper {
    /// The paper's variant allocating by `allocation`.
    pub fn new(allocation: Allocation) -> Self {
        Paper { allocation }
    }
}

impl Strategy for Paper {
    fn candidates(&mut self, cx: &Context<'_>, _: &mut Notes) -> Result<Vec<Candidate>> {
        let opts = cx.opts;
        (cx.on_event)(Event::Stage {
            name: "stage 1: RPCA",
            total: cx.linears.len() as u64,
        });
        let done = AtomicU64::new(0);
        let dopts = DecomposeOptions {
            settings: opts.rpca,
            threads: opts.threads,
            shard: None,
            only: None,
            stop_after: None,
            scales: None,
        };
        decompose_model(cx.model, &opts.cache_dir, &dopts, &|ev| {
            if let crate::rpca::model::Event::Done { .. } = ev {
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                (cx.on_event)(Event::Progress(d));
            }
        })
        .map_err(step_error)?;
        cx.linears
            .iter()
            .map(|(n, l)| {
                let (w, m, k) = (&l.weight, l.out_features, l.in_features);
                load_cached(&opts.cache_dir, n, w, m, k, &opts.rpca, None)
                    .map(Candidate::from_decomposition)
                    .ok_or_else(|| {
                        CompressError::Internal(format!(
                            "{n}: no cached decomposition after stage 1"
                        ))
                    })
            })
            .collect()
    }

    fn select_within(
        &mut self,
        cx: &Context<'_>,
        cands: &[Candidate],
        notes: &mut Notes,
    ) -> Result<Vec<Selection>> {
        match self.allocation {
            Allocation::Threshold => Ok(select_uniform(cx, cands, Method::Cap, &[], notes)),
            Allocation::Reinforce => reinforce_select(cx, cands, notes),
        }
    }

    fn allocation(&self) -> Option<Allocation> {
        Some(self.allocation)
    }
}

/// Learned keep-probabilities (REINFORCE on the calibration loss of the model with the
/// sampled items kept), then the best-scored items of the whole model.
fn reinforce_select(
    cx: &Context<'_>,
    cands: &[Candidate],
    notes: &mut Notes,
) -> Result<Vec<Selection>> {
    let opts = cx.opts;
    (cx.on_event)(Event::Stage {
        name: "stage 2: REINFORCE",
        total: opts.reinforce.steps as u64,
    });
    let cref: Vec<&Candidate> = cands.iter().collect();
    let mut skel = factored_skeleton(cx.model);
    // The candidates are the compressible linears in table order; each mask goes to the
    // layer of the same name, found by role and block (never by position alone).
    let which = compressible(&cx.model.config);
    let names_match =
        which.len() == cands.len() && which.iter().zip(cx.linears).all(|(t, (n, _))| &t.name == n);
    if !names_match {
        return Err(CompressError::Internal(format!(
            "{} candidates do not match the model's {} compressible linears",
            cands.len(),
            which.len()
        )));
    }
    let windows = cx.windows;
    let k = opts.step_samples.clamp(1, windows.len());
    let mut step = 0usize;
    let (policy, log) = reinforce::run(
        &cref,
        cx.cost,
        cx.limit,
        &opts.reinforce,
        |z| {
            let slots = named_linears_mut(&mut skel, &which)
                .map_err(|n| CompressError::Internal(format!("the skeleton has no linear {n}")))?;
            for ((_, l), (c, s)) in slots.into_iter().zip(cref.iter().zip(z)) {
                *l = c.factored(s);
            }
            let ws: Vec<&[u32]> = (0..k)
                .map(|i| windows[(step * k + i) % windows.len()])
                .collect();
            step += 1;
            calibration_loss(&skel, &ws, opts.threads)
        },
        |s| (cx.on_event)(Event::Step(s)),
    )?;
    notes.steps = log;
    let scores: Vec<_> = cref
        .iter()
        .zip(&policy.p)
        .map(|(c, (ps, pe))| probability_scores(c, ps, pe))
        .collect();
    Ok(global_top_k(&cref, &scores, cx.cost, cx.limit))
}

/// The model with every block linear as a [`FactoredLinear`] (dense to start with),
/// sharing nothing with `model`: the search swaps its linears for masked ones.
fn factored_skeleton(model: &Model<DenseLinear>) -> Model<FactoredLinear> {
    let f = |l: &DenseLinear| {
        FactoredLinear::dense(l.weight.clone(), l.out_features, l.in_features)
            .unwrap_or_else(|| unreachable!("a validated model has consistent linears"))
    };
    Model {
        config: model.config.clone(),
        embed: model.embed.clone(),
        blocks: model
            .blocks
            .iter()
            .map(|b| b.map_linears(|_, l| f(l)))
            .collect(),
        norm: model.norm.clone(),
        head: match &model.head {
            Head::Tied => Head::Tied,
            Head::Separate(h) => Head::Separate(f(h)),
        },
    }
}
