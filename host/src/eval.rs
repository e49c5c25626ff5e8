//! `cap-host eval`: perplexity of a model on a text, with the device's forward pass.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cap_device::forward::KvDtype;
use cap_device::model::{Embedding, Linear, Model};
use cap_device::ppl::{PplError, PplOptions, Protocol, perplexity};
use cap_device::tokenizer::Tokenizer;
use serde::Serialize;

/// Why a text could not be read or evaluated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// The text file could not be read.
    #[error("cannot read text file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The text is longer than [`MAX_TEXT_BYTES`].
    #[error("{}: longer than {MAX_TEXT_BYTES} bytes, the most a text may have", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The text file is not UTF-8.
    #[error("{}: not valid UTF-8 (first bad byte at {offset})", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Offset of the first byte that is not UTF-8.
        offset: usize,
    },
    /// The perplexity could not be measured on the text.
    #[error("{text}")]
    Perplexity {
        /// The text's name (its path).
        text: String,
        /// What went wrong.
        #[source]
        source: PplError,
    },
    /// A window (or calibration sequence) is longer than the model's positions.
    #[error(
        "a context of {ctx} tokens exceeds the model's {max_position} positions (lower {flag})"
    )]
    ContextTooLong {
        /// The tokens asked for.
        ctx: usize,
        /// The model's positions (`max_position`).
        max_position: usize,
        /// The flag that asked for them (`--ctx`, `--eval-ctx`, `--calib-len`).
        flag: &'static str,
    },
}

/// Refuses a context longer than the model was trained for, as the board does
/// (`cap-device`): positions past it are extrapolated, and it would size the KV cache.
/// `flag` names the option that set `ctx` in the message. `eval --ctx` and `compress
/// --eval-ctx`/`--calib-len` share it.
pub fn check_ctx(
    ctx: usize,
    config: &cap_device::config::Config,
    flag: &'static str,
) -> Result<(), EvalError> {
    if ctx > config.max_position {
        return Err(EvalError::ContextTooLong {
            ctx,
            max_position: config.max_position,
            flag,
        });
    }
    Ok(())
}

/// The longest text [`read_text`] reads: 1 GiB (WikiText-103's training split is 0.5 GB;
/// tokenizing a text costs 4 bytes per token on top of it).
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

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
///
/// At most [`MAX_TEXT_BYTES`] are read: a text is tokenized whole, and `/dev/zero` or a
/// runaway pipe would otherwise be read until memory ran out.
pub fn read_text(path: &Path, wikitext: bool) -> Result<String, EvalError> {
    use std::io::Read;
    let read_err = |source| EvalError::Read {
        path: path.into(),
        source,
    };
    let mut raw = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TEXT_BYTES + 1).read_to_end(&mut raw))
        .map_err(read_err)?;
    if raw.len() as u64 > MAX_TEXT_BYTES {
        return Err(EvalError::TooLarge { path: path.into() });
    }
    let text = String::from_utf8(raw).map_err(|e| EvalError::NotUtf8 {
        path: path.into(),
        offset: e.utf8_error().valid_up_to(),
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
    progress: impl FnMut(usize, usize),
) -> Result<EvalReport, EvalError> {
    let tokens = tokenizer.encode(text, true);
    let ppl = PplOptions {
        ctx: opts.ctx,
        protocol: opts.protocol,
        max_windows: opts.max_windows,
        bos: tokenizer.bos_id().filter(|_| tokenizer.adds_bos()),
        kv: KvDtype::F32,
    };
    let start = Instant::now();
    let run = perplexity(model, opts.threads, &tokens, &ppl, progress).map_err(|source| {
        EvalError::Perplexity {
            text: text_name.into(),
            source,
        }
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let (total, n_windows) = (run.total, run.window_nll_mean.len());
    Ok(EvalReport {
        ppl: total.ppl(),
        ppl_stderr: total.ppl_stderr(),
        nll_mean: total.mean(),
        tokens_scored: total.count,
        windows: n_windows,
        ctx: opts.ctx,
        protocol: opts.protocol.name(),
        text_tokens: tokens.len(),
        tokens_per_s: (n_windows * opts.ctx) as f64 / seconds,
        seconds,
        threads: opts.threads,
        window_nll_mean: run.window_nll_mean,
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
