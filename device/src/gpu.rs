//! A model's linear layers on a CUDA GPU (feature `cuda`).
//!
//! [`upload`] copies every stored linear layer of a [`CapModel`] to the GPU once, in
//! its stored encoding and value type (dense, low-rank, bitmask, block-CSR, 2:4; f32,
//! f16, bf16, Q8, Q4): nothing is densified. The result is a [`Model`] the ordinary
//! forward pass runs ([`crate::forward::Runner`], [`crate::ppl::perplexity`]): each
//! [`GpuLinear::forward`] sends its input rows to the GPU, runs the matrix-vector
//! kernels of every part there and reads the output back. Norms, RoPE, attention and
//! the KV cache stay on the CPU: this is the first step of the GPU runtime (the
//! weights, which are what a decode step reads, on the GPU), measured against the CPU
//! path by `cap-device selftest --device cuda`.
//!
//! Errors: a failure inside [`Linear::forward`] (which returns nothing) is kept, the
//! output filled with NaN so no result can pass as a number, and reported by
//! [`GpuModel::error`].

use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use std::sync::Mutex;

use cap_kernels::cuda::{CudaError, Gpu, Resident};
use cudarc::driver::CudaSlice;

use crate::caplinear::CapLinear;
use crate::load::CapModel;
use crate::model::{Block, Embedding, Head, Linear, Model};

/// Where a [`GpuLinear`] records the first failure of its forward passes.
type ErrorSlot = Arc<Mutex<Option<String>>>;

/// Device buffers of one linear layer's forward pass: one input row, one output row,
/// the low-rank intermediate.
struct Bufs {
    x: CudaSlice<f32>,
    y: CudaSlice<f32>,
    h: CudaSlice<f32>,
}

/// A linear layer with its stored parts on the GPU: `y = dense·x`, or
/// `y = B·(A·x) + S·x` with either part optional, as [`CapLinear`].
pub struct GpuLinear {
    gpu: Arc<Gpu>,
    rows: usize,
    cols: usize,
    dense: Option<Resident>,
    low_rank: Option<(Resident, Resident)>,
    sparse: Option<Resident>,
    bufs: Mutex<Bufs>,
    error: ErrorSlot,
}

impl GpuLinear {
    /// Uploads every part of `l`.
    pub fn upload(gpu: &Arc<Gpu>, l: &CapLinear<'_>) -> Result<Self, CudaError> {
        Self::upload_with(gpu, l, Arc::new(Mutex::new(None)))
    }

    fn upload_with(gpu: &Arc<Gpu>, l: &CapLinear<'_>, error: ErrorSlot) -> Result<Self, CudaError> {
        let (rows, cols) = (l.rows, l.cols);
        let dense = l
            .dense
            .map(|w| gpu.upload_dense(w, rows, cols))
            .transpose()?;
        let low_rank = match &l.low_rank {
            Some(lr) => Some((
                gpu.upload_dense(lr.a, lr.rank, cols)?,
                gpu.upload_dense(lr.b, rows, lr.rank)?,
            )),
            None => None,
        };
        let sparse = match &l.sparse {
            Some(s) => Some(gpu.upload_sparse(&s.as_ref(cols), rows)?),
            None => None,
        };
        let rank = l.low_rank.map_or(0, |lr| lr.rank);
        let bufs = Bufs {
            x: gpu.zeros(cols)?,
            y: gpu.zeros(rows)?,
            h: gpu.zeros(rank)?,
        };
        Ok(GpuLinear {
            gpu: Arc::clone(gpu),
            rows,
            cols,
            dense,
            low_rank,
            sparse,
            bufs: Mutex::new(bufs),
            error,
        })
    }

    /// `y = W·x` for one row on the GPU.
    fn row(&self, b: &mut Bufs, x: &[f32], y: &mut [f32]) -> Result<(), CudaError> {
        let g = &self.gpu;
        g.write_f32(x, &mut b.x)?;
        g.clear_f32(&mut b.y)?;
        if let Some(w) = &self.dense {
            g.resident_rows_dev(w, 0, self.rows, &b.x, &mut b.y)?;
        }
        if let Some((a, bm)) = &self.low_rank {
            g.clear_f32(&mut b.h)?;
            g.resident_rows_dev(a, 0, a.rows(), &b.x, &mut b.h)?;
            g.resident_rows_dev(bm, 0, self.rows, &b.h, &mut b.y)?;
        }
        if let Some(s) = &self.sparse {
            g.resident_rows_dev(s, 0, self.rows, &b.x, &mut b.y)?;
        }
        g.read_f32(&b.y, y)
    }
}

impl Linear for GpuLinear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], y: &mut [f32], _scratch: &mut Vec<f32>, _threads: usize) {
        // A poisoned lock means another forward panicked; its buffers are still whole
        // device allocations, so carrying on is sound.
        let mut b = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        let rows = x.chunks_exact(self.cols).zip(y.chunks_exact_mut(self.rows));
        for (xr, yr) in rows {
            if let Err(e) = self.row(&mut b, xr, yr) {
                yr.fill(f32::NAN);
                let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// The token embedding of a GPU model: rows looked up on the CPU from the file, the
/// tied output head (the largest matrix of a small model) on the GPU.
pub struct GpuEmbedding<'a> {
    table: CapLinear<'a>,
    /// The table on the GPU when it is the head (`None` under a separate head, whose
    /// own layer the forward pass calls instead).
    head: Option<GpuLinear>,
}

impl Embedding for GpuEmbedding<'_> {
    fn numel(&self) -> usize {
        self.table.numel()
    }

    fn row_into(&self, id: usize, out: &mut [f32]) {
        self.table.row_into(id, out);
    }

    fn head_forward(
        &self,
        x: &[f32],
        y: &mut [f32],
        vocab: usize,
        scratch: &mut Vec<f32>,
        threads: usize,
    ) {
        match &self.head {
            Some(h) => h.forward(x, y, scratch, threads),
            None => self.table.head_forward(x, y, vocab, scratch, threads),
        }
    }
}

/// A model whose linear layers (and tied head) live on the GPU.
pub type GpuModelInner<'a> = Model<GpuLinear, GpuEmbedding<'a>>;

/// A [`Model`] on the GPU, with the error slot its layers share.
pub struct GpuModel<'a> {
    /// The model, for [`crate::forward::Runner`] and [`crate::ppl::perplexity`].
    pub model: GpuModelInner<'a>,
    error: ErrorSlot,
    bytes: u64,
}

impl GpuModel<'_> {
    /// The first failure of any layer's forward pass since the upload, if any (the
    /// outputs it touched are NaN).
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Bytes of stored weights uploaded.
    pub fn weight_bytes(&self) -> u64 {
        self.bytes
    }
}

/// Uploads every linear layer of `m` (and its tied or separate head) to `gpu`.
pub fn upload<'a>(gpu: &Arc<Gpu>, m: &CapModel<'a>) -> Result<GpuModel<'a>, CudaError> {
    let error: ErrorSlot = Arc::new(Mutex::new(None));
    let mut bytes = 0u64;
    let mut up = |l: &CapLinear<'_>| {
        bytes += l.weight_bytes() as u64;
        GpuLinear::upload_with(gpu, l, Arc::clone(&error))
    };
    let mut blocks = Vec::with_capacity(m.blocks.len());
    for b in &m.blocks {
        blocks.push(Block {
            attn_norm: b.attn_norm.clone(),
            q: up(&b.q)?,
            k: up(&b.k)?,
            v: up(&b.v)?,
            o: up(&b.o)?,
            qkv_bias: b.qkv_bias.clone(),
            qk_norm: b.qk_norm.clone(),
            post_norms: b.post_norms.clone(),
            mlp_norm: b.mlp_norm.clone(),
            gate: up(&b.gate)?,
            up: up(&b.up)?,
            down: up(&b.down)?,
        });
    }
    let (embed_head, head) = match &m.head {
        Head::Tied => (Some(up(&m.embed)?), Head::Tied),
        Head::Separate(l) => (None, Head::Separate(up(l)?)),
    };
    Ok(GpuModel {
        model: Model {
            config: m.config.clone(),
            embed: GpuEmbedding {
                table: m.embed.clone(),
                head: embed_head,
            },
            blocks,
            norm: m.norm.clone(),
            head,
        },
        error,
        bytes,
    })
}
