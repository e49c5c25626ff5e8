//! SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS updates.
//!
//! Per linear, with `H = Σ x·xᵀ` over the calibration inputs of the layer, dampened by
//! 1% of its mean diagonal: columns are processed in blocks of 128; in each block the
//! entries with the smallest `w²/[H⁻¹]_jj²` are pruned (the same fraction in every
//! block), and each pruned column's error is spread over the columns not yet
//! processed through the upper Cholesky factor of `H⁻¹`, so the kept weights
//! compensate what was dropped. The model is pruned block by block: the inputs of
//! block `b` come from blocks `0..b` already pruned (the reference implementation's
//! order; within a block every linear sees the dense block's inputs).
//!
//! One deliberate difference from the reference code: it prunes every entry whose score
//! is ≤ the score at rank `⌊s·count⌋` (so one more than `s·count`, plus ties); here
//! exactly `⌈s·count⌉` entries per block are pruned, ties to the lower index, so the
//! kept count, and with it the budget, is exact.

use std::sync::Mutex;

use super::error::{CompressError, Result};
use cap_device::forward::Runner;
use cap_device::model::{DenseLinear, Linear, Model};
use cap_kernels::gemm::{MatMut, MatRef, matmul};
use faer::Mat;
use faer::linalg::solvers::DenseSolveCore;

use super::candidate::{Candidate, Csr};
use super::pattern::Pattern;
use super::reconstruct::{ReconOptions, StepLog, apply_refit, reconstruct, refit_mask, targets};
use super::source::BlockSource;

/// Columns per OBS block (the paper's and reference code's 128).
pub const BLOCK: usize = 128;
/// Dampening: this fraction of the mean diagonal of `H` is added to its diagonal.
pub const PERC_DAMP: f64 = 0.01;

/// Entries pruned in a block of `count` columns × `rows` rows at sparsity `s`.
pub fn pruned_in_block(rows: usize, count: usize, s: f64) -> usize {
    ((s * (rows * count) as f64).ceil() as usize).min(rows * count)
}

/// Entries kept in a `rows × cols` matrix pruned at sparsity `s`.
pub fn kept(rows: usize, cols: usize, s: f64) -> u64 {
    (0..cols)
        .step_by(BLOCK)
        .map(|i1| {
            let count = BLOCK.min(cols - i1);
            (rows * count - pruned_in_block(rows, count, s)) as u64
        })
        .sum()
}

/// Prunes the row-major `rows × cols` weight `w` in place at sparsity `s` with the
/// Hessian `h` (`cols × cols`, row-major, `Σ x·xᵀ`). Returns the keep mask.
pub fn prune(w: &mut [f32], rows: usize, cols: usize, h: &[f32], s: f64) -> Result<Vec<bool>> {
    prune_pattern(w, rows, cols, h, s, None)
}

/// [`prune`], or with an N:M `pattern` SparseGPT's N:M mode (`s` is then unused): each
/// row's group of `M` columns is masked when the sweep reaches it, by the same OBS score
/// `w²/[H⁻¹]_cc` on the weights as the earlier columns' errors have updated them.
pub fn prune_pattern(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    h: &[f32],
    s: f64,
    pattern: Option<Pattern>,
) -> Result<Vec<bool>> {
    let n = cols;
    let mut hm = Mat::<f64>::from_fn(n, n, |i, j| f64::from(h[i * n + j]));
    // Inputs that never fire carry no information: their weights are pruned outright
    // and their Hessian row made the identity so the factorization exists.
    let mut dead = vec![false; n];
    for j in 0..n {
        if hm[(j, j)] == 0.0 {
            dead[j] = true;
            hm[(j, j)] = 1.0;
            for r in 0..rows {
                w[r * n + j] = 0.0;
            }
        }
    }
    let damp = PERC_DAMP * (0..n).map(|j| hm[(j, j)]).sum::<f64>() / n as f64;
    for j in 0..n {
        hm[(j, j)] += damp;
    }
    let hinv = hm
        .llt(faer::Side::Lower)
        .map_err(|e| CompressError::Numerical(format!("Hessian not positive definite: {e:?}")))?
        .inverse();
    let l = hinv.llt(faer::Side::Lower).map_err(|e| {
        CompressError::Numerical(format!("inverse Hessian not positive definite: {e:?}"))
    })?;
    // Upper factor U with H⁻¹ = Uᵀ·U: U = Lᵀ.
    let lf = l.L();
    let u = |i: usize, j: usize| lf[(j, i)];

    let mut mask = vec![true; rows * n];
    let mut wd: Vec<f64> = w.iter().map(|&x| f64::from(x)).collect();
    for i1 in (0..n).step_by(BLOCK) {
        let i2 = (i1 + BLOCK).min(n);
        let count = i2 - i1;
        if pattern.is_none() {
            // Scores of the block, pruned: the ⌈s·numel⌉ smallest (ties: lower index).
            let mut idx: Vec<(f64, usize)> = (0..rows * count)
                .map(|k| {
                    let (r, c) = (k / count, i1 + k % count);
                    let d = u(c, c);
                    (wd[r * n + c] * wd[r * n + c] / (d * d), r * n + c)
                })
                .collect();
            // The k smallest under a total order (score, then index) are one set: a
            // selection finds it without sorting the rest.
            let k = pruned_in_block(rows, count, s).min(idx.len());
            if k > 0 && k < idx.len() {
                idx.select_nth_unstable_by(k, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            }
            for &(_, at) in &idx[..k] {
                mask[at] = false;
            }
        }
        // Column by column: quantize (prune), spread the error over the rest of the block.
        let mut err = vec![0.0f64; rows * count];
        let mut score = Vec::new();
        for c in i1..i2 {
            if let Some(p) = pattern.filter(|p| c % p.m == 0) {
                // The group starting here (inside the block: M divides 128).
                let c1 = (c + p.m).min(n);
                for r in 0..rows {
                    score.clear();
                    score.extend((c..c1).map(|j| {
                        let d = u(j, j);
                        wd[r * n + j] * wd[r * n + j] / (d * d)
                    }));
                    p.keep_in_group(&score, &mut mask[r * n + c..r * n + c1]);
                }
            }
            let d = u(c, c);
            for r in 0..rows {
                let wv = wd[r * n + c];
                let q = if mask[r * n + c] { wv } else { 0.0 };
                let e = (wv - q) / d;
                err[r * count + (c - i1)] = e;
                wd[r * n + c] = q;
                if e != 0.0 {
                    for c2 in c + 1..i2 {
                        wd[r * n + c2] -= e * u(c, c2);
                    }
                }
            }
        }
        // Lazy update of the columns after the block: W[:, i2:] -= Err · U[i1:i2, i2:].
        lazy_update(&mut wd, &err, lf, rows, (i1, i2));
    }
    for (j, d) in dead.iter().enumerate() {
        if *d {
            for r in 0..rows {
                mask[r * n + j] = false;
            }
        }
    }
    for (x, (&v, &k)) in w.iter_mut().zip(wd.iter().zip(&mask)) {
        *x = if k { v as f32 } else { 0.0 };
    }
    Ok(mask)
}

/// SparseGPT's lazy batch update: `W[:, i2..] -= Err · U[i1..i2, i2..]` for the
/// row-major `rows × n` weights `wd`, the block's errors `err` (`rows × (i2 − i1)`,
/// row-major) and `U = Lᵀ` from the Cholesky factor `l` of `H⁻¹`. One matrix product
/// (faer, on the rayon pool): the bulk of SparseGPT's arithmetic, `rows·n²/2` over the
/// sweep.
fn lazy_update(
    wd: &mut [f64],
    err: &[f64],
    l: faer::MatRef<'_, f64>,
    rows: usize,
    (i1, i2): (usize, usize),
) {
    let n = l.nrows();
    if i2 >= n || rows == 0 {
        return;
    }
    let w = faer::MatMut::from_row_major_slice_mut(wd, rows, n);
    let e = faer::MatRef::from_row_major_slice(err, rows, i2 - i1);
    // U[i1..i2, i2..] = L[i2.., i1..i2]ᵀ.
    let ub = l.submatrix(i2, i1, n - i2, i2 - i1).transpose();
    faer::linalg::matmul::matmul(
        w.submatrix_mut(0, i2, rows, n - i2),
        faer::Accum::Add,
        e,
        ub,
        -1.0,
        faer::Par::rayon(0),
    );
}

/// The pruned weight as a candidate whose sparse part holds exactly the kept entries.
pub fn masked_candidate(w: &[f32], mask: &[bool], rows: usize, cols: usize) -> Candidate {
    let mut row_ptr = vec![0u64];
    let (mut col, mut val) = (Vec::new(), Vec::new());
    for r in 0..rows {
        for c in 0..cols {
            if mask[r * cols + c] {
                col.push(c as u32);
                val.push(w[r * cols + c]);
            }
        }
        row_ptr.push(col.len() as u64);
    }
    Candidate::sparse(Csr { row_ptr, col, val }, rows, cols)
}

/// A linear that passes through and, if asked, accumulates `Σ x·xᵀ` of its inputs.
struct Recorder<'a> {
    inner: &'a DenseLinear,
    h: Option<Mutex<Vec<f32>>>,
}

impl Linear for Recorder<'_> {
    fn in_features(&self) -> usize {
        self.inner.in_features
    }
    fn out_features(&self) -> usize {
        self.inner.out_features
    }
    fn forward(&self, x: &[f32], y: &mut [f32], scratch: &mut Vec<f32>, threads: usize) {
        if let Some(h) = &self.h
            && let Ok(mut h) = h.lock()
        {
            let n = self.inner.in_features;
            let t = x.len() / n;
            let xm = MatRef::row_major(x, t, n);
            matmul(
                &mut MatMut::row_major(&mut h, n, n),
                xm.t(),
                xm,
                1.0,
                1.0,
                threads,
            );
        }
        self.inner.forward(x, y, scratch, threads);
    }
}

fn recorder(l: &DenseLinear, record: bool) -> Recorder<'_> {
    let n = l.in_features;
    Recorder {
        inner: l,
        h: record.then(|| Mutex::new(vec![0.0; n * n])),
    }
}

/// How one linear is compressed: `(index in block order, weight, rows, cols, H) →
/// what it keeps`, with the weight replaced in place by the matrix the compressed
/// layer computes (so the next blocks see its outputs).
pub type Pruner<'a> =
    dyn Fn(usize, &mut [f32], usize, usize, &[f32]) -> Result<Candidate> + Sync + 'a;

/// Prunes every block linear of `model` with SparseGPT at per-linear sparsities
/// `sparsity` (in block order: q, k, v, o, gate, up, down of each block), on the
/// calibration `windows`. Returns one candidate per linear (kept entries only) and
/// calls `progress(block)` after each block.
pub fn sparsegpt_model(
    model: &Model<DenseLinear>,
    windows: &[&[u32]],
    sparsity: &[f64],
    threads: usize,
    progress: impl FnMut(usize),
) -> Result<Vec<Candidate>> {
    if sparsity.len() != model.blocks.len() * 7 {
        return Err(CompressError::Invalid(
            "one sparsity per block linear expected".into(),
        ));
    }
    prune_sequential(
        model,
        windows,
        threads,
        &|i, w, r, c, h| {
            let mask = prune(w, r, c, h, sparsity[i])?;
            Ok(masked_candidate(w, &mask, r, c))
        },
        false,
        progress,
    )
}

/// Compresses every block linear of `model` with `pruner`, block by block: the
/// Hessians of block `b` come from running the calibration `windows` through blocks
/// `0..b` already compressed (and, with `true_sequential`, through the parts of block
/// `b` already compressed: q/k/v, then o, then gate/up, then down). The result is in
/// block order (q, k, v, o, gate, up, down of each block); `progress(block)` is called
/// after each block.
pub fn prune_sequential(
    model: &Model<DenseLinear>,
    windows: &[&[u32]],
    threads: usize,
    pruner: &Pruner<'_>,
    true_sequential: bool,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Candidate>> {
    let mut out = Vec::with_capacity(model.blocks.len() * 7);
    let blocks = 0..model.blocks.len();
    prune_blocks(
        model,
        blocks,
        windows,
        threads,
        pruner,
        true_sequential,
        None,
        &mut |bi, cands| {
            out.extend(cands);
            progress(bi + 1);
            Ok(())
        },
    )?;
    Ok(out)
}

/// [`prune_sequential`] over blocks `range` of `src`, one block in memory at a time:
/// each block's seven candidates go to `done(block, candidates)` as soon as it is
/// compressed. The windows reach `range.start` through the source's own blocks before
/// it (uncompressed: a shard of the blocks starts from the source model's outputs).
/// With `recon`, each block is reconstructed after its linears are pruned
/// ([`super::reconstruct`]): its candidates' kept values refit, masks unchanged, the
/// steps logged; the next block's inputs come from the reconstructed block.
#[allow(clippy::too_many_arguments)] // each is one independent setting of the pass
pub fn prune_blocks(
    src: &dyn BlockSource,
    range: std::ops::Range<usize>,
    windows: &[&[u32]],
    threads: usize,
    pruner: &Pruner<'_>,
    true_sequential: bool,
    mut recon: Option<(&ReconOptions, &mut Vec<StepLog>)>,
    done: &mut dyn FnMut(usize, Vec<Candidate>) -> Result<()>,
) -> Result<()> {
    let model = src.model();
    let h = model.config.hidden_size;
    let ctx = windows.iter().map(|w| w.len()).max().unwrap_or(0);
    let runner = Runner::new(model, ctx, threads);
    let mut xs: Vec<Vec<f32>> = windows
        .iter()
        .map(|w| {
            let mut x = vec![0.0; w.len() * h];
            runner.embed(w, &mut x);
            x
        })
        .collect();
    for bi in 0..range.start {
        let b = src.block(bi)?;
        for x in &mut xs {
            let mut kv = runner.new_cache();
            runner.run_block(bi, &*b, x, &mut kv);
        }
    }
    // The dense model's own stream, when reconstruction aims at it (a shard starts
    // from the source's outputs, so it equals the inputs here).
    let mut dense_xs = recon
        .as_ref()
        .is_some_and(|(o, _)| o.global)
        .then(|| xs.clone());
    // Groups of linears that share an input (q/k/v, o, gate/up, down), by index in
    // `Block::linears` order: the first of each is recorded.
    const GROUPS: [&[usize]; 4] = [&[0, 1, 2], &[3], &[4, 5], &[6]];
    for bi in range {
        let b = src.block(bi)?;
        let b = &*b;
        let mut pruned = b.clone();
        let mut cands: Vec<Option<Candidate>> = vec![None; 7];
        // With `true_sequential`, each group's inputs come from the block with the
        // groups before it already pruned; otherwise every group sees the dense block.
        let passes: Vec<&[&[usize]]> = if true_sequential {
            GROUPS.iter().map(core::slice::from_ref).collect()
        } else {
            vec![&GROUPS[..]]
        };
        for groups in passes {
            let source = if true_sequential { &pruned } else { b };
            let record: Vec<usize> = groups.iter().map(|g| g[0]).collect();
            let rec = source.map_linears(|i, l| recorder(l, record.contains(&i)));
            for x in &xs {
                let mut kv = runner.new_cache();
                let mut y = x.clone();
                runner.run_block(bi, &rec, &mut y, &mut kv);
            }
            let take = |r: &Recorder<'_>| -> Vec<f32> {
                r.h.as_ref()
                    .and_then(|m| m.lock().ok().map(|mut v| std::mem::take(&mut *v)))
                    .unwrap_or_default()
            };
            let hs = [take(&rec.q), take(&rec.o), take(&rec.gate), take(&rec.down)];
            drop(rec);
            let lin = pruned.linears_mut();
            for g in groups {
                let hm = &hs[match g[0] {
                    0 => 0,
                    3 => 1,
                    4 => 2,
                    _ => 3,
                }];
                for &k in g.iter() {
                    let l = &mut *lin[k];
                    let (rows, cols) = (l.out_features, l.in_features);
                    cands[k] = Some(pruner(bi * 7 + k, &mut l.weight, rows, cols, hm)?);
                }
            }
        }
        if let Some((ro, logs)) = recon.as_mut()
            && !ro.steps.is_empty()
        {
            let c = &model.config;
            let masks: [Option<Vec<bool>>; 7] =
                std::array::from_fn(|k| cands[k].as_ref().and_then(refit_mask));
            let tg = targets(c, bi, b, dense_xs.as_deref().unwrap_or(&xs), threads);
            let old: Vec<Vec<f32>> = pruned
                .linears()
                .iter()
                .map(|l| l.1.weight.clone())
                .collect();
            logs.extend(reconstruct(
                c,
                bi,
                &mut pruned,
                &masks,
                &xs,
                &tg,
                ro,
                threads,
            )?);
            for (k, (cand, old)) in cands.iter_mut().zip(&old).enumerate() {
                if let (Some(cand), Some(_)) = (cand, &masks[k]) {
                    apply_refit(cand, old, &pruned.linears()[k].1.weight);
                }
            }
            if let Some(d) = &mut dense_xs {
                *d = tg.into_iter().map(|t| t.out).collect();
            }
        }
        for x in &mut xs {
            let mut kv = runner.new_cache();
            runner.run_block(bi, &pruned, x, &mut kv);
        }
        drop(pruned);
        done(bi, cands.into_iter().flatten().collect())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The inputs block-by-block pruning records are the ones the forward pass feeds
    /// each linear (Gemma-3, and Qwen2 with its q/k/v biases): with a pruner that keeps everything, the diagonal of every recorded
    /// `Σ x·xᵀ` is `tokens · rms²` of the inputs `calib::input_rms_windows` records by
    /// running the whole model (an independent path: the Runner's own embedding, every
    /// norm, Gemma-3's √d embedding scale and local layers). Tolerance 1e-4 relative:
    /// f32 sums over 3 × 24 tokens in two orders.
    #[test]
    fn lazy_update_equals_the_scalar_loop() {
        // The update as SparseGPT's reference writes it, one product at a time, against
        // the matrix product: equal to rounding (1e-12 relative; sums of 64 f64 terms
        // in another order).
        let (rows, n, i1, i2) = (5, 200, 64, 128);
        let mut rng = cap_device::rng::SplitMix64::new(3);
        let mut next = || f64::from(rng.uniform_f32()) - 0.5;
        let lm = faer::Mat::<f64>::from_fn(n, n, |i, j| if i >= j { next() } else { 0.0 });
        let wd0: Vec<f64> = (0..rows * n).map(|_| next()).collect();
        let err: Vec<f64> = (0..rows * (i2 - i1)).map(|_| next()).collect();
        let mut want = wd0.clone();
        for r in 0..rows {
            for (k, c) in (i1..i2).enumerate() {
                for c2 in i2..n {
                    want[r * n + c2] -= err[r * (i2 - i1) + k] * lm[(c2, c)];
                }
            }
        }
        let mut got = wd0.clone();
        lazy_update(&mut got, &err, lm.as_ref(), rows, (i1, i2));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{i}: {a} vs {b}");
        }
        // Columns before the block untouched.
        for r in 0..rows {
            assert_eq!(got[r * n..r * n + i2], wd0[r * n..r * n + i2]);
        }
    }

    #[test]
    fn block_inputs_are_the_forward_pass_inputs_on_gemma3_and_qwen2() {
        for fixture in ["gemma3/gemma3.gguf", "qwen2"] {
            check_block_inputs(fixture);
        }
    }

    fn check_block_inputs(fixture: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny")
            .join(fixture);
        let model = crate::import::Checkpoint::open(&path)
            .unwrap()
            .load_model()
            .unwrap();
        let tokens: Vec<u32> = (0..72u32).map(|i| (i * 37 + 11) % 256).collect();
        let windows: Vec<&[u32]> = tokens.chunks(24).collect();
        let diag = Mutex::new(BTreeMap::new());
        let keep_all: &Pruner<'_> = &|i, w, r, c, h| {
            let d: Vec<f32> = (0..c).map(|j| h[j * c + j]).collect();
            diag.lock().unwrap().insert(i, d);
            Ok(masked_candidate(w, &vec![true; r * c], r, c))
        };
        prune_sequential(&model, &windows, 1, keep_all, false, |_| {}).unwrap();
        let rms = crate::calib::input_rms_windows(&model, &windows, 1, |_, _| {}).unwrap();
        let names = crate::rpca::model::linear_matrices(&model);
        let diag = diag.into_inner().unwrap();
        assert_eq!(diag.len(), model.blocks.len() * 7);
        for (i, d) in &diag {
            let (name, _) = &names[*i];
            for (j, (&h, &r)) in d.iter().zip(&rms[name]).enumerate() {
                let want = f64::from(r).powi(2) * tokens.len() as f64;
                let rel = (f64::from(h) - want).abs() / want.max(1e-12);
                assert!(rel < 1e-4, "{fixture} {name} column {j}: Σx² {h} vs {want}");
            }
        }
    }
}
