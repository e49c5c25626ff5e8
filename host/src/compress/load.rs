//! Stage "load": the source model, its tokenizer, the calibration windows and the
//! held-out text.

use cap_device::config::Config;
use cap_device::model::{DenseLinear, Model};
use cap_device::tokenizer::Tokenizer;

use super::budget::{BudgetSpec, target_kv_bytes};
use super::calibration::{check_calib_tokens, prefix_for_tokens, sample_windows};
use super::error::{CompressError, Result, StepContext, step_error};
use super::memory::{WorkingSet, human, machine_bytes};
use super::run::{CompressOptions, Event};
use super::source::{BlockSource, Source, Streamed};
use crate::eval::{check_ctx, read_text};
use crate::import::Checkpoint;
use crate::pack::source_sha256;

/// The inputs of `compress`.
pub struct Loaded {
    /// The source model: in memory, or (`--stream`) its skeleton with the blocks read
    /// from the checkpoint one at a time.
    pub source: Source,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Calibration sequences (token ids).
    pub windows: Vec<Vec<u32>>,
    /// The held-out text the file is measured on (and stores for its self-test).
    pub self_test_text: String,
    /// Name of the held-out text.
    pub eval_name: String,
    /// What the model was calibrated on.
    pub calibration: String,
    /// SHA-256 of the source (hex), hashed once: the provenance and the data-free
    /// cache key both use it.
    pub source_sha256: String,
}

impl Loaded {
    /// The source model (its skeleton when streamed).
    pub fn model(&self) -> &Model<DenseLinear> {
        self.source.model()
    }
}

/// Loads the model and the texts, and samples the calibration windows. Everything
/// the flags and the model's hyper-parameters can refuse is refused first
/// ([`preflight`]), and a calibration text too short for the request before the
/// weights are loaded.
pub fn load(opts: &CompressOptions, on_event: &(dyn Fn(Event<'_>) + Sync)) -> Result<Loaded> {
    let ck = Checkpoint::open(&opts.model).map_err(step_error)?;
    let config = ck.config().map_err(step_error)?;
    preflight(opts, &config)?;
    let tokenizer = ck.tokenizer().map_err(step_error)?;
    // Calibration: a text file, or (data-free) text the model writes itself.
    let calib_text = match &opts.calib {
        Some(p) => Some(crate::calib::read_calib_text(p).map_err(step_error)?),
        None => None,
    };
    let (held_out, eval_name) = match &opts.eval_text {
        Some(p) => (
            read_text(p, opts.eval_wikitext).map_err(step_error)?,
            p.display().to_string(),
        ),
        None => {
            let (name, text) = crate::texts::default_held_out(calib_text.as_deref());
            (text, name.to_string())
        }
    };
    let self_test_text = prefix_for_tokens(
        &held_out,
        opts.eval_ctx
            .saturating_mul(opts.eval_windows)
            .saturating_add(1),
    )
    .to_string();
    let from_text = match (&calib_text, &opts.calib) {
        (Some(text), Some(p)) => {
            let calib_tokens = tokenizer.encode(text, true);
            let w = sample_windows(&calib_tokens, opts.calib_samples, opts.calib_len, opts.seed)
                .step(|| format!("{}", p.display()))?;
            Some((w, p.display().to_string()))
        }
        _ => None,
    };
    let source = if opts.stream {
        Source::Streamed(Streamed::new(ck)?)
    } else {
        Source::Memory(
            ck.load_model()
                .step(|| format!("{}: loading the model", opts.model.display()))?,
        )
    };
    let source_sha = source_sha256(&opts.model).map_err(step_error)?;
    let (windows, calibration) = match from_text {
        Some(w) => w,
        None => data_free(opts, source.model(), &tokenizer, &source_sha, on_event)?,
    };
    Ok(Loaded {
        source,
        tokenizer,
        windows,
        self_test_text,
        eval_name,
        calibration,
        source_sha256: source_sha,
    })
}

/// What the flags and the model's hyper-parameters alone can refuse, checked before
/// any text is read or weight loaded: the evaluation and calibration settings, both
/// contexts against the model's positions (as `eval --ctx` is), the calibration tokens
/// against [`super::calibration::MAX_CALIB_TOKENS`], and under `--target` the KV
/// cache against the profile's usable memory.
pub fn preflight(opts: &CompressOptions, config: &Config) -> Result<()> {
    if opts.eval_ctx < 2 || opts.eval_windows == 0 {
        return Err(CompressError::Invalid(
            "--eval-ctx must be at least 2 and --eval-windows at least 1".into(),
        ));
    }
    if opts.calib_samples == 0 || opts.calib_len < 2 {
        return Err(CompressError::Invalid(
            "--calib-samples must be at least 1 and --calib-len at least 2".into(),
        ));
    }
    check_calib_tokens(opts.calib_samples, opts.calib_len)?;
    // Then the flags against the model: a calibration sequence runs from position 0,
    // as an evaluation window does.
    check_ctx(opts.eval_ctx, config, "--eval-ctx").map_err(step_error)?;
    check_ctx(opts.calib_len, config, "--calib-len").map_err(step_error)?;
    if let BudgetSpec::Target {
        profile,
        ctx,
        batch,
        ..
    } = &opts.budget
    {
        target_kv_bytes(profile, config, *ctx, *batch)?;
    }
    check_memory(opts, config)
}

/// The working set of the run `opts` asks for on a model with configuration `config`,
/// `streamed` or not.
pub(crate) fn working_set(opts: &CompressOptions, config: &Config, streamed: bool) -> WorkingSet {
    let (samples, len) = (opts.calib_samples, opts.calib_len);
    let w = WorkingSet::of(config, samples, len, streamed);
    let r = &opts.reconstruct;
    let w = if r.steps.is_empty() {
        w
    } else {
        w.with_reconstruction(config, samples, len, r.global)
    };
    if opts.distill.epochs == 0 {
        w
    } else {
        w.with_distillation(config, samples, len)
    }
}

/// Refuses a run whose estimated working set exceeds `--max-memory` (by default the
/// machine's memory), naming what takes it and, for a model held in memory, what a
/// streamed run would need.
fn check_memory(opts: &CompressOptions, config: &Config) -> Result<()> {
    let Some(limit) = opts.max_memory.or_else(machine_bytes) else {
        return Ok(());
    };
    let need = working_set(opts, config, opts.stream);
    if need.total() <= limit {
        return Ok(());
    }
    let what = if opts.max_memory.is_some() {
        "--max-memory"
    } else {
        "this machine's memory"
    };
    let mut parts = format!(
        "blocks {}, embedding and head {}, Hessians {}, calibration activations {}",
        human(need.blocks),
        human(need.skeleton),
        human(need.hessians),
        human(need.activations)
    );
    if need.reconstruction > 0 {
        parts += &format!(", reconstruction {}", human(need.reconstruction));
    }
    if need.distillation > 0 {
        parts += &format!(", distillation {}", human(need.distillation));
    }
    Err(CompressError::Invalid(if opts.stream {
        format!(
            "a streamed run of this model needs about {} ({parts}), more than {what} ({}): fewer --calib-samples or a larger machine",
            human(need.total()),
            human(limit)
        )
    } else {
        let streamed = working_set(opts, config, true).total();
        format!(
            "this model needs about {} in memory ({parts}), more than {what} ({}): add --stream (one block at a time: about {})",
            human(need.total()),
            human(limit),
            human(streamed)
        )
    }))
}

/// Data-free calibration windows: `--calib-samples` sequences the model writes itself
/// (cached per model and recipe), and how the report names them.
fn data_free(
    opts: &CompressOptions,
    model: &Model<DenseLinear>,
    tokenizer: &Tokenizer,
    source_sha: &str,
    on_event: &(dyn Fn(Event<'_>) + Sync),
) -> Result<(Vec<Vec<u32>>, String)> {
    let recipe = crate::selfcalib::Recipe::new(opts.calib_samples, opts.calib_len - 1, opts.seed);
    let dir = opts
        .selfcalib_dir
        .clone()
        .or_else(crate::selfcalib::default_cache_dir)
        .ok_or_else(|| {
            CompressError::Invalid(
                "neither XDG_CACHE_HOME nor HOME is set: pass --calib FILE".into(),
            )
        })?;
    on_event(Event::Stage {
        name: "data-free calibration text",
        total: (opts.calib_samples * (opts.calib_len - 1)) as u64,
    });
    let (w, cached) = crate::selfcalib::cached_or_generate(
        model,
        tokenizer,
        &recipe,
        source_sha,
        &dir,
        opts.threads,
        |d, _| on_event(Event::Progress(d as u64)),
    )
    .map_err(step_error)?;
    let how = if cached { "cached" } else { "generated" };
    Ok((
        w,
        format!(
            "data-free: {} × {} tokens written by the model ({how})",
            opts.calib_samples, opts.calib_len
        ),
    ))
}
