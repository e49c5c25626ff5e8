//! The RPCA commands: `decompose`, `rpca-sweep`, `rpca-eval` and `bench-rpca`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use cap_device::ppl::Protocol;
use cap_host::compress::source::{BlockSource, Source, Streamed};
use cap_host::eval::{EvalOptions, evaluate, read_text};
use cap_host::import::Checkpoint;
use clap::ValueEnum;
use indicatif::ProgressBar;

use crate::{progress_bar, threads_or_all};

/// Which SVD the IALM iterations use.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum SvdArg {
    /// faer's exact thin SVD every iteration.
    Exact,
    /// Randomized truncated SVD while the predicted rank is small.
    Randomized,
}

impl From<SvdArg> for cap_host::rpca::SvdMethod {
    fn from(a: SvdArg) -> Self {
        match a {
            SvdArg::Exact => cap_host::rpca::SvdMethod::Exact,
            SvdArg::Randomized => cap_host::rpca::SvdMethod::Randomized,
        }
    }
}

/// Activation-aware decomposition: where the calibration activations come from.
#[derive(clap::Args)]
pub(crate) struct CalibArgs {
    /// Decompose W·diag(d) instead of W, d = the RMS of each input channel over
    /// calibration text (plain text, or JSON lines with a "text" field such as the C4
    /// sample), then unscale. Calibrate on other text than you evaluate on.
    #[arg(long, value_name = "FILE")]
    calib: Option<PathBuf>,
    /// Calibration windows (the first N non-overlapping windows of the text).
    #[arg(long, value_name = "N", default_value_t = 16)]
    calib_windows: usize,
    /// Tokens per calibration window.
    #[arg(long, value_name = "N", default_value_t = 512)]
    calib_ctx: usize,
}

impl CalibArgs {
    /// The calibration text, read before any slow work so a bad path fails fast.
    fn text(&self) -> Result<Option<String>> {
        self.calib
            .as_deref()
            .map(cap_host::calib::read_calib_text)
            .transpose()
            .map_err(Into::into)
    }

    /// Per-tensor input RMS from `text` (None in plain mode).
    fn scales(
        &self,
        text: Option<&str>,
        ck: &Checkpoint,
        m: &cap_device::model::Model<cap_device::model::DenseLinear>,
        threads: usize,
    ) -> Result<Option<std::collections::BTreeMap<String, Vec<f32>>>> {
        self.scales_of(text, ck, m, threads)
    }

    /// [`CalibArgs::scales`] of the model in `src`, read one block at a time when
    /// streamed (the same figures).
    fn scales_of(
        &self,
        text: Option<&str>,
        ck: &Checkpoint,
        src: &dyn BlockSource,
        threads: usize,
    ) -> Result<Option<std::collections::BTreeMap<String, Vec<f32>>>> {
        let (Some(text), Some(path)) = (text, &self.calib) else {
            return Ok(None);
        };
        let tokenizer = ck.tokenizer()?;
        let opts = cap_host::calib::CalibOptions {
            ctx: self.calib_ctx,
            windows: self.calib_windows,
            threads,
        };
        let pb = progress_bar(0, "calibration");
        let r = cap_host::calib::input_rms_source(
            src,
            &tokenizer,
            text,
            &path.display().to_string(),
            &opts,
            |done, total| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            },
        );
        pb.finish_and_clear();
        Ok(Some(r?))
    }
}

/// `decompose` with an overall progress bar and one bar per matrix being computed.
pub(crate) fn run_decompose(
    m: &dyn BlockSource,
    out: &std::path::Path,
    opts: &cap_host::rpca::model::DecomposeOptions,
) -> Result<cap_host::rpca::model::DecomposeReport> {
    use cap_host::rpca::model::Event;
    use indicatif::MultiProgress;
    use std::collections::HashMap;
    use std::sync::Mutex;

    let multi = MultiProgress::new();
    let overall = multi.add(progress_bar(0, "decompose"));
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    let iters = opts.settings.max_iters as u64;
    let on_event = |e: Event<'_>| match e {
        Event::Plan { total } => overall.set_length(total as u64),
        Event::Start { name } => {
            let pb = multi.add(progress_bar(iters, name));
            if let Ok(mut b) = bars.lock() {
                b.insert(name.to_string(), pb);
            }
        }
        Event::Iter { name, info } => {
            if let Ok(b) = bars.lock()
                && let Some(pb) = b.get(name)
            {
                pb.set_position(info.iter as u64);
            }
        }
        Event::Done { name, .. } => {
            if let Ok(mut b) = bars.lock()
                && let Some(pb) = b.remove(name)
            {
                pb.finish_and_clear();
                multi.remove(&pb);
            }
            overall.inc(1);
        }
    };
    let r = cap_host::rpca::model::decompose_model(m, out, opts, &on_event);
    overall.finish_and_clear();
    Ok(r?)
}

/// The largest matrix `bench-rpca` accepts, in elements: 2²⁶ (256 MiB in f32; the
/// solver's state is a few times that). SmolLM2's largest matrix has 28.3M.
const MAX_BENCH_ELEMENTS: usize = 1 << 26;

/// `bench-rpca`: seconds of the first iteration (with the spectral norm) and of each
/// later one, per shape and thread count, and the projected seconds per matrix at the
/// default iteration count.
pub(crate) fn run_bench(
    sizes: &str,
    threads: &str,
    iters: usize,
    low_rank: Option<usize>,
    svd: cap_host::rpca::SvdMethod,
    json: bool,
) -> Result<()> {
    use cap_host::rpca::rng::XorShift;
    use std::time::Instant;

    if iters == 0 {
        anyhow::bail!("--iters must be at least 1");
    }
    let parse_list = |s: &str, what: &str| -> Result<Vec<usize>> {
        s.split(',')
            .map(|x| {
                x.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&v| v > 0)
                    .with_context(|| format!("{what}: {x:?} is not a positive number"))
            })
            .collect()
    };
    let threads = parse_list(threads, "--threads")?;
    if let Some(t) = threads.iter().find(|&&t| t > cap_kernels::par::MAX_THREADS) {
        anyhow::bail!(
            "--threads {t} is more than the most cap runs, {}",
            cap_kernels::par::MAX_THREADS
        );
    }
    let mut rows = Vec::new();
    for size in sizes.split(',') {
        let (m, n) = size
            .trim()
            .split_once('x')
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .filter(|&(a, b)| a > 0 && b > 0)
            .with_context(|| format!("--sizes: {size:?} is not ROWSxCOLS"))?;
        // The solver holds several m×n f32 matrices (W, L, S, the multiplier, SVD
        // work): bounded before anything is allocated.
        if m.checked_mul(n).is_none_or(|e| e > MAX_BENCH_ELEMENTS) {
            anyhow::bail!(
                "--sizes: {m}x{n} is more than the {MAX_BENCH_ELEMENTS} elements a benchmark matrix may have"
            );
        }
        if low_rank.is_some_and(|r| r > m.min(n)) {
            anyhow::bail!("--low-rank must be at most min(rows, cols) = {}", m.min(n));
        }
        let mut rng = XorShift::new(42);
        // Weight-like scale (SmolLM2's weights have std ≈ 0.02-0.05).
        let w: Vec<f32> = match low_rank {
            None => (0..m * n).map(|_| (0.02 * rng.normal()) as f32).collect(),
            Some(r) => {
                let a: Vec<f32> = (0..m * r).map(|_| rng.normal() as f32).collect();
                let b: Vec<f32> = (0..n * r).map(|_| rng.normal() as f32).collect();
                let mut w = vec![0.0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = 0.0;
                        for k in 0..r {
                            acc += a[i * r + k] * b[j * r + k];
                        }
                        let spike = if rng.uniform() < 0.05 { 10.0 } else { 0.0 };
                        w[i * n + j] = acc + spike;
                    }
                }
                w
            }
        };
        for &t in &threads {
            let settings = cap_host::rpca::RpcaSettings {
                max_iters: iters,
                tol: 0.0,
                svd,
                ..Default::default()
            };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .context("cannot start the worker threads")?;
            let par = if t == 1 {
                faer::Par::Seq
            } else {
                faer::Par::rayon(t)
            };
            // The spectral norm alone (one values-only SVD), so the first iteration's
            // own cost can be separated from the setup.
            let tn = Instant::now();
            let wm = faer::Mat::<f32>::from_fn(m, n, |i, j| w[i * n + j]);
            pool.install(|| cap_host::rpca::svd::spectral_norm(wm.as_ref(), par))
                .context("SVD did not converge")?;
            drop(wm);
            let norm_s = tn.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let mut marks = Vec::new();
            let (d, total) = pool.install(|| {
                cap_host::rpca::decompose_matrix(&w, m, n, &settings, None, par, &mut |_| {
                    marks.push(t0.elapsed().as_secs_f64())
                })
            })?;
            let first = marks.first().copied().unwrap_or(total);
            let later = if marks.len() > 1 {
                (marks[marks.len() - 1] - first) / (marks.len() - 1) as f64
            } else {
                f64::NAN
            };
            // Without a second iteration, the first one less the setup stands for all.
            let per_iter = if later.is_nan() {
                (first - norm_s).max(0.0)
            } else {
                later
            };
            let projected = first + per_iter * (cap_host::rpca::DEFAULT_ITERS as f64 - 1.0);
            rows.push(serde_json::json!({
                "rows": m, "cols": n, "threads": t, "iterations": d.stats.iterations,
                "spectral_norm_s": norm_s, "first_iter_s": first, "later_iter_s": later,
                "projected_default_s": projected, "rank": d.stats.rank,
                "residual": d.stats.residual,
                "density_s": d.stats.density(m, n), "svd": format!("{svd:?}"),
                "low_rank": low_rank,
            }));
            if !json {
                println!(
                    "{m}x{n} threads {t}: ‖W‖₂ alone {norm_s:.3} s, first iteration {first:.3} s (with ‖W‖₂), later {later:.3} s/iter, projected {} iterations {projected:.2} s (rank {}, density(S) {:.1}%, residual {:.2e})",
                    cap_host::rpca::DEFAULT_ITERS,
                    d.stats.rank,
                    100.0 * d.stats.density(m, n),
                    d.stats.residual
                );
            }
        }
    }
    if json {
        println!("{}", serde_json::json!({ "runs": rows }));
    }
    Ok(())
}

/// The solver settings shared by `decompose` and `rpca-eval` (which must name the
/// settings its cache was made with: they are part of every cache key).
#[derive(clap::Args)]
pub struct SolverArgs {
    /// Maximum IALM iterations per matrix.
    #[arg(long, default_value_t = cap_host::rpca::DEFAULT_ITERS)]
    pub iters: usize,
    /// λ = X / sqrt(max(rows, cols)); larger makes S sparser and L fuller.
    #[arg(long, value_name = "X", default_value_t = cap_host::rpca::DEFAULT_LAMBDA_SCALE)]
    pub lambda_scale: f64,
    /// Stop a matrix early when ‖W − L − S‖_F / ‖W‖_F falls below T.
    #[arg(long, value_name = "T", default_value_t = cap_host::rpca::DEFAULT_TOL)]
    pub tol: f64,
    /// SVD inside the iterations.
    #[arg(long, value_enum, default_value = "exact")]
    pub svd: SvdArg,
}

impl SolverArgs {
    /// The validated settings.
    pub fn settings(&self) -> Result<cap_host::rpca::RpcaSettings> {
        let s = cap_host::rpca::RpcaSettings {
            max_iters: self.iters,
            lambda_scale: self.lambda_scale,
            tol: self.tol,
            svd: self.svd.into(),
        };
        s.validate()?;
        Ok(s)
    }
}

/// Arguments of `cap-host decompose`.
#[derive(clap::Args)]
pub struct DecomposeArgs {
    /// A GGUF file or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The cache directory (one `<tensor>.rpca` file per matrix).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub solver: SolverArgs,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Process only the I-th of N disjoint slices of the matrices (1 <= I <= N).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Process only matrices whose tensor name contains this text.
    #[arg(long, value_name = "TEXT")]
    pub only: Option<String>,
    /// Read the checkpoint one block at a time (only the blocks holding selected
    /// matrices), never the whole model: memory is one block in f32, the embedding and
    /// head, and `threads` decompositions. The results are the same.
    #[arg(long)]
    pub stream: bool,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `cap-host decompose`.
pub fn decompose(a: DecomposeArgs) -> Result<()> {
    let DecomposeArgs {
        model,
        out,
        solver,
        threads,
        shard,
        only,
        stream,
        calib,
        json,
    } = a;
    // Check everything cheap before the (slow) model load.
    let settings = solver.settings()?;
    let shard = shard
        .map(|s| s.parse::<cap_host::rpca::model::Shard>())
        .transpose()?;
    let threads = threads_or_all(threads)?;
    let stop_after = match std::env::var("CAP_RPCA_STOP_AFTER") {
        Ok(v) => Some(
            v.parse::<usize>()
                .with_context(|| format!("CAP_RPCA_STOP_AFTER={v:?} is not a count"))?,
        ),
        Err(_) => None,
    };
    let calib_text = calib.text()?;
    let ck = Checkpoint::open(&model)?;
    let tok_ck = Checkpoint::open(&model)?;
    let m: Source = if stream {
        Source::Streamed(Streamed::new(ck)?)
    } else {
        Source::Memory(
            ck.load_model()
                .with_context(|| format!("loading {}", model.display()))?,
        )
    };
    cap_kernels::par::init_threads(threads);
    let scales = calib.scales_of(calib_text.as_deref(), &tok_ck, &m, threads)?;
    let opts = cap_host::rpca::model::DecomposeOptions {
        settings,
        threads,
        shard,
        only,
        stop_after,
        scales,
    };
    let r = run_decompose(&m, &out, &opts)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", cap_host::rpca::model::render(&r));
    }
    Ok(())
}

/// Arguments of `cap-host rpca-sweep`.
#[derive(clap::Args)]
pub struct RpcaSweepArgs {
    /// A GGUF file or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Tensor name, e.g. blk.0.attn_k.weight.
    #[arg(long)]
    pub tensor: String,
    /// Iterations of each point of the λ sweep.
    #[arg(long, default_value_t = cap_host::rpca::DEFAULT_ITERS)]
    pub iters: usize,
    /// λ scales to try, comma-separated.
    #[arg(long, value_name = "X,Y,...", default_value = "0.5,1,2,4,8,16")]
    pub lambda_scales: String,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `cap-host rpca-sweep`.
pub fn rpca_sweep(a: RpcaSweepArgs) -> Result<()> {
    let RpcaSweepArgs {
        model,
        tensor,
        iters,
        lambda_scales,
        threads,
        json,
    } = a;
    let lambda_scales = lambda_scales
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .with_context(|| format!("--lambda-scales: {x:?} is not a positive number"))
        })
        .collect::<Result<Vec<f64>>>()?;
    let base = cap_host::rpca::RpcaSettings {
        max_iters: iters,
        ..Default::default()
    };
    base.validate()?;
    let threads = threads_or_all(threads)?;
    let m = Checkpoint::open(&model)?
        .load_model()
        .with_context(|| format!("loading {}", model.display()))?;
    let lin = cap_host::rpca::model::linear_matrices(&m)
        .into_iter()
        .find(|(n, _)| *n == tensor)
        .map(|(_, l)| l)
        .with_context(|| format!("{}: no linear weight named {tensor:?}", model.display()))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start the worker threads")?;
    let r = pool
        .install(|| {
            cap_host::rpca::sweep::sweep(
                &lin.weight,
                lin.out_features,
                lin.in_features,
                &base,
                &lambda_scales,
                &cap_host::rpca::sweep::SWEEP_ITERS,
                faer::Par::rayon(threads),
            )
        })
        .with_context(|| format!("decomposing {tensor}"))?;
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["tensor"] = tensor.into();
        println!("{v}");
    } else {
        println!("{tensor}");
        print!("{}", cap_host::rpca::sweep::render(&r));
    }
    Ok(())
}

/// Arguments of `cap-host rpca-eval`.
#[derive(clap::Args)]
pub struct RpcaEvalArgs {
    /// A GGUF file or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The decompose cache directory.
    #[arg(long, value_name = "DIR")]
    pub cache: PathBuf,
    /// The text to score (UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    #[command(flatten)]
    pub solver: SolverArgs,
    /// Window length in tokens (standard protocol).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate only the first K windows.
    #[arg(long, value_name = "K")]
    pub max_windows: Option<usize>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `cap-host rpca-eval`.
pub fn rpca_eval(a: RpcaEvalArgs) -> Result<()> {
    let RpcaEvalArgs {
        model,
        cache,
        text,
        solver,
        ctx,
        max_windows,
        threads,
        calib,
        json,
    } = a;
    let settings = solver.settings()?;
    let threads = threads_or_all(threads)?;
    cap_kernels::par::init_threads(threads);
    let body = read_text(&text, false)?;
    let calib_text = calib.text()?;
    let ck = Checkpoint::open(&model)?;
    let tokenizer = ck.tokenizer()?;
    let mut m = ck
        .load_model()
        .with_context(|| format!("loading {}", model.display()))?;
    let scales = calib.scales(calib_text.as_deref(), &ck, &m, threads)?;
    // Names first (owned), so the model can then be borrowed mutably.
    let names: Vec<String> = cap_host::rpca::model::linear_matrices(&m)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut lins: Vec<&mut cap_device::model::DenseLinear> = Vec::new();
    for b in m.blocks.iter_mut() {
        lins.extend(b.linears_mut());
    }
    if let cap_device::model::Head::Separate(h) = &mut m.head {
        lins.push(h);
    }
    for (name, lin) in names.iter().zip(lins) {
        let (r, c) = (lin.out_features, lin.in_features);
        let scale = scales.as_ref().and_then(|s| s.get(name)).map(Vec::as_slice);
        let d = cap_host::rpca::load_cached(&cache, name, &lin.weight, r, c, &settings, scale)
            .with_context(|| {
                format!(
                    "{}: no cached decomposition of {name} with these settings",
                    cache.display()
                )
            })?;
        lin.weight = d.reconstruct();
    }
    let opts = EvalOptions {
        ctx,
        protocol: Protocol::Standard,
        max_windows,
        threads,
    };
    let report = evaluate(
        &m,
        &tokenizer,
        &body,
        &text.display().to_string(),
        &opts,
        |_, _| {},
    )?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "PPL {:.4} with W = L + S ({} windows of {} tokens, standard protocol)",
            report.ppl, report.windows, report.ctx
        );
    }
    Ok(())
}

/// Arguments of `cap-host bench-rpca`.
#[derive(clap::Args)]
pub struct BenchRpcaArgs {
    /// Shapes as ROWSxCOLS, comma-separated.
    #[arg(long, default_value = "576x576,1536x576,4096x4096,4096x11008")]
    pub sizes: String,
    /// Thread counts to measure, comma-separated.
    #[arg(long, default_value = "1,2")]
    pub threads: String,
    /// Iterations to time (the first includes the spectral norm).
    #[arg(long, default_value_t = 2)]
    pub iters: usize,
    /// Rank of a low-rank-plus-sparse test matrix instead of a Gaussian one.
    #[arg(long)]
    pub low_rank: Option<usize>,
    /// SVD inside the iterations.
    #[arg(long, value_enum, default_value = "exact")]
    pub svd: SvdArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `cap-host bench-rpca`.
pub fn bench_rpca(a: BenchRpcaArgs) -> Result<()> {
    let BenchRpcaArgs {
        sizes,
        threads,
        iters,
        low_rank,
        svd,
        json,
    } = a;
    run_bench(&sizes, &threads, iters, low_rank, svd.into(), json)?;
    Ok(())
}
