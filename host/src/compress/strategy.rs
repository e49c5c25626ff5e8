//! Methods behind one trait: each offers [`Candidate`]s (stage "candidates"), then
//! chooses which of their items to keep under the budget (stage "select").
//!
//! * [`super::oneshot::OneShot`]: `magnitude`, `wanda`, `svd`.
//! * [`super::pruned::Pruned`]: `sparsegpt`, `admm` and cap's own method (a learned
//!   allocation, ADMM with an exact refit, an optional low-rank part).
//! * [`super::paper::Paper`]: the paper's variant (RPCA, then REINFORCE or threshold).

use std::time::Instant;

use cap_device::model::{DenseLinear, Model};

use super::allocate::{Allocation2, Trial};
use super::budget::CostModel;
use super::candidate::Candidate;
use super::error::Result;
use super::methods::{Allocation, Method, Variant, uniform_groups};
use super::oneshot::OneShot;
use super::paper::Paper;
use super::pruned::Pruned;
use super::reinforce::StepLog;
use super::run::{CompressOptions, Event};
use super::select::{Selection, selection_cost, uniform};
use super::source::BlockSource;

/// What a method sees: the model, its block linears, the calibration windows and the
/// budget.
pub struct Context<'a> {
    /// The source model.
    pub model: &'a Model<DenseLinear>,
    /// Its block linears with their file names, in file order. Streamed
    /// (`--stream`), `model` is the skeleton and these linears have their shapes but
    /// no weights: the methods that stream read blocks from `source`.
    pub linears: &'a [(String, &'a DenseLinear)],
    /// The blocks, one at a time: `model` itself, or the checkpoint read block by
    /// block.
    pub source: &'a dyn BlockSource,
    /// The runs of blocks to compress (all of them; streamed, those of the shard the
    /// block cache lacks). Each run starts from the source model's outputs before it.
    pub blocks: &'a [std::ops::Range<usize>],
    /// Where a streamed run sends each block's candidates as soon as they are made
    /// (`None`: [`Strategy::candidates`] returns them all).
    pub sink: Option<&'a BlockSink<'a>>,
    /// Calibration sequences.
    pub windows: &'a [&'a [u32]],
    /// The cost of a linear's kept items.
    pub cost: &'a CostModel,
    /// The limit on the sum of those costs.
    pub limit: u64,
    /// The embedding types the allocation may choose from with the limit each
    /// leaves the linears; the first is `opts.dtype` with `limit`. More than one only
    /// under `opts.auto_embed`.
    pub embeds: &'a [(cap_format::DType, u64)],
    /// All options (seeds, threads, method settings).
    pub opts: &'a CompressOptions,
    /// Progress.
    pub on_event: &'a (dyn Fn(Event<'_>) + Sync),
}

/// Takes block `b`'s seven candidates (block order) in a streamed run.
pub type BlockSink<'a> = dyn Fn(usize, Vec<Candidate>) -> Result<()> + Sync + 'a;

/// What the stages record for the report besides their results.
pub struct Notes {
    /// The REINFORCE log (empty for other methods).
    pub steps: Vec<StepLog>,
    /// Fraction kept by the uniform rule (threshold and the one-shot baselines).
    pub uniform_fraction: Option<f64>,
    /// cap's learned allocation and the settings it tried.
    pub allocation_search: Option<(Allocation2, Vec<Trial>)>,
    /// Seconds per stage, in order.
    pub seconds: Vec<(String, f64)>,
    /// Which of [`Context::embeds`] the allocation chose (`None`: the first), with
    /// each one's best calibration loss.
    pub embed_choice: Option<(usize, Vec<f64>)>,
    /// Block reconstruction's steps, block by block (empty without `--reconstruct`).
    pub reconstruction: Vec<super::reconstruct::StepLog>,
    /// `--lowrank-fit joint`: each linear's choice between `S` alone and `S + L`.
    pub lowrank: Vec<super::joint::LowrankChoice>,
    clock: Instant,
}

impl Notes {
    /// Empty notes; the clock starts now.
    pub fn start() -> Self {
        Notes {
            steps: vec![],
            uniform_fraction: None,
            allocation_search: None,
            seconds: vec![],
            embed_choice: None,
            reconstruction: vec![],
            lowrank: vec![],
            clock: Instant::now(),
        }
    }

    /// Records the seconds since the last lap as stage `name`.
    pub fn lap(&mut self, name: &str) {
        self.seconds
            .push((name.to_string(), self.clock.elapsed().as_secs_f64()));
        self.clock = Instant::now();
    }
}

/// A compression method.
pub trait Strategy {
    /// What every block linear (in [`Context::linears`] order) offers to keep.
    fn candidates(&mut self, cx: &Context<'_>, notes: &mut Notes) -> Result<Vec<Candidate>>;

    /// The items kept of each candidate; their total cost must be within
    /// [`Context::limit`]. Every item when the budget holds them all (the same answer
    /// for every method, so no method searches then), else
    /// [`Strategy::select_within`]'s choice.
    fn select(
        &mut self,
        cx: &Context<'_>,
        cands: &[Candidate],
        notes: &mut Notes,
    ) -> Result<Vec<Selection>> {
        match keep_all_if_it_fits(cx, cands) {
            Some(all) => Ok(all),
            None => self.select_within(cx, cands, notes),
        }
    }

    /// [`Strategy::select`] when the budget does not hold every item: the method's
    /// own choice of what to drop.
    fn select_within(
        &mut self,
        cx: &Context<'_>,
        cands: &[Candidate],
        notes: &mut Notes,
    ) -> Result<Vec<Selection>>;

    /// The paper's allocation, for the report (other methods have none).
    fn allocation(&self) -> Option<Allocation> {
        None
    }
}

/// The method `opts` asks for.
pub fn strategy(opts: &CompressOptions) -> Box<dyn Strategy> {
    match (opts.method, opts.variant) {
        (Method::Cap, Variant::Paper) => Box::new(Paper::new(opts.allocation)),
        (Method::Cap | Method::Sparsegpt | Method::Admm, _) => Box::new(Pruned::new(opts.method)),
        (Method::Magnitude | Method::Wanda | Method::Svd, _) => Box::new(OneShot::new(opts.method)),
    }
}

/// The method's name in the file's compression record.
pub fn method_name(opts: &CompressOptions) -> String {
    let name = base_method_name(opts);
    match opts.pattern {
        Some(p) => format!("{name} {p}"),
        None => name,
    }
}

/// [`method_name`] without the pattern.
fn base_method_name(opts: &CompressOptions) -> String {
    match (opts.method, opts.variant) {
        (Method::Cap, Variant::Cap) => "cap".to_string(),
        (Method::Cap, Variant::Paper) => format!(
            "cap/{}",
            match opts.allocation {
                Allocation::Reinforce => "reinforce",
                Allocation::Threshold => "threshold",
            }
        ),
        (m, _) => m.name().to_string(),
    }
}

/// Every item of every candidate.
pub fn keep_all(cands: &[Candidate]) -> Vec<Selection> {
    cands.iter().map(Selection::all).collect()
}

/// [`keep_all`] if the budget holds every item (SmolLM2 on any real board).
pub fn keep_all_if_it_fits(cx: &Context<'_>, cands: &[Candidate]) -> Option<Vec<Selection>> {
    let all = keep_all(cands);
    let all_cost: u64 = cands
        .iter()
        .zip(&all)
        .map(|(c, s)| selection_cost(cx.cost, c, s))
        .sum();
    (all_cost <= cx.limit).then(|| {
        tracing::info!(
            "the budget ({}) holds every item ({all_cost}): nothing is dropped",
            cx.limit
        );
        all
    })
}

/// The same fraction of every group of items ([`uniform_groups`] of `method`) kept in
/// every linear; `in_norms` (per linear, input-channel norms) for `wanda`, empty
/// otherwise.
pub fn select_uniform(
    cx: &Context<'_>,
    cands: &[Candidate],
    method: Method,
    in_norms: &[Option<&[f32]>],
    notes: &mut Notes,
) -> Vec<Selection> {
    let groups: Vec<_> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| uniform_groups(method, c, in_norms.get(i).copied().flatten()))
        .collect();
    let refs: Vec<&Candidate> = cands.iter().collect();
    let (s, q) = uniform(&refs, &groups, cx.cost, cx.limit);
    notes.uniform_fraction = Some(q);
    s
}
