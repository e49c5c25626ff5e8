//! Sparse + low-rank fitted together against a linear's reconstruction loss (issue 15,
//! after HASSLE-free and 3BASiL): alternating minimisation of
//!
//! ```text
//! f(S, L) = tr((W − S − L)·H_d·(W − S − L)ᵀ)      H_d = Σ x·xᵀ + damping
//! ```
//!
//! over `S` with a fixed kept count (the sparse projection: ADMM with its exact masked
//! refit, [`super::admm::prune`], applied to `W − L`) and `L` of rank `r` (the rank
//! projection). With `H_d = R·Rᵀ` (Cholesky) the loss is `‖(W − S − L)·R‖²`, so the
//! best rank-`r` `L` for a fixed `S` is exact (Eckart–Young in whitened coordinates):
//! the truncated SVD `U·Σ·Vᵀ` of `(W − S)·R`, then `L = U·Σ·(R⁻ᵀ·V)ᵀ`. Each step
//! lowers `f` (up to ADMM's mask choice, which is a heuristic), so the pair with the
//! lowest loss over the rounds is kept.
//!
//! The older fit (`--lowrank-fit residual`, [`super::pruned`]) prunes `S` once, then
//! fits `L` to what it removed in coordinates scaled by `diag(H)^½` only, which is
//! exact for a diagonal `H` and not otherwise.

use super::admm::{AdmmOptions, prune as admm_prune};
use super::error::{CompressError, Result};
use cap_kernels::gemm::{MatMut, MatRef, matmul};
use faer::{Mat, Par};
use serde::Serialize;

/// How cap's method fits a linear's low-rank part (`--lowrank-fit`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LowrankFit {
    /// Prune first, then fit `L` to what pruning removed, scaled by `diag(H)^½`.
    #[default]
    Residual,
    /// Alternate the sparse and the rank step against the full loss ([`prune_joint`]).
    Joint,
}

/// The factors of `L = U·diag(σ)·Vᵀ`: `U` row-major `rows × k`, `σ` (k), `V`
/// row-major `cols × k`.
pub type Lr = (Vec<f32>, Vec<f32>, Vec<f32>);

/// `H_d = H + damp·mean(diag H)·I` and its lower Cholesky factor `R` (`H_d = R·Rᵀ`),
/// with the damping ADMM uses, so both steps minimise the same loss.
pub struct Whitening {
    n: usize,
    /// `R`, row-major `n × n`, as `f32` for the products.
    r32: Vec<f32>,
    /// `R` in `f64`, for the triangular solve that unwhitens `V`.
    r: Mat<f64>,
}

impl Whitening {
    /// The whitening of the row-major `n × n` Hessian `h`, dampened by `damp` of its
    /// mean diagonal (as [`AdmmOptions::damp`]).
    pub fn new(h: &[f32], n: usize, damp: f64) -> Result<Self> {
        let mut hd = Mat::<f64>::from_fn(n, n, |i, j| f64::from(h[i * n + j]));
        let mean = (0..n).map(|j| hd[(j, j)]).sum::<f64>() / n.max(1) as f64;
        let d = damp * mean.max(f64::MIN_POSITIVE);
        for j in 0..n {
            hd[(j, j)] += d;
        }
        let llt = hd.llt(faer::Side::Lower).map_err(|e| {
            CompressError::Numerical(format!("Hessian not positive definite: {e:?}"))
        })?;
        let r = llt.L().to_owned();
        let r32 = (0..n * n).map(|x| r[(x / n, x % n)] as f32).collect();
        Ok(Whitening { n, r32, r })
    }

    /// `e·R` for the row-major `rows × n` matrix `e`.
    fn whiten(&self, e: &[f32], rows: usize, threads: usize) -> Vec<f32> {
        let n = self.n;
        let mut out = vec![0.0f32; rows * n];
        matmul(
            &mut MatMut::row_major(&mut out, rows, n),
            MatRef::row_major(e, rows, n),
            MatRef::row_major(&self.r32, n, n),
            1.0,
            0.0,
            threads,
        );
        out
    }

    /// The loss `‖e·R‖² = tr(e·H_d·eᵀ)` of the row-major `rows × n` error `e`.
    pub fn loss(&self, e: &[f32], rows: usize, threads: usize) -> f64 {
        self.whiten(e, rows, threads)
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum()
    }

    /// The best rank-`rank` approximation of `a` (row-major `rows × n`) under the
    /// loss: `U·Σ·Vᵀ` of `a·R` truncated, then `V ← R⁻ᵀ·V`. `None` if the SVD fails.
    pub fn best_rank(&self, a: &[f32], rows: usize, rank: usize, threads: usize) -> Option<Lr> {
        let n = self.n;
        let x = self.whiten(a, rows, threads);
        let (u, sigma, v) = super::lowrank::truncated(&x, rows, n, rank)?;
        let k = sigma.len();
        // Rᵀ·V' = V: Rᵀ is upper triangular.
        let mut vm = Mat::<f64>::from_fn(n, k, |i, j| f64::from(v[i * k + j]));
        faer::linalg::triangular_solve::solve_upper_triangular_in_place(
            self.r.transpose(),
            vm.as_mut(),
            Par::Seq,
        );
        let v = (0..n * k).map(|x| vm[(x / k, x % k)] as f32).collect();
        Some((u, sigma, v))
    }
}

/// `a` minus (or, `sign` +1, plus) `U·diag(σ)·Vᵀ`, in place.
pub fn add_product(
    a: &mut [f32],
    rows: usize,
    cols: usize,
    (u, sigma, v): (&[f32], &[f32], &[f32]),
    sign: f32,
) {
    let k = sigma.len();
    for r in 0..rows {
        for c in 0..cols {
            let acc: f32 = (0..k).map(|t| u[r * k + t] * sigma[t] * v[c * k + t]).sum();
            a[r * cols + c] += sign * acc;
        }
    }
}

/// The rank-`rank` part that best fits what pruning removed from `orig` (leaving `w`)
/// in activation-scaled coordinates (`(orig − w)·D`, `D = diag(H)^½`): exact for a
/// diagonal `H`, an approximation otherwise (`--lowrank-fit residual`).
pub fn residual_fit(
    w: &[f32],
    orig: &[f32],
    h: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
) -> Result<Lr> {
    let scale: Vec<f32> = (0..cols)
        .map(|j| h[j * cols + j].max(0.0).sqrt().max(1e-6))
        .collect();
    let resid: Vec<f32> = (0..rows * cols)
        .map(|x| (orig[x] - w[x]) * scale[x % cols])
        .collect();
    let (u, sigma, v) =
        super::lowrank::truncated(&resid, rows, cols, rank).ok_or_else(svd_failed)?;
    let k = sigma.len();
    // Unscale: V's rows divided by D (as the activation-aware RPCA stores them).
    let v: Vec<f32> = (0..cols * k).map(|x| v[x] / scale[x / k]).collect();
    Ok((u, sigma, v))
}

/// The error of an SVD that did not converge.
pub fn svd_failed() -> CompressError {
    CompressError::Numerical("low-rank fit: SVD did not converge".into())
}

/// What [`prune_joint`] found.
pub struct JointFit {
    /// The sparse part's keep mask (row-major).
    pub mask: Vec<bool>,
    /// The low-rank part.
    pub factors: Lr,
    /// The loss `f(S, L)` after each round's rank step, relative to `f(0, 0)`.
    pub losses: Vec<f64>,
    /// The round whose pair was kept (0-based).
    pub kept_round: usize,
}

/// Fits `S + L` to the row-major `rows × cols` weight `w` under its Hessian `h`: `S`
/// keeps what [`admm_prune`] keeps at sparsity `s` (or `o.pattern`), `L` has rank
/// `rank`; `rounds` sparse steps (at least 1), each followed by a rank step. `w`
/// becomes `S` (the sparse part alone); the factors are returned.
pub fn prune_joint(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    h: &[f32],
    (s, rank, rounds): (f64, usize, usize),
    o: &AdmmOptions,
) -> Result<JointFit> {
    let wh = Whitening::new(h, cols, o.damp)?;
    let orig = w.to_vec();
    let base = wh.loss(&orig, rows, o.threads).max(f64::MIN_POSITIVE);
    // The lowest loss so far, its S and its fit (without the losses).
    let mut best: Option<(f64, Vec<f32>, JointFit)> = None;
    let mut losses = Vec::new();
    let mut target = orig.clone();
    for round in 0..rounds.max(1) {
        // Sparse step: ADMM on W − L (L = 0 in the first round).
        let mut sp = target.clone();
        let mask = admm_prune(&mut sp, rows, cols, h, s, o)?;
        // Rank step: the best L for this S.
        let mut resid: Vec<f32> = orig.iter().zip(&sp).map(|(&a, &b)| a - b).collect();
        let f = wh
            .best_rank(&resid, rows, rank, o.threads)
            .ok_or_else(svd_failed)?;
        add_product(&mut resid, rows, cols, (&f.0, &f.1, &f.2), -1.0);
        let loss = wh.loss(&resid, rows, o.threads) / base;
        losses.push(loss);
        target.copy_from_slice(&orig);
        add_product(&mut target, rows, cols, (&f.0, &f.1, &f.2), -1.0);
        if best.as_ref().is_none_or(|b| loss < b.0) {
            let fit = JointFit {
                mask,
                factors: f,
                losses: Vec::new(),
                kept_round: round,
            };
            best = Some((loss, sp, fit));
        }
    }
    let (_, sp, fit) =
        best.ok_or_else(|| CompressError::Internal("joint fit ran no round".into()))?;
    w.copy_from_slice(&sp);
    Ok(JointFit { losses, ..fit })
}

/// One linear's choice under `--lowrank-fit joint`, for the report: where `L` earned
/// its bytes.
#[derive(Clone, Debug, Serialize)]
pub struct LowrankChoice {
    /// The linear's tensor name.
    pub linear: String,
    /// The rank the joint fit tried.
    pub rank: usize,
    /// Loss of `S` alone at the same parameter count, relative to `f(0, 0)`.
    pub loss_alone: f64,
    /// Loss of the joint fit, relative to `f(0, 0)`.
    pub loss_joint: f64,
    /// Whether `L` was kept.
    pub kept: bool,
}

/// What [`prune_or_joint`] chose for a linear.
pub struct Choice {
    /// The keep mask of the sparse part.
    pub mask: Vec<bool>,
    /// The low-rank part, when it won.
    pub factors: Option<Lr>,
    /// The loss of pruning alone (`S` at `s_alone`, no `L`) and of the joint fit, both
    /// relative to `f(0, 0)`.
    pub losses: (f64, f64),
}

/// Prunes `w` both ways at the same parameter count and keeps the lower loss: `S`
/// alone at sparsity `s_alone` ([`admm_prune`]), or `S` at `s` plus rank `rank`
/// ([`prune_joint`]). `w` becomes the chosen sparse part. This is where `L` earns its
/// bytes: layer by layer, by the loss both minimise.
pub fn prune_or_joint(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    h: &[f32],
    (s, rank, rounds): (f64, usize, usize),
    s_alone: f64,
    o: &AdmmOptions,
) -> Result<Choice> {
    let wh = Whitening::new(h, cols, o.damp)?;
    let orig = w.to_vec();
    let base = wh.loss(&orig, rows, o.threads).max(f64::MIN_POSITIVE);
    let mut alone = orig.clone();
    let mask_alone = admm_prune(&mut alone, rows, cols, h, s_alone, o)?;
    let e: Vec<f32> = orig.iter().zip(&alone).map(|(&a, &b)| a - b).collect();
    let l_alone = wh.loss(&e, rows, o.threads) / base;
    let fit = prune_joint(w, rows, cols, h, (s, rank, rounds), o)?;
    let l_joint = fit.losses[fit.kept_round];
    if l_joint < l_alone {
        return Ok(Choice {
            mask: fit.mask,
            factors: Some(fit.factors),
            losses: (l_alone, l_joint),
        });
    }
    w.copy_from_slice(&alone);
    Ok(Choice {
        mask: mask_alone,
        factors: None,
        losses: (l_alone, l_joint),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform values in [−0.5, 0.5) from an LCG seeded with `seed`.
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut seed = seed;
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    }

    /// `Σ_k x_k·x_kᵀ` of `t` row-major inputs of `cols` values, with correlated
    /// channels (each input mixes a few random sources) so `H` is far from diagonal.
    fn correlated_hessian(t: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut r = uniform(seed);
        let z: Vec<f32> = (0..t * cols).map(|_| r()).collect();
        let mix: Vec<f32> = (0..cols * cols).map(|_| r()).collect();
        let x: Vec<f32> = (0..t * cols)
            .map(|i| {
                let (k, j) = (i / cols, i % cols);
                (0..cols).map(|c| z[k * cols + c] * mix[c * cols + j]).sum()
            })
            .collect();
        let mut h = vec![0f32; cols * cols];
        for i in 0..cols {
            for j in 0..cols {
                h[i * cols + j] = (0..t).map(|k| x[k * cols + i] * x[k * cols + j]).sum();
            }
        }
        h
    }

    /// `tr(e·H_d·eᵀ)` computed directly in f64 (the reference the whitened loss must
    /// equal).
    fn direct_loss(e: &[f32], rows: usize, n: usize, h: &[f32], damp: f64) -> f64 {
        let mean = (0..n).map(|j| f64::from(h[j * n + j])).sum::<f64>() / n as f64;
        let hd =
            |i: usize, j: usize| f64::from(h[i * n + j]) + if i == j { damp * mean } else { 0.0 };
        let mut s = 0.0;
        for r in 0..rows {
            for i in 0..n {
                for j in 0..n {
                    s += f64::from(e[r * n + i]) * hd(i, j) * f64::from(e[r * n + j]);
                }
            }
        }
        s
    }

    /// The whitened loss equals `tr(e·H_d·eᵀ)` (f32 products of ≤ 32 terms: 1e-4
    /// relative), and the rank step is Eckart–Young's optimum: its loss equals the sum
    /// of the squared singular values of `a·R` beyond the rank (computed by faer's
    /// full SVD, an independent reference), within 1e-3 relative (f32 whitening and
    /// the randomized SVD's rounding).
    #[test]
    fn rank_step_is_the_whitened_optimum() {
        let (rows, n, t) = (20, 32, 200);
        let h = correlated_hessian(t, n, 3);
        let mut r = uniform(9);
        let a: Vec<f32> = (0..rows * n).map(|_| r()).collect();
        let wh = Whitening::new(&h, n, 0.05).unwrap();
        let direct = direct_loss(&a, rows, n, &h, 0.05);
        let via = wh.loss(&a, rows, 1);
        assert!((via - direct).abs() <= 1e-4 * direct, "{via} vs {direct}");
        let x = wh.whiten(&a, rows, 1);
        let xm = Mat::<f64>::from_fn(rows, n, |i, j| f64::from(x[i * n + j]));
        let sv = xm.singular_values().unwrap();
        for rank in [1, 4, 10] {
            let f = wh.best_rank(&a, rows, rank, 1).unwrap();
            let mut e = a.clone();
            add_product(&mut e, rows, n, (&f.0, &f.1, &f.2), -1.0);
            let got = direct_loss(&e, rows, n, &h, 0.05);
            let want: f64 = sv[rank..].iter().map(|s| s * s).sum();
            assert!(
                (got - want).abs() <= 1e-3 * want,
                "rank {rank}: {got} vs Eckart–Young {want}"
            );
        }
    }

    /// On a layer that is sparse + low-rank with correlated inputs, at the same
    /// parameter count: the pair kept is the rounds' lowest loss, and it beats both
    /// the first round's `S` with `L` fit in `diag(H)^½`-scaled coordinates (the
    /// residual fit) and pruning alone with L's parameters spent on the sparse part.
    /// (Here the residual fit loses to pruning alone, as it did on SmolLM2.)
    #[test]
    fn joint_beats_residual_fit_and_pruning_alone() {
        let (rows, n, t, rank) = (24, 48, 300, 3);
        let h = correlated_hessian(t, n, 5);
        let mut r = uniform(17);
        let u: Vec<f32> = (0..rows * rank).map(|_| r()).collect();
        let v: Vec<f32> = (0..n * rank).map(|_| r()).collect();
        let mut w: Vec<f32> = (0..rows * n)
            .map(|_| {
                let s = r();
                if s.abs() > 0.45 { 4.0 * s } else { 0.1 * s }
            })
            .collect();
        add_product(&mut w, rows, n, (&u, &[8.0; 3], &v), 1.0);
        let o = AdmmOptions::default();
        let loss = |approx: &[f32]| {
            let e: Vec<f32> = w.iter().zip(approx).map(|(&a, &b)| a - b).collect();
            direct_loss(&e, rows, n, &h, o.damp)
        };
        // Parameters: S at 85% sparsity plus rank 3 against S alone with the same count.
        let s_joint = 0.85;
        let lr_params = (rank * (rows + n)) as f64 / (rows * n) as f64;
        let mut sj = w.clone();
        let fit = prune_joint(&mut sj, rows, n, &h, (s_joint, rank, 3), &o).unwrap();
        assert_eq!(fit.losses.len(), 3);
        let mut joint = sj.clone();
        let (fu, fs, fv) = &fit.factors;
        add_product(&mut joint, rows, n, (fu, fs, fv), 1.0);
        let lj = loss(&joint);
        let best = fit.losses.iter().cloned().fold(f64::INFINITY, f64::min);
        let base = direct_loss(&w, rows, n, &h, o.damp);
        assert!(
            (lj / base - best).abs() <= 1e-3 * best,
            "{} vs {best}",
            lj / base
        );
        // Residual fit: round 1's S, L from the diag-scaled SVD of what it removed.
        let mut s1 = w.clone();
        admm_prune(&mut s1, rows, n, &h, s_joint, &o).unwrap();
        let (ru, rs, rv) = residual_fit(&s1, &w, &h, rows, n, rank).unwrap();
        let mut residual = s1.clone();
        add_product(&mut residual, rows, n, (&ru, &rs, &rv), 1.0);
        let lr = loss(&residual);
        // Pruning alone at the same parameter count.
        let mut alone = w.clone();
        admm_prune(&mut alone, rows, n, &h, s_joint - lr_params, &o).unwrap();
        let la = loss(&alone);
        eprintln!(
            "joint {lj:.4}, residual {lr:.4}, alone {la:.4}, rounds {:?}",
            fit.losses
        );
        assert!(lj < lr, "joint {lj} vs residual {lr}");
        assert!(lj < la, "joint {lj} vs pruning alone {la}");
    }
    /// `prune_or_joint` keeps `L` on the sparse + low-rank layer (where the joint fit
    /// beats pruning alone at the same count) and reports both losses as the direct
    /// `tr(E·H_d·Eᵀ)` of what it returns and of pruning alone (1e-3 relative: f32
    /// products); on an i.i.d. layer with no low-rank structure `S` alone wins.
    #[test]
    fn choice_keeps_l_where_it_pays() {
        let (rows, n, t, rank) = (24, 48, 300, 3);
        let h = correlated_hessian(t, n, 5);
        let o = AdmmOptions::default();
        let lr = (rank * (rows + n)) as f64 / (rows * n) as f64;
        for structured in [true, false] {
            let mut r = uniform(if structured { 17 } else { 23 });
            let u: Vec<f32> = (0..rows * rank).map(|_| r()).collect();
            let v: Vec<f32> = (0..n * rank).map(|_| r()).collect();
            let mut w: Vec<f32> = (0..rows * n)
                .map(|_| {
                    let s = r();
                    if !structured || s.abs() > 0.45 {
                        4.0 * s
                    } else {
                        0.1 * s
                    }
                })
                .collect();
            if structured {
                add_product(&mut w, rows, n, (&u, &[8.0; 3], &v), 1.0);
            }
            let base = direct_loss(&w, rows, n, &h, o.damp);
            let loss = |approx: &[f32]| {
                let e: Vec<f32> = w.iter().zip(approx).map(|(&a, &b)| a - b).collect();
                direct_loss(&e, rows, n, &h, o.damp) / base
            };
            let mut got = w.clone();
            let ch = prune_or_joint(&mut got, rows, n, &h, (0.85, rank, 3), 0.85 - lr, &o).unwrap();
            let mut alone = w.clone();
            admm_prune(&mut alone, rows, n, &h, 0.85 - lr, &o).unwrap();
            let la = loss(&alone);
            assert!(
                (ch.losses.0 - la).abs() <= 1e-3 * la,
                "{:?} vs {la}",
                ch.losses
            );
            if let Some((fu, fs, fv)) = &ch.factors {
                add_product(&mut got, rows, n, (fu, fs, fv), 1.0);
            }
            let lg = loss(&got);
            let want = ch.losses.0.min(ch.losses.1);
            assert!((lg - want).abs() <= 1e-3 * want, "{lg} vs {:?}", ch.losses);
            assert_eq!(
                ch.factors.is_some(),
                structured,
                "{structured}: {:?}",
                ch.losses
            );
        }
    }
}
