//! The one-shot baselines: `magnitude` and `wanda` offer every entry of `W` (kept
//! dense), `svd` its singular directions; each keeps the same fraction of every group
//! of items under the budget.

use std::collections::BTreeMap;

use super::candidate::Candidate;
use super::error::{Result, step_error};
use super::methods::{Method, sparse_candidate, svd_candidates};
use super::run::Event;
use super::select::Selection;
use super::sparsegpt::masked_candidate;
use super::strategy::{Context, Notes, Strategy, keep_all, select_uniform};

/// `magnitude`, `wanda` or `svd`.
pub struct OneShot {
    method: Method,
    /// Input-channel norms per linear name (`wanda`).
    in_norms: Option<BTreeMap<String, Vec<f32>>>,
}

impl OneShot {
    /// The baseline `method` (one of `magnitude`, `wanda`, `svd`).
    pub fn new(method: Method) -> Self {
        OneShot {
            method,
            in_norms: None,
        }
    }
}

impl Strategy for OneShot {
    fn candidates(&mut self, cx: &Context<'_>, notes: &mut Notes) -> Result<Vec<Candidate>> {
        if self.method == Method::Wanda {
            (cx.on_event)(Event::Stage {
                name: "input norms",
                total: cx.windows.len() as u64,
            });
            let n =
                crate::calib::input_rms_windows(cx.model, cx.windows, cx.opts.threads, |d, _| {
                    (cx.on_event)(Event::Progress(d as u64))
                })
                .map_err(step_error)?;
            notes.lap("input norms");
            self.in_norms = Some(n);
        }
        if self.method == Method::Svd {
            (cx.on_event)(Event::Stage {
                name: "svd",
                total: 0,
            });
            let ws: Vec<(&[f32], usize, usize)> = cx
                .linears
                .iter()
                .map(|(_, l)| (l.weight.as_slice(), l.out_features, l.in_features))
                .collect();
            return svd_candidates(&ws);
        }
        if let Some(p) = cx.opts.pattern {
            // N:M: each row's groups keep their N largest scores (|W|, or Wanda's
            // |W|·‖x‖), the kept weights as they are.
            return Ok(cx
                .linears
                .iter()
                .map(|(name, l)| {
                    let (rows, cols) = (l.out_features, l.in_features);
                    let norm = self.in_norms.as_ref().and_then(|m| m.get(name));
                    let w = &l.weight;
                    let mask = p.mask(rows, cols, |r, c| {
                        let s = f64::from(w[r * cols + c].abs());
                        norm.map_or(s, |n| s * f64::from(n[c]))
                    });
                    let kept: Vec<f32> = w
                        .iter()
                        .zip(&mask)
                        .map(|(&x, &k)| if k { x } else { 0.0 })
                        .collect();
                    masked_candidate(&kept, &mask, rows, cols)
                })
                .collect());
        }
        Ok(cx
            .linears
            .iter()
            .map(|(_, l)| sparse_candidate(&l.weight, l.out_features, l.in_features))
            .collect())
    }

    fn select_within(
        &mut self,
        cx: &Context<'_>,
        cands: &[Candidate],
        notes: &mut Notes,
    ) -> Result<Vec<Selection>> {
        if cx.opts.pattern.is_some() {
            // The pattern is the selection.
            return Ok(keep_all(cands));
        }
        let norms: Vec<Option<&[f32]>> = match &self.in_norms {
            Some(m) => cx
                .linears
                .iter()
                .map(|(n, _)| m.get(n).map(|v| v.as_slice()))
                .collect(),
            None => vec![],
        };
        Ok(select_uniform(cx, cands, self.method, &norms, notes))
    }
}
