//! `cap-host compress`: stage 1 + stage 2 (or a one-shot baseline) under a budget, the
//! `.cap` file written and measured.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Result, bail};
use cap_format::DType;
use cap_host::compress::budget::{Budget, BudgetSpec};
use cap_host::compress::distill::{DistillOptions, Schedule};
use cap_host::compress::joint::LowrankFit;
use cap_host::compress::methods::{Allocation, Method, Variant};
use cap_host::compress::pattern::Pattern;
use cap_host::compress::qvalues::Quantizer;
use cap_host::compress::reconstruct::{ReconOptions, Step};
use cap_host::compress::reinforce::ReinforceOptions;
use cap_host::compress::run::{
    CompressOptions, CompressReport, Event, Outcome, Plan, compress, default_cache_dir,
};
use cap_host::targets::Dtype;
use indicatif::ProgressBar;

use super::rpca::SolverArgs;
use crate::{DTypeArg, progress_bar, threads_or_all};

/// Arguments of `cap-host compress`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("limit").required(true).args(["target", "budget", "ratio", "pattern"])))]
pub struct CompressArgs {
    /// A GGUF file or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The `.cap` file to write (written atomically: nothing appears on failure). Only a
    /// regular file: a directory, device or FIFO is refused before any work; a symbolic
    /// link is written through, atomically, to the file it names (the link stays).
    /// Not needed with --shard, which writes no file.
    #[arg(long, short = 'o', required_unless_present = "shard")]
    pub out: Option<PathBuf>,
    /// A device profile (see `cap-host targets`): the file, the KV cache for --ctx ×
    /// --batch tokens, the forward pass's scratch and the runtime must fit its usable
    /// memory (a KV cache that alone does not fit is refused before any work).
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
    /// A folder of extra `NAME.toml` device profiles.
    #[arg(long, value_name = "DIR")]
    pub targets_dir: Option<PathBuf>,
    /// Context length the board must serve (KV cache and scratch), with --target.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Sequences served at once, with --target.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// With --target: the board must decode at least N tokens per second (per
    /// sequence). Decoding is memory-bound, so this caps the bytes a token reads: the
    /// compressed linears, the output head, norms and the KV cache at half of --ctx,
    /// streamed at 0.4 of the profile's memory bandwidth (a planning figure; see the
    /// README). The tighter of this and the memory limit wins.
    #[arg(long, value_name = "N")]
    pub min_tokens_per_s: Option<f64>,
    /// The written file must be at most this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub budget: Option<u64>,
    /// The CAP paper's budget: kept parameters (m+n per singular value, 1 per sparse
    /// entry) ≤ R × the linears' dense parameters; R in (0, 1].
    #[arg(long, value_name = "R")]
    pub ratio: Option<f64>,
    /// N:M structured sparsity instead of a budget: every pruned linear keeps at most N
    /// of every M consecutive weights of a row (2:4 is what NVIDIA's sparse tensor cores
    /// run; M a power of two up to 64), so each layer's sparsity is 1 − N/M. For the
    /// pruning methods (cap: ADMM projected onto the pattern; sparsegpt, wanda: their
    /// N:M modes; magnitude; admm), with any --values but auto.
    #[arg(long, value_name = "N:M")]
    pub pattern: Option<Pattern>,
    /// What is kept of each linear: `cap` (RPCA L + S, allocated globally) or a
    /// one-shot baseline at the same accounting.
    #[arg(long, value_enum, default_value = "cap")]
    pub method: Method,
    /// Which CAP: `cap` (the budget allocated across layers from measured calibration
    /// losses, each layer pruned by ADMM with an exact refit) or `paper` (RPCA `L + S`
    /// and the paper's allocation, see --allocation).
    #[arg(long, value_enum, default_value = "cap")]
    pub variant: Variant,
    /// `--variant cap`: spend this share (0–0.9) of every linear's kept parameters on a
    /// low-rank part fit to what pruning removes [default: the allocation search tries
    /// 0, 0.1 and 0.2 and keeps what the calibration loss prefers].
    #[arg(long, value_name = "X")]
    pub lowrank_share: Option<f64>,
    /// `--variant cap`: how a low-rank part is fit: `residual` (prune, then fit `L` to
    /// what pruning removed, scaled by the inputs' norms) or `joint` (alternate ADMM's
    /// sparse step on `W − L` and the exact rank step against the layer's full
    /// reconstruction loss, --lowrank-rounds times).
    #[arg(long, value_enum, default_value = "residual")]
    pub lowrank_fit: LowrankFit,
    /// `--lowrank-fit joint`: sparse/rank rounds per linear (each one ADMM run; the
    /// lowest-loss pair is kept).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub lowrank_rounds: usize,
    /// `--method cap` and `admm`: passes of exact 1-swaps on each linear's mask after
    /// ADMM (prune one kept weight and restore one pruned one where that lowers the
    /// layer's calibration loss), each followed by the refit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub swap_passes: usize,
    /// How `--variant paper` allocates: learned (REINFORCE + global top-K) or the
    /// uniform threshold ablation.
    #[arg(long, value_enum, default_value = "reinforce")]
    pub allocation: Allocation,
    /// Storage dtype of the tensors kept dense (embedding, an untied head), and of the
    /// compressed linears unless --values says otherwise [default: the target's
    /// preferred dtype, else f16].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Value type of the compressed linears (sparse values, dense layers, low-rank
    /// factors): a float type, or q8 (symmetric 8-bit codes) / q4 (asymmetric 4-bit
    /// codes) with one f16 scale (q4: and one f16 minimum) per --group values of a row,
    /// or auto (cap's allocation picks q4, q8 or f16 per linear by calibration loss)
    /// [default: --dtype's]. The embedding and an untied head: see --embed-values; the
    /// norms stay f32.
    #[arg(long, value_enum)]
    pub values: Option<ValuesArg>,
    /// Value type of the token embedding and an untied output head (each row rounded
    /// to nearest, --group values a group; auto, with --values auto: q8 or q4, whichever
    /// the allocation's calibration loss prefers under the budget) [default: q8 when
    /// --values is quantized, else --dtype's]. On a small model with a large vocabulary the tied head is the
    /// largest tensor and is read for every token; llama.cpp likewise keeps it at 6 to
    /// 8 bits in its 4-bit files.
    #[arg(long, value_enum, value_name = "VALUES")]
    pub embed_values: Option<ValuesArg>,
    /// Values per quantization group with --values q8|q4: a multiple of 16 in
    /// 16..=256 (64: 4.5 bits per q4 value, 8.25 per q8 value).
    #[arg(long, value_name = "G")]
    pub group: Option<u16>,
    /// How quantized values are chosen: gptq (each layer's kept weights quantized
    /// right after pruning with its input Hessian, by the methods that have one: cap,
    /// sparsegpt, admm; the others round to nearest) or rtn (round to nearest).
    #[arg(long, value_enum, default_value = "gptq")]
    pub quantizer: Quantizer,
    /// Calibration text: plain text, or JSON lines with a `text` field (the C4 layout).
    /// Never calibrate on the text you evaluate on. Without it, calibration is
    /// data-free: the model writes --calib-samples × --calib-len tokens itself (seeded
    /// nucleus sampling from its BOS token, all sequences at once; cached in
    /// ~/.cache/cap/selfcalib per model and recipe).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Calibration sequences (the papers use 128; 32 keeps a 2-core CPU within minutes),
    /// drawn from --calib's text at seeded random offsets, so they may overlap; but
    /// --calib-samples × --calib-len may not exceed the text's tokens (nor 2^20).
    #[arg(long, default_value_t = 32)]
    pub calib_samples: usize,
    /// Tokens per calibration sequence (the papers use 2048): at least 2, at most the
    /// model's positions (each sequence runs from position 0) and the calibration
    /// text's tokens.
    #[arg(long, default_value_t = 256)]
    pub calib_len: usize,
    /// Seed of the calibration sample and of the masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Held-out text to measure the result on and store for the board's self-test
    /// [default: WikiText-2 validation, shipped with cap; the C4 sample when --calib is
    /// that very text].
    #[arg(long, value_name = "FILE")]
    pub eval_text: Option<PathBuf>,
    /// Build --eval-text as the papers do from the HF `wikitext` dataset.
    #[arg(long)]
    pub wikitext: bool,
    /// Window of the held-out perplexity (stored in the file for the board's self-test);
    /// at most the model's positions, as for `eval --ctx`.
    #[arg(long, default_value_t = 512)]
    pub eval_ctx: usize,
    /// Windows of the held-out perplexity.
    #[arg(long, default_value_t = 8)]
    pub eval_windows: usize,
    /// REINFORCE steps.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// REINFORCE step size on the keep-probabilities (small: with a loss advantage of a
    /// few nats, 0.05 pins every probability to 0 or 1 within two steps).
    #[arg(long, default_value_t = 0.002)]
    pub lr: f64,
    /// Calibration sequences per REINFORCE step.
    #[arg(long, default_value_t = 4)]
    pub step_samples: usize,
    #[command(flatten)]
    pub solver: SolverArgs,
    /// Stage 1's cache [default: ~/.cache/cap/rpca/<first 16 hex digits of the source's
    /// SHA-256>].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Skip measuring the source model on the same held-out windows.
    #[arg(long)]
    pub no_source_eval: bool,
    /// Print the budget (and what takes the memory) and stop; nothing is written.
    #[arg(long)]
    pub dry_run: bool,
    /// Read the checkpoint one block at a time (memory: one block in f32, the
    /// embedding and head, the calibration activations; not the model), keeping each
    /// compressed block in a block cache on disk until the file is assembled. For
    /// models larger than memory. Methods cap, sparsegpt and admm; needs --calib.
    #[arg(long)]
    pub stream: bool,
    /// With --stream: compute only the I-th of N contiguous slices of the blocks into
    /// the block cache and stop (1 <= I <= N), e.g. one per machine of a job array
    /// sharing --block-cache; then one run without --shard assembles the file from the
    /// cache without recomputing. Each shard starts from the source model's outputs at
    /// its first block.
    #[arg(long, value_name = "I/N", requires = "stream")]
    pub shard: Option<String>,
    /// With --stream: the block cache folder [default: ~/.cache/cap/blocks/<first 16
    /// hex digits of the run's key>]. Blocks of another model or other settings in it
    /// are refused.
    #[arg(long, value_name = "DIR", requires = "stream")]
    pub block_cache: Option<PathBuf>,
    /// With --stream: keep the block cache after the file is written (it is deleted by
    /// default).
    #[arg(long, requires = "stream")]
    pub keep_blocks: bool,
    /// Refuse, before loading anything, a run whose working set (estimated from the
    /// model's shapes and the calibration request: see the README) exceeds this
    /// (bytes, or with K/M/G/T, powers of 1024) [default: the machine's memory].
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// Block reconstruction after each block is pruned (cap, sparsegpt, admm; float
    /// values): the kept weights refit by gradient descent, masks fixed, so the pruned
    /// block reproduces the dense block's outputs. Steps, comma-separated, in order:
    /// attn (q, k, v, o against the residual after attention), mlp (gate, up, down
    /// against the block's output), block (all seven against the output); none to
    /// turn it off. Each step holds out the last eighth of the calibration sequences
    /// and keeps the epoch that did best on them (the starting weights included).
    /// [default: block for cap's method with float values (measured: 28.72 → 27.63 at
    /// ratio 0.5 on SmolLM2, see the README), none otherwise, so sparsegpt and admm stay
    /// the published methods unless asked]
    #[arg(long, value_name = "STEPS", value_parser = parse_steps)]
    pub reconstruct: Option<Steps>,
    /// Passes over the calibration sequences per reconstruction step.
    #[arg(long, value_name = "N", default_value_t = ReconOptions::default().epochs)]
    pub reconstruct_epochs: usize,
    /// Adam's step size in reconstruction, relative to each layer's kept-weight RMS.
    #[arg(long, value_name = "LR", default_value_t = ReconOptions::default().lr)]
    pub reconstruct_lr: f32,
    /// What reconstruction matches: block (the dense block applied to the pruned
    /// model's inputs) or model (the dense model's own outputs at that block:
    /// measured better for SparseGPT, 28.28 → 27.89, not yet for cap's default).
    #[arg(long, value_enum, default_value = "block")]
    pub reconstruct_target: ReconTarget,
    /// End-to-end distillation after every block is pruned (cap, sparsegpt, admm;
    /// float values; not streamed): this many passes over the calibration sequences
    /// refit all kept weights together, masks fixed, so the pruned model's next-token
    /// distribution matches the source model's (KL divergence, gradients through every
    /// block). Holds out the last eighth of the sequences and keeps the epoch that did
    /// best on them (the starting weights included). 0: off.
    #[arg(long, value_name = "N", default_value_t = DistillOptions::default().epochs)]
    pub distill_epochs: usize,
    /// Adam's step size in distillation, relative to each layer's kept-weight RMS.
    #[arg(long, value_name = "LR", default_value_t = DistillOptions::default().lr)]
    pub distill_lr: f32,
    /// Distillation's step size over the run: constant, or cosine (from --distill-lr
    /// at the first step down to zero after the last of all epochs).
    #[arg(long, value_enum, default_value = "constant")]
    pub distill_schedule: Schedule,
    /// Start from FILE's kept entries instead of pruning (a .cap compressed from
    /// --model with the --method, --pattern and budget given here): pruning is
    /// skipped, --distill-epochs refines the file's values (masks fixed), and the
    /// result is written to --out and measured as usual. With --distill-epochs 0 the
    /// file's layers are written again as they are.
    #[arg(long, value_name = "FILE.cap")]
    pub from: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `--reconstruct-target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReconTarget {
    /// The dense block on the pruned model's inputs.
    Block,
    /// The dense model's outputs at the block.
    Model,
}

/// `--reconstruct`'s steps, in order.
#[derive(Clone, Debug)]
pub struct Steps(pub Vec<Step>);

/// Parses `--reconstruct` (`none`: no reconstruction).
fn parse_steps(s: &str) -> std::result::Result<Steps, String> {
    if s.trim() == "none" {
        return Ok(Steps(vec![]));
    }
    Step::parse_list(s).map(Steps)
}

/// Value types of `--values`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ValuesArg {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// Single precision.
    F32,
    /// Symmetric 8-bit codes, one f16 scale per group.
    Q8,
    /// Asymmetric 4-bit codes, one f16 scale and one f16 minimum per group.
    Q4,
    /// cap's allocation chooses per linear among q4, q8 and f16 by the calibration
    /// loss, under the same byte budget (--method cap only).
    Auto,
}

/// The default `--group`: 64 values. For q4 that is 4.5 bits per value (g32: 5,
/// g128: 4.25) with llama.cpp-like accuracy; for q8 8.25 bits, where the scale
/// overhead (3%) matters more than the accuracy, which 8 bits already have. A sparse
/// row pads its last group, so smaller groups waste fewer bytes at moderate
/// sparsity; 64 is the middle.
pub const DEFAULT_GROUP: u16 = 64;

/// A `--values`-like argument as a value type (`None`: `default`), quantized types in
/// groups of `g`.
fn value_type(v: Option<ValuesArg>, g: u16, default: DType) -> DType {
    match v {
        None => default,
        Some(ValuesArg::F16) => DType::F16,
        Some(ValuesArg::Bf16) => DType::BF16,
        Some(ValuesArg::F32) => DType::F32,
        Some(ValuesArg::Q8) => DType::Q8 { group: g },
        // `auto` starts from q4, which the allocation lifts where bits pay.
        Some(ValuesArg::Q4 | ValuesArg::Auto) => DType::Q4 { group: g },
    }
}

/// The linears' value type (`--values`) and the embedding's (`--embed-values`), with
/// `--group`; `float` is the dense dtype.
fn values_of(a: &CompressArgs, float: DType) -> Result<(DType, DType)> {
    let g = a.group.unwrap_or(DEFAULT_GROUP);
    let values = value_type(a.values, g, float);
    let embed_default = if values.is_quantized() {
        DType::Q8 { group: g }
    } else {
        float
    };
    if a.embed_values == Some(ValuesArg::Auto) && a.values != Some(ValuesArg::Auto) {
        bail!(
            "--embed-values auto needs --values auto: the allocation that chooses the linears' bits chooses the embedding's"
        );
    }
    // Under auto the allocation starts from q8 and may take q4 instead.
    let embed = match a.embed_values {
        Some(ValuesArg::Auto) => embed_default,
        e => value_type(e, g, embed_default),
    };
    if a.group.is_some() && !values.is_quantized() && !embed.is_quantized() {
        bail!(
            "--group {g} needs quantized values (--values or --embed-values q8 or q4), not {values}"
        );
    }
    Ok((values, embed))
}

fn dtype_of(a: DTypeArg) -> DType {
    match a {
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F32 => DType::F32,
    }
}

/// Runs `cap-host compress`.
pub fn run(a: CompressArgs) -> Result<()> {
    let threads = threads_or_all(a.threads)?;
    cap_kernels::par::init_threads(threads);
    if !a.dry_run
        && let Some(out) = &a.out
    {
        cap_host::outputs::prepare(out)?;
    }
    // NaN passes every `<`/`>` test silently (a NaN step size ran REINFORCE with no
    // sampled items and exited 0), so the float flags are checked here, by name.
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("--lr must be a finite number > 0, got {}", a.lr);
    }
    if let Some(t) = a.min_tokens_per_s
        && !(t.is_finite() && t > 0.0)
    {
        bail!("--min-tokens-per-s must be a positive number, got {t}");
    }
    if a.min_tokens_per_s.is_some() && a.target.is_none() {
        bail!(
            "--min-tokens-per-s needs --target: the speed is predicted from a board's memory bandwidth"
        );
    }
    // The pattern's parameter ratio is its budget (clap allows only one of them); cap's
    // low-rank part on top of a pattern adds its share of the kept parameters.
    let on_top = match (a.method, a.variant, a.lowrank_share) {
        (Method::Cap, Variant::Cap, Some(x)) => x,
        _ => 0.0,
    };
    let ratio = a.pattern.map(|p| p.n as f64 / p.m as f64 * (1.0 + on_top));
    if let (Some(p), Some(r)) = (a.pattern, ratio)
        && r > 1.0
    {
        bail!(
            "--pattern {p} with --lowrank-share {on_top} keeps more parameters than the dense layers ({r:.2} of them)"
        );
    }
    let ratio = ratio.or(a.ratio);
    let (budget, preferred) = match (&a.target, a.budget, ratio) {
        (Some(t), None, None) => {
            let profile = cap_host::targets::find(t, a.targets_dir.as_deref())?;
            let d = match profile.preferred_dtype {
                Dtype::F16 => DType::F16,
                Dtype::Bf16 => DType::BF16,
                Dtype::F32 => DType::F32,
            };
            (
                BudgetSpec::Target {
                    profile: Box::new(profile),
                    ctx: a.ctx,
                    batch: a.batch,
                    min_tokens_per_s: a.min_tokens_per_s,
                },
                Some(d),
            )
        }
        (None, Some(b), None) => (BudgetSpec::FileBytes(b), None),
        (None, None, Some(r)) => {
            if !(r > 0.0 && r <= 1.0) {
                bail!("--ratio must be in (0, 1], got {r}");
            }
            (BudgetSpec::Ratio(r), None)
        }
        _ => bail!("give exactly one of --target, --budget, --ratio, --pattern"),
    };
    let dtype = a.dtype.map(dtype_of).or(preferred).unwrap_or(DType::F16);
    let (values, embed) = values_of(&a, dtype)?;
    let cache_dir = match a.cache_dir {
        Some(d) => d,
        None => default_cache_dir(&a.model)?,
    };
    let opts = CompressOptions {
        model: a.model,
        out: a.out.clone().unwrap_or_default(),
        method: a.method,
        variant: a.variant,
        lowrank_share: match a.lowrank_share {
            Some(x) if !(0.0..=0.9).contains(&x) => {
                bail!("--lowrank-share must be in [0, 0.9], got {x}")
            }
            x => x,
        },
        lowrank_fit: match a.lowrank_rounds {
            0 => bail!("--lowrank-rounds must be at least 1"),
            n => (a.lowrank_fit, n),
        },
        swap_passes: a.swap_passes,
        allocation: a.allocation,
        budget,
        dtype: embed,
        values,
        auto_values: a.values == Some(ValuesArg::Auto),
        // Opt-in: the calibration loss chose wrongly at one of three measured budgets
        // (see the README's Pareto notes).
        auto_embed: a.embed_values == Some(ValuesArg::Auto),
        pattern: a.pattern,
        quantizer: a.quantizer,
        calib: a.calib,
        selfcalib_dir: None,
        calib_samples: a.calib_samples,
        calib_len: a.calib_len,
        seed: a.seed,
        eval_text: a.eval_text,
        eval_wikitext: a.wikitext,
        eval_ctx: a.eval_ctx,
        eval_windows: a.eval_windows,
        reinforce: ReinforceOptions {
            steps: a.steps,
            lr: a.lr,
            seed: a.seed,
            ..ReinforceOptions::default()
        },
        step_samples: a.step_samples,
        rpca: a.solver.settings()?,
        cache_dir,
        threads,
        dry_run: a.dry_run,
        source_eval: !a.no_source_eval,
        stream: a.stream,
        shard: a
            .shard
            .as_deref()
            .map(str::parse::<cap_host::rpca::model::Shard>)
            .transpose()?,
        block_cache: a.block_cache.clone(),
        keep_blocks: a.keep_blocks,
        max_memory: a.max_memory,
        reconstruct: ReconOptions {
            steps: match &a.reconstruct {
                Some(s) => s.0.clone(),
                None if a.from.is_none()
                    && a.method == Method::Cap
                    && a.variant == Variant::Cap
                    && !values.is_quantized()
                    && a.values != Some(ValuesArg::Auto) =>
                {
                    vec![Step::Block]
                }
                None => vec![],
            },
            epochs: a.reconstruct_epochs,
            lr: a.reconstruct_lr,
            global: a.reconstruct_target == ReconTarget::Model,
        },
        distill: DistillOptions {
            epochs: a.distill_epochs,
            lr: a.distill_lr,
            schedule: a.distill_schedule,
        },
        from: a.from.clone(),
    };
    let bar: Mutex<Option<ProgressBar>> = Mutex::new(None);
    let on_event = |ev: Event<'_>| {
        let Ok(mut b) = bar.lock() else { return };
        match ev {
            Event::Stage { name, total } => {
                if let Some(old) = b.take() {
                    old.finish_and_clear();
                }
                *b = Some(progress_bar(total, name));
            }
            Event::Progress(d) => {
                if let Some(pb) = b.as_ref() {
                    pb.set_position(d);
                }
            }
            Event::Step(s) => {
                if let Some(pb) = b.as_ref() {
                    pb.set_position(s.step as u64);
                }
                tracing::info!(
                    "step {}: loss {:.4} baseline {:.4} expected cost {:.0} mean p {:.4}",
                    s.step,
                    s.loss,
                    s.baseline,
                    s.expected_cost,
                    s.mean_p
                );
            }
        }
    };
    let report = compress(&opts, &on_event);
    if let Ok(mut b) = bar.lock()
        && let Some(pb) = b.take()
    {
        pb.finish_and_clear();
    }
    match report? {
        Outcome::Written(r) if a.json => println!("{}", serde_json::to_string(&r)?),
        Outcome::Written(r) => print!("{}", render(&r)),
        Outcome::Planned(p) if a.json => println!("{}", serde_json::to_string(&p)?),
        Outcome::Planned(p) => print!("{}", render_plan(&p)),
        Outcome::Shard(r) if a.json => println!("{}", serde_json::to_string(&r)?),
        Outcome::Shard(r) => println!(
            "shard {}/{}: blocks {}..{} in {} ({} computed now, {} cached before); run again without --shard to write the file",
            r.shard,
            r.shards,
            r.blocks[0],
            r.blocks[1],
            r.cache_dir,
            r.computed,
            r.blocks[1] - r.blocks[0] - r.computed
        ),
    }
    Ok(())
}

/// The budget's source, where the memory goes, and a speed requirement's bound.
fn render_budget(budget: &Budget) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "budget: {}", budget.source);
    for (what, b) in &budget.breakdown {
        let _ = writeln!(s, "  {what:<40} {b:>14} bytes");
    }
    if let Some(b) = &budget.speed {
        let _ = writeln!(
            s,
            "  {:<40} {:>14} bytes (memory alone allows {})",
            format!("linears for {} tokens/s", b.tokens_per_s),
            b.linear_limit,
            b.memory_limit
        );
    }
    s
}

/// The budget and where the memory goes.
pub fn render_plan(p: &Plan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    s.push_str(&render_budget(&p.budget));
    let _ = writeln!(
        s,
        "compressed linears may take {} {} (stored dense they take {} bytes, {} parameters)",
        p.budget.limit,
        match p.budget.accounting {
            cap_host::compress::budget::Accounting::Bytes => "bytes",
            cap_host::compress::budget::Accounting::Params => "parameters",
        },
        p.fixed.linear_dense_bytes,
        p.fixed.linear_params
    );
    s
}

/// The per-layer table and the totals against the budget.
pub fn render(r: &CompressReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let unit = match r.budget.accounting {
        cap_host::compress::budget::Accounting::Bytes => "bytes",
        cap_host::compress::budget::Accounting::Params => "params",
    };
    let _ = writeln!(
        s,
        "{:<24} {:>11} {:>13} {:>21} {:<20} {:<8} {:>10}",
        "tensor", "shape", "rank kept", "non-zeros kept", "encoding", "values", "bytes"
    );
    for l in &r.layers {
        let _ = writeln!(
            s,
            "{:<24} {:>11} {:>13} {:>21} {:<20} {:<8} {:>10}",
            l.name,
            format!("{}×{}", l.shape[0], l.shape[1]),
            format!("{}/{}", l.rank[0], l.rank[1]),
            format!("{}/{}", l.nnz[0], l.nnz[1]),
            l.encoding,
            l.values,
            l.bytes
        );
    }
    let _ = writeln!(s);
    s.push_str(&render_budget(&r.budget));
    let _ = writeln!(
        s,
        "compressed linears: {} {unit} of a budget of {} ({:.2}%); {} bytes; paper ratio {:.4}",
        r.linear_cost,
        r.budget.limit,
        100.0 * r.linear_cost as f64 / r.budget.limit.max(1) as f64,
        r.linear_bytes,
        r.param_ratio
    );
    let _ = writeln!(
        s,
        "values of the compressed linears: {}{}",
        r.values,
        r.quantizer
            .map(|q| format!(" ({}; low-rank factors rounded to nearest)", q.name()))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "dense tensors (embedding and head in {}): {} bytes; file: {} bytes ({})",
        r.embed_values, r.dense_tensor_bytes, r.file_bytes, r.path
    );
    if !r.embed_search.is_empty() {
        let tried: Vec<String> = r
            .embed_search
            .iter()
            .map(|t| {
                let mark = if t.chosen { " (chosen)" } else { "" };
                format!("{} loss {:.4}{mark}", t.values, t.loss)
            })
            .collect();
        let _ = writeln!(
            s,
            "embedding types searched (best calibration loss of each): {}",
            tried.join(", ")
        );
    }
    let _ = writeln!(s, "calibration: {}", r.calibration);
    if let Some(f) = &r.from {
        let _ = writeln!(s, "started from {f}'s kept entries (no pruning)");
    }
    if let Some(d) = &r.distillation {
        let kept = d.heldout.get(d.kept_epoch).copied().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "distillation: held-out divergence {:.4} → {kept:.4} nats per token (epoch {} of {} kept; {} sequences trained on, {} held out)",
            d.heldout.first().copied().unwrap_or(f64::NAN),
            d.kept_epoch,
            d.heldout.len().saturating_sub(1),
            d.windows[0],
            d.windows[1]
        );
    }
    let source = r
        .dense_eval
        .as_ref()
        .map(|d| format!(" (source model {:.4})", d.ppl))
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "held-out PPL ({}, ctx {}, {} windows): {:.4}{source}",
        r.eval_text, r.eval.ctx, r.eval.windows, r.eval.ppl
    );
    let _ = writeln!(
        s,
        "self-test figure stored in the file (llama.cpp rule, same windows): {:.4}; check it on the board with `cap-device selftest {}`",
        r.self_test.ppl, r.path
    );
    let t: Vec<String> = r
        .seconds
        .iter()
        .map(|(n, s)| format!("{n} {s:.1}s"))
        .collect();
    let _ = writeln!(s, "time: {}", t.join(", "));
    s.push_str(&summary(r));
    s
}

/// A few lines for someone seeing cap for the first time: what got smaller, what it
/// cost in quality, what the board should do with it, and what to run next.
fn summary(r: &CompressReport) -> String {
    use std::fmt::Write;
    let mut s = String::from("\nsummary\n");
    // What `pack` would write: the same dense tensors with every linear dense, and
    // the header and manifest (their bound, within a few KB of what pack writes).
    let dense_file =
        r.fixed.dense_tensor_bytes + r.fixed.linear_dense_bytes + r.fixed.file_overhead_bytes;
    let change = |a: f64, b: f64| 100.0 * (b - a) / a;
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    let _ = writeln!(
        s,
        "  size     {} with every linear dense (as `pack` writes it) → {} ({:+.1}%); the source file has {}",
        mb(dense_file),
        mb(r.file_bytes),
        change(dense_file as f64, r.file_bytes as f64),
        mb(r.source_bytes)
    );
    let before = r
        .dense_eval
        .as_ref()
        .map(|d| format!("{:.3} (source) → ", d.ppl))
        .unwrap_or_default();
    let rel = r
        .dense_eval
        .as_ref()
        .map(|d| format!(" ({:+.1}%)", change(d.ppl, r.eval.ppl)))
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "  quality  perplexity {before}{:.3}{rel} on {} (held out; ctx {}, {} windows)",
        r.eval.ppl, r.eval_text, r.eval.ctx, r.eval.windows
    );
    if let Some(e) = &r.speed {
        let req = e
            .required_tokens_per_s
            .map(|t| format!(", {t} asked for"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "  speed    {}: about {:.0} tokens/s decoding (every linear dense: {:.0}){req}; predicted from {} bytes read per token at {} of {} GB/s",
            e.target,
            e.tokens_per_s,
            e.dense_tokens_per_s,
            e.bytes_per_token,
            e.efficiency,
            e.bandwidth_gbps
        );
    }
    if let Some(peak) = r.peak_rss_bytes {
        let how = if r.streamed {
            "streamed, one block at a time"
        } else {
            "the model in memory"
        };
        let _ = writeln!(
            s,
            "  memory   peak {} resident ({how}; estimated working set {})",
            cap_host::compress::memory::human(peak),
            cap_host::compress::memory::human(r.working_set.total())
        );
    }
    let _ = writeln!(
        s,
        "  next     cargo run --release -p cap-device -- selftest {}   (recomputes the stored {:.3}; exit 0 when it matches)",
        r.path, r.self_test.ppl
    );
    let _ = writeln!(
        s,
        "           cargo run --release -p cap-device -- generate {} --prompt \"The capital of France is\"",
        r.path
    );
    s
}

/// A byte count: digits, optionally followed by K, M, G or T (powers of 1024; `KiB`,
/// `GB` and the like read the same).
fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (for example 20G or 512M)"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches(['B', 'I'])
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?}: unknown unit (K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is more than 2^64 bytes"))
}

#[cfg(test)]
mod byte_tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_with_units() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("20G"), Ok(20 << 30));
        assert_eq!(parse_bytes("20GiB"), Ok(20 << 30));
        assert_eq!(parse_bytes("3m"), Ok(3 << 20));
        assert!(parse_bytes("1.5G").is_err());
        assert!(parse_bytes("G").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }
}
