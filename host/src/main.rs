//! The `cap-host` command line.

mod cli;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cap_device::ppl::Protocol;
use cap_host::eval::{EvalOptions, evaluate, read_text};
use cap_host::import::Checkpoint;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

/// cap: compress large language models for edge boards and run them there.
#[derive(Parser)]
#[command(name = "cap-host", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    /// SparseGPT/Wanda: non-overlapping windows, all but each window's first token scored.
    Standard,
    /// llama.cpp's llama-perplexity: only the second half of each window scored, ± stderr.
    LlamaCpp,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    /// IEEE half precision: half the bytes of f32, 11-bit mantissa.
    F16,
    /// bfloat16: half the bytes of f32, f32's range, 8-bit mantissa.
    Bf16,
    /// Single precision: exact for imported f32 weights, twice the bytes.
    F32,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a model on a text, computed with the device's forward pass.
    Eval {
        /// A GGUF file, a Hugging Face checkpoint directory or a `.cap` file.
        #[arg(long)]
        model: PathBuf,
        /// The text to score (UTF-8). A WikiText `.raw` file is used as-is unless --wikitext.
        #[arg(long)]
        text: PathBuf,
        /// Window length in tokens [default: 2048 for standard, 512 for llama-cpp].
        #[arg(long)]
        ctx: Option<usize>,
        /// Which tokens of each window are scored.
        #[arg(long, value_enum, default_value = "standard")]
        protocol: ProtocolArg,
        /// Evaluate only the first K windows.
        #[arg(long, value_name = "K")]
        max_windows: Option<usize>,
        /// Build the text as the papers' code does from the HF `wikitext` dataset: one row
        /// per line (whitespace-only rows empty), rows joined with "\n\n".
        #[arg(long)]
        wikitext: bool,
        /// Worker threads [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Token ids of a text under a model's tokenizer (one JSON array).
    Tokenize {
        /// A GGUF file, a Hugging Face checkpoint directory or a `.cap` file.
        #[arg(long)]
        model: PathBuf,
        /// The text (UTF-8).
        #[arg(long)]
        text: PathBuf,
        /// Prepend BOS when the tokenizer adds one.
        #[arg(long)]
        add_special: bool,
    },
    /// Architecture, dimensions, parameter counts and bytes per tensor group of a model
    /// (GGUF, Hugging Face directory, or `.cap` file: then also encodings, compression
    /// and provenance records).
    Inspect {
        /// A GGUF file, a Hugging Face checkpoint directory or a `.cap` file.
        path: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Writes a model uncompressed (dense) into a `.cap` file with its tokenizer: the
    /// baseline compressed files are compared with. The write is atomic: an interrupted
    /// pack leaves no `.cap` behind.
    Pack {
        /// A GGUF file or a Hugging Face checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// The `.cap` file to write (replaced if it exists). Only a regular file: a
        /// directory, device or FIFO is refused; a symbolic link is written through,
        /// atomically, to the file it names (the link stays).
        #[arg(short, long, value_name = "FILE.cap")]
        output: PathBuf,
        /// Storage type of the weight matrices (norms and biases stay f32).
        #[arg(long, value_enum, default_value = "f16")]
        dtype: DTypeArg,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Robust PCA of every linear weight (W = L + S, inexact ALM), cached per matrix
    /// under --out: a rerun or an interrupted run resumes, skipping finished matrices.
    Decompose(cli::rpca::DecomposeArgs),
    /// Rank of L, density of S and the energy split of one weight against
    /// --lambda-scale (0.5 … 16) and against iterations (1, 2, 3, 5, 10).
    RpcaSweep(cli::rpca::RpcaSweepArgs),
    /// Perplexity of a model whose linear weights are replaced by L + S from a
    /// decompose cache (the evidence for the iteration count and λ): every linear must
    /// be cached with the given settings.
    RpcaEval(cli::rpca::RpcaEvalArgs),
    /// Compresses a model under a budget (a device profile, a file size or the paper's
    /// ratio) and writes a `.cap` file measured on held-out text: CAP (RPCA + learned
    /// allocation) or a one-shot baseline (magnitude, wanda, svd).
    Compress(Box<cli::compress::CompressArgs>),
    /// Puts a board's `cap-device`, a `.cap` file, a manifest (`bundle.json`) and
    /// `run.sh` into one folder, after checking the file fits the board's memory.
    Bundle(cli::flash::BundleArgs),
    /// Copies a bundle onto boards over ssh (resumably), verifies sha256 there,
    /// switches to it atomically, runs its self-test and rolls back when that fails.
    Flash(cli::flash::FlashArgs),
    /// What each board has installed: version, cap version, last self-test verdict.
    Boards(cli::flash::BoardArgs),
    /// Seconds per matrix of the RPCA solve on random matrices of given shapes.
    BenchRpca(cli::rpca::BenchRpcaArgs),
    /// Writes a random LLaMA checkpoint (Hugging Face folder: config.json, bf16
    /// safetensors shards, index, tokenizer) of a chosen size, for testing memory and
    /// speed at scale.
    ///
    /// The weights are noise (std 0.02, deterministic from --seed): the model's
    /// perplexity is meaningless; its shapes, tensor names and bytes are a real
    /// checkpoint's. Written streaming (a few MB of memory whatever the size) and
    /// atomically (into DIR.tmp-PID, then renamed).
    RandomModel(cli::randmodel::RandomModelArgs),
    /// The device profiles a budget can target (`targets/*.toml`, plus a folder of your
    /// own): memory, memory reserved for the OS and runtime, bandwidth, CPU, GPU, Rust
    /// target and preferred storage dtype.
    Targets {
        /// A folder of extra `NAME.toml` profiles (same fields; a name that exists
        /// replaces the built-in profile).
        #[arg(long, value_name = "DIR")]
        targets_dir: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Checks a `.cap` file completely: header, manifest, directory, every section's
    /// checksum and sparse structure. Exit status 0 when sound, 1 with the first
    /// problem otherwise.
    Verify {
        /// The `.cap` file.
        path: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Refuses a model path that is neither a regular file nor a directory: opening a FIFO
/// would block until a writer came, and a device is no model. A missing path is left to
/// the reader, whose message names it.
fn check_input(path: &std::path::Path) -> Result<()> {
    if let Ok(m) = std::fs::metadata(path)
        && !m.is_file()
        && !m.is_dir()
    {
        anyhow::bail!("{}: not a regular file or directory", path.display());
    }
    Ok(())
}

/// Whether `path` looks like a `.cap` file (by extension, or by magic for other names).
fn is_cap_file(path: &std::path::Path) -> bool {
    if path.extension().is_some_and(|e| e == "cap") {
        return true;
    }
    // Opening a FIFO to read its magic would block until a writer came.
    if !path.is_file() {
        return false;
    }
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == cap_format::MAGIC
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("CAP_LOG"))
        .with_writer(std::io::stderr)
        .init();
    // Ctrl-C or SIGTERM must not leave half-written temporary files behind.
    if let Err(e) = cap_host::tempfiles::install_signal_cleanup() {
        tracing::warn!(
            "cannot watch for signals ({e}); an interrupted write may leave a temporary file"
        );
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A progress bar on stderr when it is a terminal, hidden otherwise (logs and pipes).
fn progress_bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Eval { model, .. }
        | Command::Tokenize { model, .. }
        | Command::Pack { model, .. } => check_input(model)?,
        Command::Inspect { path, .. } | Command::Verify { path, .. } => check_input(path)?,
        Command::Compress(a) => check_input(&a.model)?,
        _ => {}
    }
    match cli.command {
        Command::Eval {
            model,
            text,
            ctx,
            protocol,
            max_windows,
            wikitext,
            threads,
            json,
        } => {
            let protocol = match protocol {
                ProtocolArg::Standard => Protocol::Standard,
                ProtocolArg::LlamaCpp => Protocol::LlamaCpp,
            };
            let ctx = ctx.unwrap_or(match protocol {
                Protocol::Standard => 2048,
                Protocol::LlamaCpp => 512,
            });
            // 0 keeps meaning what it always did here (one worker); only the top is new.
            let threads = threads_or_all(threads.map(|t| t.max(1)))?;
            cap_kernels::par::init_threads(threads);
            let body = read_text(&text, wikitext)?;
            let opts = EvalOptions {
                ctx,
                protocol,
                max_windows,
                threads,
            };
            let pb = progress_bar(0, "eval");
            let progress = |done: usize, total: usize| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            };
            let text_name = text.display().to_string();
            // A .cap file runs in place through the board's runtime (cap-device's
            // loader and kernels), so the host measures what the board computes.
            let report = if is_cap_file(&model) {
                let map = cap_host::capmodel::map(&model)?;
                let file = cap_host::capmodel::parse_verified(&model, &map)?;
                let m = cap_host::capmodel::model(&model, &file)?;
                check_ctx(ctx, &m.config)?;
                let tokenizer = cap_host::capmodel::tokenizer(&model, file.manifest())?;
                evaluate(&m, &tokenizer, &body, &text_name, &opts, progress)?
            } else {
                let ck = Checkpoint::open(&model)?;
                let tokenizer = ck.tokenizer()?;
                let m = ck
                    .load_model()
                    .with_context(|| format!("loading {}", model.display()))?;
                check_ctx(ctx, &m.config)?;
                evaluate(&m, &tokenizer, &body, &text_name, &opts, progress)?
            };
            pb.finish_and_clear();
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["model"] = model.display().to_string().into();
                v["text"] = text.display().to_string().into();
                v["wikitext"] = wikitext.into();
                println!("{v}");
            } else {
                let err = report
                    .ppl_stderr
                    .map(|e| format!(" ± {e:.4}"))
                    .unwrap_or_default();
                println!(
                    "PPL {:.4}{err}  ({} protocol, ctx {}, {} windows, {} tokens scored, {:.1} tokens/s, {} threads)",
                    report.ppl,
                    report.protocol,
                    report.ctx,
                    report.windows,
                    report.tokens_scored,
                    report.tokens_per_s,
                    report.threads
                );
            }
        }
        Command::Tokenize {
            model,
            text,
            add_special,
        } => {
            let body = read_text(&text, false)?;
            let tokenizer = if is_cap_file(&model) {
                let map = cap_host::capmodel::map(&model)?;
                let file = cap_host::capmodel::parse_verified(&model, &map)?;
                cap_host::capmodel::tokenizer(&model, file.manifest())?
            } else {
                Checkpoint::open(&model)?.tokenizer()?
            };
            println!(
                "{}",
                serde_json::to_string(&tokenizer.encode(&body, add_special))?
            );
        }
        Command::Inspect { path, json } if is_cap_file(&path) => {
            let r = cap_host::capinfo::inspect_cap_file(&path)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", cap_host::capinfo::render(&r));
            }
        }
        Command::Inspect { path, json } => {
            let ck = Checkpoint::open(&path)?;
            let r = cap_host::inspect::inspect(&ck)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", cap_host::inspect::render(&r));
            }
        }
        Command::Pack {
            model,
            output,
            dtype,
            json,
        } => {
            let dtype = match dtype {
                DTypeArg::F16 => cap_format::DType::F16,
                DTypeArg::Bf16 => cap_format::DType::BF16,
                DTypeArg::F32 => cap_format::DType::F32,
            };
            cap_host::outputs::prepare(&output)?;
            let ck = Checkpoint::open(&model)?;
            let sha = cap_host::pack::source_sha256(&model)?;
            let source = model.file_name().map_or_else(
                || model.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            let r = cap_host::pack::pack(&ck, &output, dtype, &source, &sha)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "wrote {}: {} bytes ({} tensors, {} parameters, {}{})",
                    r.path,
                    r.file_bytes,
                    r.tensors,
                    r.params,
                    r.dtype,
                    if r.tokenizer {
                        ", with tokenizer"
                    } else {
                        ", no tokenizer"
                    }
                );
            }
        }
        Command::Decompose(a) => cli::rpca::decompose(a)?,
        Command::RpcaSweep(a) => cli::rpca::rpca_sweep(a)?,
        Command::RpcaEval(a) => cli::rpca::rpca_eval(a)?,
        Command::Compress(a) => cli::compress::run(*a)?,
        Command::BenchRpca(a) => cli::rpca::bench_rpca(a)?,
        Command::RandomModel(a) => cli::randmodel::run(a)?,
        Command::Bundle(a) => cli::flash::bundle(a)?,
        Command::Flash(a) => cli::flash::flash(a)?,
        Command::Boards(a) => cli::flash::boards(a)?,
        Command::Targets { targets_dir, json } => {
            let all = cap_host::targets::load_all(targets_dir.as_deref())?;
            if json {
                let rows: Vec<_> = all
                    .iter()
                    .map(|p| {
                        let mut v = serde_json::to_value(p).unwrap_or_default();
                        v["usable_bytes"] = p.usable_bytes().into();
                        v
                    })
                    .collect();
                println!("{}", serde_json::json!({ "targets": rows }));
            } else {
                const GIB: f64 = (1u64 << 30) as f64;
                println!(
                    "{:<24} {:>8} {:>9} {:>8} {:>8}  {:<28} {:<8} dtype",
                    "target", "memory", "reserved", "usable", "GB/s", "cpu", "gpu"
                );
                for p in &all {
                    println!(
                        "{:<24} {:>6.1}Gi {:>7.2}Gi {:>6.2}Gi {:>8.1}  {:<28} {:<8} {}",
                        p.name,
                        p.total_memory_bytes as f64 / GIB,
                        p.reserved_bytes as f64 / GIB,
                        p.usable_bytes() as f64 / GIB,
                        p.memory_bandwidth_gbps,
                        format!("{}x {}", p.cpu_cores, p.cpu_model),
                        p.gpu.as_ref().map_or("none".to_string(), |g| format!(
                            "sm_{}",
                            g.cuda_compute_capability.replace('.', "")
                        )),
                        p.preferred_dtype.as_str()
                    );
                }
            }
        }
        Command::Verify { path, json } => {
            let r = cap_host::capinfo::verify_cap_file(&path)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{}: ok ({} tensors, {} section bytes checked, {} bytes)",
                    path.display(),
                    r.tensors,
                    r.tensor_bytes,
                    r.file_bytes
                );
            }
        }
    }
    Ok(())
}

/// Refuses `eval --ctx` beyond the model's positions ([`cap_host::eval::check_ctx`],
/// shared with `compress --eval-ctx` and `--calib-len`).
fn check_ctx(ctx: usize, c: &cap_device::config::Config) -> Result<()> {
    Ok(cap_host::eval::check_ctx(ctx, c, "--ctx")?)
}

/// `--threads` or every core, at least 1 and at most [`cap_kernels::par::MAX_THREADS`].
fn threads_or_all(threads: Option<usize>) -> Result<usize> {
    use cap_kernels::par::MAX_THREADS;
    match threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(t) if t > MAX_THREADS => {
            anyhow::bail!("--threads {t} is more than the most cap runs, {MAX_THREADS}")
        }
        Some(t) => Ok(t),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}
