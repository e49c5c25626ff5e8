//! Stage "measure": the written file, run in place by the board's loader and kernels,
//! scored on the held-out windows (the figures are what `cap-device` computes from
//! these bytes), and the source model on the same windows if asked.

use std::path::Path;

use cap_device::ppl::Protocol;

use super::error::{Result, step_error};
use super::load::Loaded;
use super::run::{CompressOptions, Event};
use crate::eval::{EvalOptions, EvalReport, evaluate};

/// The measurements of a written file.
pub struct Measured {
    /// Perplexity of the file (all but each window's first token scored).
    pub eval: EvalReport,
    /// The file's self-test figure: llama.cpp's rule (second half of each window).
    pub self_test: EvalReport,
    /// The source model on the same windows (unless skipped).
    pub dense_eval: Option<EvalReport>,
}

/// Measures the file at `path`.
pub fn measure(
    opts: &CompressOptions,
    input: &Loaded,
    path: &Path,
    on_event: &(dyn Fn(Event<'_>) + Sync),
) -> Result<Measured> {
    let eval_opts = EvalOptions {
        ctx: opts.eval_ctx,
        protocol: Protocol::Standard,
        max_windows: Some(opts.eval_windows),
        threads: opts.threads,
    };
    let stage = |name| {
        on_event(Event::Stage {
            name,
            total: opts.eval_windows as u64,
        })
    };
    let progress = |d: usize, _| on_event(Event::Progress(d as u64));
    let text = &input.self_test_text;
    stage("eval (compressed file)");
    let map = crate::capmodel::map(path).map_err(step_error)?;
    let file = crate::capmodel::parse_verified(path, &map).map_err(step_error)?;
    let written = crate::capmodel::model(path, &file).map_err(step_error)?;
    let tok = &input.tokenizer;
    let eval = evaluate(&written, tok, text, &input.eval_name, &eval_opts, progress)
        .map_err(step_error)?;
    stage("self-test figure (llama.cpp protocol)");
    let llama = EvalOptions {
        protocol: Protocol::LlamaCpp,
        ..eval_opts.clone()
    };
    let self_test =
        evaluate(&written, tok, text, &input.eval_name, &llama, progress).map_err(step_error)?;
    drop(written);
    drop(file);
    drop(map);
    // Streamed, the source is never whole in memory: it is not evaluated.
    let dense_eval = if opts.source_eval && !opts.stream {
        stage("eval (source model)");
        Some(
            evaluate(
                input.model(),
                tok,
                text,
                &input.eval_name,
                &eval_opts,
                progress,
            )
            .map_err(step_error)?,
        )
    } else {
        None
    };
    Ok(Measured {
        eval,
        self_test,
        dense_eval,
    })
}
