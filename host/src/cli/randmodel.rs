//! `cap-host random-model`: the command-line side of [`cap_host::randmodel`].

use std::path::PathBuf;

use anyhow::{Result, bail};
use cap_host::randmodel::{RandomSpec, parse_param_count, write_random_llama_with_progress};
use indicatif::ProgressStyle;

use crate::progress_bar;

/// `cap-host random-model`.
#[derive(clap::Args)]
pub struct RandomModelArgs {
    /// Parameter count: `1b` (TinyLlama's shapes), `3b` (OpenLLaMA-3B's), `7b`, `13b`,
    /// or any count such as `50m`, `1.1b`, `125000000` (LLaMA-like shapes scaled to it).
    #[arg(long, value_name = "COUNT", value_parser = parse_count)]
    params: u64,
    /// The checkpoint folder to create (it must not exist, or be empty).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Seed of the weights: the same seed and size give the same bytes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// Largest shard in MB (10^6 bytes) of tensor data; a larger tensor gets a shard
    /// of its own.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    shard_mb: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_count(s: &str) -> Result<u64, String> {
    parse_param_count(s).map_err(|e| e.to_string())
}

/// Runs `cap-host random-model`.
pub fn run(a: RandomModelArgs) -> Result<()> {
    if a.shard_mb == 0 {
        bail!("--shard-mb must be at least 1");
    }
    let spec = RandomSpec {
        seed: a.seed,
        shard_bytes: a.shard_mb.saturating_mul(1_000_000),
        ..RandomSpec::for_params(a.params)
    };
    let pb = progress_bar(2 * spec.params(), "random-model");
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let summary = write_random_llama_with_progress(&a.output, &spec, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    if a.json {
        let v = serde_json::json!({
            "dir": a.output.display().to_string(),
            "params": summary.params,
            "bytes": summary.bytes,
            "shards": summary.shards,
            "spec": spec,
        });
        println!("{v}");
    } else {
        println!(
            "wrote {}: {} parameters, {} bytes in {} shard{} (random LLaMA: hidden {}, \
             intermediate {}, {} layers, {}/{} heads, vocab {}{}, seed {})",
            a.output.display(),
            summary.params,
            summary.bytes,
            summary.shards,
            if summary.shards == 1 { "" } else { "s" },
            spec.hidden,
            spec.intermediate,
            spec.layers,
            spec.heads,
            spec.kv_heads,
            spec.vocab,
            if spec.tie_embeddings { ", tied" } else { "" },
            spec.seed
        );
    }
    Ok(())
}
