//! The `cap-host` command line.

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

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a model on a text, computed with the device's forward pass.
    Eval {
        /// A GGUF file or a Hugging Face checkpoint directory.
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
        /// A GGUF file or a Hugging Face checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// The text (UTF-8).
        #[arg(long)]
        text: PathBuf,
        /// Prepend BOS when the tokenizer adds one.
        #[arg(long)]
        add_special: bool,
    },
    /// Architecture, dimensions, parameter counts and bytes per tensor group of a model.
    Inspect {
        /// A GGUF file or a Hugging Face checkpoint directory.
        path: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("CAP_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

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
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            cap_kernels::par::init_threads(threads);
            let body = read_text(&text, wikitext)?;
            let ck = Checkpoint::open(&model)?;
            let tokenizer = ck.tokenizer()?;
            let m = ck
                .load_model()
                .with_context(|| format!("loading {}", model.display()))?;
            let opts = EvalOptions {
                ctx,
                protocol,
                max_windows,
                threads,
            };
            let pb = progress_bar(0, "eval");
            let report = evaluate(
                &m,
                &tokenizer,
                &body,
                &text.display().to_string(),
                &opts,
                |done, total| {
                    pb.set_length(total as u64);
                    pb.set_position(done as u64);
                },
            )?;
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
            let tokenizer = Checkpoint::open(&model)?.tokenizer()?;
            println!(
                "{}",
                serde_json::to_string(&tokenizer.encode(&body, add_special))?
            );
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
    }
    Ok(())
}
