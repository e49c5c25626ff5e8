//! `cap-device`: runs a `.cap` file on the board. `info` describes it, `selftest`
//! measures its perplexity and compares it with the figure the host stored in it,
//! `generate` writes text. The file is memory-mapped and run in place.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cap_device::forward::{KvCache, KvDtype, Runner, Workspace};
use cap_device::load;
use cap_device::model::{Embedding, Linear, Model};
use cap_device::open::{map, model as load_model, parse_verified as open, tokenizer};
use cap_device::ppl::{PplOptions, PplReport, Protocol, perplexity};
use cap_device::sample::{Sampler, SamplerConfig};
use cap_format::manifest::PerplexityProtocol;
use cap_kernels::{cpu, par};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

/// Largest relative difference between the self-test perplexity and the host's
/// figure that passes. The board runs the host's code on the same bytes; only the
/// order of `f32` summations could differ (SIMD width, GEMM blocking, threads). Measured
/// (README, "Self-test"): no difference at all between x86 AVX2, scalar, 1 or 2 threads
/// and aarch64 NEON; token-at-a-time decoding moves NLLs by ~3e-5. 1e-3 leaves a wide
/// margin for other CPUs yet is far below what a wrong kernel or a corrupted weight
/// does (percents or more).
const SELFTEST_REL_TOLERANCE: f64 = 1e-3;

/// Tokens of the first window the self-test also decodes one at a time, as `generate`
/// does. The perplexity windows run the prompt path (stored rows decoded to `f32`
/// tiles, then GEMM); single tokens run the matrix-vector kernels of this CPU (NEON,
/// AVX2 or scalar), so this is what checks those on the board.
const DECODE_CHECK_TOKENS: usize = 32;

/// Largest difference (nats) between a token's NLL decoded one at a time and in a
/// batch that passes. Both sum the same products in `f32`, in different orders:
/// measured differences are about 1e-5 (README, "Self-test"); a wrong kernel moves
/// NLLs by far more than 1e-3.
const DECODE_CHECK_TOL: f64 = 1e-3;

/// Exit status when the self-test ran but its perplexity differs from the stored one.
const EXIT_MISMATCH: u8 = 1;
/// Exit status for unusable input (bad file, checksum failure, bad arguments).
const EXIT_ERROR: u8 = 2;

#[derive(Parser)]
#[command(
    name = "cap-device",
    version,
    about = "Run a compressed .cap model on this machine: describe it, self-test it, generate text",
    long_about = "Run a compressed .cap model on this machine.\n\n\
        The file is memory-mapped and run in place: compressed layers are never expanded.\n\
        Kernels are chosen at run time for this CPU (AVX2 on x86-64, NEON on aarch64);\n\
        CAP_FORCE_SCALAR=1 forces the portable reference kernels."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KvArg {
    /// 32-bit floats (what the host measures with).
    F32,
    /// 16-bit floats: half the cache memory.
    F16,
}

impl From<KvArg> for KvDtype {
    fn from(k: KvArg) -> Self {
        match k {
            KvArg::F32 => KvDtype::F32,
            KvArg::F16 => KvDtype::F16,
        }
    }
}

/// Where the linear layers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// The GPU when this cap-device has `cuda` and a GPU is usable; else the CPU, with
    /// one line on stderr saying why (built with `cuda`) or silently (built without).
    Auto,
    /// This machine's CPU (NEON, AVX2 or scalar kernels).
    Cpu,
    /// The first CUDA GPU: every linear layer uploaded once in its stored encoding,
    /// the matrix-vector kernels there; norms, RoPE, attention and the KV cache on the
    /// CPU. Needs a cap-device built with the `cuda` feature.
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe a file: model, compression, memory needs, kernels; verifies checksums.
    Info {
        /// The .cap file.
        file: PathBuf,
        /// Context length to size the KV cache for.
        #[arg(long, default_value_t = 2048)]
        ctx: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Measure perplexity (llama.cpp's rule: second half of each window scored) and
    /// compare it with the host-measured figure stored in the file.
    ///
    /// Also decodes the first tokens one at a time (the kernels `generate` uses) and
    /// checks they score as in the batch (difference at most 1e-3 nats).
    ///
    /// Exit status: 0 when both match (perplexity: relative difference at most 1e-3),
    /// 1 when either differs, 2 when the file or the arguments are unusable (including
    /// a checksum failure). With --text, --ctx, --max-windows or --kv f16 there is no
    /// stored figure to compare with: the figure is reported, only the decode check
    /// decides.
    Selftest {
        /// The .cap file.
        file: PathBuf,
        /// Text to measure on (default: the self-test text stored in the file).
        #[arg(long)]
        text: Option<PathBuf>,
        /// Window length in tokens (default: the stored figure's).
        #[arg(long)]
        ctx: Option<usize>,
        /// Windows to score (default: the stored figure's).
        #[arg(long)]
        max_windows: Option<usize>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// KV cache element type.
        #[arg(long, value_enum, default_value_t = KvArg::F32)]
        kv: KvArg,
        /// Tokens of the first window to also decode one at a time and compare with
        /// the batched path (0 skips the check).
        #[arg(long, default_value_t = DECODE_CHECK_TOKENS)]
        decode_check: usize,
        /// Where the linear layers run. `cuda` without a usable GPU is an error (one
        /// line saying why); `auto` falls back to the CPU.
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Memory the KV cache and RoPE tables may take, in bytes [default: the
        /// memory the OS reports available (Linux MemAvailable); unbounded elsewhere].
        #[arg(long, value_name = "BYTES")]
        max_memory: Option<u64>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt, streaming tokens; reports prefill and decode speed.
    Generate {
        /// The .cap file.
        file: PathBuf,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate at most (stops early at end-of-sequence).
        #[arg(short = 'n', long, default_value_t = 64)]
        n: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.8)]
        temp: f32,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Context length (prompt + generated tokens; sizes the KV cache).
        #[arg(long, default_value_t = 2048)]
        ctx: usize,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// KV cache element type.
        #[arg(long, value_enum, default_value_t = KvArg::F32)]
        kv: KvArg,
        /// Memory the KV cache and RoPE tables may take, in bytes [default: the
        /// memory the OS reports available (Linux MemAvailable); unbounded elsewhere].
        #[arg(long, value_name = "BYTES")]
        max_memory: Option<u64>,
        /// Where the linear layers run (as for `selftest`).
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// Print one JSON object at the end instead of streaming.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// `--threads` (every core by default), at most [`par::MAX_THREADS`]; starts the pool.
fn threads(t: Option<usize>) -> Result<usize> {
    let n = t.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if n > par::MAX_THREADS {
        bail!(
            "--threads {n} is more than the most cap runs, {}",
            par::MAX_THREADS
        );
    }
    par::init_threads(n);
    Ok(n.max(1))
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses contexts longer than the model was trained for (they would also size the KV
/// cache and RoPE table without bound).
fn check_ctx(ctx: usize, c: &cap_device::config::Config) -> Result<()> {
    if ctx > c.max_position {
        bail!(
            "a context of {ctx} tokens exceeds the model's {} (lower --ctx or -n)",
            c.max_position
        );
    }
    Ok(())
}

/// The longest `--text` read: 1 GiB, as on the host (`/dev/zero` would be read until
/// memory ran out).
const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Reads a UTF-8 text of at most [`MAX_TEXT_BYTES`].
fn read_text(p: &Path) -> Result<String> {
    use std::io::Read;
    let mut raw = Vec::new();
    std::fs::File::open(p)
        .and_then(|f| f.take(MAX_TEXT_BYTES + 1).read_to_end(&mut raw))
        .with_context(|| format!("{}: cannot read the text", p.display()))?;
    if raw.len() as u64 > MAX_TEXT_BYTES {
        bail!(
            "{}: longer than {MAX_TEXT_BYTES} bytes, the most a text may have",
            p.display()
        );
    }
    String::from_utf8(raw).map_err(|_| anyhow::anyhow!("{}: not valid UTF-8", p.display()))
}

/// The memory available to this process per the OS (Linux `MemAvailable`), in bytes.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Refuses a context whose KV cache and RoPE tables (sized from the file's dimensions
/// and `ctx`) exceed `--max-memory`, or else the memory the OS reports available: an
/// allocation that large would abort the process instead of failing in one line.
fn check_memory(
    c: &cap_device::config::Config,
    ctx: usize,
    kv: KvDtype,
    max_memory: Option<u64>,
) -> Result<()> {
    let (limit, what) = match (max_memory, mem_available()) {
        (Some(m), _) => (m, "--max-memory"),
        (None, Some(m)) => (m, "available (MemAvailable)"),
        (None, None) => return Ok(()),
    };
    // cos and sin, f32, half a head per position.
    let rope = (ctx as u64).saturating_mul(c.head_dim as u64 / 2 * 8);
    let need = KvCache::bytes_for(c, ctx, kv).saturating_add(rope);
    if need > limit {
        bail!(
            "a context of {ctx} tokens needs {need} bytes of KV cache and RoPE tables, more than the {limit} bytes {what} (lower --ctx or -n)"
        );
    }
    Ok(())
}

fn run(cmd: Cmd) -> Result<u8> {
    match cmd {
        Cmd::Info { file, ctx, json } => info(&file, ctx, json),
        Cmd::Selftest {
            file,
            text,
            ctx,
            max_windows,
            threads: t,
            kv,
            decode_check,
            device,
            max_memory,
            json,
        } => selftest(
            &file,
            text.as_deref(),
            (ctx, max_windows),
            t,
            (kv.into(), max_memory),
            (decode_check, device),
            json,
        ),
        Cmd::Generate {
            file,
            prompt,
            n,
            temp,
            top_p,
            seed,
            ctx,
            threads: t,
            kv,
            max_memory,
            device,
            json,
        } => {
            let cfg = SamplerConfig {
                temperature: temp,
                top_p,
                seed,
            };
            generate(
                &file,
                &prompt,
                n,
                cfg,
                ctx,
                t,
                (kv.into(), max_memory),
                (device, json),
            )
        }
    }
}

fn info(path: &Path, ctx: usize, json: bool) -> Result<u8> {
    let bytes = map(path)?;
    let file = open(path, &bytes)?;
    let model = load_model(path, &file)?;
    let m = file.manifest();
    let c = &model.config;
    let mut encodings = std::collections::BTreeMap::<&str, (usize, u64)>::new();
    for t in &m.tensors {
        let e = encodings.entry(t.encoding.name()).or_default();
        e.0 += 1;
        e.1 += t.len;
    }
    let kv = KvCache::bytes_for(c, ctx, KvDtype::F32);
    let per_token = load::weight_bytes_per_token(&model);
    let comp = m.compression.as_ref();
    let record = comp.and_then(|c| c.perplexity.as_ref());
    let k = cpu::kernels();
    let gpu = gpu_line();
    let mut v = json!({
        "file": path.display().to_string(),
        "file_bytes": bytes.len(),
        "format": format!("{}.{}", file.header().major, file.header().minor),
        "checksums": "ok",
        "architecture": m.model.architecture,
        "layers": c.n_layers, "hidden": c.hidden_size, "heads": c.n_heads,
        "kv_heads": c.n_kv_heads, "vocab": c.vocab_size,
        "tensors": m.tensors.len(),
        "encodings": encodings.iter().map(|(k, (n, b))| json!({"encoding": k, "tensors": n, "bytes": b})).collect::<Vec<_>>(),
        "method": comp.map(|c| c.method.clone()),
        "target_profile": comp.map(|c| c.target_profile.clone()),
        "stored_ppl": record.map(|r| json!({"value": r.value, "ctx": r.ctx, "windows": r.windows,
            "protocol": match r.protocol { PerplexityProtocol::LlamaCpp => "llama-cpp", PerplexityProtocol::Standard => "standard" },
            "text": r.text_name})),
        "self_test_text_bytes": comp.map_or(0, |c| c.self_test_text.len()),
        "weight_bytes_per_token": per_token,
        "ctx": ctx,
        "kv_cache_bytes_f32": kv,
        "kv_cache_bytes_f16": KvCache::bytes_for(c, ctx, KvDtype::F16),
        "kernels": k.isa.name(),
        "cpu_features": cpu::cpu_features(),
    });
    if let Some(g) = &gpu {
        v["gpu"] = json!(g);
    }
    if json {
        println!("{v}");
        return Ok(0);
    }
    println!(
        "{}: {} bytes, format {}, checksums ok",
        path.display(),
        bytes.len(),
        v["format"].as_str().unwrap_or("?")
    );
    println!(
        "model: {} ({} layers, hidden {}, {} heads / {} KV heads, vocab {})",
        m.model.architecture, c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.vocab_size
    );
    if let Some(cm) = comp {
        println!(
            "compression: method {}, target {}",
            cm.method,
            if cm.target_profile.is_empty() {
                "-"
            } else {
                &cm.target_profile
            }
        );
    }
    for (e, (n, b)) in &encodings {
        println!("  {e:<16} {n:>4} tensors  {b:>12} bytes");
    }
    println!("weights read per decoded token: {per_token} bytes");
    println!(
        "KV cache at ctx {ctx}: {kv} bytes (f32), {} bytes (f16)",
        KvCache::bytes_for(c, ctx, KvDtype::F16)
    );
    match record {
        Some(r) => println!(
            "stored self-test figure: PPL {:.4} (ctx {}, {} windows, {})",
            r.value, r.ctx, r.windows, r.text_name
        ),
        None => println!("stored self-test figure: none"),
    }
    println!(
        "kernels: {} (cpu: {})",
        k.isa.name(),
        cpu::cpu_features().join(", ")
    );
    if let Some(g) = &gpu {
        println!("gpu: {g}");
    }
    Ok(0)
}

/// One line on the GPU when built with `cuda`: the GPU found, or why none is usable
/// (no driver, no device, too old). The kernels do not run on it yet.
#[cfg(feature = "cuda")]
fn gpu_line() -> Option<String> {
    Some(cap_kernels::cuda::describe())
}

/// Without the `cuda` feature there is no GPU line.
#[cfg(not(feature = "cuda"))]
fn gpu_line() -> Option<String> {
    None
}

fn selftest(
    path: &Path,
    text: Option<&Path>,
    (ctx, max_windows): (Option<usize>, Option<usize>),
    threads_arg: Option<usize>,
    (kv, max_memory): (KvDtype, Option<u64>),
    (decode_check_tokens, device): (usize, DeviceArg),
    json: bool,
) -> Result<u8> {
    let th = threads(threads_arg)?;
    let device = resolve_device(device);
    let bytes = map(path)?;
    let file = open(path, &bytes)?;
    let model = load_model(path, &file)?;
    let tok = tokenizer(path, file.manifest())?;
    let comp = file.manifest().compression.as_ref();
    let record = comp
        .and_then(|c| c.perplexity.as_ref())
        .filter(|r| r.protocol == PerplexityProtocol::LlamaCpp);
    let body = match text {
        Some(p) => read_text(p)?,
        None => match comp.map(|c| c.self_test_text.as_str()) {
            Some(t) if !t.is_empty() => t.to_string(),
            _ => bail!(
                "{}: the file stores no self-test text; pass one with --text",
                path.display()
            ),
        },
    };
    if let Some(r) = record
        && !(r.value.is_finite() && r.value > 0.0)
    {
        bail!(
            "{}: the stored self-test figure {} is not a perplexity (a finite number > 0); the file is unusable",
            path.display(),
            r.value
        );
    }
    let ctx = ctx.or(record.map(|r| r.ctx as usize)).unwrap_or(512);
    let max_windows = max_windows.or(record.map(|r| r.windows as usize));
    check_ctx(ctx, &model.config)?;
    check_memory(&model.config, ctx, kv, max_memory)?;
    let tokens = tok.encode(&body, true);
    // The stored figure's own settings must be met by its own text: otherwise fewer
    // windows would be scored and the self-test would silently compare nothing.
    if let Some(r) = record
        && text.is_none()
        && ctx == r.ctx as usize
        && max_windows == Some(r.windows as usize)
        && (r.windows == 0 || tokens.len() / ctx < r.windows as usize)
    {
        bail!(
            "{}: the stored self-test figure was measured on {} windows of {ctx} tokens, but the stored text has {} tokens; the file is unusable",
            path.display(),
            r.windows,
            tokens.len()
        );
    }
    let opts = PplOptions {
        ctx,
        protocol: Protocol::LlamaCpp,
        max_windows,
        bos: tok.bos_id().filter(|_| tok.adds_bos()),
        kv,
    };
    // The decode check's tokens: the first of the first window. A text shorter than
    // one window is refused by `perplexity` (which runs first) with its own message.
    let n_check = decode_check_tokens.min(ctx.min(tokens.len()).saturating_sub(1));
    let window = &tokens[..(n_check + 1).min(tokens.len())];
    let progress = |_: usize, _: usize| {
        if !json {
            eprint!(".");
        }
    };
    let (report, secs, decode_diff, gpu) = match device {
        DeviceArg::Cpu | DeviceArg::Auto => {
            let m = measure(&model, th, &tokens, &opts, window, progress)?;
            (m.0, m.1, m.2, None)
        }
        DeviceArg::Cuda => {
            let (m, gpu) = on_gpu(&model, |g| measure(g, th, &tokens, &opts, window, progress))?;
            (m.0, m.1, m.2, gpu)
        }
    };
    if !json {
        eprintln!();
    }
    let total = report.total;
    let n_windows = report.window_nll_mean.len();
    let decode_ok = decode_diff <= DECODE_CHECK_TOL;
    let ppl = total.ppl();
    let comparable = record.filter(|r| {
        text.is_none()
            && r.ctx as usize == ctx
            && r.windows as usize == n_windows
            && kv == KvDtype::F32
    });
    let rel = comparable.map(|r| (ppl - r.value).abs() / r.value);
    let pass = rel.map(|d| d <= SELFTEST_REL_TOLERANCE && decode_ok);
    let v = json!({
        "file": path.display().to_string(),
        "ppl": ppl,
        "ppl_stderr": total.ppl_stderr(),
        "protocol": "llama-cpp",
        "ctx": ctx,
        "windows": n_windows,
        "tokens_scored": total.count,
        "stored_ppl": comparable.map(|r| r.value),
        "relative_difference": rel,
        "tolerance": SELFTEST_REL_TOLERANCE,
        "pass": pass,
        "decode_check_tokens": n_check,
        "decode_check_max_nll_diff": decode_diff,
        "decode_check_tolerance": DECODE_CHECK_TOL,
        "decode_check_pass": decode_ok,
        "kv": match kv { KvDtype::F32 => "f32", KvDtype::F16 => "f16" },
        "threads": th,
        "kernels": cpu::kernels().isa.name(),
        "device": if device == DeviceArg::Cuda { "cuda" } else { "cpu" },
        "gpu": gpu,
        "tokens_per_s": (n_windows * ctx) as f64 / secs,
        "seconds": secs,
        "file_bytes": bytes.len(),
        "kv_cache_bytes": KvCache::bytes_for(&model.config, ctx, kv),
        "peak_rss_bytes": peak_rss(),
    });
    if json {
        println!("{v}");
    } else {
        let err = total
            .ppl_stderr()
            .map(|e| format!(" ± {e:.4}"))
            .unwrap_or_default();
        println!(
            "PPL {ppl:.4}{err} (llama.cpp rule, ctx {ctx}, {} windows, {} tokens scored, {:.1} tokens/s, {th} threads, {} kernels)",
            n_windows,
            total.count,
            (n_windows * ctx) as f64 / secs,
            match &gpu {
                Some(g) => format!("linears on {g}, the rest on {}", cpu::kernels().isa.name()),
                None => cpu::kernels().isa.name().to_string(),
            }
        );
        match (comparable, rel, pass) {
            (Some(r), Some(d), Some(ok)) => println!(
                "stored figure {:.4}: relative difference {d:.2e} (tolerance {SELFTEST_REL_TOLERANCE:.0e}): {}",
                r.value,
                if ok { "PASS" } else { "FAIL" }
            ),
            _ => println!("no stored figure for these settings: nothing to compare"),
        }
        println!(
            "decode check ({} tokens one at a time vs batched): largest NLL difference {decode_diff:.2e} (tolerance {DECODE_CHECK_TOL:.0e}): {}",
            n_check,
            if decode_ok { "PASS" } else { "FAIL" }
        );
    }
    Ok(if pass == Some(false) || !decode_ok {
        EXIT_MISMATCH
    } else {
        0
    })
}

/// `--device auto` made definite: the GPU when this binary has `cuda` and a GPU is
/// usable, else the CPU (saying why on stderr when built with `cuda`).
fn resolve_device(d: DeviceArg) -> DeviceArg {
    if d != DeviceArg::Auto {
        return d;
    }
    #[cfg(feature = "cuda")]
    {
        match cap_kernels::cuda::probe() {
            Ok(_) => DeviceArg::Cuda,
            Err(u) => {
                eprintln!("{u}; running on the CPU");
                DeviceArg::Cpu
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    DeviceArg::Cpu
}

/// The self-test's two measurements on `model`: the perplexity of `tokens` under
/// `opts` (with the seconds it took) and the decode check over `window`.
fn measure<L: Linear, E: Embedding>(
    model: &Model<L, E>,
    th: usize,
    tokens: &[u32],
    opts: &PplOptions,
    window: &[u32],
    progress: impl FnMut(usize, usize) + Send,
) -> Result<(PplReport, f64, f64)> {
    let start = Instant::now();
    let report = par::install(|| perplexity(model, th, tokens, opts, progress))?;
    let secs = start.elapsed().as_secs_f64();
    let runner = Runner::new(model, opts.ctx, th);
    let diff = par::install(|| decode_check(&runner, window, opts.kv)).context("decode check")?;
    Ok((report, secs, diff))
}

/// Largest |NLL difference| over the tokens of `window` (but its last) between the batched
/// forward pass and decoding one token at a time with a fresh cache.
fn decode_check<L: Linear, E: Embedding>(
    runner: &Runner<'_, L, E>,
    window: &[u32],
    kv: KvDtype,
) -> Result<f64, cap_device::forward::ForwardError> {
    let n = window.len().saturating_sub(1);
    if n == 0 {
        return Ok(0.0);
    }
    let c = &runner.model().config;
    let mut cache = KvCache::new(c, n, kv);
    let mut hidden = Vec::new();
    runner.forward_with(&window[..n], &mut cache, &mut Workspace::new(), &mut hidden)?;
    let batched = runner.nll(&hidden, &window[1..=n]);
    let mut cache = KvCache::new(c, n, kv);
    let mut ws = Workspace::new();
    let mut worst = 0.0f64;
    for (i, want) in batched.iter().enumerate() {
        let logits = runner.next_logits(&window[i..i + 1], &mut cache, &mut ws)?;
        let nll =
            cap_kernels::vexp::log_sum_exp(logits) - f64::from(logits[window[i + 1] as usize]);
        worst = worst.max((nll - want).abs());
    }
    Ok(worst)
}

/// `logits` when every one is a number: sampling NaN logits picked token 0 forever.
fn finite(logits: &[f32]) -> Result<&[f32]> {
    if logits.iter().all(|x| x.is_finite()) {
        Ok(logits)
    } else {
        bail!(
            "the model's logits are not finite (NaN or infinite): a weight or setting of the file is broken"
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn generate(
    path: &Path,
    prompt: &str,
    n: usize,
    cfg: SamplerConfig,
    ctx: usize,
    threads_arg: Option<usize>,
    (kv, max_memory): (KvDtype, Option<u64>),
    (device, json): (DeviceArg, bool),
) -> Result<u8> {
    if !cfg.temperature.is_finite() || cfg.temperature < 0.0 {
        bail!("--temp must be a finite number ≥ 0 (0 = greedy)");
    }
    if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let th = threads(threads_arg)?;
    let device = resolve_device(device);
    let bytes = map(path)?;
    let file = open(path, &bytes)?;
    let model = load_model(path, &file)?;
    let tok = tokenizer(path, file.manifest())?;
    let ids = tok.encode(prompt, true);
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    if ids.len() > ctx {
        bail!(
            "the prompt is {} tokens, longer than the context of {ctx} (raise --ctx or shorten it)",
            ids.len()
        );
    }
    let ctx = ctx.min(ids.len().saturating_add(n));
    check_ctx(ctx, &model.config)?;
    check_memory(&model.config, ctx, kv, max_memory)?;
    let job = Sampling {
        ids: &ids,
        n,
        ctx,
        kv,
        th,
        cfg,
        tok: &tok,
        json,
    };
    let (r, gpu) = match device {
        DeviceArg::Cpu | DeviceArg::Auto => (job.run(&model)?, None),
        DeviceArg::Cuda => on_gpu(&model, |g| job.run(g))?,
    };
    let Generated {
        out,
        decoded,
        prefill_s,
        decode_s,
        kv_bytes,
    } = r;
    let text = tok.decode(&out);
    let prefill_tps = ids.len() as f64 / prefill_s;
    let decode_tps = if decoded > 0 {
        decoded as f64 / decode_s
    } else {
        0.0
    };
    if json {
        let v = json!({
            "file": path.display().to_string(),
            "prompt_tokens": ids.len(),
            "generated_tokens": out.len(),
            "decoded_tokens": decoded,
            "tokens": out,
            "text": text,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
            "prefill_seconds": prefill_s,
            "decode_seconds": decode_s,
            "threads": th,
            "kernels": cpu::kernels().isa.name(),
            "kv": match kv { KvDtype::F32 => "f32", KvDtype::F16 => "f16" },
            "file_bytes": bytes.len(),
            "kv_cache_bytes": kv_bytes,
            "device": if device == DeviceArg::Cuda { "cuda" } else { "cpu" },
            "gpu": gpu,
            "weight_bytes_per_token": load::weight_bytes_per_token(&model),
            "peak_rss_bytes": peak_rss(),
        });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "prompt {} tokens: {prefill_tps:.1} tokens/s prefill; {} generated: {decode_tps:.1} tokens/s decode ({th} threads, {})",
            ids.len(),
            out.len(),
            match &gpu {
                Some(g) => format!(
                    "linears on {g}, the rest on {} kernels",
                    cpu::kernels().isa.name()
                ),
                None => format!("{} kernels", cpu::kernels().isa.name()),
            }
        );
    }
    Ok(0)
}

/// What [`Sampling::run`] produced.
struct Generated {
    /// The sampled tokens.
    out: Vec<u32>,
    /// Tokens decoded one at a time after the prefill.
    decoded: usize,
    prefill_s: f64,
    decode_s: f64,
    kv_bytes: u64,
}

/// What `generate` samples: the prompt's ids and the sampling settings.
struct Sampling<'a> {
    ids: &'a [u32],
    n: usize,
    ctx: usize,
    kv: KvDtype,
    th: usize,
    cfg: SamplerConfig,
    tok: &'a cap_device::tokenizer::Tokenizer,
    json: bool,
}

impl Sampling<'_> {
    /// Prefills the prompt and samples up to `n` tokens on `model`, streaming them
    /// unless `json`.
    fn run<L: Linear, E: Embedding>(&self, model: &Model<L, E>) -> Result<Generated> {
        let (ids, n, ctx, tok) = (self.ids, self.n, self.ctx, self.tok);
        let runner = Runner::new(model, ctx, self.th);
        let mut cache = KvCache::new(&model.config, ctx, self.kv);
        let mut ws = Workspace::new();
        let mut sampler = Sampler::new(self.cfg, model.config.vocab_size);
        let eos = tok.eos_id();
        let json = self.json;
        // The loop runs on a worker thread of the pool, where the kernels' parallel work
        // allocates nothing per token.
        let (out, decoded, prefill_s, decode_s) = par::install(|| -> Result<_> {
            let t0 = Instant::now();
            let mut next = sampler.sample(finite(
                runner
                    .next_logits(ids, &mut cache, &mut ws)
                    .context("prefill")?,
            )?);
            let prefill_s = t0.elapsed().as_secs_f64();
            let mut out = Vec::new();
            let mut stdout = std::io::stdout().lock();
            let t1 = Instant::now();
            let mut decoded = 0usize;
            while out.len() < n && Some(next) != eos {
                out.push(next);
                if !json {
                    stdout.write_all(tok.token_bytes(next))?;
                    stdout.flush()?;
                }
                if out.len() == n || cache.len() >= ctx {
                    break;
                }
                let logits = runner
                    .next_logits(&[next], &mut cache, &mut ws)
                    .context("decode")?;
                decoded += 1;
                next = sampler.sample(finite(logits)?);
            }
            Ok((out, decoded, prefill_s, t1.elapsed().as_secs_f64()))
        })?;
        Ok(Generated {
            out,
            decoded,
            prefill_s,
            decode_s,
            kv_bytes: cache.bytes(),
        })
    }
}

/// The model `on_gpu` hands to its closure: the file's linears on the GPU.
#[cfg(feature = "cuda")]
type GpuSide<'a> = cap_device::gpu::GpuModelInner<'a>;
/// Without `cuda` no GPU model is ever built; the type only lets callers compile.
#[cfg(not(feature = "cuda"))]
type GpuSide<'a> = cap_device::load::CapModel<'a>;

/// Runs `f` on `model` with its linear layers uploaded to the first CUDA GPU; returns
/// its result and the GPU's description. One line (exit status 2) when no GPU is
/// usable or a layer failed there.
#[cfg(feature = "cuda")]
fn on_gpu<'a, T>(
    model: &cap_device::load::CapModel<'a>,
    f: impl FnOnce(&GpuSide<'a>) -> Result<T>,
) -> Result<(T, Option<String>)> {
    use cap_kernels::cuda::{Gpu, probe};
    let info = probe().map_err(|u| anyhow::anyhow!("--device cuda: {u}"))?;
    let gpu = std::sync::Arc::new(Gpu::new().context("--device cuda")?);
    let g = cap_device::gpu::upload(&gpu, model).context("--device cuda: uploading the weights")?;
    let r = f(&g.model);
    if let Some(e) = g.error() {
        bail!("--device cuda: a layer failed on the GPU: {e}");
    }
    Ok((r?, Some(info.to_string())))
}

/// Without the `cuda` feature, `--device cuda` is an error.
#[cfg(not(feature = "cuda"))]
fn on_gpu<'a, T>(
    _: &cap_device::load::CapModel<'a>,
    _: impl FnOnce(&GpuSide<'a>) -> Result<T>,
) -> Result<(T, Option<String>)> {
    bail!(
        "--device cuda: this cap-device was built without the `cuda` feature (cargo build --features cuda)"
    )
}
