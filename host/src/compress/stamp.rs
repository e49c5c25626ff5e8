//! Stage "stamp": what the file says about itself (the manifest's compression record
//! and provenance), and re-stamping the written file with the perplexity measured on
//! it.

use std::path::{Path, PathBuf};

use cap_format::manifest::{
    Budget as BudgetRecord, BudgetKind, Compression, LayerCompression, Manifest,
    PerplexityProtocol, PerplexityRecord, Provenance,
};
use cap_format::{CapFile, CapWriter, TensorDesc, WriterOptions};

use super::budget::{Budget, BudgetSpec, FixedCosts};
use super::error::{Result, StepContext, step_error};
use super::load::Loaded;
use super::run::CompressOptions;
use super::select::Selection;
use super::strategy::method_name;
use crate::pack::{model_config, model_extensions, parse_sha256};

/// The manifest before the budget is resolved: model, tokenizer, method, target and
/// provenance; the budget value, layer table and perplexity are filled in later.
pub fn base_manifest(opts: &CompressOptions, input: &Loaded) -> Result<Manifest> {
    let sha = &input.source_sha256;
    Ok(Manifest {
        model: model_config(&input.model().config).map_err(step_error)?,
        tokenizer: Some(input.tokenizer.spec().to_record()),
        compression: Some(Compression {
            method: method_name(opts),
            budget: BudgetRecord {
                kind: BudgetKind::TotalBytes,
                value: 0.0,
            },
            target_profile: match &opts.budget {
                BudgetSpec::Target { profile, .. } => profile.name.clone(),
                BudgetSpec::FileBytes(_) | BudgetSpec::Ratio(_) => String::new(),
            },
            layers: vec![],
            perplexity: Some(PerplexityRecord {
                value: 0.0,
                protocol: PerplexityProtocol::LlamaCpp,
                text_name: input.eval_name.clone(),
                ctx: 0,
                windows: 0,
            }),
            self_test_text: input.self_test_text.clone(),
        }),
        provenance: Provenance {
            source_file: opts
                .model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            source_sha256: parse_sha256(sha).map_err(step_error)?,
            cap_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix: crate::pack::creation_time().map_err(step_error)?,
        },
        tensors: vec![],
        extensions: model_extensions(&input.model().config).map_err(step_error)?,
    })
}

fn compression(m: &mut Manifest) -> &mut Compression {
    m.compression
        .as_mut()
        .unwrap_or_else(|| unreachable!("base_manifest always has a compression record"))
}

/// Records the resolved budget.
pub fn record_budget(m: &mut Manifest, spec: &BudgetSpec, budget: &Budget, fixed: &FixedCosts) {
    compression(m).budget = match spec {
        BudgetSpec::Ratio(r) => BudgetRecord {
            kind: BudgetKind::FractionOfDense,
            value: *r,
        },
        _ => BudgetRecord {
            kind: BudgetKind::TotalBytes,
            value: (budget.limit + fixed.dense_tensor_bytes + fixed.file_overhead_bytes) as f64,
        },
    };
}

/// Records what each linear keeps.
pub fn record_layers(m: &mut Manifest, names: &[String], sels: &[Selection]) {
    compression(m).layers = names
        .iter()
        .zip(sels)
        .map(|(n, s)| LayerCompression {
            tensor: n.clone(),
            rank: s.rank() as u32,
            nnz: s.nnz(),
        })
        .collect();
}

/// [`record_layers`] from the rows of a written (or cached) selection.
pub fn record_layer_rows(m: &mut Manifest, rows: &[super::run::LayerRow]) {
    compression(m).layers = rows
        .iter()
        .map(|r| LayerCompression {
            tensor: r.name.clone(),
            rank: r.rank[0] as u32,
            nnz: r.nnz[0],
        })
        .collect();
}

/// The manifest of the first, unmeasured file: no perplexity record yet.
pub fn unmeasured(m: &Manifest) -> Manifest {
    let mut first = m.clone();
    if let Some(c) = &mut first.compression {
        c.perplexity = None;
    }
    first
}

/// Records the self-test perplexity measured on the written file.
pub fn record_perplexity(m: &mut Manifest, ppl: f64, ctx: usize, windows: usize) {
    if let Some(c) = &mut m.compression
        && let Some(p) = &mut c.perplexity
    {
        p.value = ppl;
        p.ctx = ctx as u32;
        p.windows = windows as u32;
    }
}

/// Copies the `.cap` file `src` to `out` (atomically) with `manifest` in place of its
/// own (the tensor directory is rebuilt from the copied sections).
pub fn restamp(src: &Path, out: &Path, mut manifest: Manifest) -> Result<PathBuf> {
    let bytes = std::fs::read(src).step(|| format!("{}: cannot read", src.display()))?;
    let file = CapFile::parse(&bytes).step(|| format!("{}: invalid", src.display()))?;
    let opts = WriterOptions {
        alignment: file.header().alignment,
    };
    let _cleanup = crate::tempfiles::register_writer(out);
    let mut w =
        CapWriter::create(out, opts).step(|| format!("{}: cannot create", out.display()))?;
    for i in 0..file.len() {
        let t = file.tensor(i)?;
        let name = &file.manifest().tensors[i].name;
        let parts: Vec<&[u8]> = t
            .layout
            .parts()
            .iter()
            .map(|p| t.part(p.kind).unwrap_or(&[]))
            .collect();
        let desc = TensorDesc {
            rows: t.rows,
            cols: t.cols,
            encoding: t.encoding,
        };
        w.add_tensor(name, &desc, &parts)
            .step(|| format!("{}: writing tensor {name}", out.display()))?;
    }
    manifest.tensors.clear();
    w.finish(manifest)
        .step(|| format!("{}: finishing the file", out.display()))
}
