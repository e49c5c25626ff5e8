//! Stage 1 of CAP: robust PCA of every linear weight, `W = L + S` with `L` low-rank and
//! `S` sparse, by the inexact augmented Lagrange multiplier method (Lin, Chen & Ma
//! 2010; [`ialm`]) on faer's SVD ([`svd`]).
//!
//! * [`decompose_matrix`] splits one row-major `out × in` weight into a
//!   [`Decomposition`]: the thin SVD factors of `L` (`U` `m × r`, `σ` `r`, `V` `n × r`),
//!   `S` in CSR form, and [`Stats`].
//! * [`cache`] stores one decomposition per file, keyed by checksums of the weight and
//!   of the settings, written atomically, so runs resume and `compress` reuses them.
//! * [`model`] runs every linear of a model in parallel with bounded memory, sharded
//!   and filtered, skipping what the cache already holds.
//! * [`sweep`] reports rank, density and energy against λ and iterations.
//!
//! Defaults (reference IALM code): `λ = lambda_scale / sqrt(max(m, n))`,
//! `μ₀ = 1.25/‖W‖₂`, `ρ = 1.5`, `μ_max = 10⁷ μ₀`, `Y₀ = W / max(‖W‖₂, ‖W‖_∞/λ)`.
//!
//! Activation-aware mode ([`Mode::ActivationAware`]): with a per-input-column scale `d`
//! (`sqrt(diag(XᵀX))` of calibration inputs `X`), `W·diag(d)` is decomposed and the
//! result unscaled (`S`'s columns and `V`'s rows divided by `d`), so `L + S ≈ W` still
//! holds while the split weighs columns by how much the inputs use them.

pub mod cache;
pub mod ialm;
pub mod model;
pub mod rng;
pub mod svd;
pub mod sweep;

use std::time::Instant;

use faer::{Mat, Par};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use cache::load_cached;
pub use ialm::IterInfo;

/// Default maximum iteration count, chosen from measurements on SmolLM2-135M-Instruct
/// (README, "RPCA (decompose)": every linear decomposed, then W replaced by L + S and
/// the perplexity measured, WikiText-2 validation, ctx 512, first 8 windows; dense
/// 21.18): 2 iterations give PPL 187,425, 3 give 150.0, 5 give 21.95 (+3.7%), 10 give
/// 21.17 (equal to dense), with a mean relative residual ‖W − L − S‖/‖W‖ of 0.19 after
/// 3, 0.048 after 5 and 0.0026 after 10. The CAP paper's "3 is close to 10" does not
/// hold with the reference μ schedule (μ₀ = 1.25/‖W‖₂, ρ = 1.5): after 3 iterations μ
/// is only 3.4 μ₀ and both shrinkages still remove much of W. 10 is the smallest
/// count measured whose split stands for W without loss, so the budget search starts
/// from an exact split; it costs about 2.5× of 5 iterations.
pub const DEFAULT_ITERS: usize = 10;
/// Default λ scale (λ = scale / sqrt(max(m, n)), the Candès et al. / CAP choice).
pub const DEFAULT_LAMBDA_SCALE: f64 = 1.0;
/// Default stopping tolerance on ‖W − L − S‖_F / ‖W‖_F. The reference uses 1e-7, which
/// is at `f32`'s unit roundoff (6e-8) times the norm: the solve works in `f32`, so the
/// residual bottoms out at a few 1e-7 and 1e-6 is the smallest tolerance it reliably
/// reaches.
pub const DEFAULT_TOL: f64 = 1e-6;
/// Floor of an activation scale relative to the largest one: a column no calibration
/// input touched (d = 0) would otherwise be divided by zero when unscaling, and a tiny
/// scale multiplies that column's share of the residual by 1/d when unscaling. 1e-3
/// bounds that amplification to 1000× while leaving real channel scales (which span
/// about two decades in LLM activations) untouched.
pub const ACT_SCALE_FLOOR: f32 = 1e-3;
/// Version of the algorithm and of the stored result, part of every cache key: bump it
/// when a change alters the numbers, so old caches are recomputed instead of reused.
pub const ALGORITHM_VERSION: u32 = 1;

/// Why a decomposition, a cache file or a run over a model failed. File problems
/// name the file; a matrix's problem names the tensor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcaError {
    /// A block could not be read from the checkpoint (streamed runs).
    #[error("{0}")]
    Source(String),
    /// The weight holds NaN or infinity, or the iteration diverged.
    #[error("weight or iterate is not finite")]
    NonFinite,
    /// faer's SVD iteration did not converge.
    #[error("SVD did not converge")]
    SvdFailed,
    /// The weight's length is not rows × cols, or a scale vector has the wrong length.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Settings out of range.
    #[error("invalid setting: {0}")]
    Setting(String),
    /// A `--shard` value is not `I/N` with `1 ≤ I ≤ N` (the message says how).
    #[error("{0}")]
    Shard(String),
    /// The worker count is zero.
    #[error("threads must be at least 1")]
    NoThreads,
    /// `--only` selects nothing.
    #[error("--only {0:?} matches no linear weight of the model")]
    NoMatch(String),
    /// The worker pool could not start.
    #[error("cannot start the worker threads")]
    Pool(#[source] rayon::ThreadPoolBuildError),
    /// Activation-aware mode without a scale for a matrix.
    #[error("no calibration scale for {0}")]
    NoScale(String),
    /// A tensor name that cannot be a file name.
    #[error("tensor name {0:?} cannot be a cache file name")]
    CacheName(String),
    /// A decomposition could not be serialized.
    #[error("encoding a decomposition")]
    Encode(#[source] postcard::Error),
    /// A file or directory could not be created, written or renamed.
    #[error("{}: {what}", .path.display())]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What was being done (`cannot create`, `write error`, ...).
        what: &'static str,
        /// The OS error, if any.
        #[source]
        source: Option<std::io::Error>,
    },
    /// Decomposing one matrix failed.
    #[error("decomposing {name}")]
    Matrix {
        /// The tensor.
        name: String,
        /// Why.
        #[source]
        source: Box<RpcaError>,
    },
    /// Caching one matrix's result failed.
    #[error("caching {name}")]
    Cache {
        /// The tensor.
        name: String,
        /// Why.
        #[source]
        source: Box<RpcaError>,
    },
}

/// Which SVD the singular value threshold uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SvdMethod {
    /// faer's exact thin SVD every iteration (the default).
    Exact,
    /// A randomized truncated SVD of the predicted rank while that rank is below a
    /// quarter of `min(m, n)`, falling back to the exact SVD when the prediction is
    /// saturated.
    Randomized,
}

/// Settings of a decomposition run; all of them enter the cache key.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RpcaSettings {
    /// Maximum IALM iterations (≥ 1).
    pub max_iters: usize,
    /// λ = lambda_scale / sqrt(max(m, n)) (> 0).
    pub lambda_scale: f64,
    /// Relative-residual stopping tolerance (≥ 0).
    pub tol: f64,
    /// SVD used in the iterations.
    pub svd: SvdMethod,
}

impl Default for RpcaSettings {
    fn default() -> Self {
        RpcaSettings {
            max_iters: DEFAULT_ITERS,
            lambda_scale: DEFAULT_LAMBDA_SCALE,
            tol: DEFAULT_TOL,
            svd: SvdMethod::Exact,
        }
    }
}

impl RpcaSettings {
    /// Checks the ranges of every setting.
    pub fn validate(&self) -> Result<(), RpcaError> {
        if self.max_iters == 0 {
            return Err(RpcaError::Setting("iterations must be at least 1".into()));
        }
        if !(self.lambda_scale.is_finite() && self.lambda_scale > 0.0) {
            return Err(RpcaError::Setting(format!(
                "lambda scale must be a positive number, got {}",
                self.lambda_scale
            )));
        }
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(RpcaError::Setting(format!(
                "tolerance must be a non-negative number, got {}",
                self.tol
            )));
        }
        Ok(())
    }

    /// λ for an `m × n` matrix.
    pub fn lambda(&self, m: usize, n: usize) -> f64 {
        self.lambda_scale / (m.max(n).max(1) as f64).sqrt()
    }
}

/// Which matrix was decomposed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// `W` itself.
    Plain,
    /// `W·diag(d)`, unscaled afterwards; `scale_sha256` identifies `d` (hex SHA-256 of
    /// its `f32` little-endian bytes).
    ActivationAware {
        /// Hex SHA-256 of the scale vector.
        scale_sha256: String,
    },
}

impl Mode {
    /// The mode for an optional scale vector.
    pub fn of(scale: Option<&[f32]>) -> Mode {
        match scale {
            None => Mode::Plain,
            Some(d) => Mode::ActivationAware {
                scale_sha256: crate::digest::to_hex(&sha256_f32(d)),
            },
        }
    }

    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::ActivationAware { .. } => "activation-aware",
        }
    }
}

/// SHA-256 of `f32` values as little-endian bytes.
pub fn sha256_f32(x: &[f32]) -> [u8; 32] {
    let mut h = Sha256::new();
    // Hash in blocks: one update per value would be slow on 45M-value matrices.
    let mut buf = Vec::with_capacity(4096 * 4);
    for chunk in x.chunks(4096) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&buf);
    }
    h.finalize().into()
}

/// A sparse matrix in compressed sparse row form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Csr {
    /// Row `i`'s entries are `col[row_ptr[i]..row_ptr[i + 1]]`; `rows + 1` values.
    pub row_ptr: Vec<u64>,
    /// Column of each non-zero, increasing within a row.
    pub col: Vec<u32>,
    /// Value of each non-zero.
    pub val: Vec<f32>,
}

/// Statistics of one decomposition (deterministic: no timings, so cache files of
/// equal inputs are byte-identical).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Rank of L.
    pub rank: usize,
    /// Non-zeros of S.
    pub nnz: usize,
    /// ‖W − L − S‖_F / ‖W‖_F of the decomposed (possibly scaled) matrix.
    pub residual: f64,
    /// Iterations run.
    pub iterations: usize,
    /// ‖L‖_F² / ‖W‖_F² (of the decomposed matrix).
    pub energy_l: f64,
    /// ‖S‖_F² / ‖W‖_F² (of the decomposed matrix).
    pub energy_s: f64,
    /// λ used.
    pub lambda: f64,
}

impl Stats {
    /// Fraction of S's entries that are non-zero.
    pub fn density(&self, rows: usize, cols: usize) -> f64 {
        self.nnz as f64 / (rows * cols).max(1) as f64
    }
}

/// One matrix split into `L = U·diag(σ)·Vᵀ` and sparse `S`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decomposition {
    /// Rows `m` (output features).
    pub rows: usize,
    /// Columns `n` (input features).
    pub cols: usize,
    /// What was decomposed.
    pub mode: Mode,
    /// `U`, row-major `m × r`, orthonormal columns.
    pub u: Vec<f32>,
    /// `σ`, `r` values, non-increasing, positive.
    pub sigma: Vec<f32>,
    /// `V`, row-major `n × r` (orthonormal columns in plain mode; rows divided by `d`
    /// in activation-aware mode).
    pub v: Vec<f32>,
    /// `S` (columns divided by `d` in activation-aware mode).
    pub s: Csr,
    /// Statistics.
    pub stats: Stats,
}

impl Decomposition {
    /// Rank `r` of L.
    pub fn rank(&self) -> usize {
        self.sigma.len()
    }

    /// L densified, row-major `m × n`.
    pub fn low_rank_dense(&self) -> Vec<f32> {
        let (m, n, r) = (self.rows, self.cols, self.rank());
        let us = Mat::<f32>::from_fn(m, r, |i, c| self.u[i * r + c] * self.sigma[c]);
        let vt = Mat::<f32>::from_fn(r, n, |c, j| self.v[j * r + c]);
        let mut l = Mat::<f32>::zeros(m, n);
        faer::linalg::matmul::matmul(
            l.as_mut(),
            faer::Accum::Replace,
            us.as_ref(),
            vt.as_ref(),
            1.0,
            Par::Seq,
        );
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = l[(i, j)];
            }
        }
        out
    }

    /// S densified, row-major `m × n`.
    pub fn sparse_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for i in 0..self.rows {
            for k in self.s.row_ptr[i] as usize..self.s.row_ptr[i + 1] as usize {
                out[i * self.cols + self.s.col[k] as usize] = self.s.val[k];
            }
        }
        out
    }

    /// L + S, row-major `m × n`: the weight this decomposition stands for.
    pub fn reconstruct(&self) -> Vec<f32> {
        let mut l = self.low_rank_dense();
        for i in 0..self.rows {
            for k in self.s.row_ptr[i] as usize..self.s.row_ptr[i + 1] as usize {
                l[i * self.cols + self.s.col[k] as usize] += self.s.val[k];
            }
        }
        l
    }
}

/// Decomposes one row-major `rows × cols` weight. With `scale` (length `cols`), runs
/// the activation-aware mode. `par` is faer's parallelism inside this one matrix;
/// `on_iter` sees every iteration. Returns the decomposition and the seconds it took.
pub fn decompose_matrix(
    weight: &[f32],
    rows: usize,
    cols: usize,
    settings: &RpcaSettings,
    scale: Option<&[f32]>,
    par: Par,
    on_iter: &mut dyn FnMut(&IterInfo),
) -> Result<(Decomposition, f64), RpcaError> {
    settings.validate()?;
    if rows.checked_mul(cols) != Some(weight.len()) {
        return Err(RpcaError::Shape(format!(
            "{} values for a {rows} × {cols} matrix",
            weight.len()
        )));
    }
    let t0 = Instant::now();
    // Scale floor: see ACT_SCALE_FLOOR.
    let d: Option<Vec<f32>> = match scale {
        None => None,
        Some(d) if d.len() != cols => {
            return Err(RpcaError::Shape(format!(
                "scale of length {} for {cols} columns",
                d.len()
            )));
        }
        Some(d) => {
            if d.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(RpcaError::Setting(
                    "activation scales must be finite and non-negative".into(),
                ));
            }
            let max = d.iter().fold(0.0f32, |a, &b| a.max(b));
            let floor = if max > 0.0 {
                max * ACT_SCALE_FLOOR
            } else {
                1.0
            };
            Some(d.iter().map(|&x| x.max(floor)).collect())
        }
    };
    let w = Mat::<f32>::from_fn(rows, cols, |i, j| {
        weight[i * cols + j] * d.as_ref().map_or(1.0, |d| d[j])
    });
    let params = ialm::IalmParams {
        lambda: settings.lambda(rows, cols),
        max_iters: settings.max_iters,
        tol: settings.tol,
        svd: settings.svd,
    };
    let out = ialm::ialm(w.as_ref(), &params, par, on_iter)?;
    drop(w);
    let r = out.sigma.len();
    let inv_d = |j: usize| d.as_ref().map_or(1.0, |d| 1.0 / d[j]);
    let mut u = vec![0.0f32; rows * r];
    for i in 0..rows {
        for c in 0..r {
            u[i * r + c] = out.u[(i, c)];
        }
    }
    let mut v = vec![0.0f32; cols * r];
    for j in 0..cols {
        let s = inv_d(j);
        for c in 0..r {
            v[j * r + c] = out.v[(j, c)] * s;
        }
    }
    let mut row_ptr = Vec::with_capacity(rows + 1);
    let mut col = Vec::with_capacity(out.last.nnz);
    let mut val = Vec::with_capacity(out.last.nnz);
    row_ptr.push(0u64);
    for i in 0..rows {
        for j in 0..cols {
            let x = out.s[(i, j)];
            if x != 0.0 {
                col.push(j as u32);
                val.push(x * inv_d(j));
            }
        }
        row_ptr.push(col.len() as u64);
    }
    let stats = Stats {
        rank: r,
        nnz: col.len(),
        residual: out.last.residual,
        iterations: out.last.iter,
        energy_l: out.last.energy_l,
        energy_s: out.last.energy_s,
        lambda: params.lambda,
    };
    let dec = Decomposition {
        rows,
        cols,
        mode: Mode::of(scale),
        u,
        sigma: out.sigma,
        v,
        s: Csr { row_ptr, col, val },
        stats,
    };
    Ok((dec, t0.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests;
