//! Where the pruning methods get their blocks: a model held in memory, or a checkpoint
//! read one block at a time ([`Streamed`]), behind one trait ([`BlockSource`]); and
//! the block-major passes the allocation search makes over either (every calibration
//! window through block 0, then block 1, ...), which hold one block at a time.
//!
//! A block-major pass computes what the token-major forward pass
//! ([`cap_device::forward::Runner::forward`]) computes, bit for bit: each window runs
//! through a block in the forward pass's chunks of [`PREFILL_CHUNK`] tokens, with a KV
//! cache of its own, and the windows' scores are summed in the same order.

use std::borrow::Cow;
use std::collections::BTreeMap;

use cap_device::config::Config;
use cap_device::forward::{KvCache, KvDtype, PREFILL_CHUNK, Runner};
use cap_device::model::{Block, DenseLinear, Head, Linear, Model};
use cap_device::ppl::NllStats;

use super::error::{CompressError, Result, step_error};
use crate::calib::Recording;
use crate::import::Checkpoint;

/// Blocks of a dense model, one at a time.
pub trait BlockSource: Sync {
    /// The model a [`Runner`] runs the embedding, the final norm and the head of: the
    /// whole model, or its skeleton (no blocks).
    fn model(&self) -> &Model<DenseLinear>;

    /// Number of blocks.
    fn n_blocks(&self) -> usize {
        self.model().config.n_layers
    }

    /// Block `i` in `f32`.
    fn block(&self, i: usize) -> Result<Cow<'_, Block<DenseLinear>>>;
}

impl BlockSource for Model<DenseLinear> {
    fn model(&self) -> &Model<DenseLinear> {
        self
    }

    fn block(&self, i: usize) -> Result<Cow<'_, Block<DenseLinear>>> {
        self.blocks
            .get(i)
            .map(Cow::Borrowed)
            .ok_or_else(|| CompressError::Internal(format!("the model has no block {i}")))
    }
}

/// A checkpoint read block by block: the skeleton (embedding, final norm, head) stays
/// in memory, each block is read from the mapped file and dequantized when asked for,
/// and dropped by the caller after use.
pub struct Streamed {
    ck: Checkpoint,
    skeleton: Model<DenseLinear>,
}

impl Streamed {
    /// Opens the checkpoint's skeleton.
    pub fn new(ck: Checkpoint) -> Result<Self> {
        let skeleton = ck.skeleton().map_err(step_error)?;
        Ok(Streamed { ck, skeleton })
    }

    /// Block `i` without its linears' weights (norms and biases only).
    pub fn hollow_block(&self, i: usize) -> Result<Block<DenseLinear>> {
        self.ck
            .block(&self.skeleton.config, i, false)
            .map_err(step_error)
    }
}

impl BlockSource for Streamed {
    fn model(&self) -> &Model<DenseLinear> {
        &self.skeleton
    }

    fn block(&self, i: usize) -> Result<Cow<'_, Block<DenseLinear>>> {
        Ok(Cow::Owned(
            self.ck
                .block(&self.skeleton.config, i, true)
                .map_err(step_error)?,
        ))
    }
}

/// The source of a `compress` run.
pub enum Source {
    /// The whole model in memory.
    Memory(Model<DenseLinear>),
    /// The checkpoint read block by block (`--stream`).
    Streamed(Streamed),
}

impl BlockSource for Source {
    fn model(&self) -> &Model<DenseLinear> {
        match self {
            Source::Memory(m) => m,
            Source::Streamed(s) => s.model(),
        }
    }

    fn block(&self, i: usize) -> Result<Cow<'_, Block<DenseLinear>>> {
        match self {
            Source::Memory(m) => m.block(i),
            Source::Streamed(s) => s.block(i),
        }
    }
}

impl Streamed {
    /// The skeleton with every block put in place without its linears' weights (norms
    /// and biases only): what the writer reads around linears encoded already. The
    /// blocks stay; [`BlockSource::block`] still reads whole ones from the file.
    pub fn hollow_model(&mut self) -> Result<&Model<DenseLinear>> {
        let blocks = (0..self.skeleton.config.n_layers)
            .map(|i| self.hollow_block(i))
            .collect::<Result<_>>()?;
        self.skeleton.blocks = blocks;
        Ok(&self.skeleton)
    }
}

/// `m` without its blocks: what a runner of block-major passes needs of it.
pub fn skeleton_of(m: &Model<DenseLinear>) -> Model<DenseLinear> {
    Model {
        config: m.config.clone(),
        embed: m.embed.clone(),
        blocks: vec![],
        norm: m.norm.clone(),
        head: m.head.clone(),
    }
}

/// The residual streams of `windows` entering block 0.
pub fn embedded(runner: &Runner<'_, DenseLinear>, windows: &[&[u32]]) -> Vec<Vec<f32>> {
    let h = runner.model().config.hidden_size;
    windows
        .iter()
        .map(|w| {
            let mut x = vec![0.0; w.len() * h];
            runner.embed(w, &mut x);
            x
        })
        .collect()
}

/// Runs block `layer` (`b`) in place on one window's residual stream `x`, in the
/// forward pass's chunks with a cache of its own.
pub fn run_window<L: Linear>(
    runner: &Runner<'_, DenseLinear>,
    config: &Config,
    layer: usize,
    b: &Block<L>,
    x: &mut [f32],
) {
    let h = config.hidden_size;
    let mut kv = KvCache::new(config, x.len() / h, KvDtype::F32);
    for chunk in x.chunks_mut(PREFILL_CHUNK * h) {
        runner.run_block(layer, b, chunk, &mut kv);
        kv.advance(chunk.len() / h);
    }
}

/// Per block linear (file order), then an untied head, `sqrt(mean x²)` of its input
/// columns over every token of `windows` on the source model: what
/// [`crate::calib::input_rms_windows`] measures, one block at a time. `progress(blocks
/// done)`.
pub fn input_norms(
    src: &dyn BlockSource,
    windows: &[&[u32]],
    threads: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let config = &src.model().config;
    let ctx = windows.iter().map(|w| w.len()).max().unwrap_or(0);
    let runner = Runner::new(src.model(), ctx, threads);
    let mut xs = embedded(&runner, windows);
    let mut out = Vec::with_capacity(src.n_blocks() * 7);
    for bi in 0..src.n_blocks() {
        let b = src.block(bi)?;
        let rec = b.map_linears(|_, l| Recording::new(l));
        for x in &mut xs {
            run_window(&runner, config, bi, &rec, x);
        }
        out.extend(rec.linears().iter().map(|(_, l)| l.rms()));
        progress(bi + 1);
    }
    // An untied head's inputs: the final norm of the last residual streams.
    if let Head::Separate(h) = &src.model().head {
        let rec = Recording::new(h);
        let mut hidden = Vec::new();
        for x in &xs {
            hidden.resize(x.len(), 0.0);
            cap_kernels::ops::rms_norm(&mut hidden, x, &src.model().norm, config.rms_eps);
            rec.record(&hidden);
        }
        out.push(rec.rms());
    }
    Ok(out)
}

/// Mean NLL (nats) of `windows` (every token but each window's first scored, as
/// [`super::calibration::calibration_loss`]) on the blocks of `src`, each changed by
/// `change(block index, block)` first; the embedding, final norm and head those of
/// `outer` (`src.model()`, or a copy of its skeleton with them rounded).
pub fn calibration_loss(
    src: &dyn BlockSource,
    outer: &Model<DenseLinear>,
    windows: &[&[u32]],
    threads: usize,
    change: &(dyn Fn(usize, &Block<DenseLinear>) -> Block<DenseLinear> + Sync),
) -> Result<f64> {
    let config = &outer.config;
    let h = config.hidden_size;
    let ctx = windows.iter().map(|w| w.len()).max().unwrap_or(0);
    let runner = Runner::new(outer, ctx, threads);
    let mut xs = embedded(&runner, windows);
    for bi in 0..src.n_blocks() {
        let b = change(bi, &*src.block(bi)?);
        for x in &mut xs {
            run_window(&runner, config, bi, &b, x);
        }
    }
    let mut total = NllStats::default();
    let mut hidden = Vec::new();
    for (x, w) in xs.iter().zip(windows) {
        if w.len() < 2 {
            continue;
        }
        hidden.resize(x.len(), 0.0);
        cap_kernels::ops::rms_norm(&mut hidden, x, &outer.norm, config.rms_eps);
        let nll = runner.nll(&hidden[..(w.len() - 1) * h], &w[1..]);
        let mut s = NllStats::default();
        for v in nll {
            s.sum += v;
            s.sum_sq += v * v;
            s.count += 1;
        }
        total.merge(&s);
    }
    if total.count == 0 {
        return Err(CompressError::Numerical(
            "calibration forward pass: no token to score".into(),
        ));
    }
    Ok(total.mean())
}

/// Names of the block linears of a model with configuration `c`, in file order (the
/// order of [`input_norms`] and of every per-linear list of `compress`).
pub fn linear_names(c: &Config) -> Vec<String> {
    cap_device::tensors::compressible(c)
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// [`linear_names`], then an untied head's: the order of [`input_norms`].
pub fn linear_names_with_head(c: &Config) -> Vec<String> {
    cap_device::tensors::linears(c)
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// `input_norms` as a map by linear name.
pub fn norms_by_name(c: &Config, norms: Vec<Vec<f32>>) -> BTreeMap<String, Vec<f32>> {
    linear_names_with_head(c).into_iter().zip(norms).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::calibration::calibration_loss as forward_loss;

    fn tiny(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny")
            .join(name)
    }

    /// The block-major passes against the token-major forward pass, on a streamed
    /// checkpoint and on the same model in memory: equal bit for bit (same operations
    /// in the same order). The fixtures hold 256 positions, one chunk: windows of
    /// several chunks are compared on SmolLM2 in `tests/stream.rs`.
    #[test]
    fn block_major_passes_equal_the_forward_pass() {
        for fixture in [
            "llama-tied-bf16-sharded",
            "qwen2",
            "gemma3/gemma3.gguf",
            "llama3-scaled",
        ] {
            let ck = Checkpoint::open(&tiny(fixture)).unwrap();
            let model = ck.load_model().unwrap();
            let streamed = Streamed::new(Checkpoint::open(&tiny(fixture)).unwrap()).unwrap();
            for i in 0..model.blocks.len() {
                let (a, b) = (streamed.block(i).unwrap(), &model.blocks[i]);
                for ((n, x), (_, y)) in a.linears().iter().zip(b.linears()) {
                    assert_eq!(x.weight, y.weight, "{fixture} block {i} {n}");
                }
                assert_eq!((&a.attn_norm, &a.mlp_norm), (&b.attn_norm, &b.mlp_norm));
                assert_eq!((&a.qkv_bias, &a.qk_norm), (&b.qkv_bias, &b.qk_norm));
                assert_eq!(a.post_norms, b.post_norms);
            }
            let toks: Vec<u32> = (0..600u32).map(|i| (i * 7 + 3) % 200).collect();
            let windows: Vec<&[u32]> = vec![&toks[..40], &toks[40..250]];
            let want = forward_loss(&model, &windows, 2).unwrap();
            let same = |b: &Block<DenseLinear>| b.clone();
            for src in [&model as &dyn BlockSource, &streamed] {
                let got = calibration_loss(src, src.model(), &windows, 2, &|_, b| same(b)).unwrap();
                assert_eq!(got.to_bits(), want.to_bits(), "{fixture}");
            }
            let rms = crate::calib::input_rms_windows(&model, &windows, 2, |_, _| {}).unwrap();
            let got = norms_by_name(
                &model.config,
                input_norms(&streamed, &windows, 2, |_| {}).unwrap(),
            );
            assert_eq!(rms.len(), got.len(), "{fixture}");
            for (name, v) in &got {
                assert_eq!(&rms[name], v, "{fixture} {name}");
                assert!(
                    v.iter().any(|&x| x > 0.0),
                    "{fixture} {name}: no input seen"
                );
            }
        }
    }
}
