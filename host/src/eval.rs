//! `cap-host eval`: perplexity of a model on a text, with the device's forward pass.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cap_device::forward::Runner;
use cap_device::model::{Embedding, Linear, Model};
use cap_device::ppl::{NllStats, Protocol, score_window, windows};
use cap_device::tokenizer::Tokenizer;
use serde::Serialize;

/// How to evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Window length in tokens.
    pub ctx: usize,
    /// Which tokens are scored.
    pub protocol: Protocol,
    /// Evaluate at most this many windows.
    pub max_windows: Option<usize>,
    /// Worker threads.
    pub threads: usize,
}

/// The result of an evaluation, as printed by `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// exp(mean NLL).
    pub ppl: f64,
    /// llama.cpp's standard error of the PPL (reported for the llama-cpp protocol).
    pub ppl_stderr: Option<f64>,
    /// Mean NLL over scored tokens (nats).
    pub nll_mean: f64,
    /// Number of scored tokens.
    pub tokens_scored: usize,
    /// Number of windows evaluated.
    pub windows: usize,
    /// Window length.
    pub ctx: usize,
    /// Protocol name.
    pub protocol: &'static str,
    /// Tokens in the whole tokenized text.
    pub text_tokens: usize,
    /// Tokens run through the model per second (windows × ctx / seconds).
    pub tokens_per_s: f64,
    /// Wall-clock seconds of the forward passes.
    pub seconds: f64,
    /// Worker threads.
    pub threads: usize,
    /// Mean NLL of each window, in order.
    pub window_nll_mean: Vec<f64>,
}

/// Reads an evaluation text. With `wikitext`, builds the text the way the SparseGPT /
/// Wanda code does from the Hugging Face `wikitext` dataset: every line of the raw file is
/// a row that keeps its newline, whitespace-only rows become empty, rows are joined with
/// `"\n\n"`.
pub fn read_text(path: &Path, wikitext: bool) -> Result<String> {
    let raw =
        std::fs::read(path).with_context(|| format!("cannot read text file {}", path.display()))?;
    let text = String::from_utf8(raw).map_err(|e| {
        anyhow::anyhow!(
            "{}: not valid UTF-8 (first bad byte at {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(if wikitext { wikitext_rows(&text) } else { text })
}

/// The Hugging Face `wikitext` rows of a raw file, joined with `"\n\n"`.
pub fn wikitext_rows(raw: &str) -> String {
    let rows: Vec<&str> = raw
        .split_inclusive('\n')
        .map(|line| if line.trim().is_empty() { "" } else { line })
        .collect();
    rows.join("\n\n")
}

/// Evaluates `model` on `text`; `progress(done, total)` is called after each window.
pub fn evaluate<L: Linear, E: Embedding>(
    model: &Model<L, E>,
    tokenizer: &Tokenizer,
    text: &str,
    text_name: &str,
    opts: &EvalOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if opts.ctx < 2 {
        bail!("--ctx must be at least 2 (got {})", opts.ctx);
    }
    let tokens = tokenizer.encode(text, true);
    let wins = windows(tokens.len(), opts.ctx, opts.max_windows);
    if wins.is_empty() {
        bail!(
            "{text_name}: the text has {} tokens, fewer than one window of {} (use a longer text or a smaller --ctx)",
            tokens.len(),
            opts.ctx
        );
    }
    let runner = Runner::new(model, opts.ctx, opts.threads);
    let bos = tokenizer.bos_id().filter(|_| tokenizer.adds_bos());
    let start = Instant::now();
    let mut total = NllStats::default();
    let mut per_window = Vec::with_capacity(wins.len());
    for (i, w) in wins.iter().enumerate() {
        let s = score_window(&runner, &tokens[w.clone()], opts.protocol, bos)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        per_window.push(s.mean());
        total.merge(&s);
        progress(i + 1, wins.len());
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(EvalReport {
        ppl: total.ppl(),
        ppl_stderr: total.ppl_stderr(),
        nll_mean: total.mean(),
        tokens_scored: total.count,
        windows: wins.len(),
        ctx: opts.ctx,
        protocol: opts.protocol.name(),
        text_tokens: tokens.len(),
        tokens_per_s: (wins.len() * opts.ctx) as f64 / seconds,
        seconds,
        threads: opts.threads,
        window_nll_mean: per_window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wikitext_rows_match_the_hf_loader() {
        // HF rows of " \n = A = \n \nx y\n" are ["", " = A = \n", "", "x y\n"].
        let raw = " \n = A = \n \nx y\n";
        assert_eq!(wikitext_rows(raw), "\n\n = A = \n\n\n\n\nx y\n");
    }
}
