//! The inexact augmented Lagrange multiplier method for robust PCA (Lin, Chen & Ma,
//! arXiv 1009.5055, algorithm 5), in `f32` on faer matrices.
//!
//! One iteration, with `W` the input, `Y` the dual variable and `μ` the penalty:
//! 1. `S ← shrink(W − L + Y/μ, λ/μ)` (element-wise soft threshold);
//! 2. `U Σ Vᵀ = svd(W − S + Y/μ)`, `L ← U · max(Σ − 1/μ, 0) · Vᵀ` (singular value
//!    threshold);
//! 3. `Y ← Y + μ (W − L − S)`, `μ ← min(ρ μ, μ_max)`;
//! 4. stop when `‖W − L − S‖_F / ‖W‖_F < tol` or after the maximum iteration count.
//!
//! Initialisation as the reference MATLAB code: `L = S = 0`,
//! `Y₀ = W / max(‖W‖₂, ‖W‖_∞/λ)`, `μ₀ = 1.25/‖W‖₂`, `μ_max = 10⁷ μ₀`, `ρ = 1.5`.
//!
//! Why `f32`: the weights are `f32` (dequantized or stored so), faer's `f32` SVD is
//! backward stable to `f32` precision, and it is about twice as fast and half the
//! memory of `f64`, which matters for 4096 × 11008 matrices. Norms and energies are
//! accumulated in `f64`. The price is a floor on the reachable relative residual of a
//! few `f32` epsilons (see [`super::DEFAULT_TOL`]).

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use super::svd::{randomized_svd, spectral_norm, thin_svd};
use super::{RpcaError, SvdMethod};

/// Penalty growth factor ρ of the reference implementation.
pub const RHO: f64 = 1.5;
/// μ₀ = MU0_SCALE / ‖W‖₂ (reference default).
pub const MU0_SCALE: f64 = 1.25;
/// μ_max = MU_MAX_FACTOR · μ₀ (reference default).
pub const MU_MAX_FACTOR: f64 = 1e7;
/// Rank the randomized SVD tries first (PROPACK-style prediction in the reference code).
pub const RSVD_START_RANK: usize = 10;
/// Growth of the predicted rank when the previous prediction was saturated, as a
/// fraction of `min(m, n)` (the reference code's `round(0.05 n)`).
pub const RSVD_RANK_GROWTH: f64 = 0.05;
/// The randomized SVD is used only while the predicted rank is below this fraction of
/// `min(m, n)`; above it a randomized SVD costs as much as the exact one.
pub const RSVD_MAX_FRACTION: f64 = 0.25;

/// Parameters of one IALM solve.
#[derive(Clone, Copy, Debug)]
pub struct IalmParams {
    /// The sparsity weight λ (already scaled: `lambda_scale / sqrt(max(m, n))`).
    pub lambda: f64,
    /// Maximum iteration count (≥ 1).
    pub max_iters: usize,
    /// Stop when the relative residual ‖W − L − S‖_F / ‖W‖_F drops below this.
    pub tol: f64,
    /// Which SVD the singular value threshold uses.
    pub svd: SvdMethod,
}

/// What one iteration produced (for progress bars and the iteration sweep).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct IterInfo {
    /// Iteration number, from 1.
    pub iter: usize,
    /// Rank of L.
    pub rank: usize,
    /// Non-zeros of S.
    pub nnz: usize,
    /// ‖W − L − S‖_F / ‖W‖_F.
    pub residual: f64,
    /// ‖L‖_F² / ‖W‖_F².
    pub energy_l: f64,
    /// ‖S‖_F² / ‖W‖_F².
    pub energy_s: f64,
}

/// The result of a solve: L as thin SVD factors and S dense (the caller sparsifies).
pub struct IalmOutput {
    /// Left singular vectors of L, `m × r`.
    pub u: Mat<f32>,
    /// Singular values of L (already shrunk), `r`, non-increasing.
    pub sigma: Vec<f32>,
    /// Right singular vectors of L, `n × r`.
    pub v: Mat<f32>,
    /// The sparse part, dense `m × n`.
    pub s: Mat<f32>,
    /// Statistics of the last iteration (`iter` = iterations run; all zero for W = 0).
    pub last: IterInfo,
}

/// ‖A‖_F² accumulated in f64.
fn fro2(a: MatRef<'_, f32>) -> f64 {
    let mut acc = 0.0f64;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            let x = a[(i, j)] as f64;
            acc += x * x;
        }
    }
    acc
}

/// Runs IALM on `w` (column-major `m × n`). `on_iter` sees every iteration.
pub fn ialm(
    w: MatRef<'_, f32>,
    p: &IalmParams,
    par: Par,
    on_iter: &mut dyn FnMut(&IterInfo),
) -> Result<IalmOutput, RpcaError> {
    let (m, n) = w.shape();
    let k_full = m.min(n);
    let w_fro2 = fro2(w);
    let mut last = IterInfo {
        iter: 0,
        rank: 0,
        nnz: 0,
        residual: 0.0,
        energy_l: 0.0,
        energy_s: 0.0,
    };
    if w_fro2 == 0.0 || m == 0 || n == 0 {
        // W = 0: L = S = 0 exactly; the defaults would divide by ‖W‖₂ = 0.
        return Ok(IalmOutput {
            u: Mat::zeros(m, 0),
            sigma: Vec::new(),
            v: Mat::zeros(n, 0),
            s: Mat::zeros(m, n),
            last,
        });
    }
    if !w_fro2.is_finite() {
        return Err(RpcaError::NonFinite);
    }
    let w_fro = w_fro2.sqrt();
    let lambda = p.lambda;
    let norm2 = spectral_norm(w, par).ok_or(RpcaError::SvdFailed)? as f64;
    let mut norm_inf = 0.0f32;
    for j in 0..n {
        for i in 0..m {
            norm_inf = norm_inf.max(w[(i, j)].abs());
        }
    }
    let dual = norm2.max(norm_inf as f64 / lambda);
    let mut y = Mat::<f32>::from_fn(m, n, |i, j| (w[(i, j)] as f64 / dual) as f32);
    let mut mu = MU0_SCALE / norm2;
    let mu_max = mu * MU_MAX_FACTOR;

    let mut l = Mat::<f32>::zeros(m, n);
    let mut s = Mat::<f32>::zeros(m, n);
    let mut a = Mat::<f32>::zeros(m, n);
    let mut u_r = Mat::<f32>::zeros(m, 0);
    let mut v_r = Mat::<f32>::zeros(n, 0);
    let mut sigma_r: Vec<f32> = Vec::new();
    let mut predicted = RSVD_START_RANK;

    for iter in 1..=p.max_iters {
        let inv_mu = (1.0 / mu) as f32;
        let thr = (lambda / mu) as f32;
        // Steps 1 and the SVD's argument, fused: one pass over the matrices.
        for j in 0..n {
            let wj = w.col(j);
            let lj = l.col_as_slice(j);
            let yj = y.col_as_slice(j);
            let sj = s.col_as_slice_mut(j);
            let aj = a.col_as_slice_mut(j);
            for i in 0..m {
                let wy = wj[i] + yj[i] * inv_mu;
                let t = wy - lj[i];
                let sv = if t > thr {
                    t - thr
                } else if t < -thr {
                    t + thr
                } else {
                    0.0
                };
                sj[i] = sv;
                aj[i] = wy - sv;
            }
        }
        // Step 2: singular value threshold at 1/μ.
        let use_rsvd = matches!(p.svd, SvdMethod::Randomized)
            && (predicted as f64) < RSVD_MAX_FRACTION * k_full as f64;
        let mut t = if use_rsvd {
            randomized_svd(a.as_ref(), predicted, 0x5EED ^ iter as u64, par)
                .ok_or(RpcaError::SvdFailed)?
        } else {
            thin_svd(a.as_ref(), par).ok_or(RpcaError::SvdFailed)?
        };
        let mut rank = t.s.iter().take_while(|&&x| x > inv_mu).count();
        if use_rsvd && rank >= t.s.len() && t.s.len() < k_full {
            // Every computed value survived: the prediction was too small and values
            // beyond it may survive too. Redo this iteration's SVD exactly.
            t = thin_svd(a.as_ref(), par).ok_or(RpcaError::SvdFailed)?;
            rank = t.s.iter().take_while(|&&x| x > inv_mu).count();
        }
        // The reference code's rank prediction for the next iteration.
        predicted = if rank < predicted {
            rank + 1
        } else {
            (predicted + (RSVD_RANK_GROWTH * k_full as f64).round() as usize).min(k_full)
        };
        sigma_r = t.s[..rank].iter().map(|&x| x - inv_mu).collect();
        u_r = t.u.as_ref().get(.., ..rank).to_owned();
        v_r = t.v.as_ref().get(.., ..rank).to_owned();
        let us = Mat::<f32>::from_fn(m, rank, |i, c| u_r[(i, c)] * sigma_r[c]);
        matmul(
            l.as_mut(),
            Accum::Replace,
            us.as_ref(),
            v_r.as_ref().transpose(),
            1.0,
            par,
        );
        // Step 3: dual update and residual, plus the statistics.
        let muf = mu as f32;
        let mut z2 = 0.0f64;
        let mut s2 = 0.0f64;
        let mut nnz = 0usize;
        for j in 0..n {
            let wj = w.col(j);
            let lj = l.col_as_slice(j);
            let sj = s.col_as_slice(j);
            let yj = y.col_as_slice_mut(j);
            for i in 0..m {
                let z = wj[i] - lj[i] - sj[i];
                yj[i] += muf * z;
                z2 += (z as f64) * (z as f64);
                s2 += (sj[i] as f64) * (sj[i] as f64);
                nnz += (sj[i] != 0.0) as usize;
            }
        }
        // fold from +0.0: an empty float `sum()` is -0.0, which prints as "-0.0%".
        let l2 = sigma_r
            .iter()
            .fold(0.0f64, |acc, &x| acc + (x as f64) * (x as f64));
        last = IterInfo {
            iter,
            rank,
            nnz,
            residual: z2.sqrt() / w_fro,
            energy_l: l2 / w_fro2,
            energy_s: s2 / w_fro2,
        };
        if !last.residual.is_finite() {
            return Err(RpcaError::NonFinite);
        }
        on_iter(&last);
        mu = (mu * RHO).min(mu_max);
        if last.residual < p.tol {
            break;
        }
    }
    Ok(IalmOutput {
        u: u_r,
        sigma: sigma_r,
        v: v_r,
        s,
        last,
    })
}
