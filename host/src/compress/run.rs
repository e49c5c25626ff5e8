//! The `compress` driver: load → budget → candidates → select → write → measure →
//! stamp, each stage in its own module of [`super`].

use std::path::{Path, PathBuf};

use cap_format::DType;
use serde::Serialize;

use super::allocate::{Allocation2, Trial};
use super::blockcache::BlockCache;
use super::budget::{Budget, BudgetSpec, FixedCosts};
use super::candidate::Candidate;
use super::error::{CompressError, Result, StepContext, step_error};
use super::load::load;
use super::measure::measure;
use super::memory::WorkingSet;
use super::methods::{Allocation, Method, Variant};
use super::plan::plan;
use super::qvalues::{Quantizer, check_values};
use super::reinforce::{ReinforceOptions, StepLog};
use super::select::Selection;
use super::source::{BlockSource, Source};
use super::speed::{DECODE_BANDWIDTH_EFFICIENCY, DecodeCost, SpeedEstimate};
use super::stamp::record_layer_rows;
use super::stamp::{
    base_manifest, record_budget, record_layers, record_perplexity, restamp, unmeasured,
};
use super::strategy::BlockSink;
use super::strategy::{Context, Notes, method_name, strategy};
use super::tensors::block_linears;
use super::write::write;
use super::write::{EncodedLinear, encoded_linear, write_encoded};
use crate::eval::EvalReport;
use crate::pack::source_sha256;
use crate::rpca::RpcaSettings;
use crate::rpca::model::Shard;
use cap_device::model::DenseLinear;

/// Everything `compress` needs.
#[derive(Clone, Debug)]
pub struct CompressOptions {
    /// Source checkpoint (GGUF file or Hugging Face directory).
    pub model: PathBuf,
    /// Output `.cap` path.
    pub out: PathBuf,
    /// What to keep of each linear.
    pub method: Method,
    /// Which CAP `--method cap` runs.
    pub variant: Variant,
    /// How the paper's variant allocates (ignored otherwise).
    pub allocation: Allocation,
    /// cap: spend this share of every linear's kept parameters on a low-rank part
    /// instead of letting the allocation search decide.
    pub lowrank_share: Option<f64>,
    /// cap: how the low-rank part is fit, and (joint) how many sparse/rank rounds.
    pub lowrank_fit: (super::joint::LowrankFit, usize),
    /// cap and `admm`: passes of exact 1-swaps on each mask after ADMM ([`super::swap`]).
    pub swap_passes: usize,
    /// The budget.
    pub budget: BudgetSpec,
    /// Storage type of the tensors kept dense (the token embedding and an untied
    /// head; norms and biases are always f32): a float type, or quantized (each row
    /// rounded to nearest; the rows are gathered and multiplied in place).
    pub dtype: DType,
    /// Value type of the compressed linears (factors, sparse values, dense values):
    /// `dtype` itself, or quantized ([`DType::Q8`], [`DType::Q4`]).
    pub values: DType,
    /// cap's allocation chooses each linear's value type (`--values auto`): `values`
    /// (q4) or q8 in its groups, or f16, by the calibration loss
    /// ([`super::allocate::Bits`]).
    pub auto_values: bool,
    /// Under `auto_values`, the allocation also chooses the embedding's (and an
    /// untied head's) type: `dtype`, or Q4 in `dtype`'s group when the bytes that
    /// frees serve the linears better, by the same calibration loss
    /// (`--embed-values auto`).
    pub auto_embed: bool,
    /// An N:M pattern every pruned linear's mask follows (`--pattern`); the budget is
    /// then the pattern's parameter ratio.
    pub pattern: Option<super::pattern::Pattern>,
    /// How quantized values are chosen (ignored for float values).
    pub quantizer: Quantizer,
    /// Calibration text (plain text, or JSON lines with a `text` field); `None`:
    /// data-free, text the model generates itself ([`crate::selfcalib`]).
    pub calib: Option<PathBuf>,
    /// Where data-free calibration text is cached; `None`: the default cache.
    pub selfcalib_dir: Option<PathBuf>,
    /// Calibration sequences.
    pub calib_samples: usize,
    /// Tokens per calibration sequence.
    pub calib_len: usize,
    /// Seed of the sampled sequences and masks.
    pub seed: u64,
    /// Held-out evaluation text; `None`: a text shipped with cap, never the calibration
    /// text ([`crate::texts::default_held_out`]).
    pub eval_text: Option<PathBuf>,
    /// Read `eval_text` the way the papers build WikiText-2.
    pub eval_wikitext: bool,
    /// Evaluation window.
    pub eval_ctx: usize,
    /// Evaluation windows (at most).
    pub eval_windows: usize,
    /// REINFORCE settings.
    pub reinforce: ReinforceOptions,
    /// Calibration sequences per REINFORCE step.
    pub step_samples: usize,
    /// RPCA settings of stage 1.
    pub rpca: RpcaSettings,
    /// Where stage 1's decompositions are cached.
    pub cache_dir: PathBuf,
    /// Worker threads.
    pub threads: usize,
    /// Block reconstruction after each block is pruned (cap, sparsegpt, admm).
    pub reconstruct: super::reconstruct::ReconOptions,
    /// End-to-end distillation of the pruned model's kept weights after every block is
    /// pruned (cap, sparsegpt, admm; `epochs` 0: none).
    pub distill: super::distill::DistillOptions,
    /// Start from this file's kept entries (compressed from `model` with the same
    /// method and budget) instead of pruning: the stages after pruning refine it.
    pub from: Option<PathBuf>,
    /// Resolve the budget and stop: nothing is computed or written.
    pub dry_run: bool,
    /// Also evaluate the source model on the held-out windows (for the report).
    pub source_eval: bool,
    /// Read the checkpoint one block at a time and keep each block's result on disk
    /// ([`super::blockcache`]), so memory holds one block, not the model.
    pub stream: bool,
    /// Streamed: compute only shard `I` of `N` (from 1) of the blocks into the block
    /// cache and stop; a run without a shard assembles the file.
    pub shard: Option<Shard>,
    /// Streamed: the block cache folder; `None`: one per run under the user's cache.
    pub block_cache: Option<PathBuf>,
    /// Streamed: keep the block cache after the file is written.
    pub keep_blocks: bool,
    /// Refuse a run whose estimated working set ([`super::memory::WorkingSet`]) is
    /// larger; `None`: the machine's memory.
    pub max_memory: Option<u64>,
}

/// The budget of a model, as `--dry-run` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The resolved budget.
    pub budget: Budget,
    /// The costs besides the compressed linears.
    pub fixed: FixedCosts,
}

/// What a `--shard I/N` run did.
#[derive(Clone, Debug, Serialize)]
pub struct ShardReport {
    /// `I` (from 1).
    pub shard: usize,
    /// `N`.
    pub shards: usize,
    /// The shard's blocks (first, last + 1).
    pub blocks: [usize; 2],
    /// Blocks this run computed (the others were cached already).
    pub computed: usize,
    /// The block cache folder.
    pub cache_dir: String,
    /// Seconds per stage, in order.
    pub seconds: Vec<(String, f64)>,
}

/// What [`compress`] produced.
pub enum Outcome {
    /// `--dry-run`: the budget only.
    Planned(Plan),
    /// `--shard I/N`: the shard's blocks are in the block cache.
    Shard(ShardReport),
    /// The file was written and measured.
    Written(Box<CompressReport>),
}

/// Progress of [`compress`].
pub enum Event<'a> {
    /// A stage starts; `total` units of work follow (0: unknown).
    Stage {
        /// Stage name.
        name: &'a str,
        /// Units of work.
        total: u64,
    },
    /// Units done in the current stage.
    Progress(u64),
    /// A REINFORCE step finished.
    Step(&'a StepLog),
}

/// One compressed linear in the report.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LayerRow {
    /// Tensor name.
    pub name: String,
    /// Rows × columns.
    pub shape: [usize; 2],
    /// Singular values kept / offered.
    pub rank: [usize; 2],
    /// Sparse entries kept / offered.
    pub nnz: [u64; 2],
    /// Encoding written.
    pub encoding: String,
    /// Value type of its stored values (`q4/g64`, `f16`, ...).
    pub values: String,
    /// Bytes of its section.
    pub bytes: u64,
    /// Cost in the budget's accounting.
    pub cost: u64,
}

/// What [`compress`] did.
#[derive(Clone, Debug, Serialize)]
pub struct CompressReport {
    /// Written file.
    pub path: String,
    /// Method.
    pub method: Method,
    /// Value type of the compressed linears (`f16`, `q4/g64`, ...).
    pub values: String,
    /// Value type of the token embedding and an untied head.
    pub embed_values: String,
    /// The quantizer that chose the kept weights' codes (`gptq`: with each layer's
    /// input Hessian; `rtn`: round-to-nearest), `None` for float values. Low-rank
    /// factors are always rounded to nearest.
    pub quantizer: Option<Quantizer>,
    /// Allocation (for `cap`).
    pub allocation: Option<Allocation>,
    /// The budget.
    pub budget: Budget,
    /// The costs besides the compressed linears.
    pub fixed: FixedCosts,
    /// Per compressed linear.
    pub layers: Vec<LayerRow>,
    /// Sum of the layers' cost in the budget's accounting (≤ `budget.limit`).
    pub linear_cost: u64,
    /// Bytes of the compressed linears' sections.
    pub linear_bytes: u64,
    /// Bytes of the dense tensors' sections.
    pub dense_tensor_bytes: u64,
    /// Size of the written file.
    pub file_bytes: u64,
    /// Kept paper parameters over the linears' dense parameters.
    pub param_ratio: f64,
    /// Fraction kept by the uniform rule (threshold and baselines).
    pub uniform_fraction: Option<f64>,
    /// Perplexity of the written file on the held-out text.
    pub eval: EvalReport,
    /// Perplexity of the source model on the same windows (unless skipped).
    pub dense_eval: Option<EvalReport>,
    /// The file's self-test figure: the same windows under llama.cpp's rule (second
    /// half of each window scored), stored in the file for `cap-device selftest`.
    pub self_test: EvalReport,
    /// Name of the held-out text.
    pub eval_text: String,
    /// What the model was calibrated on.
    pub calibration: String,
    /// Bytes of the source checkpoint (a file, or a folder's files).
    pub source_bytes: u64,
    /// Predicted decode speed on the target board (budgets from a target only).
    pub speed: Option<SpeedEstimate>,
    /// The REINFORCE log (empty for other allocations).
    pub steps: Vec<StepLog>,
    /// cap's learned allocation and the settings it tried.
    pub allocation_search: Option<(Allocation2, Vec<Trial>)>,
    /// Under `--embed-values auto`: each embedding type the allocation searched with,
    /// its best calibration loss, and whether it was chosen.
    pub embed_search: Vec<EmbedTrial>,
    /// Block reconstruction (`--reconstruct`): each block's steps, with the relative
    /// output error on held-out calibration sequences before and after.
    pub reconstruction: Vec<super::reconstruct::StepLog>,
    /// End-to-end distillation (`--distill-epochs`): the divergence from the source
    /// model per epoch and the epoch kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distillation: Option<super::distill::DistillLog>,
    /// `--from`: the file whose kept entries this run started from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `--lowrank-fit joint` without a pattern: per linear, the loss of `S` alone and of
    /// `S + L` at the same parameters, and which was kept.
    pub lowrank_choices: Vec<super::joint::LowrankChoice>,
    /// Seconds per stage, in order.
    pub seconds: Vec<(String, f64)>,
    /// Whether the checkpoint was read one block at a time (`--stream`).
    pub streamed: bool,
    /// The working set `--max-memory` was checked against ([`super::memory`]).
    pub working_set: WorkingSet,
    /// Peak resident memory of this process so far (Linux `VmHWM`; file pages of the
    /// mapped files included), `None` where it cannot be read.
    pub peak_rss_bytes: Option<u64>,
}

/// One embedding type the allocation searched with (`--embed-values auto`).
#[derive(Clone, Debug, Serialize)]
pub struct EmbedTrial {
    /// The type (`q8/g64`).
    pub values: String,
    /// The lowest calibration loss of its search (mean NLL, nats).
    pub loss: f64,
    /// Whether the file stores the embedding in it.
    pub chosen: bool,
}

/// Runs the whole pipeline.
pub fn compress(opts: &CompressOptions, on_event: &(dyn Fn(Event<'_>) + Sync)) -> Result<Outcome> {
    check_values(opts.values)?;
    check_values(opts.dtype)?;
    if opts.pattern.is_some() {
        let pruning = matches!(
            opts.method,
            Method::Cap | Method::Sparsegpt | Method::Admm | Method::Magnitude | Method::Wanda
        );
        if !pruning || opts.variant != Variant::Cap {
            return Err(CompressError::Invalid(
                "--pattern: only the pruning methods (cap, sparsegpt, admm, magnitude, wanda; not svd or --variant paper) follow an N:M pattern".into(),
            ));
        }
        if opts.auto_values {
            return Err(CompressError::Invalid(
                "--pattern fixes every linear's sparsity, so there is nothing to allocate: give --values q8|q4|f16, not auto".into(),
            ));
        }
    }
    if opts.auto_values && (opts.method, opts.variant) != (Method::Cap, Variant::Cap) {
        return Err(CompressError::Invalid(
            "--values auto: only cap's own allocation (--method cap --variant cap) chooses bits per layer"
                .into(),
        ));
    }
    check_stream(opts)?;
    check_reconstruct(opts)?;
    check_distill(opts)?;
    check_from(opts)?;
    let mut notes = Notes::start();
    let mut input = load(opts, on_event)?;
    let windows: Vec<&[u32]> = input.windows.iter().map(|w| w.as_slice()).collect();
    let hollow = hollow_linears(&input.model().config);
    let linears: Vec<(String, &DenseLinear)> = match &input.source {
        Source::Memory(m) => block_linears(m)?,
        Source::Streamed(_) => hollow.iter().map(|(n, l)| (n.clone(), l)).collect(),
    };
    let names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    notes.lap("load");

    let mut manifest = base_manifest(opts, &input)?;
    let plan_for = |dtype| {
        plan(
            &opts.budget,
            dtype,
            opts.values,
            input.model(),
            &linears,
            &manifest,
        )
    };
    let embed_types = embed_types(opts);
    // Every embedding type the budget admits (it must admit one), each with the limit
    // it leaves the linears.
    let mut plans = Vec::new();
    let mut first_error = None;
    for &e in &embed_types {
        match plan_for(e) {
            Ok(p) => plans.push((e, p)),
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    let Some((_, planned)) = plans.first() else {
        return Err(first_error
            .unwrap_or_else(|| CompressError::Internal("no embedding type to plan".into())));
    };
    if opts.dry_run {
        return Ok(Outcome::Planned(Plan {
            budget: planned.budget.clone(),
            fixed: planned.fixed,
        }));
    }
    // The linears' cost model depends on their value type only, not the embedding's.
    let (cost, first_limit) = (planned.cost, planned.budget.limit);
    notes.lap("budget");

    let mut method = strategy(opts);
    let embeds: Vec<(DType, u64)> = plans.iter().map(|(e, p)| (*e, p.budget.limit)).collect();
    let n_blocks = input.source.n_blocks();
    // Streamed: the blocks this run computes (those of its shard the cache lacks) and
    // where each goes as soon as it is made.
    let cache = match opts.stream {
        true => Some(open_block_cache(opts, &input, &windows)?),
        false => None,
    };
    let (todo, shard_blocks) = match &cache {
        Some(c) => {
            let range = shard_range(opts.shard.as_ref(), n_blocks);
            (missing_runs(c, range.clone()), range)
        }
        None => (std::iter::once(0..n_blocks).collect(), 0..n_blocks),
    };
    let sink = |b: usize, cands: Vec<Candidate>| -> Result<()> {
        let c = cache
            .as_ref()
            .ok_or_else(|| CompressError::Internal("a block sink without a cache".into()))?;
        let enc = cands
            .iter()
            .enumerate()
            .map(|(k, cand)| encoded_linear(&names[b * 7 + k], cand, &Selection::all(cand), &cost))
            .collect::<Result<Vec<_>>>()?;
        c.put(b, &enc)
    };
    let cx = Context {
        model: input.model(),
        linears: &linears,
        windows: &windows,
        cost: &cost,
        limit: first_limit,
        embeds: &embeds,
        source: &input.source,
        blocks: &todo,
        sink: cache.as_ref().map(|_| &sink as &BlockSink<'_>),
        opts,
        on_event,
    };
    let computed: usize = todo.iter().map(|r| r.len()).sum();
    // A streamed run whose blocks are all cached only assembles the file.
    let mut cands = if let Some(path) = &opts.from {
        let c = read_candidates(path, &cx, &input.source_sha256)?;
        notes.lap("read");
        c
    } else if computed == 0 && cache.is_some() {
        notes.lap("candidates");
        vec![]
    } else {
        let c = method.candidates(&cx, &mut notes)?;
        notes.lap("candidates");
        c
    };
    // Refused with --stream (check_distill): the model and every candidate are here.
    let distillation = if opts.distill.epochs > 0 {
        let w = windows.len();
        let train = w - if w >= 4 { (w / 8).max(1) } else { 0 };
        on_event(Event::Stage {
            name: "distill",
            total: (opts.distill.epochs * train) as u64,
        });
        let log = super::distill::distill(
            input.model(),
            &mut cands,
            &windows,
            &opts.distill,
            opts.threads,
            &mut |n| on_event(Event::Progress(n)),
        )?;
        notes.lap("distill");
        Some(log)
    } else {
        None
    };
    if let (Some(c), Some(sh)) = (&cache, &opts.shard) {
        return Ok(Outcome::Shard(ShardReport {
            shard: sh.index,
            shards: sh.count,
            blocks: [shard_blocks.start, shard_blocks.end],
            computed,
            cache_dir: c.dir().display().to_string(),
            seconds: notes.seconds,
        }));
    }
    // The allocation may have chosen another embedding type, and with it another limit.
    let chosen = notes.embed_choice.as_ref().map_or(0, |(i, _)| *i);
    let (embed_dtype, planned) = plans.swap_remove(chosen);
    let (budget, fixed) = (planned.budget, planned.fixed);
    record_budget(&mut manifest, &opts.budget, &budget, &fixed);
    let cx = Context {
        limit: budget.limit,
        ..cx
    };
    let sels = match (&cache, &opts.from) {
        (Some(_), _) => vec![],
        // Checked against the budget when read: the file's entries are the selection.
        (None, Some(_)) => super::strategy::keep_all(&cands),
        (None, None) => method.select(&cx, &cands, &mut notes)?,
    };
    notes.lap("allocation");

    on_event(Event::Stage {
        name: "write",
        total: 0,
    });
    let written = match (&cache, &mut input.source) {
        (Some(c), Source::Streamed(s)) => {
            // Streamed: the manifest's layer table from the blocks' metadata, then the
            // file around the cached linears, one block's bytes in memory at a time.
            let mut rows = Vec::with_capacity(names.len());
            for b in 0..n_blocks {
                rows.extend(c.rows(b)?);
            }
            record_layer_rows(&mut manifest, &rows);
            let first = unmeasured(&manifest);
            let model = s.hollow_model()?;
            let mut current: (usize, std::vec::IntoIter<EncodedLinear>) =
                (usize::MAX, vec![].into_iter());
            write_encoded(model, &opts.out, first, embed_dtype, &mut |name| {
                let i = names.iter().position(|n| n == name).ok_or_else(|| {
                    CompressError::Internal(format!("{name}: not a block linear"))
                })?;
                if current.0 != i / 7 {
                    current = (i / 7, c.get(i / 7)?.into_iter());
                }
                match current.1.next() {
                    Some(e) if e.row.name == name => Ok(e),
                    _ => Err(CompressError::Invalid(format!(
                        "{}: block {} does not hold {name} where expected: delete it to compute the block again",
                        c.dir().display(),
                        i / 7
                    ))),
                }
            })?
        }
        _ => {
            record_layers(&mut manifest, &names, &sels);
            let first = unmeasured(&manifest);
            let written = write(
                input.model(),
                &opts.out,
                first,
                &names,
                &cands,
                &sels,
                &cost,
                embed_dtype,
            )?;
            drop((cands, sels));
            written
        }
    };
    notes.lap("write");
    // Checked before the held-out measurement, which is most of a run's remaining
    // minutes: a selection over its budget is a bug, not a file to measure.
    let linear_cost: u64 = written.rows.iter().map(|r| r.cost).sum();
    if linear_cost > budget.limit {
        return Err(CompressError::Internal(format!(
            "the selection costs {linear_cost}, over the budget {}",
            budget.limit
        )));
    }
    let m = measure(opts, &input, written.file.path(), on_event)?;
    notes.lap("eval");
    let (ppl, n) = (m.self_test.ppl, m.self_test.windows);
    record_perplexity(&mut manifest, ppl, opts.eval_ctx, n);
    let path = restamp(written.file.path(), &opts.out, manifest)?;
    notes.lap("re-stamp");
    if let Some(c) = &cache
        && !opts.keep_blocks
    {
        c.remove();
    }

    let rows = written.rows;
    let file_bytes = std::fs::metadata(&path)
        .step(|| format!("{}: cannot stat", path.display()))?
        .len();
    let linear_bytes = rows.iter().map(|r| r.bytes).sum();
    let kept_params: u64 = rows
        .iter()
        .map(|r| r.rank[0] as u64 * (r.shape[0] + r.shape[1]) as u64 + r.nnz[0])
        .sum();
    let speed = speed_estimate(
        &opts.budget,
        &input.model().config,
        &budget,
        &fixed,
        linear_bytes,
    );
    let source_bytes = source_bytes(&opts.model);
    let working_set = super::load::working_set(opts, &input.model().config, opts.stream);
    Ok(Outcome::Written(Box::new(CompressReport {
        path: path.display().to_string(),
        method: opts.method,
        values: values_summary(opts, &rows),
        embed_values: match &notes.embed_choice {
            Some(_) => format!("auto: {embed_dtype}"),
            None => embed_dtype.to_string(),
        },
        quantizer: quantizer_used(opts),
        allocation: method.allocation(),
        param_ratio: kept_params as f64 / fixed.linear_params.max(1) as f64,
        dense_tensor_bytes: fixed.dense_tensor_bytes,
        budget,
        fixed,
        layers: rows,
        linear_cost,
        linear_bytes,
        file_bytes,
        uniform_fraction: notes.uniform_fraction,
        eval: m.eval,
        dense_eval: m.dense_eval,
        self_test: m.self_test,
        eval_text: input.eval_name,
        calibration: input.calibration,
        source_bytes,
        speed,
        steps: notes.steps,
        allocation_search: notes.allocation_search,
        reconstruction: notes.reconstruction,
        distillation,
        from: opts.from.as_ref().map(|p| p.display().to_string()),
        lowrank_choices: notes.lowrank,
        embed_search: match notes.embed_choice {
            Some((chosen, losses)) => losses
                .iter()
                .zip(&embeds)
                .enumerate()
                .map(|(i, (&loss, (e, _)))| EmbedTrial {
                    values: e.to_string(),
                    loss,
                    chosen: i == chosen,
                })
                .collect(),
            None => vec![],
        },
        seconds: notes.seconds,
        streamed: opts.stream,
        working_set,
        peak_rss_bytes: super::memory::peak_rss(),
    })))
}

/// The embedding types the allocation may choose from: `opts.dtype`, and under
/// `auto_embed` Q4 in its group (Q4 of the same group as a quantized `dtype`, else of
/// the linears' group).
fn embed_types(opts: &CompressOptions) -> Vec<DType> {
    let mut v = vec![opts.dtype];
    if opts.auto_embed {
        let group = if opts.dtype.is_quantized() {
            opts.dtype.group() as u16
        } else {
            opts.values.group() as u16
        };
        let q4 = DType::Q4 { group };
        if q4 != opts.dtype && check_values(q4).is_ok() {
            v.push(q4);
        }
    }
    v
}

/// The linears' value type, or under `--values auto` how many linears got which type
/// (`auto: q4/g64 ×140, q8/g64 ×70`).
fn values_summary(opts: &CompressOptions, rows: &[LayerRow]) -> String {
    if !opts.auto_values {
        return opts.values.to_string();
    }
    let mut n: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in rows {
        *n.entry(r.values.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = n.iter().map(|(v, k)| format!("{v} ×{k}")).collect();
    format!("auto: {}", parts.join(", "))
}

/// The quantizer that actually chose the codes of the sparse and dense values: GPTQ
/// needs each layer's input Hessian, which only the pruning methods compute.
fn quantizer_used(opts: &CompressOptions) -> Option<Quantizer> {
    if !opts.values.is_quantized() {
        return None;
    }
    let hessian = matches!(
        (opts.method, opts.variant),
        (Method::Cap, Variant::Cap) | (Method::Sparsegpt | Method::Admm, _)
    );
    Some(match opts.quantizer {
        Quantizer::Gptq if hessian => Quantizer::Gptq,
        _ => Quantizer::Rtn,
    })
}

/// The predicted decode speed of linears of `linear_bytes` on the budget's target.
fn speed_estimate(
    spec: &BudgetSpec,
    config: &cap_device::config::Config,
    budget: &Budget,
    fixed: &FixedCosts,
    linear_bytes: u64,
) -> Option<SpeedEstimate> {
    let BudgetSpec::Target {
        profile,
        ctx,
        batch,
        ..
    } = spec
    else {
        return None;
    };
    let cost = DecodeCost::new(profile, config, *ctx, *batch, fixed.dense_read_bytes);
    Some(SpeedEstimate {
        target: profile.name.clone(),
        bandwidth_gbps: profile.memory_bandwidth_gbps,
        efficiency: DECODE_BANDWIDTH_EFFICIENCY,
        bytes_per_token: cost.bytes_per_token(linear_bytes),
        tokens_per_s: cost.tokens_per_s(linear_bytes),
        dense_tokens_per_s: cost.tokens_per_s(fixed.linear_dense_bytes),
        required_tokens_per_s: budget.speed.map(|s| s.tokens_per_s),
    })
}

/// Bytes of the source checkpoint: the file, or the files of a folder (0 when it
/// cannot be read; the report only shows it).
fn source_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Default cache of stage 1 for a source file: `$XDG_CACHE_HOME/cap/rpca/<sha16>` (or
/// `~/.cache/...`), one directory per source so tensor names never collide.
pub fn default_cache_dir(model: &Path) -> Result<PathBuf> {
    let base = user_cache("--cache-dir")?;
    let sha = source_sha256(model).map_err(step_error)?;
    Ok(base.join("rpca").join(&sha[..16]))
}

/// cap's folder in the user's cache (`$XDG_CACHE_HOME/cap`, or `~/.cache/cap`); when
/// neither variable is set, the error names `flag`, which gives a folder instead.
fn user_cache(flag: &str) -> Result<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|base| base.join("cap"))
        .ok_or_else(|| {
            CompressError::Invalid(format!(
                "neither XDG_CACHE_HOME nor HOME is set; pass {flag}"
            ))
        })
}

/// What `--stream` and `--shard` can run, refused before anything is loaded.
fn check_stream(opts: &CompressOptions) -> Result<()> {
    if !opts.stream {
        if opts.shard.is_some() || opts.block_cache.is_some() || opts.keep_blocks {
            return Err(CompressError::Invalid(
                "--shard, --block-cache and --keep-blocks belong to --stream".into(),
            ));
        }
        return Ok(());
    }
    let streams = matches!(
        (opts.method, opts.variant),
        (Method::Cap, Variant::Cap) | (Method::Sparsegpt | Method::Admm, _)
    );
    if !streams {
        return Err(CompressError::Invalid(
            "--stream: the block-by-block methods stream (cap, sparsegpt, admm); magnitude, wanda, svd and --variant paper hold the whole model".into(),
        ));
    }
    if opts.calib.is_none() {
        return Err(CompressError::Invalid(
            "--stream needs --calib FILE: data-free calibration generates text with the whole model".into(),
        ));
    }
    if opts.auto_embed {
        return Err(CompressError::Invalid(
            "--stream: --embed-values auto is not streamed; give the embedding's type with --dtype"
                .into(),
        ));
    }
    Ok(())
}

/// The refits after pruning (`flag`: `--reconstruct`, `--distill-epochs`) change the
/// block-by-block methods' float values (their `what`): anything else is refused in one
/// line naming the flag.
fn check_refit_applies(opts: &CompressOptions, flag: &str, what: &str) -> Result<()> {
    let prunes = matches!(
        (opts.method, opts.variant),
        (Method::Cap, Variant::Cap) | (Method::Sparsegpt | Method::Admm, _)
    );
    // A file's entries (`--from`) are masked whatever method made them.
    if !prunes && opts.from.is_none() {
        return Err(CompressError::Invalid(format!(
            "{flag} refits the block-by-block methods' {what} (cap, sparsegpt, admm); magnitude, wanda, svd and --variant paper have none"
        )));
    }
    if opts.values.is_quantized() || opts.auto_values {
        return Err(CompressError::Invalid(format!(
            "{flag} refits float values; quantized values are fixed by GPTQ when each layer is pruned (use --values f16|bf16|f32)"
        )));
    }
    Ok(())
}

/// What `--reconstruct` applies to, refused before anything is loaded.
fn check_reconstruct(opts: &CompressOptions) -> Result<()> {
    let r = &opts.reconstruct;
    if r.steps.is_empty() {
        return Ok(());
    }
    check_refit_applies(opts, "--reconstruct", "blocks")?;
    if r.epochs == 0 || !(r.lr.is_finite() && r.lr > 0.0) {
        return Err(CompressError::Invalid(format!(
            "--reconstruct-epochs must be at least 1 and --reconstruct-lr finite and positive (got {} and {})",
            r.epochs, r.lr
        )));
    }
    Ok(())
}

/// What `--distill-epochs` applies to, refused before anything is loaded.
fn check_distill(opts: &CompressOptions) -> Result<()> {
    let d = &opts.distill;
    if d.epochs == 0 {
        return Ok(());
    }
    check_refit_applies(opts, "--distill-epochs", "kept weights")?;
    if opts.stream {
        return Err(CompressError::Invalid(
            "--distill-epochs runs the whole model at once; it is not streamed (drop --stream)"
                .into(),
        ));
    }
    if !(d.lr.is_finite() && d.lr > 0.0) {
        return Err(CompressError::Invalid(format!(
            "--distill-lr must be finite and positive (got {})",
            d.lr
        )));
    }
    Ok(())
}

/// What `--from` applies to, refused before anything is loaded.
fn check_from(opts: &CompressOptions) -> Result<()> {
    if opts.from.is_none() {
        return Ok(());
    }
    if opts.stream {
        return Err(CompressError::Invalid(
            "--from refines a file with the whole model in memory; it is not streamed (drop --stream)".into(),
        ));
    }
    if !opts.reconstruct.steps.is_empty() {
        return Err(CompressError::Invalid(
            "--reconstruct runs while each block is pruned; --from starts after pruning (use --distill-epochs)".into(),
        ));
    }
    if opts.auto_values || opts.auto_embed {
        return Err(CompressError::Invalid(
            "--from keeps the file's entries: give --values and --embed-values as types, not auto"
                .into(),
        ));
    }
    Ok(())
}

/// Stage "read" (`--from`): the file's entries as candidates, refused in one line when
/// the file was made by another method, or its entries do not fit this run's budget.
fn read_candidates(path: &Path, cx: &Context<'_>, source_sha256: &str) -> Result<Vec<Candidate>> {
    (cx.on_event)(Event::Stage {
        name: "read",
        total: 0,
    });
    let bytes = crate::capmodel::map(path).map_err(step_error)?;
    let file = crate::capmodel::parse_verified(path, &bytes).map_err(step_error)?;
    let (theirs, ours) = (super::from_file::method_of(&file), method_name(cx.opts));
    if theirs != ours {
        return Err(CompressError::Invalid(format!(
            "--from {}: made by method \"{theirs}\", this run is \"{ours}\": give the --method and --pattern it was made with",
            path.display()
        )));
    }
    let cands = super::from_file::candidates(path, &file, source_sha256, cx.linears)?;
    let cost: u64 = cands
        .iter()
        .map(|c| super::select::selection_cost(cx.cost, c, &Selection::all(c)))
        .sum();
    if cost > cx.limit {
        return Err(CompressError::Invalid(format!(
            "--from {}: its linears cost {cost}, over this run's budget for them ({}): give the --ratio, --budget or --target it was made with",
            path.display(),
            cx.limit
        )));
    }
    Ok(cands)
}

/// The block linears of a model with configuration `c`, their shapes set and no
/// weights: what the budget and a streamed run's methods see of them.
fn hollow_linears(c: &cap_device::config::Config) -> Vec<(String, DenseLinear)> {
    cap_device::tensors::compressible(c)
        .into_iter()
        .map(|t| {
            let l = DenseLinear {
                weight: vec![],
                out_features: t.rows,
                in_features: t.cols,
            };
            (t.name, l)
        })
        .collect()
}

/// The blocks of shard `I` of `N` (contiguous, sizes differing by at most one), or all.
pub fn shard_range(shard: Option<&Shard>, n_blocks: usize) -> std::ops::Range<usize> {
    match shard {
        Some(s) => ((s.index - 1) * n_blocks / s.count)..(s.index * n_blocks / s.count),
        None => 0..n_blocks,
    }
}

/// The runs of consecutive blocks of `range` the cache lacks.
fn missing_runs(cache: &BlockCache, range: std::ops::Range<usize>) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for b in range.filter(|&b| !cache.has(b)) {
        match out.last_mut() {
            Some(r) if r.end == b => r.end = b + 1,
            _ => out.push(b..b + 1),
        }
    }
    out
}

/// The block cache of this run: `--block-cache`, or a folder per run key under the
/// user's cache. The key digests everything a block's result depends on: the source,
/// the calibration tokens, the method and its settings, the budget and cap's version.
fn open_block_cache(
    opts: &CompressOptions,
    input: &super::load::Loaded,
    windows: &[&[u32]],
) -> Result<BlockCache> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"cap block cache 1\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(input.source_sha256.as_bytes());
    let settings = format!(
        "{:?}",
        (
            opts.method,
            opts.variant,
            opts.values,
            opts.dtype,
            opts.auto_values,
            opts.quantizer,
            opts.pattern.map(|p| p.to_string()),
            opts.lowrank_share,
            opts.lowrank_fit,
            opts.swap_passes,
            &opts.budget,
            &opts.reconstruct,
        )
    );
    h.update(settings.as_bytes());
    for w in windows {
        h.update((w.len() as u64).to_le_bytes());
        for t in *w {
            h.update(t.to_le_bytes());
        }
    }
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let dir = match &opts.block_cache {
        Some(d) => d.clone(),
        None => user_cache("--block-cache")?.join("blocks").join(&key[..16]),
    };
    BlockCache::open(&dir, &key)
}
