//! The `compress` pipeline: load, calibrate, build candidates (stage 1 for `cap`),
//! allocate under the budget (stage 2), write, measure the written file, re-stamp it
//! with the measurement.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use cap_device::factored::FactoredLinear;
use cap_device::forward::Runner;
use cap_device::model::{Block, DenseLinear, Head, Model};
use cap_device::ppl::{NllStats, Protocol, score_window};
use cap_format::manifest::{
    Budget as BudgetRecord, BudgetKind, Compression, LayerCompression, Manifest,
    PerplexityProtocol, PerplexityRecord, Provenance, TensorEntry,
};
use cap_format::{
    DType, Encoding, MIN_ALIGNMENT, Sparse, TensorDesc, encode_manifest, encoded_bytes_aligned,
};
use serde::Serialize;

use super::admm::{AdmmOptions, prune as admm_prune};
use super::allocate::{Allocation2, Keep, Trial, search, sparsities, wanda_pruned};
use super::budget::{Accounting, Budget, BudgetSpec, CostModel, FixedCosts, resolve};
use super::build::factored;
use super::calibration::{prefix_for_tokens, sample_windows};
use super::methods::{
    Allocation, Method, Variant, probability_scores, sparse_candidate, svd_candidates,
    uniform_groups,
};
use super::reinforce::{self, ReinforceOptions, StepLog};
use super::select::{Selection, global_top_k, selection_cost, uniform};
use super::sparsegpt::{
    kept as sparsegpt_kept, masked_candidate, prune_sequential, sparsegpt_model,
};
use super::write::{encode_linear, restamp};
use crate::eval::{EvalOptions, EvalReport, evaluate, read_text};
use crate::import::Checkpoint;
use crate::pack::{model_config, parse_sha256, source_sha256, write_model};
use crate::rpca::model::{DecomposeOptions, decompose_model, linear_matrices};
use crate::rpca::{Decomposition, RpcaSettings, cache::load_cached};

/// Everything `compress` needs.
#[derive(Clone, Debug)]
pub struct CompressOptions {
    /// Source checkpoint (GGUF file or Hugging Face directory).
    pub model: PathBuf,
    /// Output `.cap` path.
    pub out: PathBuf,
    /// What to keep of each linear.
    pub method: Method,
    /// Which CAP `--method cap` runs.
    pub variant: Variant,
    /// How the paper's variant allocates (ignored otherwise).
    pub allocation: Allocation,
    /// cap: spend this share of every linear's kept parameters on a low-rank part
    /// instead of letting the allocation search decide.
    pub lowrank_share: Option<f64>,
    /// The budget.
    pub budget: BudgetSpec,
    /// Storage dtype of factors, sparse values and the dense tensors.
    pub dtype: DType,
    /// Calibration text (plain text, or JSON lines with a `text` field); `None`:
    /// data-free, text the model generates itself ([`crate::selfcalib`]).
    pub calib: Option<PathBuf>,
    /// Where data-free calibration text is cached; `None`: the default cache.
    pub selfcalib_dir: Option<PathBuf>,
    /// Calibration sequences.
    pub calib_samples: usize,
    /// Tokens per calibration sequence.
    pub calib_len: usize,
    /// Seed of the sampled sequences and masks.
    pub seed: u64,
    /// Held-out evaluation text; `None`: a text shipped with cap, never the calibration
    /// text ([`crate::texts::default_held_out`]).
    pub eval_text: Option<PathBuf>,
    /// Read `eval_text` the way the papers build WikiText-2.
    pub eval_wikitext: bool,
    /// Evaluation window.
    pub eval_ctx: usize,
    /// Evaluation windows (at most).
    pub eval_windows: usize,
    /// REINFORCE settings.
    pub reinforce: ReinforceOptions,
    /// Calibration sequences per REINFORCE step.
    pub step_samples: usize,
    /// RPCA settings of stage 1.
    pub rpca: RpcaSettings,
    /// Where stage 1's decompositions are cached.
    pub cache_dir: PathBuf,
    /// Worker threads.
    pub threads: usize,
    /// Resolve the budget and stop: nothing is computed or written.
    pub dry_run: bool,
    /// Also evaluate the source model on the held-out windows (for the report).
    pub source_eval: bool,
}

/// The budget of a model, as `--dry-run` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The resolved budget.
    pub budget: Budget,
    /// The costs besides the compressed linears.
    pub fixed: FixedCosts,
}

/// What [`compress`] produced.
pub enum Outcome {
    /// `--dry-run`: the budget only.
    Planned(Plan),
    /// The file was written and measured.
    Written(Box<CompressReport>),
}

/// Progress of [`compress`].
pub enum Event<'a> {
    /// A stage starts; `total` units of work follow (0: unknown).
    Stage {
        /// Stage name.
        name: &'a str,
        /// Units of work.
        total: u64,
    },
    /// Units done in the current stage.
    Progress(u64),
    /// A REINFORCE step finished.
    Step(&'a StepLog),
}

/// One compressed linear in the report.
#[derive(Clone, Debug, Serialize)]
pub struct LayerRow {
    /// Tensor name.
    pub name: String,
    /// Rows × columns.
    pub shape: [usize; 2],
    /// Singular values kept / offered.
    pub rank: [usize; 2],
    /// Sparse entries kept / offered.
    pub nnz: [u64; 2],
    /// Encoding written.
    pub encoding: String,
    /// Bytes of its section.
    pub bytes: u64,
    /// Cost in the budget's accounting.
    pub cost: u64,
}

/// What [`compress`] did.
#[derive(Clone, Debug, Serialize)]
pub struct CompressReport {
    /// Written file.
    pub path: String,
    /// Method.
    pub method: Method,
    /// Allocation (for `cap`).
    pub allocation: Option<Allocation>,
    /// The budget.
    pub budget: Budget,
    /// The costs besides the compressed linears.
    pub fixed: FixedCosts,
    /// Per compressed linear.
    pub layers: Vec<LayerRow>,
    /// Sum of the layers' cost in the budget's accounting (≤ `budget.limit`).
    pub linear_cost: u64,
    /// Bytes of the compressed linears' sections.
    pub linear_bytes: u64,
    /// Bytes of the dense tensors' sections.
    pub dense_tensor_bytes: u64,
    /// Size of the written file.
    pub file_bytes: u64,
    /// Kept paper parameters over the linears' dense parameters.
    pub param_ratio: f64,
    /// Fraction kept by the uniform rule (threshold and baselines).
    pub uniform_fraction: Option<f64>,
    /// Perplexity of the written file on the held-out text.
    pub eval: EvalReport,
    /// Perplexity of the source model on the same windows (unless skipped).
    pub dense_eval: Option<EvalReport>,
    /// The file's self-test figure: the same windows under llama.cpp's rule (second
    /// half of each window scored), stored in the file for `cap-device selftest`.
    pub self_test: EvalReport,
    /// Name of the held-out text.
    pub eval_text: String,
    /// What the model was calibrated on.
    pub calibration: String,
    /// The REINFORCE log (empty for other allocations).
    pub steps: Vec<StepLog>,
    /// cap's learned allocation and the settings it tried.
    pub allocation_search: Option<(Allocation2, Vec<Trial>)>,
    /// Seconds per stage, in order.
    pub seconds: Vec<(String, f64)>,
}

/// Deletes a file when dropped (the unmeasured intermediate).
struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Block linears with their names, in file order.
fn block_linears(model: &Model<DenseLinear>) -> Vec<(String, &DenseLinear)> {
    let n = model.blocks.len() * 7;
    linear_matrices(model).into_iter().take(n).collect()
}

fn dense_desc(rows: usize, cols: usize, dtype: DType) -> TensorDesc {
    TensorDesc {
        rows: rows as u32,
        cols: cols as u32,
        encoding: Encoding::Dense { dtype },
    }
}

/// Bytes of the tensors `write_model` writes dense (everything but the block linears).
fn dense_tensor_bytes(model: &Model<DenseLinear>, dtype: DType) -> Result<u64> {
    let c = &model.config;
    let a = |d: TensorDesc| encoded_bytes_aligned(&d, MIN_ALIGNMENT).map_err(|e| anyhow!("{e}"));
    let mut total = a(dense_desc(c.vocab_size, c.hidden_size, dtype))?;
    total += a(dense_desc(1, c.hidden_size, DType::F32))?; // final norm
    for b in &model.blocks {
        total += 2 * a(dense_desc(1, c.hidden_size, DType::F32))?;
        if let Some(bias) = &b.qkv_bias {
            for v in bias {
                total += a(dense_desc(1, v.len(), DType::F32))?;
            }
        }
    }
    if let Head::Separate(h) = &model.head {
        total += a(dense_desc(h.out_features, h.in_features, dtype))?;
    }
    Ok(total)
}

/// An upper bound of the manifest's encoded size: `base` with a directory of
/// `tensor_names` and a layer table whose every number takes its longest encoding.
fn manifest_bound(
    base: &Manifest,
    tensor_names: &[String],
    linear_names: &[String],
) -> Result<u64> {
    let mut m = base.clone();
    let widest = Encoding::Composite {
        rank: u32::MAX,
        factor_dtype: DType::F32,
        sparse: Sparse::BlockCsr {
            nnz: u64::MAX,
            dtype: DType::F32,
        },
    };
    m.tensors = tensor_names
        .iter()
        .map(|n| TensorEntry {
            name: n.clone(),
            rows: u32::MAX,
            cols: u32::MAX,
            encoding: widest,
            offset: u64::MAX,
            len: u64::MAX,
            crc32: u32::MAX,
            extensions: vec![],
        })
        .collect();
    if let Some(c) = &mut m.compression {
        c.layers = linear_names
            .iter()
            .map(|n| LayerCompression {
                tensor: n.clone(),
                rank: u32::MAX,
                nnz: u64::MAX,
            })
            .collect();
        if let Some(p) = &mut c.perplexity {
            p.ctx = u32::MAX;
            p.windows = u32::MAX;
        }
    }
    Ok(encode_manifest(&m).map_err(|e| anyhow!("{e}"))?.len() as u64)
}

/// Every tensor name `write_model` writes, in order.
fn all_tensor_names(model: &Model<DenseLinear>) -> Vec<String> {
    use crate::import::arch::{Naming, Role, tensor_name};
    let name = |r, l| tensor_name(Naming::Gguf, r, l);
    let mut v = vec![name(Role::Embed, 0)];
    for (i, b) in model.blocks.iter().enumerate() {
        v.push(name(Role::AttnNorm, i));
        v.extend([Role::Q, Role::K, Role::V].map(|r| name(r, i)));
        if b.qkv_bias.is_some() {
            v.extend([Role::QBias, Role::KBias, Role::VBias].map(|r| name(r, i)));
        }
        v.push(name(Role::O, i));
        v.push(name(Role::MlpNorm, i));
        v.extend([Role::Gate, Role::Up, Role::Down].map(|r| name(r, i)));
    }
    v.push(name(Role::FinalNorm, 0));
    if let Head::Separate(_) = &model.head {
        v.push(name(Role::Head, 0));
    }
    v
}

/// The model with every block linear as a [`FactoredLinear`] (dense to start with),
/// sharing nothing with `model`: the search swaps its linears for masked ones.
fn factored_skeleton(model: &Model<DenseLinear>) -> Model<FactoredLinear> {
    let f = |l: &DenseLinear| {
        FactoredLinear::dense(l.weight.clone(), l.out_features, l.in_features)
            .unwrap_or_else(|| unreachable!("a validated model has consistent linears"))
    };
    Model {
        config: model.config.clone(),
        embed: model.embed.clone(),
        blocks: model
            .blocks
            .iter()
            .map(|b| Block {
                attn_norm: b.attn_norm.clone(),
                q: f(&b.q),
                k: f(&b.k),
                v: f(&b.v),
                o: f(&b.o),
                qkv_bias: b.qkv_bias.clone(),
                mlp_norm: b.mlp_norm.clone(),
                gate: f(&b.gate),
                up: f(&b.up),
                down: f(&b.down),
            })
            .collect(),
        norm: model.norm.clone(),
        head: match &model.head {
            Head::Tied => Head::Tied,
            Head::Separate(h) => Head::Separate(f(h)),
        },
    }
}

/// Mean NLL of `model` over `windows` (all but each window's first token scored).
pub fn calibration_loss<L: cap_device::model::Linear>(
    model: &Model<L>,
    windows: &[&[u32]],
    threads: usize,
) -> Result<f64> {
    let ctx = windows.iter().map(|w| w.len()).max().unwrap_or(0);
    let runner = Runner::new(model, ctx, threads);
    let mut total = NllStats::default();
    for w in windows {
        let s = score_window(&runner, w, Protocol::Standard, None)
            .map_err(|e| anyhow!("calibration forward pass: {e}"))?;
        total.merge(&s);
    }
    Ok(total.mean())
}

/// Runs the whole pipeline.
pub fn compress(opts: &CompressOptions, on_event: &(dyn Fn(Event<'_>) + Sync)) -> Result<Outcome> {
    let mut seconds = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |name: &str, seconds: &mut Vec<(String, f64)>| {
        seconds.push((name.to_string(), clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };
    // ---- inputs
    let ck = Checkpoint::open(&opts.model)?;
    let model = ck
        .load_model()
        .with_context(|| format!("{}: loading the model", opts.model.display()))?;
    let tokenizer = ck.tokenizer()?;
    // Calibration: a text file, or (data-free) text the model writes itself.
    let calib_text = match &opts.calib {
        Some(p) => Some(crate::calib::read_calib_text(p)?),
        None => None,
    };
    let (held_out, eval_name) = match &opts.eval_text {
        Some(p) => (read_text(p, opts.eval_wikitext)?, p.display().to_string()),
        None => {
            let (name, text) = crate::texts::default_held_out(calib_text.as_deref());
            (text, name.to_string())
        }
    };
    if opts.eval_ctx < 2 || opts.eval_windows == 0 {
        bail!("--eval-ctx must be at least 2 and --eval-windows at least 1");
    }
    let self_test_text =
        prefix_for_tokens(&held_out, opts.eval_ctx * opts.eval_windows + 1).to_string();
    let (windows, calibration) = match (&calib_text, &opts.calib) {
        (Some(text), Some(p)) => {
            let calib_tokens = tokenizer.encode(text, true);
            let w = sample_windows(&calib_tokens, opts.calib_samples, opts.calib_len, opts.seed)
                .with_context(|| format!("{}", p.display()))?;
            (w, p.display().to_string())
        }
        _ => {
            if opts.calib_len < 2 {
                bail!("--calib-len must be at least 2");
            }
            let recipe =
                crate::selfcalib::Recipe::new(opts.calib_samples, opts.calib_len - 1, opts.seed);
            let dir = opts
                .selfcalib_dir
                .clone()
                .or_else(crate::selfcalib::default_cache_dir)
                .ok_or_else(|| {
                    anyhow!("neither XDG_CACHE_HOME nor HOME is set: pass --calib FILE")
                })?;
            on_event(Event::Stage {
                name: "data-free calibration text",
                total: (opts.calib_samples * (opts.calib_len - 1)) as u64,
            });
            let sha = source_sha256(&opts.model)?;
            let (w, cached) = crate::selfcalib::cached_or_generate(
                &model,
                &tokenizer,
                &recipe,
                &sha,
                &dir,
                opts.threads,
                |d, _| on_event(Event::Progress(d as u64)),
            )?;
            let how = if cached { "cached" } else { "generated" };
            (
                w,
                format!(
                    "data-free: {} × {} tokens written by the model ({how})",
                    opts.calib_samples, opts.calib_len
                ),
            )
        }
    };
    let win_refs: Vec<&[u32]> = windows.iter().map(|w| w.as_slice()).collect();
    let linears = block_linears(&model);
    lap("load", &mut seconds);

    // ---- costs and budget
    let cost = CostModel {
        accounting: match opts.budget {
            BudgetSpec::Ratio(_) => Accounting::Params,
            _ => Accounting::Bytes,
        },
        dtype: opts.dtype,
    };
    let bytes_model = CostModel {
        accounting: Accounting::Bytes,
        dtype: opts.dtype,
    };
    let sha = source_sha256(&opts.model)?;
    let mut manifest = Manifest {
        model: model_config(&model.config)?,
        tokenizer: Some(tokenizer.spec().to_record()),
        compression: Some(Compression {
            method: String::new(),
            budget: BudgetRecord {
                kind: BudgetKind::TotalBytes,
                value: 0.0,
            },
            target_profile: String::new(),
            layers: vec![],
            perplexity: Some(PerplexityRecord {
                value: 0.0,
                protocol: PerplexityProtocol::LlamaCpp,
                text_name: eval_name.clone(),
                ctx: 0,
                windows: 0,
            }),
            self_test_text: self_test_text.clone(),
        }),
        provenance: Provenance {
            source_file: opts
                .model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            source_sha256: parse_sha256(&sha)?,
            cap_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix: crate::pack::creation_time()?,
        },
        tensors: vec![],
        extensions: vec![],
    };
    let c = manifest
        .compression
        .as_mut()
        .unwrap_or_else(|| unreachable!());
    c.method = match (opts.method, opts.variant) {
        (Method::Cap, Variant::Cap) => "cap".to_string(),
        (Method::Cap, Variant::Paper) => format!(
            "cap/{}",
            match opts.allocation {
                Allocation::Reinforce => "reinforce",
                Allocation::Threshold => "threshold",
            }
        ),
        (m, _) => m.name().to_string(),
    };
    match &opts.budget {
        BudgetSpec::Target { profile, .. } => c.target_profile = profile.name.clone(),
        BudgetSpec::FileBytes(_) | BudgetSpec::Ratio(_) => {}
    }
    let linear_names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    let dense_bytes = dense_tensor_bytes(&model, opts.dtype)?;
    let fixed = FixedCosts {
        dense_tensor_bytes: dense_bytes,
        file_overhead_bytes: u64::from(MIN_ALIGNMENT)
            + manifest_bound(&manifest, &all_tensor_names(&model), &linear_names)?,
        linear_params: linears
            .iter()
            .map(|(_, l)| (l.out_features * l.in_features) as u64)
            .sum(),
        linear_dense_bytes: linears
            .iter()
            .map(|(_, l)| {
                bytes_model.cost(
                    l.out_features,
                    l.in_features,
                    0,
                    (l.out_features * l.in_features) as u64,
                )
            })
            .sum(),
        linear_min_bytes: linears
            .iter()
            .map(|(_, l)| bytes_model.cost(l.out_features, l.in_features, 0, 0))
            .sum(),
    };
    let budget = resolve(&opts.budget, &model.config, &fixed)?;
    if opts.dry_run {
        return Ok(Outcome::Planned(Plan { budget, fixed }));
    }
    let c = manifest
        .compression
        .as_mut()
        .unwrap_or_else(|| unreachable!());
    c.budget = match &opts.budget {
        BudgetSpec::Ratio(r) => BudgetRecord {
            kind: BudgetKind::FractionOfDense,
            value: *r,
        },
        _ => BudgetRecord {
            kind: BudgetKind::TotalBytes,
            value: (budget.limit + fixed.dense_tensor_bytes + fixed.file_overhead_bytes) as f64,
        },
    };

    // ---- candidates
    let in_norms: Option<BTreeMap<String, Vec<f32>>> = if opts.method == Method::Wanda {
        on_event(Event::Stage {
            name: "input norms",
            total: win_refs.len() as u64,
        });
        let n = crate::calib::input_rms_windows(&model, &win_refs, opts.threads, |d, _| {
            on_event(Event::Progress(d as u64))
        })?;
        lap("input norms", &mut seconds);
        Some(n)
    } else {
        None
    };
    let paper = opts.variant == Variant::Paper;
    let mut alloc_trials = None;
    let sparse_path = matches!(opts.method, Method::Sparsegpt | Method::Admm)
        || (opts.method == Method::Cap && !paper);
    let dense_fits = linears
        .iter()
        .map(|(_, l)| {
            let (m, n) = (l.out_features, l.in_features);
            cost.cost(m, n, 0, (m * n) as u64)
        })
        .sum::<u64>()
        <= budget.limit;
    let cands: Vec<Decomposition> = if sparse_path && dense_fits {
        // The budget holds the dense linears (SmolLM2 on any real board): nothing to prune.
        tracing::info!("the budget holds every linear dense: nothing is pruned");
        linears
            .iter()
            .map(|(_, l)| sparse_candidate(&l.weight, l.out_features, l.in_features))
            .collect()
    } else if sparse_path {
        let keeps: Vec<Keep> = if opts.method == Method::Cap {
            let (k, a, trials) = learned_sparsities(
                &model,
                &linears,
                &win_refs,
                &cost,
                budget.limit,
                opts,
                on_event,
            )?;
            alloc_trials = Some((a, trials));
            lap("allocation search", &mut seconds);
            k
        } else {
            let sparsity = sparsegpt_sparsity(&linears, &cost, budget.limit);
            vec![Keep { sparsity, rank: 0 }; linears.len()]
        };
        on_event(Event::Stage {
            name: opts.method.name(),
            total: model.blocks.len() as u64,
        });
        let progress = |b: usize| on_event(Event::Progress(b as u64));
        if opts.method == Method::Sparsegpt {
            let sp: Vec<f64> = keeps.iter().map(|k| k.sparsity).collect();
            sparsegpt_model(&model, &win_refs, &sp, opts.threads, progress)?
        } else {
            let ao = AdmmOptions {
                threads: opts.threads,
                ..AdmmOptions::default()
            };
            prune_sequential(
                &model,
                &win_refs,
                opts.threads,
                &|i, w, r, c, h| {
                    let orig = w.to_vec();
                    let mask = admm_prune(w, r, c, h, keeps[i].sparsity, &ao)?;
                    let mut d = masked_candidate(w, &mask, r, c);
                    if keeps[i].rank > 0 {
                        add_lowrank(&mut d, w, &orig, h, keeps[i].rank)?;
                    }
                    Ok(d)
                },
                // Measured: true-sequential inputs gave 30.37 against 29.85 (ratio
                // 0.5, WikiText-2 ctx 2048, 8 windows), so the dense block's inputs.
                false,
                progress,
            )?
        }
    } else {
        match opts.method {
            Method::Magnitude | Method::Wanda => linears
                .iter()
                .map(|(_, l)| sparse_candidate(&l.weight, l.out_features, l.in_features))
                .collect(),
            Method::Svd => {
                on_event(Event::Stage {
                    name: "svd",
                    total: 0,
                });
                let ws: Vec<(&[f32], usize, usize)> = linears
                    .iter()
                    .map(|(_, l)| (l.weight.as_slice(), l.out_features, l.in_features))
                    .collect();
                svd_candidates(&ws)?
            }
            // The paper's variant (the pruning methods took the branch above).
            Method::Cap | Method::Sparsegpt | Method::Admm => {
                on_event(Event::Stage {
                    name: "stage 1: RPCA",
                    total: linears.len() as u64,
                });
                let done = std::sync::atomic::AtomicU64::new(0);
                let dopts = DecomposeOptions {
                    settings: opts.rpca,
                    threads: opts.threads,
                    shard: None,
                    only: None,
                    stop_after: None,
                    scales: None,
                };
                decompose_model(&model, &opts.cache_dir, &dopts, &|ev| {
                    if let crate::rpca::model::Event::Done { .. } = ev {
                        let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        on_event(Event::Progress(d));
                    }
                })?;
                linears
                    .iter()
                    .map(|(n, l)| {
                        load_cached(
                            &opts.cache_dir,
                            n,
                            &l.weight,
                            l.out_features,
                            l.in_features,
                            &opts.rpca,
                            None,
                        )
                        .ok_or_else(|| anyhow!("{n}: no cached decomposition after stage 1"))
                    })
                    .collect::<Result<_>>()?
            }
        }
    };
    lap("candidates", &mut seconds);
    let cref: Vec<&Decomposition> = cands.iter().collect();

    // ---- allocation
    let mut steps = Vec::new();
    let mut uniform_fraction = None;
    let keep_all: Vec<Selection> = cref
        .iter()
        .map(|d| Selection {
            sigma: vec![true; d.sigma.len()],
            entries: vec![true; d.s.val.len()],
        })
        .collect();
    let all_cost: u64 = cref
        .iter()
        .zip(&keep_all)
        .map(|(d, s)| selection_cost(&cost, d, s))
        .sum();
    let sels: Vec<Selection> = match (opts.method, opts.allocation) {
        // Nothing to choose: the budget holds every item (SmolLM2 on any real board),
        // or the method has chosen already.
        (Method::Sparsegpt | Method::Admm, _) => keep_all,
        (Method::Cap, _) if !paper => keep_all,
        _ if all_cost <= budget.limit => {
            tracing::info!(
                "the budget ({}) holds every item ({all_cost}): nothing is dropped",
                budget.limit
            );
            keep_all
        }
        (Method::Cap, Allocation::Reinforce) => {
            on_event(Event::Stage {
                name: "stage 2: REINFORCE",
                total: opts.reinforce.steps as u64,
            });
            let mut skel = factored_skeleton(&model);
            let k = opts.step_samples.clamp(1, win_refs.len());
            let mut step = 0usize;
            let (policy, log) = reinforce::run(
                &cref,
                &cost,
                budget.limit,
                &opts.reinforce,
                |z| {
                    let mut it = cref.iter().zip(z);
                    for b in &mut skel.blocks {
                        for l in b.linears_mut() {
                            let (d, s) = it.next().ok_or_else(|| anyhow!("mask count mismatch"))?;
                            *l = factored(d, s);
                        }
                    }
                    let ws: Vec<&[u32]> = (0..k)
                        .map(|i| win_refs[(step * k + i) % win_refs.len()])
                        .collect();
                    step += 1;
                    calibration_loss(&skel, &ws, opts.threads)
                },
                |s| on_event(Event::Step(s)),
            )?;
            steps = log;
            let scores: Vec<_> = cref
                .iter()
                .zip(&policy.p)
                .map(|(d, (ps, pe))| probability_scores(d, ps, pe))
                .collect();
            global_top_k(&cref, &scores, &cost, budget.limit)
        }
        (m, _) => {
            let groups: Vec<_> = cref
                .iter()
                .zip(&linears)
                .map(|(d, (n, _))| {
                    uniform_groups(
                        m,
                        d,
                        in_norms
                            .as_ref()
                            .and_then(|x| x.get(n))
                            .map(|v| v.as_slice()),
                    )
                })
                .collect();
            let (s, q) = uniform(&cref, &groups, &cost, budget.limit);
            uniform_fraction = Some(q);
            s
        }
    };
    lap("allocation", &mut seconds);

    // ---- write (unmeasured), measure the file, re-stamp
    on_event(Event::Stage {
        name: "write",
        total: 0,
    });
    let mut rows = Vec::with_capacity(cands.len());
    let by_name: BTreeMap<&str, usize> = linear_names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut unmeasured = opts.out.clone().into_os_string();
    unmeasured.push(format!(".unmeasured-{}", std::process::id()));
    let unmeasured = PathBuf::from(unmeasured);
    let _guard = RemoveOnDrop(unmeasured.clone());
    let c = manifest
        .compression
        .as_mut()
        .unwrap_or_else(|| unreachable!());
    c.layers = linear_names
        .iter()
        .zip(&sels)
        .map(|(n, s)| LayerCompression {
            tensor: n.clone(),
            rank: s.rank() as u32,
            nnz: s.nnz(),
        })
        .collect();
    let mut first = manifest.clone();
    if let Some(c) = &mut first.compression {
        c.perplexity = None;
    }
    write_model(
        &model,
        &unmeasured,
        opts.dtype,
        first,
        &mut |sink, name, _| {
            let i = *by_name
                .get(name)
                .ok_or_else(|| anyhow!("{name}: not a block linear"))?;
            let (d, s) = (cref[i], &sels[i]);
            let (desc, parts, bytes) = encode_linear(d, s, &cost)?;
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            sink.add_parts(name, &desc, &refs, (d.rows * d.cols) as u64)?;
            rows.push(LayerRow {
                name: name.to_string(),
                shape: [d.rows, d.cols],
                rank: [s.rank(), d.sigma.len()],
                nnz: [s.nnz(), d.s.val.len() as u64],
                encoding: encoding_name(&desc.encoding),
                bytes,
                cost: cost.cost(d.rows, d.cols, s.rank(), s.nnz()),
            });
            Ok(())
        },
    )?;
    lap("write", &mut seconds);
    let eval_opts = EvalOptions {
        ctx: opts.eval_ctx,
        protocol: Protocol::Standard,
        max_windows: Some(opts.eval_windows),
        threads: opts.threads,
    };
    on_event(Event::Stage {
        name: "eval (compressed file)",
        total: opts.eval_windows as u64,
    });
    // The written file, run in place by the board's loader and kernels: the figures
    // below are what `cap-device` computes from these bytes.
    let map = crate::capmodel::map(&unmeasured)?;
    let file = crate::capmodel::parse_verified(&unmeasured, &map)?;
    let written = crate::capmodel::model(&unmeasured, &file)?;
    let eval = evaluate(
        &written,
        &tokenizer,
        &self_test_text,
        &eval_name,
        &eval_opts,
        |d, _| on_event(Event::Progress(d as u64)),
    )?;
    on_event(Event::Stage {
        name: "self-test figure (llama.cpp protocol)",
        total: opts.eval_windows as u64,
    });
    let self_test = evaluate(
        &written,
        &tokenizer,
        &self_test_text,
        &eval_name,
        &EvalOptions {
            protocol: Protocol::LlamaCpp,
            ..eval_opts.clone()
        },
        |d, _| on_event(Event::Progress(d as u64)),
    )?;
    drop(written);
    drop(file);
    drop(map);
    let dense_eval = if opts.source_eval {
        on_event(Event::Stage {
            name: "eval (source model)",
            total: opts.eval_windows as u64,
        });
        Some(evaluate(
            &model,
            &tokenizer,
            &self_test_text,
            &eval_name,
            &eval_opts,
            |d, _| on_event(Event::Progress(d as u64)),
        )?)
    } else {
        None
    };
    lap("eval", &mut seconds);
    if let Some(c) = &mut manifest.compression
        && let Some(p) = &mut c.perplexity
    {
        p.value = self_test.ppl;
        p.ctx = opts.eval_ctx as u32;
        p.windows = self_test.windows as u32;
    }
    let path = restamp(&unmeasured, &opts.out, manifest)?;
    lap("re-stamp", &mut seconds);
    let file_bytes = std::fs::metadata(&path)
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    let linear_cost = rows.iter().map(|r| r.cost).sum();
    let linear_bytes = rows.iter().map(|r| r.bytes).sum();
    let kept_params: u64 = rows
        .iter()
        .map(|r| r.rank[0] as u64 * (r.shape[0] + r.shape[1]) as u64 + r.nnz[0])
        .sum();
    if linear_cost > budget.limit {
        bail!(
            "internal error: the selection costs {linear_cost}, over the budget {}",
            budget.limit
        );
    }
    Ok(Outcome::Written(Box::new(CompressReport {
        path: path.display().to_string(),
        method: opts.method,
        allocation: (opts.method == Method::Cap && paper).then_some(opts.allocation),
        param_ratio: kept_params as f64 / fixed.linear_params.max(1) as f64,
        budget,
        fixed,
        layers: rows,
        linear_cost,
        linear_bytes,
        dense_tensor_bytes: dense_bytes,
        file_bytes,
        uniform_fraction,
        eval,
        dense_eval,
        self_test,
        eval_text: eval_name,
        calibration,
        steps,
        allocation_search: alloc_trials,
        seconds,
    })))
}

/// A short name of an encoding for tables.
pub fn encoding_name(e: &Encoding) -> String {
    let sparse = |s: &Sparse| match s {
        Sparse::Bitmask { .. } => "bitmask",
        Sparse::BlockCsr { .. } => "block-csr",
        Sparse::TwoFour { .. } => "2:4",
    };
    match e {
        Encoding::Dense { .. } => "dense".into(),
        Encoding::LowRank { .. } => "low-rank".into(),
        Encoding::Sparse(s) => sparse(s).into(),
        Encoding::Composite { sparse: s, .. } => format!("low-rank+{}", sparse(s)),
    }
}

/// Default cache of stage 1 for a source file: `$XDG_CACHE_HOME/cap/rpca/<sha16>` (or
/// `~/.cache/...`), one directory per source so tensor names never collide.
pub fn default_cache_dir(model: &Path) -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or_else(|| anyhow!("neither XDG_CACHE_HOME nor HOME is set; pass --cache-dir"))?;
    let sha = source_sha256(model)?;
    Ok(base.join("cap").join("rpca").join(&sha[..16]))
}

/// The uniform sparsity SparseGPT runs at: the smallest whose exact cost fits `limit`.
fn sparsegpt_sparsity(linears: &[(String, &DenseLinear)], cost: &CostModel, limit: u64) -> f64 {
    let total = |s: f64| -> u64 {
        linears
            .iter()
            .map(|(_, l)| {
                let (m, n) = (l.out_features, l.in_features);
                cost.cost(m, n, 0, sparsegpt_kept(m, n, s))
            })
            .sum()
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    if total(0.0) <= limit {
        return 0.0;
    }
    // 50 halvings: below one entry of the largest matrix.
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        if total(mid) <= limit {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// cap's allocation: per-linear sparsities from [`super::allocate::search`], scored by
/// the calibration loss of the Wanda-pruned model on the first 8 calibration sequences.
fn learned_sparsities(
    model: &Model<DenseLinear>,
    linears: &[(String, &DenseLinear)],
    windows: &[&[u32]],
    cost: &CostModel,
    limit: u64,
    opts: &CompressOptions,
    on_event: &(dyn Fn(Event<'_>) + Sync),
) -> Result<(Vec<Keep>, Allocation2, Vec<Trial>)> {
    on_event(Event::Stage {
        name: "input norms",
        total: windows.len() as u64,
    });
    let norms = crate::calib::input_rms_windows(model, windows, opts.threads, |d, _| {
        on_event(Event::Progress(d as u64))
    })?;
    let norm_refs: Vec<&[f32]> = linears
        .iter()
        .map(|(n, _)| {
            norms
                .get(n)
                .map(|v| v.as_slice())
                .ok_or_else(|| anyhow!("{n}: no input norms"))
        })
        .collect::<Result<_>>()?;
    let shapes: Vec<(usize, usize)> = linears
        .iter()
        .map(|(_, l)| (l.out_features, l.in_features))
        .collect();
    let scoring = &windows[..windows.len().min(8)];
    on_event(Event::Stage {
        name: "allocation search",
        total: 11,
    });
    let done = std::cell::Cell::new(0u64);
    let (best, trials) = search(opts.lowrank_share, |a| {
        let sp = sparsities(&shapes, model.blocks.len(), a, cost, limit);
        let pruned = wanda_pruned(model, &norm_refs, &sp);
        let l = calibration_loss(&pruned, scoring, opts.threads);
        done.set(done.get() + 1);
        on_event(Event::Progress(done.get()));
        tracing::info!("allocation {a:?}: calibration loss {:?}", l.as_ref().ok());
        l
    })?;
    Ok((
        sparsities(&shapes, model.blocks.len(), &best, cost, limit),
        best,
        trials,
    ))
}

/// Adds to `d` (the sparse part, whose matrix is `w`) the rank-`rank` part that best
/// fits what pruning removed from `orig`, in activation-scaled coordinates
/// (`(orig − w)·D`, `D = diag(H)^½`), and sets `w` to `S + L`.
fn add_lowrank(
    d: &mut Decomposition,
    w: &mut [f32],
    orig: &[f32],
    h: &[f32],
    rank: usize,
) -> Result<()> {
    let (rows, cols) = (d.rows, d.cols);
    let scale: Vec<f32> = (0..cols)
        .map(|j| h[j * cols + j].max(0.0).sqrt().max(1e-6))
        .collect();
    let resid: Vec<f32> = (0..rows * cols)
        .map(|x| (orig[x] - w[x]) * scale[x % cols])
        .collect();
    let (u, sigma, v) = super::lowrank::truncated(&resid, rows, cols, rank)
        .ok_or_else(|| anyhow!("low-rank fit: SVD did not converge"))?;
    let k = sigma.len();
    // Unscale: V's rows divided by D (as the activation-aware RPCA stores them).
    let v: Vec<f32> = (0..cols * k).map(|x| v[x] / scale[x / k]).collect();
    for r in 0..rows {
        for c in 0..cols {
            let acc: f32 = (0..k).map(|t| u[r * k + t] * sigma[t] * v[c * k + t]).sum();
            w[r * cols + c] += acc;
        }
    }
    d.u = u;
    d.sigma = sigma;
    d.v = v;
    d.stats.rank = k;
    Ok(())
}
