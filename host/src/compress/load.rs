//! Stage "load": the source model, its tokenizer, the calibration windows and the
//! held-out text.

use cap_device::model::{DenseLinear, Model};
use cap_device::tokenizer::Tokenizer;

use super::calibration::{prefix_for_tokens, sample_windows};
use super::error::{CompressError, Result, StepContext, step_error};
use super::run::{CompressOptions, Event};
use crate::eval::read_text;
use crate::import::Checkpoint;
use crate::pack::source_sha256;

/// The inputs of `compress`.
pub struct Loaded {
    /// The source model.
    pub model: Model<DenseLinear>,
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

/// Loads the model and the texts, and samples the calibration windows.
pub fn load(opts: &CompressOptions, on_event: &(dyn Fn(Event<'_>) + Sync)) -> Result<Loaded> {
    let ck = Checkpoint::open(&opts.model).map_err(step_error)?;
    let model = ck
        .load_model()
        .step(|| format!("{}: loading the model", opts.model.display()))?;
    let tokenizer = ck.tokenizer().map_err(step_error)?;
    let source_sha = source_sha256(&opts.model).map_err(step_error)?;
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
    if opts.eval_ctx < 2 || opts.eval_windows == 0 {
        return Err(CompressError::Invalid(
            "--eval-ctx must be at least 2 and --eval-windows at least 1".into(),
        ));
    }
    let self_test_text =
        prefix_for_tokens(&held_out, opts.eval_ctx * opts.eval_windows + 1).to_string();
    let (windows, calibration) = match (&calib_text, &opts.calib) {
        (Some(text), Some(p)) => {
            let calib_tokens = tokenizer.encode(text, true);
            let w = sample_windows(&calib_tokens, opts.calib_samples, opts.calib_len, opts.seed)
                .step(|| format!("{}", p.display()))?;
            (w, p.display().to_string())
        }
        _ => data_free(opts, &model, &tokenizer, &source_sha, on_event)?,
    };
    Ok(Loaded {
        model,
        tokenizer,
        windows,
        self_test_text,
        eval_name,
        calibration,
        source_sha256: source_sha,
    })
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
    if opts.calib_len < 2 {
        return Err(CompressError::Invalid(
            "--calib-len must be at least 2".into(),
        ));
    }
    super::calibration::check_calib_tokens(opts.calib_samples, opts.calib_len)?;
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
