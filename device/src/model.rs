//! Model weights, generic over how a linear layer is stored.
//!
//! Weight convention (one for every source; importers convert): a linear layer maps
//! `x ∈ R^in` to `W·x ∈ R^out` with `W` stored row-major `out × in` (PyTorch's
//! `nn.Linear.weight`), and q/k rows are in Hugging Face order, where RoPE rotates the
//! pairs `(i, i + head_dim/2)` of each head ("rotate half"). GGUF files interleave the
//! pairs instead; the GGUF importer un-permutes their q/k rows.

use alloc::vec::Vec;

use cap_kernels::gemm::{MatMut, MatRef, matmul};

use crate::config::Config;

/// A linear layer `y = x·Wᵀ` applied to a batch of token rows.
///
/// The forward pass is generic over this trait so the same code runs dense weights,
/// compressed (low-rank + sparse) weights and, during the budget search, masked ones.
pub trait Linear: Sync {
    /// Input width.
    fn in_features(&self) -> usize;
    /// Output width.
    fn out_features(&self) -> usize;
    /// Writes `y[t×out] = x[t×in]·Wᵀ` for `t = x.len() / in` rows, using up to
    /// `threads` threads. `y`'s previous contents are ignored. `scratch` is the
    /// caller's working memory: an implementation may grow it (once; a later call with
    /// as many rows reuses it), so a decode loop that keeps its scratch allocates
    /// nothing per token.
    fn forward(&self, x: &[f32], y: &mut [f32], scratch: &mut Vec<f32>, threads: usize);
}

/// The token embedding table (`vocab × hidden`), which is also the output head when
/// the model ties them. Host models hold it as `Vec<f32>`; the board's runtime
/// borrows it from the file in its stored type.
pub trait Embedding: Sync {
    /// Number of stored values (`vocab · hidden`).
    fn numel(&self) -> usize;
    /// Writes row `id` (`out.len()` = hidden values) into `out`.
    fn row_into(&self, id: usize, out: &mut [f32]);
    /// The tied head: `y[t×vocab] = x[t×hidden]·Eᵀ` (see [`Linear::forward`]).
    fn head_forward(
        &self,
        x: &[f32],
        y: &mut [f32],
        vocab: usize,
        scratch: &mut Vec<f32>,
        threads: usize,
    );
}

impl Embedding for Vec<f32> {
    fn numel(&self) -> usize {
        self.len()
    }
    fn row_into(&self, id: usize, out: &mut [f32]) {
        let h = out.len();
        out.copy_from_slice(&self[id * h..(id + 1) * h]);
    }
    fn head_forward(
        &self,
        x: &[f32],
        y: &mut [f32],
        vocab: usize,
        _scratch: &mut Vec<f32>,
        threads: usize,
    ) {
        dense_forward(self, vocab, self.len() / vocab.max(1), x, y, threads);
    }
}

/// A dense `f32` weight, row-major `out × in`.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseLinear {
    /// The weights, `out_features · in_features` values.
    pub weight: Vec<f32>,
    /// Output width (rows).
    pub out_features: usize,
    /// Input width (columns).
    pub in_features: usize,
}

impl DenseLinear {
    /// Wraps a row-major `out × in` weight; `None` if the length does not match.
    pub fn new(weight: Vec<f32>, out_features: usize, in_features: usize) -> Option<Self> {
        (out_features.checked_mul(in_features) == Some(weight.len())).then_some(DenseLinear {
            weight,
            out_features,
            in_features,
        })
    }
}

/// The number of token rows `t` a linear of `in_f` inputs and `out_f` outputs is
/// given: `x` is `t × in_f`, `y` must be `t × out_f`. Panics otherwise: callers size
/// both from the model's own shapes, so a mismatch is a bug, not bad input.
pub(crate) fn token_rows(x: &[f32], y: &[f32], in_f: usize, out_f: usize) -> usize {
    let t = x.len() / in_f;
    assert!(
        x.len() == t * in_f && y.len() == t * out_f,
        "linear shape mismatch"
    );
    t
}

/// `y[t×out] = x[t×in]·Wᵀ` for a row-major `out × in` weight slice.
pub fn dense_forward(
    weight: &[f32],
    out_f: usize,
    in_f: usize,
    x: &[f32],
    y: &mut [f32],
    threads: usize,
) {
    let t = token_rows(x, y, in_f, out_f);
    let w = MatRef::row_major(weight, out_f, in_f).t();
    matmul(
        &mut MatMut::row_major(y, t, out_f),
        MatRef::row_major(x, t, in_f),
        w,
        1.0,
        0.0,
        threads,
    );
}

impl Linear for DenseLinear {
    fn in_features(&self) -> usize {
        self.in_features
    }
    fn out_features(&self) -> usize {
        self.out_features
    }
    fn forward(&self, x: &[f32], y: &mut [f32], _scratch: &mut Vec<f32>, threads: usize) {
        dense_forward(
            &self.weight,
            self.out_features,
            self.in_features,
            x,
            y,
            threads,
        );
    }
}

/// One transformer block: pre-norm attention, then pre-norm gated MLP (SwiGLU, or
/// GeGLU for Gemma-3, with its extra norms).
#[derive(Clone, Debug)]
pub struct Block<L> {
    /// RMSNorm weight before attention.
    pub attn_norm: Vec<f32>,
    /// Query projection (`q_dim × hidden`).
    pub q: L,
    /// Key projection (`kv_dim × hidden`).
    pub k: L,
    /// Value projection (`kv_dim × hidden`).
    pub v: L,
    /// Output projection (`hidden × q_dim`).
    pub o: L,
    /// Biases of q, k, v (Qwen2), in that order.
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// RMSNorm weights (`head_dim` each) of every query head and every key head, in
    /// that order, applied before RoPE (Gemma-3).
    pub qk_norm: Option<[Vec<f32>; 2]>,
    /// RMSNorm weights (`hidden` each) of the attention output and of the MLP output,
    /// in that order, applied before each is added to the residual stream (Gemma-3).
    pub post_norms: Option<[Vec<f32>; 2]>,
    /// RMSNorm weight before the MLP.
    pub mlp_norm: Vec<f32>,
    /// MLP gate projection (`intermediate × hidden`).
    pub gate: L,
    /// MLP up projection (`intermediate × hidden`).
    pub up: L,
    /// MLP down projection (`hidden × intermediate`).
    pub down: L,
}

impl<L> Block<L> {
    /// The block's linear layers with their conventional names, in a fixed order.
    pub fn linears(&self) -> [(&'static str, &L); 7] {
        [
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("o", &self.o),
            ("gate", &self.gate),
            ("up", &self.up),
            ("down", &self.down),
        ]
    }

    /// The same block with every linear layer replaced by `f(i, layer)` (`i` its index
    /// in [`Block::linears`]) and every norm and bias copied: how stages wrap a
    /// block's layers (recording, factoring, pruning) without listing its vectors.
    pub fn map_linears<'a, M>(&'a self, mut f: impl FnMut(usize, &'a L) -> M) -> Block<M> {
        Block {
            attn_norm: self.attn_norm.clone(),
            q: f(0, &self.q),
            k: f(1, &self.k),
            v: f(2, &self.v),
            o: f(3, &self.o),
            qkv_bias: self.qkv_bias.clone(),
            qk_norm: self.qk_norm.clone(),
            post_norms: self.post_norms.clone(),
            mlp_norm: self.mlp_norm.clone(),
            gate: f(4, &self.gate),
            up: f(5, &self.up),
            down: f(6, &self.down),
        }
    }

    /// The same layers, mutable, in the order of [`Block::linears`].
    pub fn linears_mut(&mut self) -> [&mut L; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// The output projection to vocabulary logits.
#[derive(Clone, Debug)]
pub enum Head<L> {
    /// Reuses the token embedding matrix (`vocab × hidden`).
    Tied,
    /// A separate `vocab × hidden` layer.
    Separate(L),
}

/// A complete decoder-only model: linear layers stored as `L`, the token embedding as
/// `E` (dense `f32` on the host, borrowed from the file on the board).
#[derive(Clone, Debug)]
pub struct Model<L, E = Vec<f32>> {
    /// Hyper-parameters.
    pub config: Config,
    /// Token embedding, row-major `vocab × hidden`.
    pub embed: E,
    /// The transformer blocks.
    pub blocks: Vec<Block<L>>,
    /// Final RMSNorm weight.
    pub norm: Vec<f32>,
    /// Output head.
    pub head: Head<L>,
}

/// Why a set of weights does not form a valid model.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// The configuration itself is inconsistent.
    #[error("{0}")]
    Config(&'static str),
    /// A matrix has the wrong shape.
    #[error("{}{tensor} is {}×{}, expected {}×{}", BlockPrefix(*block), found.0, found.1, expected.0, expected.1)]
    Matrix {
        /// The block, or `None` for the embedding and the head.
        block: Option<usize>,
        /// Which matrix (`"token embedding"`, `"q"`, ...).
        tensor: &'static str,
        /// Its (rows, columns).
        found: (usize, usize),
        /// The (rows, columns) the configuration implies.
        expected: (usize, usize),
    },
    /// A norm weight or bias (or the embedding table, by size) has the wrong length.
    #[error("{}{tensor} has {found} values, expected {expected}", BlockPrefix(*block))]
    Vector {
        /// The block, or `None` for the final norm.
        block: Option<usize>,
        /// Which vector (`"final norm"`, `"attention norm"`, ...).
        tensor: &'static str,
        /// Its length.
        found: usize,
        /// The length the configuration implies.
        expected: usize,
    },
    /// The number of blocks is not the configuration's layer count.
    #[error("{found} blocks, the configuration has {expected} layers")]
    BlockCount {
        /// Blocks present.
        found: usize,
        /// Layers configured.
        expected: usize,
    },
    /// A block has q/k/v biases when the configuration has none, or the reverse.
    #[error("block {block}: q/k/v biases disagree with the configuration")]
    BiasPresence {
        /// The block.
        block: usize,
    },
    /// A block has q/k norms or output norms when the architecture has none, or the
    /// reverse.
    #[error("block {block}: {what} disagree with the architecture")]
    NormPresence {
        /// The block.
        block: usize,
        /// Which norms (`"q/k norms"`, `"output norms"`).
        what: &'static str,
    },
}

/// `"block 3: "`, or nothing for tensors outside the blocks (for messages).
struct BlockPrefix(Option<usize>);

impl core::fmt::Display for BlockPrefix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "block {n}: "),
            None => Ok(()),
        }
    }
}

impl<L: Linear, E: Embedding> Model<L, E> {
    /// Checks every tensor's shape against the config.
    pub fn validate(&self) -> Result<(), ShapeError> {
        let c = &self.config;
        c.validate().map_err(ShapeError::Config)?;
        let h = c.hidden_size;
        let matrix = |block, tensor, found, expected| {
            if found == expected {
                Ok(())
            } else {
                Err(ShapeError::Matrix {
                    block,
                    tensor,
                    found,
                    expected,
                })
            }
        };
        let vector = |block, tensor, found, expected| {
            if found == expected {
                Ok(())
            } else {
                Err(ShapeError::Vector {
                    block,
                    tensor,
                    found,
                    expected,
                })
            }
        };
        // By size: an `Embedding` need not know its shape.
        vector(
            None,
            "token embedding",
            self.embed.numel(),
            c.vocab_size * h,
        )?;
        vector(None, "final norm", self.norm.len(), h)?;
        if self.blocks.len() != c.n_layers {
            return Err(ShapeError::BlockCount {
                found: self.blocks.len(),
                expected: c.n_layers,
            });
        }
        if let Head::Separate(l) = &self.head {
            let found = (l.out_features(), l.in_features());
            matrix(None, "output head", found, (c.vocab_size, h))?;
        }
        let i = c.intermediate_size;
        for (n, b) in self.blocks.iter().enumerate() {
            let want = [
                (c.q_dim(), h),
                (c.kv_dim(), h),
                (c.kv_dim(), h),
                (h, c.q_dim()),
                (i, h),
                (i, h),
                (h, i),
            ];
            for ((name, l), w) in b.linears().iter().zip(want) {
                matrix(Some(n), name, (l.out_features(), l.in_features()), w)?;
            }
            vector(Some(n), "attention norm", b.attn_norm.len(), h)?;
            vector(Some(n), "MLP norm", b.mlp_norm.len(), h)?;
            match (&b.qkv_bias, c.qkv_bias) {
                (Some([bq, bk, bv]), true) => {
                    vector(Some(n), "q bias", bq.len(), c.q_dim())?;
                    vector(Some(n), "k bias", bk.len(), c.kv_dim())?;
                    vector(Some(n), "v bias", bv.len(), c.kv_dim())?;
                }
                (None, false) => {}
                _ => return Err(ShapeError::BiasPresence { block: n }),
            }
            match (&b.qk_norm, c.arch.qk_norm()) {
                (Some([nq, nk]), true) => {
                    vector(Some(n), "q norm", nq.len(), c.head_dim)?;
                    vector(Some(n), "k norm", nk.len(), c.head_dim)?;
                }
                (None, false) => {}
                _ => {
                    return Err(ShapeError::NormPresence {
                        block: n,
                        what: "q/k norms",
                    });
                }
            }
            match (&b.post_norms, c.arch.post_norms()) {
                (Some([na, nm]), true) => {
                    vector(Some(n), "attention output norm", na.len(), h)?;
                    vector(Some(n), "MLP output norm", nm.len(), h)?;
                }
                (None, false) => {}
                _ => {
                    return Err(ShapeError::NormPresence {
                        block: n,
                        what: "output norms",
                    });
                }
            }
        }
        Ok(())
    }
}
