//! Packing: writes an imported checkpoint as a dense `.cap` file (every weight matrix
//! in one [`DType`], norms and biases in `f32`), with the manifest filled from the
//! checkpoint's configuration, tokenizer and provenance.
//!
//! Tensors are converted and written one at a time through [`CapWriter`] (atomic:
//! temporary file + rename), so only the imported `f32` model and one converted tensor
//! are in memory. The output is deterministic apart from the `created_unix` field.

use std::path::{Path, PathBuf};

use cap_device::config::{Config, RopeScaling as DevRope};
use cap_device::model::{DenseLinear, Model};
use cap_device::tensors::{self, Part, Storage};
use cap_format::manifest::{
    Extension, LocalAttentionRecord, Manifest, ModelConfig, Provenance, RopeScaling,
};
use cap_format::{CapWriter, DType, Encoding, FormatError, TensorDesc, WriteError, WriterOptions};
use serde::Serialize;

pub(crate) use crate::digest::parse_sha256;
pub use crate::digest::{DigestError, sha256_file, source_sha256, to_hex};
use crate::import::{Checkpoint, ImportError};

/// An error a caller's per-linear hook returns to [`write_model`]; kept as is, so the
/// caller's message reaches the user unchanged.
pub type HookError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a model could not be packed. Every message names the file or the tensor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// The model's weights could not be imported.
    #[error("{}: loading the model", .path.display())]
    Load {
        /// The checkpoint.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: ImportError,
    },
    /// The tokenizer could not be imported.
    #[error(transparent)]
    Tokenizer(ImportError),
    /// A digest could not be computed or parsed.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// `SOURCE_DATE_EPOCH` is set but not a whole number.
    #[error("SOURCE_DATE_EPOCH={0:?} is not a whole number of seconds")]
    SourceDateEpoch(String),
    /// A size does not fit the format's 32-bit field.
    #[error("{what} = {value} does not fit in u32")]
    TooLarge {
        /// Which size.
        what: &'static str,
        /// Its value.
        value: usize,
    },
    /// A tensor's data does not match its shape.
    #[error("tensor {name}: {len} values for a {rows}×{cols} shape")]
    Length {
        /// The tensor.
        name: String,
        /// Values given.
        len: usize,
        /// Rows of the shape.
        rows: usize,
        /// Columns of the shape.
        cols: usize,
    },
    /// The model in memory lacks a tensor the table lists for its configuration.
    #[error("tensor {0}: not in the model (its configuration and layers disagree)")]
    NotInModel(String),
    /// The output file could not be created, written or finished.
    #[error("{}: {what}", .path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// What was being done (`cannot create`, `writing tensor NAME`, ...).
        what: String,
        /// The writer's error.
        #[source]
        source: WriteError,
    },
    /// A tensor's encoded size could not be computed.
    #[error("tensor {name}")]
    Size {
        /// The tensor.
        name: String,
        /// The format's error.
        #[source]
        source: FormatError,
    },
    /// The written file could not be examined.
    #[error("{}: cannot stat", .path.display())]
    Stat {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A caller's per-linear hook failed (its error, unchanged).
    #[error(transparent)]
    Hook(HookError),
}

type Result<T, E = PackError> = std::result::Result<T, E>;

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

/// The creation time stamped into a written file: `SOURCE_DATE_EPOCH` (seconds since the
/// Unix epoch, the reproducible-builds convention) when set, so that the same inputs
/// give byte-identical files, else the clock (`None` if it reads before 1970).
pub fn creation_time() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| PackError::SourceDateEpoch(v)),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs())),
    }
}

fn u32_of(v: usize, what: &'static str) -> Result<u32> {
    u32::try_from(v).map_err(|_| PackError::TooLarge { what, value: v })
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

/// The manifest extension records a configuration needs besides its model record
/// (the local-attention layout of Gemma-3).
pub fn model_extensions(c: &Config) -> Result<Vec<Extension>> {
    let Some(l) = c.local_attention else {
        return Ok(Vec::new());
    };
    let record = LocalAttentionRecord {
        window: u32_of(l.window, "sliding window")?,
        global_every: u32_of(l.global_every, "global layer period")?,
        rope_theta: l.rope_theta,
    };
    Ok(vec![record.to_extension()])
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
            return Err(PackError::Length {
                name: name.to_string(),
                len: data.len(),
                rows,
                cols,
            });
        }
        self.buf.clear();
        // Each row one run: what the format's dense layout asks of quantized values.
        cap_format::extend_rows(&mut self.buf, data, cols, dtype);
        let desc = TensorDesc {
            rows: u32_of(rows, "rows")?,
            cols: u32_of(cols, "cols")?,
            encoding: Encoding::Dense { dtype },
        };
        let buf = std::mem::take(&mut self.buf);
        let r = self.add_parts(name, &desc, &[&buf], data.len() as u64);
        self.buf = buf;
        r
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
            .map_err(|source| PackError::Write {
                path: self.out.to_owned(),
                what: format!("writing tensor {name}"),
                source,
            })?;
        self.tensors += 1;
        self.params += params;
        self.tensor_bytes +=
            cap_format::encoded_bytes_aligned(desc, self.alignment).map_err(|source| {
                PackError::Size {
                    name: name.to_string(),
                    source,
                }
            })?;
        Ok(())
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
    let model = ck.load_model().map_err(|source| PackError::Load {
        path: src.clone(),
        source,
    })?;
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
        _ => Some(ck.tokenizer().map_err(PackError::Tokenizer)?),
    };
    // `Checkpoint::tokenizer` refused a tokenizer larger than the embedding and
    // accepted a smaller one (real models pad their embedding; see there).
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
        extensions: model_extensions(&model.config)?,
    };
    let has_tokenizer = tok.is_some();
    drop(tok);
    let (path, tensors, params, tensor_bytes) =
        write_model(&model, out, dtype, manifest, &mut |s, name, l| {
            s.add(name, l.out_features, l.in_features, &l.weight, dtype)?;
            Ok(())
        })?;
    let file_bytes = std::fs::metadata(&path)
        .map_err(|source| PackError::Stat {
            path: path.clone(),
            source,
        })?
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

/// A pause before each tensor is written, from `CAP_TEST_WRITE_DELAY_MS`: a test seam
/// so the hostile-input tests can interrupt a tiny model's write mid-file (which
/// otherwise takes a millisecond). Unset (always, outside those tests) is no pause.
fn test_write_delay() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var("CAP_TEST_WRITE_DELAY_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms.min(10_000)))
}

/// Writes `model` to `out` with the tensors, order and names of the tensor table
/// ([`tensors::file_tensors`]): the embedding (and an untied head) in `dtype`, norms
/// and biases in `f32`, and every compressible linear (the block projections) through
/// `linear` (which may compress it). Returns the final path, the tensor count, the
/// parameters and the bytes of the tensor sections.
pub(crate) fn write_model(
    model: &Model<DenseLinear>,
    out: &Path,
    dtype: DType,
    manifest: Manifest,
    linear: &mut dyn FnMut(&mut Sink<'_>, &str, &DenseLinear) -> Result<(), HookError>,
) -> Result<(PathBuf, usize, u64, u64)> {
    let opts = WriterOptions::default();
    let _cleanup = crate::tempfiles::register_writer(out);
    let w = CapWriter::create(out, opts).map_err(|source| PackError::Write {
        path: out.to_owned(),
        what: "cannot create".into(),
        source,
    })?;
    let mut s = Sink {
        w,
        out,
        buf: Vec::new(),
        tensors: 0,
        params: 0,
        tensor_bytes: 0,
        alignment: opts.alignment,
    };
    let delay = test_write_delay();
    for t in tensors::file_tensors(&model.config) {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let part = tensors::part(model, t.role, t.layer.unwrap_or(0))
            .ok_or_else(|| PackError::NotInModel(t.name.clone()))?;
        let dt = t.dense_dtype(dtype);
        match part {
            Part::Linear(l) if t.is_compressible() => {
                linear(&mut s, &t.name, l).map_err(PackError::Hook)?
            }
            Part::Linear(l) => s.add(&t.name, l.out_features, l.in_features, &l.weight, dt)?,
            Part::Embedding(e) => s.add(&t.name, t.rows, t.cols, e, dt)?,
            // Vectors are written `1 × len` in f32 whatever their length in the table.
            Part::Vector(v) => {
                debug_assert_eq!(t.storage(), Storage::F32);
                s.add(&t.name, 1, v.len(), v, DType::F32)?
            }
        }
    }
    let Sink {
        w,
        tensors,
        params,
        tensor_bytes,
        ..
    } = s;
    let path = w.finish(manifest).map_err(|source| PackError::Write {
        path: out.to_owned(),
        what: "finishing the file".into(),
        source,
    })?;
    Ok((path, tensors, params, tensor_bytes))
}
