//! The forward pass: embeddings, RMSNorm, RoPE, grouped-query attention with a causal
//! mask over a KV cache, SwiGLU MLP and the output head, for a chunk of tokens at once.
//!
//! Every step accumulates in `f32` and follows the order of operations of the Hugging
//! Face reference, so logits agree with it to `f32` rounding.

use alloc::vec;
use alloc::vec::Vec;

use cap_kernels::gemm::{MatMut, MatRef, matmul};
use cap_kernels::{ops, par, vexp};

use crate::model::{Block, Head, Linear, Model, dense_forward};

/// Query rows handled by one attention task; bounds the score buffer to
/// `ATTN_BLOCK × context` floats per task.
const ATTN_BLOCK: usize = 128;
/// Rows of hidden states turned into logits at a time (`LOGIT_BLOCK × vocab` floats).
const LOGIT_BLOCK: usize = 64;

/// Why a forward call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardError {
    /// The chunk would run past the KV cache's capacity.
    ContextFull {
        /// Tokens the cache can hold.
        capacity: usize,
        /// Tokens it would need to hold.
        needed: usize,
    },
    /// A token id is outside the vocabulary.
    TokenOutOfRange {
        /// The token.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The context would exceed the model's sliding attention window, which this
    /// runtime does not implement.
    BeyondSlidingWindow {
        /// The window.
        window: usize,
    },
}

impl core::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ForwardError::ContextFull { capacity, needed } => {
                write!(
                    f,
                    "context full: the KV cache holds {capacity} tokens, {needed} needed"
                )
            }
            ForwardError::TokenOutOfRange { token, vocab } => {
                write!(f, "token id {token} is outside the vocabulary of {vocab}")
            }
            ForwardError::BeyondSlidingWindow { window } => write!(
                f,
                "the context exceeds the model's sliding window of {window} tokens (not supported)"
            ),
        }
    }
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

    /// Rotates one head vector for position `pos`.
    fn apply(&self, x: &mut [f32], pos: usize) {
        let r = pos * self.half..(pos + 1) * self.half;
        ops::rope_rotate_half(x, &self.cos[r.clone()], &self.sin[r]);
    }
}

/// Keys and values of every layer for the positions seen so far.
#[derive(Clone, Debug)]
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    capacity: usize,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    /// Bytes a cache for `capacity` positions takes (`f32` keys and values).
    pub fn bytes_for(n_layers: usize, kv_dim: usize, capacity: usize) -> u64 {
        2 * 4 * n_layers as u64 * kv_dim as u64 * capacity as u64
    }

    /// A cache for `capacity` positions of a model with `n_layers` layers and
    /// `kv_dim`-wide keys, allocated once.
    pub fn new(n_layers: usize, kv_dim: usize, capacity: usize) -> Self {
        KvCache {
            k: vec![0.0; n_layers * capacity * kv_dim],
            v: vec![0.0; n_layers * capacity * kv_dim],
            capacity,
            kv_dim,
            len: 0,
        }
    }
    /// Number of positions filled.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets all positions (the memory is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }
    fn layer_range(&self, layer: usize) -> core::ops::Range<usize> {
        let n = self.capacity * self.kv_dim;
        layer * n..(layer + 1) * n
    }
}

/// Bytes of working memory one [`Runner::forward`] call over `tokens` tokens (with up
/// to `ctx` positions in the cache) and the logits of its rows take besides the
/// weights and the KV cache: the activation buffers, the attention blocks of every
/// thread, the RoPE table, one block of logits, and `max_rank` floats per token for
/// the factored layers' intermediate. The budget of `cap-host compress` reserves this.
pub fn scratch_bytes(
    c: &crate::config::Config,
    tokens: usize,
    ctx: usize,
    threads: usize,
    max_rank: usize,
) -> u64 {
    let (t, h) = (tokens as u64, c.hidden_size as u64);
    let (qd, kvd, inter) = (
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.intermediate_size as u64,
    );
    let blocks = t.div_ceil(ATTN_BLOCK as u64);
    let ab = ATTN_BLOCK as u64;
    let floats = t * (3 * h + 2 * qd + 2 * kvd + 2 * inter + max_rank as u64)
        + c.n_heads as u64 * blocks * ab * c.head_dim as u64
        + threads.max(1) as u64 * ab * ctx as u64
        + ctx as u64 * c.head_dim as u64
        + LOGIT_BLOCK as u64 * c.vocab_size as u64
        + t * h; // the caller's hidden-state output
    floats * 4
}

/// Runs a [`Model`]: owns the RoPE table and the thread budget.
pub struct Runner<'m, L> {
    model: &'m Model<L>,
    rope: RopeTable,
    threads: usize,
}

impl<'m, L: Linear> Runner<'m, L> {
    /// Prepares to run `model` for contexts of up to `max_ctx` tokens on `threads` threads.
    pub fn new(model: &'m Model<L>, max_ctx: usize, threads: usize) -> Self {
        let rope = RopeTable::new(&model.config.rope_inv_freq(), max_ctx);
        Runner {
            model,
            rope,
            threads: threads.max(1),
        }
    }

    /// The model being run.
    pub fn model(&self) -> &'m Model<L> {
        self.model
    }

    /// A KV cache sized for this runner's maximum context.
    pub fn new_cache(&self) -> KvCache {
        let c = &self.model.config;
        KvCache::new(
            c.n_layers,
            c.kv_dim(),
            self.rope.cos.len() / self.rope.half.max(1),
        )
    }

    /// Feeds `tokens` at the positions following those already in `kv` and writes the
    /// final (normalized) hidden state of each into `hidden` (`tokens × hidden_size`).
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        hidden: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        let c = &self.model.config;
        let (t, h) = (tokens.len(), c.hidden_size);
        let pos0 = kv.len;
        let needed = pos0 + t;
        if needed > kv.capacity {
            return Err(ForwardError::ContextFull {
                capacity: kv.capacity,
                needed,
            });
        }
        if let Some(w) = c.sliding_window.filter(|&w| needed > w) {
            return Err(ForwardError::BeyondSlidingWindow { window: w });
        }
        let mut x = vec![0.0f32; t * h];
        for (row, &tok) in x.chunks_exact_mut(h).zip(tokens) {
            let id = tok as usize;
            if id >= c.vocab_size {
                return Err(ForwardError::TokenOutOfRange {
                    token: tok,
                    vocab: c.vocab_size,
                });
            }
            row.copy_from_slice(&self.model.embed[id * h..(id + 1) * h]);
        }
        for (layer, b) in self.model.blocks.iter().enumerate() {
            self.run_block(layer, b, &mut x, kv);
        }
        kv.len = needed;
        hidden.resize(t * h, 0.0);
        ops::rms_norm(hidden, &x, &self.model.norm, c.rms_eps);
        Ok(())
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
        let c = &self.model.config;
        let h = c.hidden_size;
        let t = x.len() / h;
        let pos0 = kv.len;
        let needed = pos0 + t;
        let (qd, kvd, inter) = (c.q_dim(), c.kv_dim(), c.intermediate_size);
        let mut xn = vec![0.0f32; t * h];
        let mut q = vec![0.0f32; t * qd];
        let mut k = vec![0.0f32; t * kvd];
        let mut v = vec![0.0f32; t * kvd];
        let mut att = vec![0.0f32; t * qd];
        let mut tmp = vec![0.0f32; t * h];
        let mut gate = vec![0.0f32; t * inter];
        let mut up = vec![0.0f32; t * inter];
        ops::rms_norm(&mut xn, x, &b.attn_norm, c.rms_eps);
        b.q.forward(&xn, &mut q, self.threads);
        b.k.forward(&xn, &mut k, self.threads);
        b.v.forward(&xn, &mut v, self.threads);
        if let Some([bq, bk, bv]) = &b.qkv_bias {
            add_bias(&mut q, bq);
            add_bias(&mut k, bk);
            add_bias(&mut v, bv);
        }
        for (i, (qr, kr)) in q
            .chunks_exact_mut(qd)
            .zip(k.chunks_exact_mut(kvd))
            .enumerate()
        {
            for head in qr
                .chunks_exact_mut(c.head_dim)
                .chain(kr.chunks_exact_mut(c.head_dim))
            {
                self.rope.apply(head, pos0 + i);
            }
        }
        let lr = kv.layer_range(layer);
        kv.k[lr.clone()][pos0 * kvd..needed * kvd].copy_from_slice(&k);
        kv.v[lr.clone()][pos0 * kvd..needed * kvd].copy_from_slice(&v);
        self.attention(&q, &kv.k[lr.clone()], &kv.v[lr], pos0, t, &mut att);
        b.o.forward(&att, &mut tmp, self.threads);
        add_into(x, &tmp);

        ops::rms_norm(&mut xn, x, &b.mlp_norm, c.rms_eps);
        b.gate.forward(&xn, &mut gate, self.threads);
        b.up.forward(&xn, &mut up, self.threads);
        vexp::silu_mul(&mut gate, &up);
        b.down.forward(&gate, &mut tmp, self.threads);
        add_into(x, &tmp);
    }

    /// Causal grouped-query attention of `t` new queries (at positions `pos0..pos0+t`)
    /// over the cached keys/values of one layer; writes `t × q_dim` into `out`.
    fn attention(&self, q: &[f32], kc: &[f32], vc: &[f32], pos0: usize, t: usize, out: &mut [f32]) {
        let c = &self.model.config;
        let (hd, qd, kvd) = (c.head_dim, c.q_dim(), c.kv_dim());
        let group = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / libm::sqrtf(hd as f32);
        let blocks = t.div_ceil(ATTN_BLOCK);
        // Head-major output so every task owns one contiguous chunk.
        let mut ho = vec![0.0f32; c.n_heads * blocks * ATTN_BLOCK * hd];
        par::for_each_chunk(&mut ho, ATTN_BLOCK * hd, self.threads, |task, chunk| {
            let (head, blk) = (task / blocks, task % blocks);
            let (r0, r1) = (blk * ATTN_BLOCK, ((blk + 1) * ATTN_BLOCK).min(t));
            let (rows, keys) = (r1 - r0, pos0 + r1);
            let g = head / group;
            let qv = MatRef {
                data: &q[r0 * qd + head * hd..],
                rows,
                cols: hd,
                row_stride: qd,
                col_stride: 1,
            };
            let kv = MatRef {
                data: &kc[g * hd..],
                rows: keys,
                cols: hd,
                row_stride: kvd,
                col_stride: 1,
            };
            let vv = MatRef {
                data: &vc[g * hd..],
                rows: keys,
                cols: hd,
                row_stride: kvd,
                col_stride: 1,
            };
            let mut s = vec![0.0f32; rows * keys];
            matmul(
                &mut MatMut::row_major(&mut s, rows, keys),
                qv,
                kv.t(),
                scale,
                0.0,
                1,
            );
            for (i, row) in s.chunks_exact_mut(keys).enumerate() {
                let visible = pos0 + r0 + i + 1;
                vexp::softmax(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            let sv = MatRef::row_major(&s, rows, keys);
            matmul(
                &mut MatMut::row_major(&mut chunk[..rows * hd], rows, hd),
                sv,
                vv,
                1.0,
                0.0,
                1,
            );
        });
        for head in 0..c.n_heads {
            let src = &ho[head * blocks * ATTN_BLOCK * hd..];
            for i in 0..t {
                out[i * qd + head * hd..i * qd + (head + 1) * hd]
                    .copy_from_slice(&src[i * hd..(i + 1) * hd]);
            }
        }
    }

    /// Logits (`rows × vocab`) of normalized hidden states (`rows × hidden`).
    pub fn logits(&self, hidden: &[f32], logits: &mut [f32]) {
        let c = &self.model.config;
        match &self.model.head {
            Head::Tied => dense_forward(
                &self.model.embed,
                c.vocab_size,
                c.hidden_size,
                hidden,
                logits,
                self.threads,
            ),
            Head::Separate(l) => l.forward(hidden, logits, self.threads),
        }
    }

    /// Negative log-likelihood (natural log) of `targets[i]` under the logits of
    /// `hidden` row `i`, computed in blocks so the full logit matrix never exists.
    pub fn nll(&self, hidden: &[f32], targets: &[u32]) -> Vec<f64> {
        let (h, vocab) = (self.model.config.hidden_size, self.model.config.vocab_size);
        assert_eq!(hidden.len(), targets.len() * h, "one hidden row per target");
        let mut out = Vec::with_capacity(targets.len());
        let mut logits = vec![0.0f32; LOGIT_BLOCK * vocab];
        for (hrows, trows) in hidden
            .chunks(LOGIT_BLOCK * h)
            .zip(targets.chunks(LOGIT_BLOCK))
        {
            let lg = &mut logits[..trows.len() * vocab];
            self.logits(hrows, lg);
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
