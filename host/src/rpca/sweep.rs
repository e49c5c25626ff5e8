//! The split against λ and against iterations on one real weight: the evidence for the
//! default iteration count and for choosing `--lambda-scale`.

use std::time::Instant;

use faer::Par;
use serde::Serialize;

use super::{RpcaError, RpcaSettings, decompose_matrix};

/// Iteration counts the sweep reports by default.
pub const SWEEP_ITERS: [usize; 5] = [1, 2, 3, 5, 10];

/// One point of a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    /// λ scale.
    pub lambda_scale: f64,
    /// Iterations run.
    pub iterations: usize,
    /// Rank of L.
    pub rank: usize,
    /// rank / min(m, n).
    pub rank_fraction: f64,
    /// Non-zeros of S / (m · n).
    pub density_s: f64,
    /// ‖L‖² / ‖W‖².
    pub energy_l: f64,
    /// ‖S‖² / ‖W‖².
    pub energy_s: f64,
    /// ‖W − L − S‖_F / ‖W‖_F.
    pub residual: f64,
    /// Seconds to reach this point.
    pub seconds: f64,
}

/// Both sweeps of one matrix.
#[derive(Clone, Debug, Serialize)]
pub struct SweepReport {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Against λ scale, each with `base.max_iters` iterations.
    pub by_lambda: Vec<SweepRow>,
    /// Against iterations at `base.lambda_scale` (one run; IALM's first k iterations do
    /// not depend on the maximum, so each row equals a run stopped at k).
    pub by_iters: Vec<SweepRow>,
}

/// Runs both sweeps on a row-major `rows × cols` weight.
pub fn sweep(
    weight: &[f32],
    rows: usize,
    cols: usize,
    base: &RpcaSettings,
    lambda_scales: &[f64],
    iters: &[usize],
    par: Par,
) -> Result<SweepReport, RpcaError> {
    let k = rows.min(cols).max(1) as f64;
    let mut by_lambda = Vec::new();
    for &ls in lambda_scales {
        let s = RpcaSettings {
            lambda_scale: ls,
            ..*base
        };
        let (d, secs) = decompose_matrix(weight, rows, cols, &s, None, par, &mut |_| {})?;
        by_lambda.push(SweepRow {
            lambda_scale: ls,
            iterations: d.stats.iterations,
            rank: d.stats.rank,
            rank_fraction: d.stats.rank as f64 / k,
            density_s: d.stats.density(rows, cols),
            energy_l: d.stats.energy_l,
            energy_s: d.stats.energy_s,
            residual: d.stats.residual,
            seconds: secs,
        });
    }
    let max_it = iters.iter().copied().max().unwrap_or(0);
    let mut by_iters = Vec::new();
    if max_it > 0 {
        // tol = 0: run every iteration so each requested count is reported.
        let s = RpcaSettings {
            max_iters: max_it,
            tol: 0.0,
            ..*base
        };
        let t0 = Instant::now();
        decompose_matrix(weight, rows, cols, &s, None, par, &mut |info| {
            if iters.contains(&info.iter) {
                by_iters.push(SweepRow {
                    lambda_scale: base.lambda_scale,
                    iterations: info.iter,
                    rank: info.rank,
                    rank_fraction: info.rank as f64 / k,
                    density_s: info.nnz as f64 / (rows * cols) as f64,
                    energy_l: info.energy_l,
                    energy_s: info.energy_s,
                    residual: info.residual,
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
        })?;
    }
    Ok(SweepReport {
        rows,
        cols,
        by_lambda,
        by_iters,
    })
}

/// The sweep as two text tables.
pub fn render(r: &SweepReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let table = |s: &mut String, title: &str, rows: &[SweepRow]| {
        let _ = writeln!(s, "{title}");
        let _ = writeln!(
            s,
            "{:>8} {:>6} {:>6} {:>7} {:>9} {:>7} {:>7} {:>9} {:>8}",
            "λ-scale", "iters", "rank", "rank%", "dens(S)", "E(L)", "E(S)", "resid", "secs"
        );
        for x in rows {
            let _ = writeln!(
                s,
                "{:>8} {:>6} {:>6} {:>6.1}% {:>8.1}% {:>6.1}% {:>6.1}% {:>9.2e} {:>8.2}",
                x.lambda_scale,
                x.iterations,
                x.rank,
                100.0 * x.rank_fraction,
                100.0 * x.density_s,
                100.0 * x.energy_l,
                100.0 * x.energy_s,
                x.residual,
                x.seconds
            );
        }
    };
    table(
        &mut s,
        &format!("{}x{}: against lambda scale", r.rows, r.cols),
        &r.by_lambda,
    );
    table(&mut s, "against iterations", &r.by_iters);
    s
}
