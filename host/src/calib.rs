//! Calibration statistics from the device's own forward pass: for every linear layer,
//! the root-mean-square of each input channel over calibration tokens,
//! `d_j = sqrt(mean_t x_tj²)` (the diagonal of `XᵀX / T`, square-rooted). These are the
//! input-channel weights of activation-aware decomposition (W·diag(d), as OATS and
//! Wanda weigh columns) and of later allocation steps.
//!
//! The statistics are gathered by wrapping each dense linear in [`Recording`], a
//! [`Linear`] that accumulates the squares of its inputs and then runs the wrapped
//! layer, so the forward pass itself is untouched and what is recorded is exactly what
//! the layers see on the device.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use cap_device::forward::{ForwardError, Runner};
use cap_device::model::{Block, DenseLinear, Head, Linear, Model};
use cap_device::tokenizer::Tokenizer;

use crate::rpca::model::linear_matrices;

/// A dense linear that records the per-column sum of squares of its inputs.
pub struct Recording<'a> {
    inner: &'a DenseLinear,
    /// (sum over tokens of x², tokens seen); f64 so long calibration runs do not lose
    /// small contributions.
    acc: Mutex<(Vec<f64>, u64)>,
}

impl<'a> Recording<'a> {
    /// Wraps `inner` with empty statistics.
    pub fn new(inner: &'a DenseLinear) -> Self {
        Recording {
            inner,
            acc: Mutex::new((vec![0.0; inner.in_features], 0)),
        }
    }

    /// Adds the rows of `x` (inputs of the wrapped layer) to the statistics without
    /// running the layer: the output head, which the forward pass leaves to the
    /// caller, is recorded from the final hidden states this way.
    pub fn record(&self, x: &[f32]) {
        let n = self.inner.in_features;
        let mut acc = self.acc.lock().unwrap_or_else(|e| e.into_inner());
        for row in x.chunks_exact(n) {
            for (s, v) in acc.0.iter_mut().zip(row) {
                *s += f64::from(*v) * f64::from(*v);
            }
        }
        acc.1 += (x.len() / n) as u64;
    }

    /// `sqrt(mean x²)` per input column over every token seen so far (zeros if none).
    pub fn rms(&self) -> Vec<f32> {
        let acc = self.acc.lock().unwrap_or_else(|e| e.into_inner());
        let t = acc.1.max(1) as f64;
        acc.0.iter().map(|s| (s / t).sqrt() as f32).collect()
    }
}

impl Linear for Recording<'_> {
    fn in_features(&self) -> usize {
        self.inner.in_features
    }
    fn out_features(&self) -> usize {
        self.inner.out_features
    }
    fn forward(&self, x: &[f32], y: &mut [f32], scratch: &mut Vec<f32>, threads: usize) {
        self.record(x);
        self.inner.forward(x, y, scratch, threads);
    }
}

/// The model with every linear wrapped in [`Recording`] (norms and embeddings
/// borrowed by cloning: calibration is a host-side, one-off cost).
fn recording_model(model: &Model<DenseLinear>) -> Model<Recording<'_>> {
    fn wrap(b: &Block<DenseLinear>) -> Block<Recording<'_>> {
        b.map_linears(|_, l| Recording::new(l))
    }
    Model {
        config: model.config.clone(),
        embed: model.embed.clone(),
        blocks: model.blocks.iter().map(wrap).collect(),
        norm: model.norm.clone(),
        head: match &model.head {
            Head::Tied => Head::Tied,
            Head::Separate(h) => Head::Separate(Recording::new(h)),
        },
    }
}

/// Where the calibration tokens come from.
#[derive(Clone, Debug)]
pub struct CalibOptions {
    /// Tokens per window (each window runs from position 0).
    pub ctx: usize,
    /// Number of windows: the first `windows` non-overlapping windows of the text.
    pub windows: usize,
    /// Worker threads of the forward pass.
    pub threads: usize,
}

/// Why calibration statistics could not be gathered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CalibError {
    /// A block could not be read from the checkpoint (streamed runs).
    #[error("{0}")]
    Source(String),
    /// The calibration text could not be read.
    #[error(transparent)]
    Text(#[from] crate::eval::EvalError),
    /// A line of a JSON-lines text is not JSON.
    #[error("{}: line {line}: not JSON", path.display())]
    NotJson {
        /// The file.
        path: std::path::PathBuf,
        /// The line (from 1).
        line: usize,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A line of a JSON-lines text has no string field `text`.
    #[error("{}: line {line}: no string field \"text\"", path.display())]
    NoTextField {
        /// The file.
        path: std::path::PathBuf,
        /// The line (from 1).
        line: usize,
    },
    /// No window, or windows of no tokens, were asked for.
    #[error("calibration needs at least one window of at least one token")]
    NoWindows,
    /// The text is shorter than one calibration window.
    #[error("{text}: {tokens} tokens, fewer than one calibration window of {ctx}")]
    TextTooShort {
        /// The text's name.
        text: String,
        /// Tokens of the text.
        tokens: usize,
        /// The window length.
        ctx: usize,
    },
    /// The forward pass refused a window.
    #[error("calibration forward pass")]
    Forward(#[source] ForwardError),
}

/// Reads a calibration text: JSON lines with a `text` field (the C4 layout) become the
/// documents joined with `"\n\n"`; anything else is used as it is.
pub fn read_calib_text(path: &Path) -> Result<String, CalibError> {
    let raw = crate::eval::read_text(path, false)?;
    let first = raw.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if !first.trim_start().starts_with('{') {
        return Ok(raw);
    }
    let mut docs = Vec::new();
    for (i, line) in raw
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|source| CalibError::NotJson {
                path: path.into(),
                line: i + 1,
                source,
            })?;
        match v.get("text").and_then(|t| t.as_str()) {
            Some(t) => docs.push(t.to_string()),
            None => {
                return Err(CalibError::NoTextField {
                    path: path.into(),
                    line: i + 1,
                });
            }
        }
    }
    Ok(docs.join("\n\n"))
}

/// Per-linear input RMS (`d`, length = the layer's input width) keyed by GGUF tensor
/// name, from running `model` on the first `opts.windows` windows of `text`.
/// `progress(done, total)` is called after each window.
pub fn input_rms(
    model: &Model<DenseLinear>,
    tokenizer: &Tokenizer,
    text: &str,
    text_name: &str,
    opts: &CalibOptions,
    progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<String, Vec<f32>>, CalibError> {
    let tokens = calib_tokens(tokenizer, text, text_name, opts)?;
    let windows: Vec<&[u32]> = tokens.chunks_exact(opts.ctx).take(opts.windows).collect();
    input_rms_windows(model, &windows, opts.threads, progress)
}

/// The tokens of `text`, checked to hold at least one window of `opts.ctx` (a warning
/// when fewer than `opts.windows`).
fn calib_tokens(
    tokenizer: &Tokenizer,
    text: &str,
    text_name: &str,
    opts: &CalibOptions,
) -> Result<Vec<u32>, CalibError> {
    if opts.ctx < 1 || opts.windows < 1 {
        return Err(CalibError::NoWindows);
    }
    let tokens = tokenizer.encode(text, true);
    let have = tokens.len() / opts.ctx;
    if have == 0 {
        return Err(CalibError::TextTooShort {
            text: text_name.into(),
            tokens: tokens.len(),
            ctx: opts.ctx,
        });
    }
    if have < opts.windows {
        tracing::warn!(
            "{text_name}: only {have} calibration windows of {} tokens",
            opts.ctx
        );
    }
    Ok(tokens)
}

/// [`input_rms`] of the model in `src` read one block at a time (block-major passes,
/// [`crate::compress::source::input_norms`]): the same windows, the same figures.
pub fn input_rms_source(
    src: &dyn crate::compress::source::BlockSource,
    tokenizer: &Tokenizer,
    text: &str,
    text_name: &str,
    opts: &CalibOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<String, Vec<f32>>, CalibError> {
    let tokens = calib_tokens(tokenizer, text, text_name, opts)?;
    let windows: Vec<&[u32]> = tokens.chunks_exact(opts.ctx).take(opts.windows).collect();
    let n = src.n_blocks();
    let stats =
        crate::compress::source::input_norms(src, &windows, opts.threads, |b| progress(b, n))
            .map_err(|e| CalibError::Source(e.to_string()))?;
    let names = crate::compress::source::linear_names_with_head(&src.model().config);
    debug_assert_eq!(names.len(), stats.len());
    Ok(names.into_iter().zip(stats).collect())
}

/// Per-linear input RMS, as [`input_rms`], from running `model` on each token window
/// of `windows` (each from position 0).
pub fn input_rms_windows(
    model: &Model<DenseLinear>,
    windows: &[&[u32]],
    threads: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<String, Vec<f32>>, CalibError> {
    let max_ctx = windows.iter().map(|w| w.len()).max().unwrap_or(0);
    if max_ctx == 0 {
        return Err(CalibError::NoWindows);
    }
    let rec = recording_model(model);
    let runner = Runner::new(&rec, max_ctx, threads);
    let mut hidden = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        let mut kv = runner.new_cache();
        runner
            .forward(w, &mut kv, &mut hidden)
            .map_err(CalibError::Forward)?;
        // The forward pass stops at the final norm: its output is the head's input.
        if let Head::Separate(h) = &rec.head {
            h.record(&hidden);
        }
        progress(i + 1, windows.len());
    }
    // Names in the same order and spelling as decompose uses.
    let names: Vec<String> = linear_matrices(model).into_iter().map(|(n, _)| n).collect();
    let mut stats = Vec::new();
    for b in &rec.blocks {
        for (_, l) in b.linears() {
            stats.push(l.rms());
        }
    }
    if let Head::Separate(h) = &rec.head {
        stats.push(h.rms());
    }
    debug_assert_eq!(names.len(), stats.len());
    Ok(names.into_iter().zip(stats).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_accumulates_the_mean_square_and_passes_through() {
        let w = DenseLinear::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3).unwrap();
        let r = Recording::new(&w);
        let x = [1.0, -2.0, 0.5, 3.0, 0.0, -1.5];
        let mut y = [0.0; 4];
        r.forward(&x, &mut y, &mut Vec::new(), 1);
        // y = x·Wᵀ, row by row.
        assert_eq!(y, [-1.5, -3.0, -1.5, 3.0]);
        let d = r.rms();
        let want = [
            ((1.0f64 + 9.0) / 2.0).sqrt(),
            ((4.0f64 + 0.0) / 2.0).sqrt(),
            ((0.25f64 + 2.25) / 2.0).sqrt(),
        ];
        for (a, b) in d.iter().zip(want) {
            assert!((f64::from(*a) - b).abs() < 1e-6, "{d:?}");
        }
    }

    #[test]
    fn first_layer_scales_match_the_closed_form() {
        // The q/k/v inputs of block 0 are RMSNorm(embedding) · attn_norm, computed here
        // independently in f64 from the token ids; the recorded RMS must match to f32
        // rounding (1e-5 relative: a norm and a mean over a few hundred terms).
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny/llama-tied/llama-tied.gguf");
        let ck = crate::import::Checkpoint::open(&path).unwrap();
        let model = ck.load_model().unwrap();
        let tok = ck.tokenizer().unwrap();
        let text = "The quick brown fox jumps over the lazy dog. 0123456789 ".repeat(8);
        let opts = CalibOptions {
            ctx: 32,
            windows: 3,
            threads: 1,
        };
        let got = input_rms(&model, &tok, &text, "t", &opts, |_, _| {}).unwrap();
        let ids = tok.encode(&text, true);
        let h = model.config.hidden_size;
        let eps = f64::from(model.config.rms_eps);
        let mut sum = vec![0.0f64; h];
        let used = &ids[..opts.ctx * opts.windows];
        for &t in used {
            let e = &model.embed[t as usize * h..(t as usize + 1) * h];
            let ms = e.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / h as f64;
            let r = 1.0 / (ms + eps).sqrt();
            for j in 0..h {
                let x = f64::from(e[j]) * r * f64::from(model.blocks[0].attn_norm[j]);
                sum[j] += x * x;
            }
        }
        for name in [
            "blk.0.attn_q.weight",
            "blk.0.attn_k.weight",
            "blk.0.attn_v.weight",
        ] {
            let d = &got[name];
            assert_eq!(d.len(), h);
            for j in 0..h {
                let want = (sum[j] / used.len() as f64).sqrt();
                assert!(
                    (f64::from(d[j]) - want).abs() <= 1e-5 * want.max(1e-6),
                    "{name}[{j}]: {} vs {want}",
                    d[j]
                );
            }
        }
        // Every linear has a scale of its input width.
        for (name, lin) in linear_matrices(&model) {
            assert_eq!(got[&name].len(), lin.in_features, "{name}");
            assert!(
                got[&name].iter().all(|v| v.is_finite() && *v >= 0.0),
                "{name}"
            );
        }
    }

    #[test]
    fn json_lines_become_documents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c4.json");
        std::fs::write(&p, "{\"text\":\"a b\"}\n{\"text\":\"c\\nd\"}\n").unwrap();
        assert_eq!(read_calib_text(&p).unwrap(), "a b\n\nc\nd");
        std::fs::write(&p, "{\"text\":\"a\"}\n{\"x\":1}\n").unwrap();
        let e = read_calib_text(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("c4.json"), "{e}");
        let q = dir.path().join("plain.txt");
        std::fs::write(&q, "just text\n").unwrap();
        assert_eq!(read_calib_text(&q).unwrap(), "just text\n");
    }
}
