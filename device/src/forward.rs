//! The forward pass: embeddings, RMSNorm, RoPE, grouped-query attention with a causal
//! (and, in Gemma-3's local layers, sliding-window) mask over a KV cache, gated MLP
//! (SwiGLU or GeGLU) and the output head, for a chunk of tokens at once.
//!
//! Every step accumulates in `f32` and follows the order of operations of the Hugging
//! Face reference, so logits agree with it to `f32` rounding.

use alloc::vec;
use alloc::vec::Vec;

use cap_format::{DType, Values};
use cap_kernels::gemm::{MatMut, MatRef, matmul};
use cap_kernels::{cpu, ops, par, vexp};

use crate::config::{Activation, Config};
use crate::model::{Block, Embedding, Head, Linear, Model};

/// Query rows handled by one attention task; bounds the score buffer to
/// `ATTN_BLOCK × context` floats per task.
const ATTN_BLOCK: usize = 128;
/// Rows of hidden states turned into logits at a time (`LOGIT_BLOCK × vocab` floats).
const LOGIT_BLOCK: usize = 64;

/// Why a forward call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The chunk would run past the KV cache's capacity.
    #[error("context full: the KV cache holds {capacity} tokens, {needed} needed")]
    ContextFull {
        /// Tokens the cache can hold.
        capacity: usize,
        /// Tokens it would need to hold.
        needed: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The token.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The context would exceed the model's sliding attention window, which this
    /// runtime does not implement.
    #[error("the context exceeds the model's sliding window of {window} tokens (not supported)")]
    BeyondSlidingWindow {
        /// The window.
        window: usize,
    },
    /// A batched call got a different number of tokens and caches.
    #[error("a batched call needs one KV cache per token: {tokens} tokens, {caches} caches")]
    BatchMismatch {
        /// Tokens given (one per sequence).
        tokens: usize,
        /// KV caches given (one per sequence).
        caches: usize,
    },
}

/// Precomputed RoPE rotation for every position up to a maximum.
#[derive(Clone, Debug)]
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    /// Builds the table for positions `0..max_pos`. Angles are `f32(pos)·inv_freq` in
    /// `f32`, as in the reference, then `cos`/`sin` in `f32`.
    pub fn new(inv_freq: &[f32], max_pos: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in inv_freq {
                let a = p as f32 * f;
                cos.push(libm::cosf(a));
                sin.push(libm::sinf(a));
            }
        }
        RopeTable { cos, sin, half }
    }

    /// The cosines and sines of position `pos` (`head_dim / 2` each): what
    /// [`ops::rope_rotate_half`] applies; the host's block reconstruction rotates back
    /// with them.
    pub fn cos_sin(&self, pos: usize) -> (&[f32], &[f32]) {
        let r = pos * self.half..(pos + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }

    /// Rotates one head vector for position `pos`.
    fn apply(&self, x: &mut [f32], pos: usize) {
        let r = pos * self.half..(pos + 1) * self.half;
        ops::rope_rotate_half(x, &self.cos[r.clone()], &self.sin[r]);
    }
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    /// `f32`: what the host measures with; the default.
    F32,
    /// IEEE `f16`: half the memory; keys and values are rounded once when stored.
    F16,
}

impl KvDtype {
    /// Bytes per stored element.
    pub const fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

#[derive(Clone, Debug)]
enum KvStore {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl KvStore {
    fn new(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => KvStore::F32(vec![0.0; n]),
            KvDtype::F16 => KvStore::F16(vec![0; n]),
        }
    }
    fn dtype(&self) -> KvDtype {
        match self {
            KvStore::F32(_) => KvDtype::F32,
            KvStore::F16(_) => KvDtype::F16,
        }
    }
    /// Elements `range` as raw little-endian values.
    fn values(&self, r: core::ops::Range<usize>) -> Values<'_> {
        match self {
            KvStore::F32(v) => Values {
                dtype: DType::F32,
                bytes: bytemuck::cast_slice(&v[r]),
            },
            KvStore::F16(v) => Values {
                dtype: DType::F16,
                bytes: bytemuck::cast_slice(&v[r]),
            },
        }
    }
    /// Stores `x` at elements `start..start + x.len()`.
    fn store(&mut self, start: usize, x: &[f32]) {
        match self {
            KvStore::F32(v) => v[start..start + x.len()].copy_from_slice(x),
            KvStore::F16(v) => (cpu::kernels().from_f32)(
                x,
                DType::F16,
                bytemuck::cast_slice_mut(&mut v[start..start + x.len()]),
            ),
        }
    }
}

/// Keys and values of every layer for the positions seen so far, allocated once for
/// a fixed capacity. Layout: layer, then KV head, then position, then the head's
/// `head_dim` values, so one head's keys are a contiguous `positions × head_dim`
/// matrix the kernels read in place.
#[derive(Clone, Debug)]
pub struct KvCache {
    k: KvStore,
    v: KvStore,
    capacity: usize,
    n_kv_heads: usize,
    head_dim: usize,
    len: usize,
}

impl KvCache {
    /// Bytes a cache for `capacity` positions takes.
    /// Saturates at `u64::MAX` rather than wrapping (sizes come from files and flags).
    pub fn bytes_for(c: &Config, capacity: usize, dtype: KvDtype) -> u64 {
        [c.n_layers, c.kv_dim(), capacity]
            .iter()
            .fold(2 * dtype.size() as u64, |b, &x| b.saturating_mul(x as u64))
    }

    /// A cache for `capacity` positions of a model with configuration `c`.
    pub fn new(c: &Config, capacity: usize, dtype: KvDtype) -> Self {
        let n = c.n_layers * c.kv_dim() * capacity;
        KvCache {
            k: KvStore::new(dtype, n),
            v: KvStore::new(dtype, n),
            capacity,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            len: 0,
        }
    }
    /// Number of positions filled.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Marks `n` more positions filled, for a driver that runs the blocks itself
    /// ([`Runner::run_block`] writes a block's keys and values but leaves the length to
    /// its caller): after running every block it drives on a chunk of `n` tokens.
    ///
    /// # Panics
    /// If the cache would hold more than its capacity.
    pub fn advance(&mut self, n: usize) {
        assert!(self.len + n <= self.capacity, "KV cache overflow");
        self.len += n;
    }
    /// Whether no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Element type of the stored keys and values.
    pub fn dtype(&self) -> KvDtype {
        self.k.dtype()
    }
    /// Bytes the cache holds.
    pub fn bytes(&self) -> u64 {
        let n = match &self.k {
            KvStore::F32(v) => v.len(),
            KvStore::F16(v) => v.len(),
        };
        2 * (n * self.dtype().size()) as u64
    }
    /// Forgets all positions (the memory is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// First element of `(layer, kv head, position 0)`.
    fn head_start(&self, layer: usize, g: usize) -> usize {
        (layer * self.n_kv_heads + g) * self.capacity * self.head_dim
    }
}

/// Working memory of the forward pass, grown on first use and reused after: a decode
/// loop that keeps one `Workspace` allocates nothing per token. One per concurrent
/// caller.
#[derive(Clone, Debug, Default)]
pub struct Workspace {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    heads: Vec<f32>,
    lin: Vec<f32>,
    hidden: Vec<f32>,
    logits: Vec<f32>,
}

impl Workspace {
    /// An empty workspace (it grows on first use).
    pub fn new() -> Self {
        Workspace::default()
    }

    /// The buffers a block works in, each grown to (and cut at) `t` rows, borrowed
    /// apart so a block can read one while writing another.
    fn block(&mut self, c: &Config, t: usize) -> BlockBufs<'_> {
        let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        BlockBufs {
            xn: grow(&mut self.xn, t * h),
            q: grow(&mut self.q, t * qd),
            k: grow(&mut self.k, t * kvd),
            v: grow(&mut self.v, t * kvd),
            att: grow(&mut self.att, t * qd),
            tmp: grow(&mut self.tmp, t * h),
            gate: grow(&mut self.gate, t * inter),
            up: grow(&mut self.up, t * inter),
            heads: &mut self.heads,
            lin: &mut self.lin,
        }
    }
}

/// A block's view of the [`Workspace`] for `t` rows (see [`Workspace::block`]):
/// activations `xn`, `tmp` (`t × hidden`), `q`, `att` (`t × q_dim`), `k`, `v`
/// (`t × kv_dim`), `gate`, `up` (`t × intermediate`), and the attention and linear
/// scratch as the growable vectors their users size.
struct BlockBufs<'w> {
    xn: &'w mut [f32],
    q: &'w mut [f32],
    k: &'w mut [f32],
    v: &'w mut [f32],
    att: &'w mut [f32],
    tmp: &'w mut [f32],
    gate: &'w mut [f32],
    up: &'w mut [f32],
    heads: &'w mut Vec<f32>,
    lin: &'w mut Vec<f32>,
}

/// `v[..n]`, growing `v` first if it is shorter (never shrinking, so a later call with
/// `n` no larger allocates nothing).
fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Prompt tokens processed per forward call when a longer input is split; bounds the
/// activation buffers to `PREFILL_CHUNK` rows.
pub const PREFILL_CHUNK: usize = 256;

/// Floats of per-head attention scratch for `t` new tokens over `keys` positions.
fn head_floats(hd: usize, t: usize, keys: usize, kv: KvDtype) -> usize {
    let conv = if t > 1 && kv == KvDtype::F16 {
        2 * keys * hd
    } else {
        0
    };
    t * hd + t.min(ATTN_BLOCK) * keys + conv
}

/// Upper bound on the bytes of working memory a [`Runner`] takes besides the weights
/// and the KV cache when it runs `tokens` new tokens (at most [`PREFILL_CHUNK`] at a
/// time) with up to `ctx` positions in the cache: the [`Workspace`] buffers (linear
/// scratch: `linear_scratch` floats, see [`Linear`]), the RoPE table, one block of
/// logits and the caller's hidden-state output. The budget of `cap-host compress`
/// reserves this.
pub fn scratch_bytes(
    c: &Config,
    tokens: usize,
    ctx: usize,
    kv: KvDtype,
    linear_scratch: usize,
) -> u64 {
    let t = tokens.min(PREFILL_CHUNK) as u64;
    let (h, qd, kvd, inter) = (
        c.hidden_size as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.intermediate_size as u64,
    );
    let heads =
        c.n_heads as u64 * head_floats(c.head_dim, tokens.min(PREFILL_CHUNK), ctx, kv) as u64;
    let floats = t * (3 * h + 2 * qd + 2 * kvd + 2 * inter)
        + heads
        + linear_scratch as u64
        + ctx as u64 * c.head_dim as u64 * (1 + u64::from(c.local_attention.is_some()))
        + LOGIT_BLOCK as u64 * c.vocab_size as u64
        + 2 * tokens as u64 * h; // the hidden states returned, and their copy
    floats * 4
}

/// Runs a [`Model`]: owns the RoPE tables and the thread budget.
pub struct Runner<'m, L, E = Vec<f32>> {
    model: &'m Model<L, E>,
    rope: RopeTable,
    /// The local layers' table (their own base), when the model has local layers.
    rope_local: Option<RopeTable>,
    threads: usize,
}

impl<'m, L: Linear, E: Embedding> Runner<'m, L, E> {
    /// Prepares to run `model` for contexts of up to `max_ctx` tokens on `threads` threads.
    pub fn new(model: &'m Model<L, E>, max_ctx: usize, threads: usize) -> Self {
        let rope = RopeTable::new(&model.config.rope_inv_freq(), max_ctx);
        let rope_local = model
            .config
            .local_rope_inv_freq()
            .map(|f| RopeTable::new(&f, max_ctx));
        Runner {
            model,
            rope,
            rope_local,
            threads: threads.max(1),
        }
    }

    /// The model being run.
    pub fn model(&self) -> &'m Model<L, E> {
        self.model
    }

    /// The largest context this runner was prepared for.
    pub fn max_ctx(&self) -> usize {
        self.rope.cos.len() / self.rope.half.max(1)
    }

    /// An `f32` KV cache sized for this runner's maximum context.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.model.config, self.max_ctx(), KvDtype::F32)
    }

    /// Feeds `tokens` at the positions following those already in `kv` and writes the
    /// final (normalized) hidden state of each into `hidden` (`tokens × hidden_size`).
    /// Convenience form of [`Runner::forward_with`] with a fresh workspace.
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        hidden: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        self.forward_with(tokens, kv, &mut Workspace::new(), hidden)
    }

    /// [`Runner::forward`] with the caller's workspace; long inputs run in chunks of
    /// [`PREFILL_CHUNK`] tokens.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        ws: &mut Workspace,
        hidden: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        let c = &self.model.config;
        let h = c.hidden_size;
        self.check(tokens, kv)?;
        hidden.resize(tokens.len() * h, 0.0);
        for (chunk, out) in tokens
            .chunks(PREFILL_CHUNK)
            .zip(hidden.chunks_mut(PREFILL_CHUNK * h))
        {
            self.chunk(chunk, kv, ws);
            out.copy_from_slice(&ws.hidden[..chunk.len() * h]);
        }
        Ok(())
    }

    /// Feeds `tokens` (a prompt, or the one token just sampled) and returns the logits
    /// of the last one (`vocab` values, in the workspace). Allocates nothing once the
    /// workspace has grown for inputs this long.
    pub fn next_logits<'w>(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32], ForwardError> {
        let c = &self.model.config;
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        self.check(tokens, kv)?;
        if tokens.is_empty() {
            return Ok(&[]);
        }
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            self.chunk(chunk, kv, ws);
        }
        let t = tokens.len().min(PREFILL_CHUNK);
        let last = tokens.len() - 1 - (tokens.len() - 1) / PREFILL_CHUNK * PREFILL_CHUNK;
        debug_assert!(last < t);
        let Workspace {
            hidden,
            logits,
            lin,
            ..
        } = ws;
        let lg = grow(logits, vocab);
        self.logits_with(&hidden[last * h..(last + 1) * h], lg, lin);
        Ok(&ws.logits[..vocab])
    }

    /// Feeds one token to each of several independent sequences (`tokens[i]` follows
    /// what `kvs[i]` holds, at its own position) and returns their logits
    /// (`tokens.len() × vocab`, row `i` for sequence `i`, in the workspace). Equal to
    /// calling [`Runner::next_logits`] once per sequence up to float rounding, but the
    /// weights are read once for all of them: batched generation (self-generated
    /// calibration text) is bound by arithmetic, not by memory bandwidth.
    pub fn next_logits_batch<'w>(
        &self,
        tokens: &[u32],
        kvs: &mut [KvCache],
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32], ForwardError> {
        let c = &self.model.config;
        let (h, vocab, t) = (c.hidden_size, c.vocab_size, tokens.len());
        if kvs.len() != t {
            return Err(ForwardError::BatchMismatch {
                tokens: t,
                caches: kvs.len(),
            });
        }
        for (tok, kv) in tokens.iter().zip(kvs.iter()) {
            self.check(core::slice::from_ref(tok), kv)?;
        }
        self.embed_run_norm(tokens, ws, |xs, ws| {
            for (layer, b) in self.model.blocks.iter().enumerate() {
                self.run_block_batch(layer, b, xs, kvs, ws);
            }
        });
        for kv in kvs.iter_mut() {
            kv.len += 1;
        }
        let Workspace {
            hidden,
            logits,
            lin,
            ..
        } = ws;
        let lg = grow(logits, t * vocab);
        self.logits_with(&hidden[..t * h], lg, lin);
        Ok(&ws.logits[..t * vocab])
    }

    fn check(&self, tokens: &[u32], kv: &KvCache) -> Result<(), ForwardError> {
        let c = &self.model.config;
        let needed = kv.len + tokens.len();
        if needed > kv.capacity || needed > self.max_ctx() {
            return Err(ForwardError::ContextFull {
                capacity: kv.capacity.min(self.max_ctx()),
                needed,
            });
        }
        if let Some(w) = c.sliding_window.filter(|&w| needed > w) {
            return Err(ForwardError::BeyondSlidingWindow { window: w });
        }
        if let Some(&tok) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ForwardError::TokenOutOfRange {
                token: tok,
                vocab: c.vocab_size,
            });
        }
        Ok(())
    }

    /// Runs one checked chunk through every block; leaves the normalized hidden states
    /// in `ws.hidden` and advances the cache.
    fn chunk(&self, tokens: &[u32], kv: &mut KvCache, ws: &mut Workspace) {
        self.embed_run_norm(tokens, ws, |xs, ws| {
            for (layer, b) in self.model.blocks.iter().enumerate() {
                self.run_block_with(layer, b, xs, kv, ws);
            }
        });
        kv.len += tokens.len();
    }

    /// The residual stream block 0 sees for `tokens` (`tokens × hidden` into `out`):
    /// their embedding rows, scaled where the architecture scales them (Gemma-3). Stages
    /// that drive the blocks themselves (block-by-block pruning) start from this.
    pub fn embed(&self, tokens: &[u32], out: &mut [f32]) {
        let c = &self.model.config;
        let h = c.hidden_size;
        for (row, &tok) in out.chunks_exact_mut(h).zip(tokens) {
            self.model.embed.row_into(tok as usize, row);
        }
        if c.arch.scales_embedding() {
            // Hugging Face: `hidden_size ** 0.5` in Python (f64), cast to f32, then an
            // f32 product.
            let scale = libm::sqrt(h as f64) as f32;
            out.iter_mut().for_each(|v| *v *= scale);
        }
    }

    /// Embeds `tokens` into the residual stream (the workspace's `x`, taken out of it
    /// meanwhile), runs `blocks` on that stream with the rest of the workspace, and
    /// leaves the final normalized hidden states (`tokens × hidden`) in `ws.hidden`.
    /// What [`Runner::chunk`] and [`Runner::next_logits_batch`] share: they differ
    /// only in how the blocks reach the KV caches.
    fn embed_run_norm(
        &self,
        tokens: &[u32],
        ws: &mut Workspace,
        blocks: impl FnOnce(&mut [f32], &mut Workspace),
    ) {
        let c = &self.model.config;
        let (t, h) = (tokens.len(), c.hidden_size);
        let mut x = core::mem::take(&mut ws.x);
        let xs = grow(&mut x, t * h);
        self.embed(tokens, xs);
        blocks(xs, ws);
        let out = grow(&mut ws.hidden, t * h);
        ops::rms_norm(out, xs, &self.model.norm, c.rms_eps);
        ws.x = x;
    }

    /// Applies block `layer` (`block`, which may be stored differently from the
    /// runner's model, e.g. with recording layers) in place to the residual stream `x`
    /// of `t = x.len() / hidden` tokens at positions `kv.len()..`, writing its keys and
    /// values into the cache's slot for `layer`. Does not advance the cache's length
    /// (the caller does, once every block has run), and does not check capacity: the
    /// caller ([`Runner::forward`], or a block-by-block driver) has.
    pub fn run_block<B: Linear>(
        &self,
        layer: usize,
        b: &Block<B>,
        x: &mut [f32],
        kv: &mut KvCache,
    ) {
        self.run_block_with(layer, b, x, kv, &mut Workspace::new());
    }

    fn run_block_with<B: Linear>(
        &self,
        layer: usize,
        b: &Block<B>,
        x: &mut [f32],
        kv: &mut KvCache,
        ws: &mut Workspace,
    ) {
        let t = x.len() / self.model.config.hidden_size;
        let pos0 = kv.len;
        let bufs = self.qkv(b, x, ws, |i, q, k, v| {
            self.rope_and_store(layer, q, k, v, kv, pos0 + i);
        });
        self.attention(layer, bufs.q, kv, pos0, t, bufs.heads, bufs.att);
        self.finish_block(b, x, ws);
    }

    /// [`Runner::run_block_with`] for one new token of each of `kvs.len()` sequences
    /// (row `i` of `x` belongs to `kvs[i]`, at position `kvs[i].len()`): the linears
    /// run once over all rows (a GEMM instead of one matrix-vector product per
    /// sequence), attention over each row's own cache.
    fn run_block_batch<B: Linear>(
        &self,
        layer: usize,
        b: &Block<B>,
        x: &mut [f32],
        kvs: &mut [KvCache],
        ws: &mut Workspace,
    ) {
        let c = &self.model.config;
        let (qd, hd) = (c.q_dim(), c.head_dim);
        let t = kvs.len();
        let BlockBufs { q, att, heads, .. } = self.qkv(b, x, ws, |i, q, k, v| {
            let pos = kvs[i].len;
            self.rope_and_store(layer, q, k, v, &mut kvs[i], pos);
        });
        let window = c.layer_window(layer);
        // One (sequence, head) pair per chunk: its output, then its scores.
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / libm::sqrtf(hd as f32);
        let cap = kvs.iter().map(|kv| kv.capacity).max().unwrap_or(0);
        let per = hd + cap;
        let hs = grow(heads, t * c.n_heads * per);
        let kern = cpu::kernels();
        let kvs: &[KvCache] = kvs;
        par::for_each_chunk(hs, per, self.threads, |j, chunk| {
            let (i, head) = (j / c.n_heads, j % c.n_heads);
            let kv = &kvs[i];
            let keys = kv.len + 1;
            let (o, s) = chunk.split_at_mut(hd);
            let qh = &q[i * qd + head * hd..i * qd + (head + 1) * hd];
            let at = (layer, head / group, keys);
            decode_cached(kern, kv, at, window, qh, scale, s, o);
        });
        for (j, chunk) in hs.chunks_exact(per).enumerate() {
            let (i, head) = (j / c.n_heads, j % c.n_heads);
            att[i * qd + head * hd..i * qd + (head + 1) * hd].copy_from_slice(&chunk[..hd]);
        }
        self.finish_block(b, x, ws);
    }

    /// The first half of a block for the `t = x.len() / hidden` rows of `x`: the
    /// attention norm into `ws.xn`, then `q`, `k`, `v` (with their biases) into the
    /// workspace, every buffer grown to `t` rows; then `store(i, q, k, v)` for each
    /// row `i`, which rotates and caches it ([`Runner::rope_and_store`]) with the
    /// cache and position that row belongs to. Returns the workspace's block buffers.
    fn qkv<'w, B: Linear>(
        &self,
        b: &Block<B>,
        x: &[f32],
        ws: &'w mut Workspace,
        mut store: impl FnMut(usize, &mut [f32], &mut [f32], &[f32]),
    ) -> BlockBufs<'w> {
        let c = &self.model.config;
        let th = self.threads;
        let mut bufs = ws.block(c, x.len() / c.hidden_size);
        let BlockBufs {
            xn, q, k, v, lin, ..
        } = &mut bufs;
        ops::rms_norm(xn, x, &b.attn_norm, c.rms_eps);
        b.q.forward(xn, q, lin, th);
        b.k.forward(xn, k, lin, th);
        b.v.forward(xn, v, lin, th);
        if let Some([bq, bk, bv]) = &b.qkv_bias {
            add_bias(q, bq);
            add_bias(k, bk);
            add_bias(v, bv);
        }
        if let Some([nq, nk]) = &b.qk_norm {
            // Per head (each `head_dim` slice), before RoPE, as Hugging Face's Gemma-3.
            ops::rms_norm_in_place(q, nq, c.rms_eps);
            ops::rms_norm_in_place(k, nk, c.rms_eps);
        }
        let rows = q
            .chunks_exact_mut(c.q_dim())
            .zip(k.chunks_exact_mut(c.kv_dim()))
            .zip(v.chunks_exact(c.kv_dim()));
        for (i, ((q, k), v)) in rows.enumerate() {
            store(i, q, k, v);
        }
        bufs
    }

    /// Rotates one token's query and key heads for position `pos` and stores its keys
    /// and values in `kv`'s slot for `layer` at `pos`.
    fn rope_and_store(
        &self,
        layer: usize,
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        kv: &mut KvCache,
        pos: usize,
    ) {
        let c = &self.model.config;
        let hd = c.head_dim;
        let rope = match (&self.rope_local, c.layer_window(layer)) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        };
        for head in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
            rope.apply(head, pos);
        }
        for (g, (kh, vh)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
            let dst = kv.head_start(layer, g) + pos * hd;
            kv.k.store(dst, kh);
            kv.v.store(dst, vh);
        }
    }

    /// The second half of a block, from the attention output in `ws.att`: the output
    /// projection and the residual, then the MLP and its residual, in place on `x`.
    fn finish_block<B: Linear>(&self, b: &Block<B>, x: &mut [f32], ws: &mut Workspace) {
        let c = &self.model.config;
        let th = self.threads;
        let BlockBufs {
            xn,
            att,
            tmp,
            gate,
            up,
            lin,
            ..
        } = ws.block(c, x.len() / c.hidden_size);
        b.o.forward(att, tmp, lin, th);
        if let Some([post_attn, _]) = &b.post_norms {
            ops::rms_norm_in_place(tmp, post_attn, c.rms_eps);
        }
        add_into(x, tmp);

        ops::rms_norm(xn, x, &b.mlp_norm, c.rms_eps);
        b.gate.forward(xn, gate, lin, th);
        b.up.forward(xn, up, lin, th);
        match c.arch.activation() {
            Activation::Silu => vexp::silu_mul(gate, up),
            Activation::GeluTanh => vexp::gelu_tanh_mul(gate, up),
        }
        b.down.forward(gate, tmp, lin, th);
        if let Some([_, post_mlp]) = &b.post_norms {
            ops::rms_norm_in_place(tmp, post_mlp, c.rms_eps);
        }
        add_into(x, tmp);
    }

    /// Causal grouped-query attention of `t` new queries (at positions `pos0..pos0+t`)
    /// over the cached keys/values of `layer`; writes `t × q_dim` into `out`. Heads run
    /// in parallel, each in its own slice of `heads`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        q: &[f32],
        kv: &KvCache,
        pos0: usize,
        t: usize,
        heads: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let c = &self.model.config;
        let (hd, qd) = (c.head_dim, c.q_dim());
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / libm::sqrtf(hd as f32);
        let window = c.layer_window(layer);
        let keys = pos0 + t;
        let per_head = head_floats(hd, t, keys, kv.dtype());
        let kern = cpu::kernels();
        // Sized for the cache's capacity, not today's length, so decoding the next
        // token never finds the buffer too small.
        grow(
            heads,
            c.n_heads * head_floats(hd, t, kv.capacity, kv.dtype()),
        );
        let hs = &mut heads[..c.n_heads * per_head];
        par::for_each_chunk(hs, per_head, self.threads, |head, chunk| {
            let (o, rest) = chunk.split_at_mut(t * hd);
            let (s, conv) = rest.split_at_mut(t.min(ATTN_BLOCK) * keys);
            let base = kv.head_start(layer, head / group);
            let kvals = kv.k.values(base..base + keys * hd);
            let vvals = kv.v.values(base..base + keys * hd);
            if t == 1 {
                let qh = &q[head * hd..(head + 1) * hd];
                decode_cached(
                    kern,
                    kv,
                    (layer, head / group, keys),
                    window,
                    qh,
                    scale,
                    s,
                    o,
                );
                return;
            }
            let (kf, vf): (&[f32], &[f32]) = match (&kv.k, &kv.v) {
                (KvStore::F32(kc), KvStore::F32(vc)) => {
                    (&kc[base..base + keys * hd], &vc[base..base + keys * hd])
                }
                _ => {
                    let (kf, vf) = conv.split_at_mut(keys * hd);
                    (kern.to_f32)(kvals, 0, kf);
                    (kern.to_f32)(vvals, 0, vf);
                    (kf, vf)
                }
            };
            for r0 in (0..t).step_by(ATTN_BLOCK) {
                let r1 = (r0 + ATTN_BLOCK).min(t);
                let (rows, seen) = (r1 - r0, pos0 + r1);
                let qv = MatRef {
                    data: &q[r0 * qd + head * hd..],
                    rows,
                    cols: hd,
                    row_stride: qd,
                    col_stride: 1,
                };
                let sb = &mut s[..rows * seen];
                matmul(
                    &mut MatMut::row_major(sb, rows, seen),
                    qv,
                    MatRef::row_major(&kf[..seen * hd], seen, hd).t(),
                    scale,
                    0.0,
                    1,
                );
                for (i, row) in sb.chunks_exact_mut(seen).enumerate() {
                    let visible = pos0 + r0 + i + 1;
                    let first = first_visible(visible, window);
                    vexp::softmax(&mut row[first..visible]);
                    row[..first].fill(0.0);
                    row[visible..].fill(0.0);
                }
                matmul(
                    &mut MatMut::row_major(&mut o[r0 * hd..r1 * hd], rows, hd),
                    MatRef::row_major(sb, rows, seen),
                    MatRef::row_major(&vf[..seen * hd], seen, hd),
                    1.0,
                    0.0,
                    1,
                );
            }
        });
        for head in 0..c.n_heads {
            let src = &hs[head * per_head..];
            for i in 0..t {
                out[i * qd + head * hd..i * qd + (head + 1) * hd]
                    .copy_from_slice(&src[i * hd..(i + 1) * hd]);
            }
        }
    }

    /// Logits (`rows × vocab`) of normalized hidden states (`rows × hidden`).
    pub fn logits(&self, hidden: &[f32], logits: &mut [f32]) {
        self.logits_with(hidden, logits, &mut Vec::new());
    }

    fn logits_with(&self, hidden: &[f32], logits: &mut [f32], scratch: &mut Vec<f32>) {
        let c = &self.model.config;
        match &self.model.head {
            Head::Tied => {
                self.model
                    .embed
                    .head_forward(hidden, logits, c.vocab_size, scratch, self.threads)
            }
            Head::Separate(l) => l.forward(hidden, logits, scratch, self.threads),
        }
    }

    /// Negative log-likelihood (natural log) of `targets[i]` under the logits of
    /// `hidden` row `i`, computed in blocks so the full logit matrix never exists.
    pub fn nll(&self, hidden: &[f32], targets: &[u32]) -> Vec<f64> {
        let (h, vocab) = (self.model.config.hidden_size, self.model.config.vocab_size);
        assert_eq!(hidden.len(), targets.len() * h, "one hidden row per target");
        let mut out = Vec::with_capacity(targets.len());
        let mut logits = vec![0.0f32; LOGIT_BLOCK * vocab];
        let mut scratch = Vec::new();
        for (hrows, trows) in hidden
            .chunks(LOGIT_BLOCK * h)
            .zip(targets.chunks(LOGIT_BLOCK))
        {
            let lg = &mut logits[..trows.len() * vocab];
            self.logits_with(hrows, lg, &mut scratch);
            let mut nll = vec![0.0f64; trows.len()];
            par::for_each_chunk(&mut nll, 1, self.threads, |i, o| {
                let row = &lg[i * vocab..(i + 1) * vocab];
                o[0] = vexp::log_sum_exp(row) - row[trows[i] as usize] as f64;
            });
            out.extend_from_slice(&nll);
        }
        out
    }
}

/// The first position a query sees when `keys` positions (itself the last) are in the
/// cache: 0, or the start of its window in a local layer.
fn first_visible(keys: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| keys.saturating_sub(w))
}

/// Decode attention of one query head `qh` at position `keys - 1` over what it sees
/// of KV head `g` of `layer` in `kv` (`at = (layer, g, keys)`): every cached position,
/// or only its window in a local layer. `scores` holds at least `keys` floats.
#[allow(clippy::too_many_arguments)]
fn decode_cached(
    kern: &cpu::Kernels,
    kv: &KvCache,
    at: (usize, usize, usize),
    window: Option<usize>,
    qh: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (layer, g, keys) = at;
    let hd = qh.len();
    let base = kv.head_start(layer, g);
    let first = first_visible(keys, window);
    let seen = base + first * hd..base + keys * hd;
    decode_head(
        kern,
        kv.k.values(seen.clone()),
        kv.v.values(seen),
        hd,
        qh,
        scale,
        &mut scores[..keys - first],
        out,
    );
}

/// Decode attention of one query head `qh` over `keys = scores.len()` cached
/// positions: two matrix-vector products straight over the cache (`kvals`, `vvals`:
/// `keys × hd`), the softmax between them; writes `hd` values into `out`.
#[allow(clippy::too_many_arguments)]
fn decode_head(
    kern: &cpu::Kernels,
    kvals: Values<'_>,
    vvals: Values<'_>,
    hd: usize,
    qh: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    scores.fill(0.0);
    (kern.dense_rows)(kvals, hd, 0, qh, scores);
    scores.iter_mut().for_each(|v| *v *= scale);
    vexp::softmax(scores);
    out.fill(0.0);
    (kern.dense_t_rows)(vvals, hd, 0, scores, out);
}

fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (a, b) in row.iter_mut().zip(bias) {
            *a += b;
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
