//! Packing: writes an imported checkpoint as a dense `.cap` file (every weight matrix
//! in one [`DType`], norms and biases in `f32`), with the manifest filled from the
//! checkpoint's configuration, tokenizer and provenance.
//!
//! Tensors are converted and written one at a time through [`CapWriter`] (atomic:
//! temporary file + rename), so only the imported `f32` model and one converted tensor
//! are in memory. The output is deterministic apart from the `created_unix` field.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use cap_device::config::{Config, RopeScaling as DevRope};
use cap_device::model::{DenseLinear, Head, Model};
use cap_format::manifest::{Manifest, ModelConfig, Provenance, RopeScaling};
use cap_format::{CapWriter, DType, Encoding, TensorDesc, WriterOptions};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::import::Checkpoint;
use crate::import::arch::{Naming, Role, tensor_name};

/// What [`pack`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct PackReport {
    /// The `.cap` file written.
    pub path: String,
    /// Number of tensors written.
    pub tensors: usize,
    /// Number of stored values (parameters) over all tensors.
    pub params: u64,
    /// Bytes of all tensor sections, padding included.
    pub tensor_bytes: u64,
    /// Size of the whole file in bytes.
    pub file_bytes: u64,
    /// Dtype of the weight matrices.
    pub dtype: String,
    /// Whether the file carries a tokenizer.
    pub tokenizer: bool,
}

/// SHA-256 of a file as 64 lower-case hex digits, read in a streaming way.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    hash_file_into(&mut h, path)?;
    Ok(to_hex(&h.finalize()))
}

fn hash_file_into(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: read error", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// The provenance digest of a model: [`sha256_file`] of a GGUF file; for a Hugging Face
/// directory, the SHA-256 of its `*.safetensors` files concatenated in name order (the
/// weights, which are what a `.cap` file is derived from).
pub fn source_sha256(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return sha256_file(path);
    }
    let mut shards: Vec<_> = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        bail!("{}: no *.safetensors files", path.display());
    }
    let mut h = Sha256::new();
    for p in &shards {
        hash_file_into(&mut h, p)?;
    }
    Ok(to_hex(&h.finalize()))
}

/// The creation time stamped into a written file: `SOURCE_DATE_EPOCH` (seconds since the
/// Unix epoch, the reproducible-builds convention) when set, so that the same inputs
/// give byte-identical files, else the clock (`None` if it reads before 1970).
pub fn creation_time() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
            anyhow!("SOURCE_DATE_EPOCH={v:?} is not a whole number of seconds")
        }),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs())),
    }
}

/// Lower-case hex of bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn parse_sha256(hex: &str) -> Result<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        bail!("source sha256 must be 64 hex digits, got {hex:?}");
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| anyhow!("source sha256 must be 64 hex digits, got {hex:?}"))?;
    }
    Ok(out)
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow!("{what} = {v} does not fit in u32"))
}

/// Converts the runtime configuration to the manifest's model record.
pub fn model_config(c: &Config) -> Result<ModelConfig> {
    let rope_scaling = match &c.rope_scaling {
        DevRope::None => RopeScaling::None,
        DevRope::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => RopeScaling::Llama3 {
            factor: *factor,
            low_freq_factor: *low_freq_factor,
            high_freq_factor: *high_freq_factor,
            original_max_position: *original_max_position as u32,
        },
        DevRope::FreqFactors(f) => RopeScaling::PerFrequency { factors: f.clone() },
    };
    Ok(ModelConfig {
        architecture: c.arch.name().to_string(),
        vocab_size: u32_of(c.vocab_size, "vocab_size")?,
        hidden_size: u32_of(c.hidden_size, "hidden_size")?,
        intermediate_size: u32_of(c.intermediate_size, "intermediate_size")?,
        num_layers: u32_of(c.n_layers, "n_layers")?,
        num_heads: u32_of(c.n_heads, "n_heads")?,
        num_kv_heads: u32_of(c.n_kv_heads, "n_kv_heads")?,
        head_dim: u32_of(c.head_dim, "head_dim")?,
        rope_theta: c.rope_theta,
        rope_scaling,
        rms_norm_eps: c.rms_eps,
        tie_word_embeddings: c.tie_embeddings,
        qkv_bias: c.qkv_bias,
        max_position: u32_of(c.max_position, "max_position")?,
    })
}

/// Writes tensors one by one, converting each to its dtype.
pub(crate) struct Sink<'a> {
    w: CapWriter,
    out: &'a Path,
    buf: Vec<u8>,
    tensors: usize,
    params: u64,
    tensor_bytes: u64,
    alignment: u32,
}

impl Sink<'_> {
    fn add(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        data: &[f32],
        dtype: DType,
    ) -> Result<()> {
        if data.len() != rows * cols {
            bail!(
                "tensor {name}: {} values for a {rows}×{cols} shape",
                data.len()
            );
        }
        self.buf.clear();
        cap_format::extend_bytes(&mut self.buf, data, dtype);
        let desc = TensorDesc {
            rows: u32_of(rows, "rows")?,
            cols: u32_of(cols, "cols")?,
            encoding: Encoding::Dense { dtype },
        };
        self.w
            .add_tensor(name, &desc, &[&self.buf])
            .with_context(|| format!("{}: writing tensor {name}", self.out.display()))?;
        self.tensors += 1;
        self.params += data.len() as u64;
        self.tensor_bytes += cap_format::encoded_bytes_aligned(&desc, self.alignment)
            .with_context(|| format!("tensor {name}"))?;
        Ok(())
    }

    /// Writes a tensor whose parts are already encoded; `params` is the number of
    /// values it stands for (for the report).
    pub(crate) fn add_parts(
        &mut self,
        name: &str,
        desc: &TensorDesc,
        parts: &[&[u8]],
        params: u64,
    ) -> Result<()> {
        self.w
            .add_tensor(name, desc, parts)
            .with_context(|| format!("{}: writing tensor {name}", self.out.display()))?;
        self.tensors += 1;
        self.params += params;
        self.tensor_bytes += cap_format::encoded_bytes_aligned(desc, self.alignment)
            .with_context(|| format!("tensor {name}"))?;
        Ok(())
    }

    fn linear(&mut self, name: &str, l: &DenseLinear, dtype: DType) -> Result<()> {
        self.add(name, l.out_features, l.in_features, &l.weight, dtype)
    }

    fn vector(&mut self, name: &str, v: &[f32]) -> Result<()> {
        self.add(name, 1, v.len(), v, DType::F32)
    }
}

/// Packs `ck` densely into `out`: weight matrices (embedding, projections, head) in
/// `dtype`, norms and biases in `f32`, tensor names in GGUF style
/// (`token_embd.weight`, `blk.N.attn_q.weight`, ...), q/k rows in Hugging Face order.
///
/// `source_name` and `source_sha256` (64 hex digits, see [`sha256_file`]) go into the
/// provenance record; the compression record is left empty. A Hugging Face directory
/// without `tokenizer.json` is packed without a tokenizer.
pub fn pack(
    ck: &Checkpoint,
    out: &Path,
    dtype: DType,
    source_name: &str,
    source_sha256: &str,
) -> Result<PackReport> {
    let sha = parse_sha256(source_sha256)?;
    let src = ck.path();
    let model = ck
        .load_model()
        .with_context(|| format!("{}: loading the model", src.display()))?;
    // A Hugging Face directory without `tokenizer.json` packs without a tokenizer;
    // any other tokenizer problem is an error.
    let tok = match ck {
        Checkpoint::HuggingFace(h) if !h.dir().join("tokenizer.json").exists() => {
            tracing::warn!(
                "{}: no tokenizer.json; packing without a tokenizer",
                src.display()
            );
            None
        }
        _ => Some(ck.tokenizer()?),
    };
    let model_cfg = model_config(&model.config)?;
    let created_unix = creation_time()?;
    let manifest = Manifest {
        model: model_cfg,
        tokenizer: tok.as_ref().map(|t| t.spec().to_record()),
        compression: None,
        provenance: Provenance {
            source_file: source_name.to_string(),
            source_sha256: sha,
            cap_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix,
        },
        tensors: Vec::new(),
        extensions: Vec::new(),
    };
    let has_tokenizer = tok.is_some();
    drop(tok);
    let (path, tensors, params, tensor_bytes) =
        write_model(&model, out, dtype, manifest, &mut |s, name, l| {
            s.linear(name, l, dtype)
        })?;
    let file_bytes = std::fs::metadata(&path)
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    Ok(PackReport {
        path: path.display().to_string(),
        tensors,
        params,
        tensor_bytes,
        file_bytes,
        dtype: format!("{dtype:?}").to_lowercase(),
        tokenizer: has_tokenizer,
    })
}

/// Writes `model` to `out` in the tensor order and naming of [`pack`]: the embedding
/// (and an untied head) in `dtype`, norms and biases in `f32`, and every block linear
/// through `linear` (which may compress it). Returns the final path, the tensor count,
/// the parameters and the bytes of the tensor sections.
pub(crate) fn write_model(
    model: &Model<DenseLinear>,
    out: &Path,
    dtype: DType,
    manifest: Manifest,
    linear: &mut dyn FnMut(&mut Sink<'_>, &str, &DenseLinear) -> Result<()>,
) -> Result<(std::path::PathBuf, usize, u64, u64)> {
    let opts = WriterOptions::default();
    let w = CapWriter::create(out, opts)
        .with_context(|| format!("{}: cannot create", out.display()))?;
    let mut s = Sink {
        w,
        out,
        buf: Vec::new(),
        tensors: 0,
        params: 0,
        tensor_bytes: 0,
        alignment: opts.alignment,
    };
    let c = &model.config;
    let name = |role, layer| tensor_name(Naming::Gguf, role, layer);
    s.add(
        &name(Role::Embed, 0),
        c.vocab_size,
        c.hidden_size,
        &model.embed,
        dtype,
    )?;
    for (i, b) in model.blocks.iter().enumerate() {
        s.vector(&name(Role::AttnNorm, i), &b.attn_norm)?;
        linear(&mut s, &name(Role::Q, i), &b.q)?;
        linear(&mut s, &name(Role::K, i), &b.k)?;
        linear(&mut s, &name(Role::V, i), &b.v)?;
        if let Some([qb, kb, vb]) = &b.qkv_bias {
            s.vector(&name(Role::QBias, i), qb)?;
            s.vector(&name(Role::KBias, i), kb)?;
            s.vector(&name(Role::VBias, i), vb)?;
        }
        linear(&mut s, &name(Role::O, i), &b.o)?;
        s.vector(&name(Role::MlpNorm, i), &b.mlp_norm)?;
        linear(&mut s, &name(Role::Gate, i), &b.gate)?;
        linear(&mut s, &name(Role::Up, i), &b.up)?;
        linear(&mut s, &name(Role::Down, i), &b.down)?;
    }
    s.vector(&name(Role::FinalNorm, 0), &model.norm)?;
    if let Head::Separate(h) = &model.head {
        s.linear(&name(Role::Head, 0), h, dtype)?;
    }
    let Sink {
        w,
        tensors,
        params,
        tensor_bytes,
        ..
    } = s;
    let path = w
        .finish(manifest)
        .with_context(|| format!("{}: finishing the file", out.display()))?;
    Ok((path, tensors, params, tensor_bytes))
}
