//! Decomposing every linear weight of a model: selection (`--only`, `--shard`), the
//! cache check, parallel work on a bounded thread pool, and the report.
//!
//! Memory: matrices are independent jobs taken in model order (layer by layer) by a
//! pool of `threads` workers; a worker writes its result to the cache and drops it
//! before taking the next job, so at most `threads` decompositions (each a few dense
//! copies of its matrix) are alive at once, never a whole model's.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use cap_device::model::{DenseLinear, Head, Model};

use crate::compress::source::BlockSource;
use cap_device::tensors;
use faer::Par;
use rayon::prelude::*;
use serde::Serialize;

use super::cache::{self, CacheKey};
use super::{IterInfo, RpcaError, RpcaSettings, decompose_matrix};

type Result<T, E = RpcaError> = std::result::Result<T, E>;

/// The `I`-th of `N` disjoint slices of the matrix list (`1 ≤ I ≤ N`), as SLURM array
/// task ids usually count. Matrix `j` (0-based, in model order, after `--only`) belongs
/// to slice `j mod N + 1`: round robin spreads large and small matrices evenly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shard {
    /// Which slice, from 1.
    pub index: usize,
    /// How many slices.
    pub count: usize,
}

impl FromStr for Shard {
    type Err = RpcaError;
    fn from_str(s: &str) -> Result<Shard> {
        let (i, n) = s.split_once('/').ok_or_else(|| {
            RpcaError::Shard(format!("shard must be I/N (for example 1/4), got {s:?}"))
        })?;
        let parse = |x: &str| {
            x.trim().parse::<usize>().map_err(|_| {
                RpcaError::Shard(format!("shard must be I/N with whole numbers, got {s:?}"))
            })
        };
        let (index, count) = (parse(i)?, parse(n)?);
        if count == 0 || index == 0 || index > count {
            return Err(RpcaError::Shard(format!(
                "shard {s:?} out of range: need 1 <= I <= N"
            )));
        }
        Ok(Shard { index, count })
    }
}

/// How to run [`decompose_model`].
#[derive(Clone, Debug)]
pub struct DecomposeOptions {
    /// The solver's settings (part of every cache key).
    pub settings: RpcaSettings,
    /// Worker threads (≥ 1).
    pub threads: usize,
    /// Process only this slice of the matrices.
    pub shard: Option<Shard>,
    /// Process only matrices whose name contains this substring.
    pub only: Option<String>,
    /// Stop after computing this many matrices (skipped ones do not count): a hook to
    /// simulate an interrupted run in tests (`CAP_RPCA_STOP_AFTER`).
    pub stop_after: Option<usize>,
    /// Activation-aware mode: per tensor name, the input-channel scale `d` (see
    /// [`crate::calib::input_rms`]); `W·diag(d)` is decomposed and unscaled. `None`:
    /// plain mode. The scale is part of each cache key, so the two modes never mix.
    pub scales: Option<BTreeMap<String, Vec<f32>>>,
}

/// One matrix in the report.
#[derive(Clone, Debug, Serialize)]
pub struct MatrixReport {
    /// Tensor name (GGUF naming).
    pub name: String,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Rank of L.
    pub rank: usize,
    /// Non-zeros of S.
    pub nnz: usize,
    /// ‖W − L − S‖_F / ‖W‖_F.
    pub residual: f64,
    /// Iterations run.
    pub iterations: usize,
    /// Seconds spent on it in this run (0 when taken from the cache).
    pub seconds: f64,
    /// ‖L‖_F² / ‖W‖_F².
    pub energy_l: f64,
    /// ‖S‖_F² / ‖W‖_F².
    pub energy_s: f64,
    /// nnz / (rows · cols).
    pub density_s: f64,
    /// Whether the result came from the cache.
    pub cached: bool,
}

/// What [`decompose_model`] did.
#[derive(Clone, Debug, Serialize)]
pub struct DecomposeReport {
    /// Selected matrices that have a result, in model order.
    pub matrices: Vec<MatrixReport>,
    /// Matrices selected (after `--only` and `--shard`).
    pub selected: usize,
    /// Matrices computed in this run.
    pub computed: usize,
    /// Matrices found in the cache and skipped.
    pub skipped: usize,
    /// Matrices left undone because of the stop hook.
    pub not_run: usize,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// Sum of per-matrix seconds of the computed matrices.
    pub compute_seconds: f64,
    /// Mean of rank / min(rows, cols) over the reported matrices.
    pub rank_fraction_mean: f64,
    /// Mean density of S over the reported matrices.
    pub density_mean: f64,
    /// Mean ‖L‖² / ‖W‖² over the reported matrices.
    pub energy_l_mean: f64,
    /// Settings used.
    pub settings: RpcaSettings,
    /// `plain` (W) or `activation-aware` (W·diag(d) from calibration inputs).
    pub mode: &'static str,
    /// Worker threads.
    pub threads: usize,
    /// The slice processed, if any.
    pub shard: Option<Shard>,
    /// The cache directory.
    pub out: String,
}

/// The model's linear weights with their tensor names, in file order (layer by layer:
/// q, k, v, o, gate, up, down, then a separate output head): the table's
/// [`tensors::linears`], each layer looked up by its role and block. Embeddings are not
/// linears of the forward pass's blocks and are not decomposed (a tied head is the
/// embedding).
pub fn linear_matrices(model: &Model<DenseLinear>) -> Vec<(String, &DenseLinear)> {
    tensors::linears(&model.config)
        .into_iter()
        .filter_map(|t| tensors::linear(model, &t).map(|l| (t.name, l)))
        .collect()
}

/// Progress events of [`decompose_model`].
pub enum Event<'a> {
    /// Sent once, before any work: how many matrices are selected.
    Plan {
        /// Matrices selected.
        total: usize,
    },
    /// A matrix is being computed (not cached).
    Start {
        /// Tensor name.
        name: &'a str,
    },
    /// One IALM iteration of a matrix finished.
    Iter {
        /// Tensor name.
        name: &'a str,
        /// The iteration's statistics.
        info: &'a IterInfo,
    },
    /// A matrix is finished (computed or taken from the cache).
    Done {
        /// Tensor name.
        name: &'a str,
        /// Whether it came from the cache.
        cached: bool,
    },
}

/// Decomposes the selected linear weights of `model` into the cache under `out_dir`,
/// skipping those already cached with the same weight and settings.
pub fn decompose_model(
    src: &dyn BlockSource,
    out_dir: &Path,
    opts: &DecomposeOptions,
    on_event: &(dyn Fn(Event<'_>) + Sync),
) -> Result<DecomposeReport> {
    let t0 = Instant::now();
    opts.settings.validate()?;
    if opts.threads == 0 {
        return Err(RpcaError::NoThreads);
    }
    std::fs::create_dir_all(out_dir).map_err(|source| RpcaError::Io {
        path: out_dir.to_owned(),
        what: "cannot create the output directory",
        source: Some(source),
    })?;
    // The selection from the names alone: a streamed source reads only the blocks
    // that hold a selected matrix.
    let mut jobs = tensors::linears(&src.model().config);
    if let Some(only) = &opts.only {
        jobs.retain(|t| t.name.contains(only.as_str()));
        if jobs.is_empty() {
            return Err(RpcaError::NoMatch(only.clone()));
        }
    }
    if let Some(sh) = opts.shard {
        jobs = jobs
            .into_iter()
            .enumerate()
            .filter(|(j, _)| j % sh.count + 1 == sh.index)
            .map(|(_, x)| x)
            .collect();
    }
    // Many matrices: one per worker, each solved sequentially (this also makes results
    // independent of the thread count). Fewer matrices than workers: the workers
    // share each matrix's SVD instead.
    on_event(Event::Plan { total: jobs.len() });
    let par = if jobs.len() >= opts.threads {
        Par::Seq
    } else {
        Par::rayon(opts.threads)
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(RpcaError::Pool)?;
    let computed = AtomicUsize::new(0);
    let started = AtomicUsize::new(0);
    // One group of jobs per block (then the head), each block read once, its matrices
    // shared out to the workers, and dropped before the next.
    let mut results: Vec<Option<MatrixReport>> = Vec::with_capacity(jobs.len());
    let mut groups: Vec<(Option<usize>, Vec<&tensors::TensorInfo>)> = Vec::new();
    for t in &jobs {
        let layer = (t.role != tensors::Role::Head).then(|| t.layer.unwrap_or(0));
        match groups.last_mut() {
            Some((l, g)) if *l == layer => g.push(t),
            _ => groups.push((layer, vec![t])),
        }
    }
    for (layer, group) in groups {
        let block = match layer {
            Some(i) => Some(src.block(i).map_err(|e| RpcaError::Source(e.to_string()))?),
            None => None,
        };
        let named: Vec<(String, &DenseLinear)> = group
            .iter()
            .filter_map(|t| {
                let l = match (&block, &src.model().head) {
                    (Some(b), _) => tensors::block_linear(b, t.role),
                    (None, Head::Separate(h)) => Some(h),
                    (None, Head::Tied) => None,
                };
                l.map(|l| (t.name.clone(), l))
            })
            .collect();
        let done = decompose_jobs(
            &named, out_dir, opts, par, &pool, &computed, &started, on_event,
        )?;
        results.extend(done);
    }

    let selected = results.len();
    let matrices: Vec<MatrixReport> = results.into_iter().flatten().collect();
    let computed = computed.load(Ordering::SeqCst);
    let skipped = matrices.iter().filter(|r| r.cached).count();
    let count = matrices.len().max(1) as f64;
    let mean = |f: &dyn Fn(&MatrixReport) -> f64| matrices.iter().map(f).sum::<f64>() / count;
    Ok(DecomposeReport {
        selected,
        computed,
        skipped,
        not_run: selected - matrices.len(),
        seconds: t0.elapsed().as_secs_f64(),
        compute_seconds: matrices.iter().map(|r| r.seconds).sum(),
        rank_fraction_mean: mean(&|r| r.rank as f64 / r.rows.min(r.cols) as f64),
        density_mean: mean(&|r| r.density_s),
        energy_l_mean: mean(&|r| r.energy_l),
        settings: opts.settings,
        mode: if opts.scales.is_some() {
            "activation-aware"
        } else {
            "plain"
        },
        threads: opts.threads,
        shard: opts.shard,
        out: out_dir.display().to_string(),
        matrices,
    })
}

/// Decomposes `jobs` (named matrices of one block, or the head) on `pool`, one per
/// worker (`par` inside each), each cached result reused.
#[allow(clippy::too_many_arguments)]
fn decompose_jobs(
    jobs: &[(String, &DenseLinear)],
    out_dir: &Path,
    opts: &DecomposeOptions,
    par: Par,
    pool: &rayon::ThreadPool,
    computed: &AtomicUsize,
    started: &AtomicUsize,
    on_event: &(dyn Fn(Event<'_>) + Sync),
) -> Result<Vec<Option<MatrixReport>>> {
    pool.install(|| {
        jobs.par_iter()
            .map(|(name, lin)| -> Result<Option<MatrixReport>> {
                let (m, n) = (lin.out_features, lin.in_features);
                let scale = match &opts.scales {
                    None => None,
                    Some(map) => Some(
                        map.get(name)
                            .map(Vec::as_slice)
                            .ok_or_else(|| RpcaError::NoScale(name.clone()))?,
                    ),
                };
                let key = CacheKey::new(&lin.weight, m, n, &opts.settings, scale);
                let path = cache::cache_path(out_dir, name)?;
                let report = |d: &super::Decomposition, seconds, cached| MatrixReport {
                    name: name.clone(),
                    rows: m,
                    cols: n,
                    rank: d.stats.rank,
                    nnz: d.stats.nnz,
                    residual: d.stats.residual,
                    iterations: d.stats.iterations,
                    seconds,
                    energy_l: d.stats.energy_l,
                    energy_s: d.stats.energy_s,
                    density_s: d.stats.density(m, n),
                    cached,
                };
                if let Some(d) = cache::read(&path, &key) {
                    on_event(Event::Done { name, cached: true });
                    return Ok(Some(report(&d, 0.0, true)));
                }
                if let Some(k) = opts.stop_after
                    && started.fetch_add(1, Ordering::SeqCst) >= k
                {
                    return Ok(None);
                }
                on_event(Event::Start { name });
                let (d, secs) =
                    decompose_matrix(&lin.weight, m, n, &opts.settings, scale, par, &mut |info| {
                        on_event(Event::Iter { name, info })
                    })
                    .map_err(|e| RpcaError::Matrix {
                        name: name.clone(),
                        source: Box::new(e),
                    })?;
                cache::write(&path, &key, &d).map_err(|e| RpcaError::Cache {
                    name: name.clone(),
                    source: Box::new(e),
                })?;
                computed.fetch_add(1, Ordering::SeqCst);
                on_event(Event::Done {
                    name,
                    cached: false,
                });
                Ok(Some(report(&d, secs, false)))
            })
            .collect::<Result<Vec<_>>>()
    })
}

/// A plain-text table of a report, one line per matrix, then totals.
pub fn render(r: &DecomposeReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<28} {:>11} {:>6} {:>7} {:>9} {:>8} {:>6} {:>8} {:>8} {:>7}",
        "tensor", "shape", "rank", "rank%", "nnz", "dens(S)", "iters", "resid", "E(L)", "secs"
    );
    for m in &r.matrices {
        let _ = writeln!(
            s,
            "{:<28} {:>11} {:>6} {:>6.1}% {:>9} {:>7.1}% {:>6} {:>8.1e} {:>7.1}% {:>7}",
            m.name,
            format!("{}x{}", m.rows, m.cols),
            m.rank,
            100.0 * m.rank as f64 / m.rows.min(m.cols) as f64,
            m.nnz,
            100.0 * m.density_s,
            m.iterations,
            m.residual,
            100.0 * m.energy_l,
            if m.cached {
                "cached".to_string()
            } else {
                format!("{:.2}", m.seconds)
            }
        );
    }
    let _ = writeln!(
        s,
        "{} mode; {} matrices selected: {} computed, {} cached, {} not run; mean rank {:.1}% of full, mean density(S) {:.1}%, mean E(L) {:.1}%; {:.1} s wall, {:.1} s compute, {} threads",
        r.mode,
        r.selected,
        r.computed,
        r.skipped,
        r.not_run,
        100.0 * r.rank_fraction_mean,
        100.0 * r.density_mean,
        100.0 * r.energy_l_mean,
        r.seconds,
        r.compute_seconds,
        r.threads
    );
    s
}
