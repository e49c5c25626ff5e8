//! Perplexity the way the field reports it, in two protocols.
//!
//! * [`Protocol::Standard`] (SparseGPT/Wanda): the token stream is cut into
//!   non-overlapping windows of `ctx` tokens (the tail is dropped); every token of a
//!   window but its first is scored; PPL = exp(mean NLL).
//! * [`Protocol::LlamaCpp`] (llama.cpp's `llama-perplexity`): same windows, but when the
//!   tokenizer adds a BOS the window's first token is replaced by BOS, and only the second
//!   half of each window is scored (tokens `ctx/2 + 1 .. ctx`, so every scored token has
//!   at least `ctx/2` tokens of context); the PPL comes with a standard error.

use alloc::vec::Vec;

use crate::forward::{ForwardError, KvCache, KvDtype, Runner};
use crate::model::{Embedding, Linear, Model};

/// A perplexity protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// SparseGPT/Wanda: all but the first token of each window scored.
    Standard,
    /// llama.cpp: BOS-led windows (when the model adds BOS), second half scored.
    LlamaCpp,
}

impl Protocol {
    /// The protocol's name as used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Standard => "standard",
            Protocol::LlamaCpp => "llama-cpp",
        }
    }

    /// Index of the first position whose *logits* are scored in a window of `ctx`.
    pub fn first_scored(self, ctx: usize) -> usize {
        match self {
            Protocol::Standard => 0,
            Protocol::LlamaCpp => ctx / 2,
        }
    }
}

/// Sums over the scored tokens of one or more windows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NllStats {
    /// Σ NLL (nats).
    pub sum: f64,
    /// Σ NLL².
    pub sum_sq: f64,
    /// Number of scored tokens.
    pub count: usize,
}

impl NllStats {
    /// Adds another set of scored tokens.
    pub fn merge(&mut self, o: &NllStats) {
        self.sum += o.sum;
        self.sum_sq += o.sum_sq;
        self.count += o.count;
    }
    /// Mean NLL.
    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
    /// exp(mean NLL).
    pub fn ppl(&self) -> f64 {
        libm::exp(self.mean())
    }
    /// llama.cpp's standard error of the PPL: `ppl · sqrt(var(NLL)/(n−1))`.
    pub fn ppl_stderr(&self) -> Option<f64> {
        if self.count < 2 {
            return None;
        }
        let n = self.count as f64;
        let var = self.sum_sq / n - self.mean() * self.mean();
        (var > 0.0).then(|| libm::sqrt(var / (n - 1.0)) * self.ppl())
    }
}

/// The windows a protocol evaluates: `(start, ctx)` ranges over the token stream,
/// at most `max_windows` of them.
pub fn windows(
    n_tokens: usize,
    ctx: usize,
    max_windows: Option<usize>,
) -> Vec<core::ops::Range<usize>> {
    let n = n_tokens.checked_div(ctx).unwrap_or(0);
    let n = max_windows.map_or(n, |m| n.min(m));
    (0..n).map(|i| i * ctx..(i + 1) * ctx).collect()
}

/// Scores one window: runs it from position 0 and returns the NLL stats of the tokens
/// the protocol scores. `bos` replaces the first token under [`Protocol::LlamaCpp`].
pub fn score_window<L: Linear, E: Embedding>(
    runner: &Runner<'_, L, E>,
    window: &[u32],
    protocol: Protocol,
    bos: Option<u32>,
) -> Result<NllStats, ForwardError> {
    score_window_kv(runner, window, protocol, bos, KvDtype::F32)
}

/// [`score_window`] with a KV cache of element type `kv`.
pub fn score_window_kv<L: Linear, E: Embedding>(
    runner: &Runner<'_, L, E>,
    window: &[u32],
    protocol: Protocol,
    bos: Option<u32>,
    kv: KvDtype,
) -> Result<NllStats, ForwardError> {
    let mut toks = window.to_vec();
    if let (Protocol::LlamaCpp, Some(b), Some(first)) = (protocol, bos, toks.first_mut()) {
        *first = b;
    }
    let mut kv = KvCache::new(&runner.model().config, window.len(), kv);
    let mut hidden = Vec::new();
    runner.forward(&toks, &mut kv, &mut hidden)?;
    let first = protocol.first_scored(window.len());
    let h = runner.model().config.hidden_size;
    let scored_end = window.len().saturating_sub(1);
    if first >= scored_end {
        return Ok(NllStats::default());
    }
    let nll = runner.nll(&hidden[first * h..scored_end * h], &window[first + 1..]);
    let mut s = NllStats::default();
    for v in nll {
        s.sum += v;
        s.sum_sq += v * v;
        s.count += 1;
    }
    Ok(s)
}

/// How [`perplexity`] measures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PplOptions {
    /// Window length in tokens (at least 2).
    pub ctx: usize,
    /// Which tokens are scored.
    pub protocol: Protocol,
    /// Score at most this many windows (`None`: every whole window of the text).
    pub max_windows: Option<usize>,
    /// The BOS token that leads each window under [`Protocol::LlamaCpp`] (`None` when
    /// the tokenizer adds none).
    pub bos: Option<u32>,
    /// Element type of the KV cache.
    pub kv: KvDtype,
}

/// What [`perplexity`] measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PplReport {
    /// Sums over every scored token.
    pub total: NllStats,
    /// Mean NLL of each window, in order (one entry per window scored).
    pub window_nll_mean: Vec<f64>,
}

/// Why [`perplexity`] measured nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PplError {
    /// A window shorter than 2 tokens scores nothing.
    #[error("a window must hold at least 2 tokens (got {ctx})")]
    WindowTooShort {
        /// The window length asked for.
        ctx: usize,
    },
    /// The text is shorter than one window.
    #[error(
        "the text has {tokens} tokens, fewer than one window of {ctx} (use a longer text or a shorter window)"
    )]
    TextTooShort {
        /// Tokens of the text.
        tokens: usize,
        /// The window length.
        ctx: usize,
    },
    /// The forward pass refused a window.
    #[error("forward pass")]
    Forward(#[source] ForwardError),
    /// No window was asked for (`max_windows` of 0).
    #[error("the number of windows must be at least 1 (got 0)")]
    NoWindows,
    /// A window's mean NLL (or the perplexity) is NaN or infinite: the model's outputs
    /// are not numbers, which is never a figure to report.
    #[error(
        "window {window}: the perplexity is not finite (NaN or infinite); a weight or setting of the model is NaN or infinite"
    )]
    NotFinite {
        /// The window (0-based) where it was first seen.
        window: usize,
    },
}

/// Perplexity of `tokens` (the whole tokenized text) under `opts`: the window loop the
/// host's `eval` and the board's `selftest` share, so both measure the same tokens the
/// same way. Runs `model` on `threads` threads (sized for `opts.ctx` once the text is
/// known to hold a window); `progress(done, total)` is called after each window.
pub fn perplexity<L: Linear, E: Embedding>(
    model: &Model<L, E>,
    threads: usize,
    tokens: &[u32],
    opts: &PplOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<PplReport, PplError> {
    if opts.ctx < 2 {
        return Err(PplError::WindowTooShort { ctx: opts.ctx });
    }
    if opts.max_windows == Some(0) {
        return Err(PplError::NoWindows);
    }
    let wins = windows(tokens.len(), opts.ctx, opts.max_windows);
    if wins.is_empty() {
        return Err(PplError::TextTooShort {
            tokens: tokens.len(),
            ctx: opts.ctx,
        });
    }
    let runner = Runner::new(model, opts.ctx, threads);
    let mut report = PplReport {
        total: NllStats::default(),
        window_nll_mean: Vec::with_capacity(wins.len()),
    };
    for (i, w) in wins.iter().enumerate() {
        let s = score_window_kv(
            &runner,
            &tokens[w.clone()],
            opts.protocol,
            opts.bos,
            opts.kv,
        )
        .map_err(PplError::Forward)?;
        if !s.mean().is_finite() {
            return Err(PplError::NotFinite { window: i });
        }
        report.window_nll_mean.push(s.mean());
        report.total.merge(&s);
        if !report.total.ppl().is_finite() {
            return Err(PplError::NotFinite { window: i });
        }
        progress(i + 1, wins.len());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_drop_the_tail() {
        assert_eq!(windows(10, 4, None), alloc::vec![0..4, 4..8]);
        assert_eq!(windows(10, 4, Some(1)), alloc::vec![0..4]);
        assert!(windows(3, 4, None).is_empty());
    }

    #[test]
    fn stderr_matches_closed_form() {
        // NLLs 1 and 3: mean 2, population variance 1, stderr = e² · sqrt(1/1).
        let s = NllStats {
            sum: 4.0,
            sum_sq: 10.0,
            count: 2,
        };
        assert!((s.ppl() - 2f64.exp()).abs() < 1e-12);
        assert!((s.ppl_stderr().unwrap() - 2f64.exp()).abs() < 1e-12);
    }

    #[test]
    fn llama_cpp_scores_the_second_half() {
        // ctx 512: llama.cpp scores n_ctx - 1 - n_ctx/2 = 255 tokens.
        let ctx = 512;
        let first = Protocol::LlamaCpp.first_scored(ctx);
        assert_eq!(ctx - 1 - first, 255);
        assert_eq!(ctx - 1 - Protocol::Standard.first_scored(ctx), 511);
    }
}
