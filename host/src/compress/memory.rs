//! How much memory a `compress` run holds, from the model's shapes and the
//! calibration request alone, so a run that cannot fit is refused before it loads
//! anything (`--max-memory`), and a streamed run's bound is a number the tests check
//! (`tests/stream.rs` measures the resident memory of a run against it).
//!
//! A streamed run (`--stream`) holds the skeleton (embedding, final norm, an untied
//! head, in `f32`), one block at a time and what its pruning needs, and the
//! calibration activations; an in-memory run holds every block instead of one. The
//! figures count what the code allocates and touches, each term an upper bound of its
//! stage (the stages do not overlap, so the largest would do; their sum is stated
//! because it is the simpler promise).

use cap_device::config::Config;
use serde::Serialize;

/// The parts of a run's resident memory, in bytes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct WorkingSet {
    /// Embedding, final norm and an untied head in `f32`.
    pub skeleton: u64,
    /// The blocks held in `f32` at once: four copies of one block streamed (the block
    /// read, its compressed copy, its candidates, their encoded bytes), the whole
    /// model plus one block's copies in memory.
    pub blocks: u64,
    /// The input Hessians of one block (`f32`, one per group of linears sharing an
    /// input) and the solver's `f64` work matrices for its widest linear (three).
    pub hessians: u64,
    /// The calibration residual streams (`samples × len × hidden` in `f32`, twice: the
    /// streams and one window's copy), one window's forward-pass buffers and its KV
    /// cache.
    pub activations: u64,
    /// Block reconstruction (`--reconstruct`; 0 without): Adam's two moments, the
    /// gradients and the best epoch's copy of one block's linears, their masks, the
    /// dense block's targets for every window (and the dense model's stream with
    /// `--reconstruct-target model`), one window's forward tape and backward buffers.
    pub reconstruction: u64,
    /// End-to-end distillation (`--distill-epochs`; 0 without): the pruned model's
    /// copy in `f32`, Adam's two moments, the best epoch's copy and the refit matrices
    /// of every block linear, their masks, the source model's final hidden states for every window,
    /// one window's block inputs, the block tapes one window keeps (at most
    /// [`super::distill::TAPE_BYTES`]), one block's tape and backward buffers, and two
    /// chunks of logits.
    pub distillation: u64,
    /// The program, tokenizer, texts, thread stacks and allocator slack: a constant.
    pub runtime: u64,
}

/// [`WorkingSet::runtime`]. Measured: 10 MiB for a whole run on the tiny models, and
/// about 60 MiB beyond the other terms on a 275M-parameter model (the matrix
/// products' packing buffers grow with the matrices); 128 MiB leaves room for the
/// allocator's fragmentation.
pub const RUNTIME_BYTES: u64 = 128 << 20;

impl WorkingSet {
    /// The sum.
    pub fn total(&self) -> u64 {
        self.skeleton
            + self.blocks
            + self.hessians
            + self.activations
            + self.reconstruction
            + self.distillation
            + self.runtime
    }

    /// This working set with block reconstruction's term set for `c`, `samples ×
    /// len` calibration tokens; `global`: also the dense model's own stream.
    pub fn with_reconstruction(
        mut self,
        c: &Config,
        samples: usize,
        len: usize,
        global: bool,
    ) -> WorkingSet {
        let f32b = 4u64;
        let (h, q, kv, inter) = widths(c);
        let block = block_params(c);
        let (samples, len) = (samples as u64, len as u64);
        let state = 4 * f32b * block + block;
        let stream = f32b * samples * len * h;
        let targets = 2 * stream + if global { stream } else { 0 };
        // The tape: residuals and norms (6 × hidden), q/k before and after their
        // norms and rotation, v, attention output (3 × q + 4 × kv), gate, up, act
        // (3 × inter) and the probabilities (heads × len²); the backward pass's
        // buffers are of the same sizes.
        let tape =
            f32b * len * (6 * h + 3 * q + 4 * kv + 3 * inter) + f32b * c.n_heads as u64 * len * len;
        self.reconstruction = state + targets + 2 * tape;
        self
    }

    /// This working set with distillation's term set for `c`, `samples × len`
    /// calibration tokens.
    pub fn with_distillation(mut self, c: &Config, samples: usize, len: usize) -> WorkingSet {
        let f32b = 4u64;
        let (h, q, kv, inter) = widths(c);
        let heads = if c.tie_embeddings { 1 } else { 2 };
        let layers = c.n_layers as u64;
        let block = block_params(c);
        let model = f32b * (layers * block + heads * c.vocab_size as u64 * h);
        // Adam's two moments, the best epoch's copy and the candidates' refit matrices
        // built at the end (one per linear, transient), plus a byte per mask entry.
        // Measured on SmolLM2 (SparseGPT): peak RSS 3.95 GB with 2 epochs at 8k
        // calibration tokens, 1.44 GB without at 33k; this term is 2.4 GB there.
        let state = 4 * f32b * layers * block + layers * block;
        let (samples, len) = (samples as u64, len as u64);
        let teacher = f32b * samples * len * h;
        let inputs = f32b * (layers + 2) * len * h;
        let tape =
            f32b * len * (6 * h + 3 * q + 4 * kv + 3 * inter) + f32b * c.n_heads as u64 * len * len;
        let logits = 2 * f32b * super::distill::LOGIT_ROWS as u64 * c.vocab_size as u64;
        // The tapes one pass keeps for its backward pass, up to their bound.
        let kept = (layers * tape).min(super::distill::TAPE_BYTES as u64);
        self.distillation = model + state + teacher + inputs + 2 * tape + kept + logits;
        self
    }

    /// A run of a model with configuration `c` on `samples` calibration sequences of
    /// `len` tokens: `streamed`, or with the model in memory.
    pub fn of(c: &Config, samples: usize, len: usize, streamed: bool) -> WorkingSet {
        let f32b = 4u64;
        let (h, q, kv, inter) = widths(c);
        let heads = if c.tie_embeddings { 1 } else { 2 };
        let skeleton = f32b * (heads * c.vocab_size as u64 * h + h);
        let block = f32b * block_params(c);
        let blocks = if streamed {
            4 * block
        } else {
            c.n_layers as u64 * block + 4 * block
        };
        let widest = h.max(q).max(inter);
        let hessians = f32b * (2 * h * h + q * q + inter * inter) + 8 * 3 * widest * widest;
        let (samples, len) = (samples as u64, len as u64);
        let streams = 2 * f32b * samples * len * h;
        // One window through one block: q, k, v, attention output, MLP gate/up/act,
        // scores (heads × len × len), plus the KV cache of every layer.
        let window = f32b * len * (2 * h + q + 2 * kv + 3 * inter)
            + f32b * c.n_heads as u64 * len * len
            + 2 * f32b * c.n_layers as u64 * kv * len;
        WorkingSet {
            skeleton,
            blocks,
            hessians,
            activations: streams + window,
            reconstruction: 0,
            distillation: 0,
            runtime: RUNTIME_BYTES,
        }
    }
}

/// The hidden, query, key/value and MLP widths of `c`.
fn widths(c: &Config) -> (u64, u64, u64, u64) {
    (
        c.hidden_size as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.intermediate_size as u64,
    )
}

/// Parameters of one block: the seven projections, norms and biases.
pub fn block_params(c: &Config) -> u64 {
    let (h, q, kv, inter) = widths(c);
    let linears = h * q + 2 * h * kv + q * h + 3 * h * inter;
    let vectors = 4 * h + if c.qkv_bias { q + 2 * kv } else { 0 } + 2 * c.head_dim as u64;
    linears + vectors
}

/// The machine's memory (`MemTotal` of `/proc/meminfo`), `None` where it cannot be read.
pub fn machine_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Peak resident memory of this process (Linux `VmHWM`), `None` where it cannot be
/// read.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `n` bytes for messages (`1.23 GiB`).
pub fn human(n: u64) -> String {
    let g = n as f64 / f64::from(1u32 << 30);
    if g >= 1.0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.0} MiB", n as f64 / f64::from(1u32 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block count against the tiny fixture's tensors: every block tensor counted.
    #[test]
    fn block_params_count_every_block_tensor() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/qwen2");
        let m = crate::import::Checkpoint::open(&dir)
            .unwrap()
            .load_model()
            .unwrap();
        let b = &m.blocks[0];
        let mut n: usize = b.linears().iter().map(|(_, l)| l.weight.len()).sum();
        n += b.attn_norm.len() + b.mlp_norm.len();
        n += b.qkv_bias.iter().flatten().map(Vec::len).sum::<usize>();
        n += b.qk_norm.iter().flatten().map(Vec::len).sum::<usize>();
        assert!(b.post_norms.is_none() && b.qk_norm.is_none());
        // The formula counts 4·hidden for norms (two used here, two for the
        // architectures with post-norms) and 2·head_dim for q/k norms: an upper bound.
        let c = &m.config;
        let slack = 2 * c.hidden_size + 2 * c.head_dim;
        assert_eq!(block_params(c), (n + slack) as u64);
    }
}
