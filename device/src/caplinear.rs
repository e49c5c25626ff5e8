//! A linear layer read in place from a `.cap` file: dense, low-rank (`W = B·A`),
//! sparse (bitmask, block-CSR, 2:4) or low-rank + sparse, in its stored type (f32,
//! f16, bf16, or the quantized Q8 / Q4 of format 1.1, whose blocks the kernels
//! dequantize as they read them).
//!
//! Nothing is densified. Decoding a few tokens runs the `cap-kernels` matrix-vector
//! kernels straight over the stored bytes (memory-bound: fewer bytes, faster). Longer
//! inputs (prefill, perplexity) are compute-bound, so there the layer decodes
//! [`TILE_ROWS`] rows at a time into `f32` scratch and multiplies them with the whole
//! chunk of tokens by GEMM: the tile is reused by every token, and only a tile (never
//! the layer) exists in `f32`.

use alloc::vec::Vec;

use cap_format::reader::{SparseView, TensorData, TensorView};
use cap_format::{Encoding, FormatError, Values};
use cap_kernels::cpu::{self, BitmaskRef, CsrRef, Kernels, SparseRef, TwoFourRef};
use cap_kernels::gemm::{MatMut, MatRef, matmul};
use cap_kernels::par;

use crate::model::{Embedding, Linear, token_rows};

/// Inputs of at most this many tokens run the matrix-vector kernels, token by token;
/// longer ones the tiled GEMM path.
pub const GEMV_MAX_TOKENS: usize = 4;

/// Rows decoded to `f32` at a time on the GEMM path.
pub const TILE_ROWS: usize = 64;

/// Output rows below which a matrix-vector product is not split across threads (the
/// hand-off would cost more than the rows).
const MIN_ROWS_PER_THREAD: usize = 64;

/// The sparse part of a stored layer, borrowed from the file.
#[derive(Clone, Debug)]
pub enum SparsePart<'a> {
    /// Bitmask + packed values; `row_start` (computed at load, `rows + 1` entries)
    /// says where each row's values begin.
    Bitmask {
        /// The mask bits.
        mask: &'a [u8],
        /// Index of each row's first value.
        row_start: Vec<u32>,
        /// The non-zeros.
        values: Values<'a>,
    },
    /// Block-CSR.
    Csr(CsrRef<'a>),
    /// 2:4.
    TwoFour(TwoFourRef<'a>),
}

impl SparsePart<'_> {
    /// The part as the kernels take it, for a matrix of `cols` columns.
    pub fn as_ref(&self, cols: usize) -> SparseRef<'_> {
        match self {
            SparsePart::Bitmask {
                mask,
                row_start,
                values,
            } => SparseRef::Bitmask(BitmaskRef {
                cols,
                mask,
                row_start,
                values: *values,
            }),
            SparsePart::Csr(c) => SparseRef::Csr(*c),
            SparsePart::TwoFour(t) => SparseRef::TwoFour(*t),
        }
    }
}

/// The low-rank part `B·A` of a stored layer.
#[derive(Clone, Copy, Debug)]
pub struct LowRankPart<'a> {
    /// Rank.
    pub rank: usize,
    /// `rank × cols`.
    pub a: Values<'a>,
    /// `rows × rank`.
    pub b: Values<'a>,
}

/// A linear layer as stored in a `.cap` file: `W = dense`, or `B·A + S` with either
/// part optional.
#[derive(Clone, Debug)]
pub struct CapLinear<'a> {
    /// Output width.
    pub rows: usize,
    /// Input width.
    pub cols: usize,
    /// Dense values (`rows × cols`), for a dense encoding.
    pub dense: Option<Values<'a>>,
    /// The low-rank part.
    pub low_rank: Option<LowRankPart<'a>>,
    /// The sparse part.
    pub sparse: Option<SparsePart<'a>>,
}

impl<'a> CapLinear<'a> {
    /// Borrows a tensor section. The section's structure should have been verified
    /// ([`TensorView::verify`]); the kernels stay memory-safe either way.
    pub fn from_view(t: &TensorView<'a>) -> Result<Self, FormatError> {
        let (rows, cols) = (t.rows as usize, t.cols as usize);
        let sparse = |v: SparseView<'a>| -> SparsePart<'a> {
            match v {
                SparseView::Bitmask { mask, values } => SparsePart::Bitmask {
                    mask,
                    row_start: cpu::bitmask_row_starts(mask, rows, cols),
                    values,
                },
                SparseView::BlockCsr(c) => SparsePart::Csr(CsrRef {
                    cols,
                    block_ptr: c.block_ptr,
                    col_idx: c.col_idx,
                    values: c.values,
                }),
                SparseView::TwoFour { values, meta } => {
                    SparsePart::TwoFour(TwoFourRef { cols, values, meta })
                }
            }
        };
        let rank = match t.encoding {
            Encoding::LowRank { rank, .. } | Encoding::Composite { rank, .. } => rank as usize,
            _ => 0,
        };
        let mut l = CapLinear {
            rows,
            cols,
            dense: None,
            low_rank: None,
            sparse: None,
        };
        match t.data()? {
            TensorData::Dense(v) => l.dense = Some(v),
            TensorData::LowRank { a, b } => l.low_rank = Some(LowRankPart { rank, a, b }),
            TensorData::Sparse(s) => l.sparse = Some(sparse(s)),
            TensorData::Composite { a, b, sparse: s } => {
                l.low_rank = Some(LowRankPart { rank, a, b });
                l.sparse = Some(sparse(s));
            }
        }
        Ok(l)
    }

    /// Bytes of weight data this layer reads per token (every stored part once).
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.dense.map_or(0, |v| v.bytes.len());
        if let Some(l) = &self.low_rank {
            n += l.a.bytes.len() + l.b.bytes.len();
        }
        n + match &self.sparse {
            None => 0,
            Some(SparsePart::Bitmask { mask, values, .. }) => mask.len() + values.bytes.len(),
            Some(SparsePart::Csr(c)) => c.block_ptr.len() + c.col_idx.len() + c.values.bytes.len(),
            Some(SparsePart::TwoFour(s)) => s.meta.len() + s.values.bytes.len(),
        }
    }

    /// Floats of scratch [`Linear::forward`] needs for `t` tokens.
    pub fn scratch_floats(&self, t: usize) -> usize {
        let rank = self.low_rank.map_or(0, |l| l.rank);
        if t <= GEMV_MAX_TOKENS {
            rank
        } else {
            TILE_ROWS * self.cols.max(rank) + self.cols + t * rank
        }
    }

    /// One token: `y = W·x` by the matrix-vector kernels.
    fn gemv(&self, k: &Kernels, x: &[f32], y: &mut [f32], h: &mut [f32], threads: usize) {
        y.fill(0.0);
        if let Some(w) = self.dense {
            rows_par(y, threads, |r0, ys| (k.dense_rows)(w, self.cols, r0, x, ys));
        }
        if let Some(l) = &self.low_rank {
            h.fill(0.0);
            rows_par(h, threads, |r0, hs| {
                (k.dense_rows)(l.a, self.cols, r0, x, hs)
            });
            let h: &[f32] = h;
            rows_par(y, threads, |r0, ys| (k.dense_rows)(l.b, l.rank, r0, h, ys));
        }
        if let Some(s) = &self.sparse {
            let s = s.as_ref(self.cols);
            rows_par(y, threads, |r0, ys| s.mul_rows(k, r0, x, ys));
        }
    }

    /// Many tokens: `y += x·Wᵀ` through `f32` tiles of the stored rows.
    fn tiled(&self, k: &Kernels, x: &[f32], y: &mut [f32], scratch: &mut [f32], threads: usize) {
        let t = x.len() / self.cols;
        let rank = self.low_rank.map_or(0, |l| l.rank);
        let (tile, rest) = scratch.split_at_mut(TILE_ROWS * self.cols.max(rank));
        let (buf, h) = rest.split_at_mut(self.cols);
        y.fill(0.0);
        if let Some(w) = self.dense {
            tile_gemm(x, y, self.rows, self.cols, tile, threads, |r0, tl| {
                cpu::rows_to_f32(k, w, self.cols, r0, tl)
            });
        }
        if let Some(l) = &self.low_rank {
            let h = &mut h[..t * rank];
            h.fill(0.0);
            tile_gemm(x, h, rank, self.cols, tile, threads, |r0, tl| {
                cpu::rows_to_f32(k, l.a, self.cols, r0, tl)
            });
            tile_gemm(h, y, self.rows, rank, tile, threads, |r0, tl| {
                cpu::rows_to_f32(k, l.b, rank, r0, tl)
            });
        }
        if let Some(s) = &self.sparse {
            let s = s.as_ref(self.cols);
            tile_gemm(x, y, self.rows, self.cols, tile, threads, |r0, tl| {
                s.decode_rows(k, r0, tl, buf)
            });
        }
    }
}

/// Floats of scratch any [`CapLinear`] of a model with configuration `c` needs for a
/// chunk of up to [`crate::forward::PREFILL_CHUNK`] tokens (ranks are at most the
/// smaller side of a layer, so at most the wider of hidden and intermediate).
pub fn scratch_bound(c: &crate::config::Config) -> usize {
    let m = c.hidden_size.max(c.intermediate_size);
    (TILE_ROWS + 1 + crate::forward::PREFILL_CHUNK) * m
}

/// Splits the output rows `y` across up to `threads` threads; `f(r0, ys)` handles the
/// rows starting at `r0`.
fn rows_par(y: &mut [f32], threads: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let n = y.len();
    let per = n.div_ceil(threads.max(1)).max(MIN_ROWS_PER_THREAD);
    if per >= n {
        f(0, y);
    } else {
        par::for_each_chunk(y, per, threads, |i, ys| f(i * per, ys));
    }
}

/// `y[t × rows] += x[t × k] · Wᵀ` where `decode(r0, tile)` writes rows `r0..` of `W`
/// (`tile.len() / k` of them) as `f32`.
fn tile_gemm(
    x: &[f32],
    y: &mut [f32],
    rows: usize,
    k: usize,
    tile: &mut [f32],
    threads: usize,
    mut decode: impl FnMut(usize, &mut [f32]),
) {
    let t = x.len() / k;
    for r0 in (0..rows).step_by(TILE_ROWS) {
        let n = TILE_ROWS.min(rows - r0);
        let tl = &mut tile[..n * k];
        decode(r0, tl);
        matmul(
            &mut MatMut {
                data: &mut y[r0..],
                rows: t,
                cols: n,
                row_stride: rows,
                col_stride: 1,
            },
            MatRef::row_major(x, t, k),
            MatRef::row_major(tl, n, k).t(),
            1.0,
            1.0,
            threads,
        );
    }
}

impl Linear for CapLinear<'_> {
    fn in_features(&self) -> usize {
        self.cols
    }
    fn out_features(&self) -> usize {
        self.rows
    }
    fn forward(&self, x: &[f32], y: &mut [f32], scratch: &mut Vec<f32>, threads: usize) {
        let t = token_rows(x, y, self.cols, self.rows);
        let need = self.scratch_floats(t);
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let k = cpu::kernels();
        if t <= GEMV_MAX_TOKENS {
            let h = &mut scratch[..self.low_rank.map_or(0, |l| l.rank)];
            for (xi, yi) in x.chunks_exact(self.cols).zip(y.chunks_exact_mut(self.rows)) {
                self.gemv(k, xi, yi, h, threads);
            }
        } else {
            self.tiled(k, x, y, &mut scratch[..need], threads);
        }
    }
}

/// As an embedding table the layer must be stored dense (rows are gathered by token
/// id); [`crate::load`] checks that.
impl Embedding for CapLinear<'_> {
    fn numel(&self) -> usize {
        self.rows * self.cols
    }
    fn row_into(&self, id: usize, out: &mut [f32]) {
        if let Some(w) = self.dense {
            cpu::rows_to_f32(cpu::kernels(), w, self.cols, id, out);
        }
    }
    fn head_forward(
        &self,
        x: &[f32],
        y: &mut [f32],
        _vocab: usize,
        scratch: &mut Vec<f32>,
        threads: usize,
    ) {
        self.forward(x, y, scratch, threads);
    }
}
