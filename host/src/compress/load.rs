//! Stage "load": the source model, its tokenizer, the calibration windows and the
//! held-out text.

use cap_device::model::{DenseLinear, Model};
use cap_device::tokenizer::Tokenizer;

use super::calibration::{prefix_for_tokens, sample_windows, split_held_out};
use super::error::{CompressError, Result, StepContext, step_error};
use super::run::CompressOptions;
use crate::eval::read_text;
use crate::import::Checkpoint;

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
}

/// Loads the model and the texts, and samples the calibration windows.
pub fn load(opts: &CompressOptions) -> Result<Loaded> {
    let ck = Checkpoint::open(&opts.model).map_err(step_error)?;
    let model = ck
        .load_model()
        .step(|| format!("{}: loading the model", opts.model.display()))?;
    let tokenizer = ck.tokenizer().map_err(step_error)?;
    let calib_text = crate::calib::read_calib_text(&opts.calib).map_err(step_error)?;
    let (calib_part, held_out, eval_name) = match &opts.eval_text {
        Some(p) => (
            calib_text.as_str(),
            read_text(p, opts.eval_wikitext).map_err(step_error)?,
            p.display().to_string(),
        ),
        None => {
            let (c, e) = split_held_out(&calib_text, 0.1);
            (
                c,
                e.to_string(),
                format!("{} (held-out last 10%)", opts.calib.display()),
            )
        }
    };
    if opts.eval_ctx < 2 || opts.eval_windows == 0 {
        return Err(CompressError::Invalid(
            "--eval-ctx must be at least 2 and --eval-windows at least 1".into(),
        ));
    }
    let self_test_text =
        prefix_for_tokens(&held_out, opts.eval_ctx * opts.eval_windows + 1).to_string();
    let calib_tokens = tokenizer.encode(calib_part, true);
    let windows = sample_windows(&calib_tokens, opts.calib_samples, opts.calib_len, opts.seed)
        .step(|| format!("{}", opts.calib.display()))?;
    Ok(Loaded {
        model,
        tokenizer,
        windows,
        self_test_text,
        eval_name,
    })
}
