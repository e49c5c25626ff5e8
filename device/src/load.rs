//! Builds a runnable model from a parsed `.cap` file without copying weight data: every
//! linear layer and the embedding borrow the file's bytes ([`CapLinear`]); only the
//! norm weights and biases (a few kilobytes) are converted to `f32`.

use alloc::string::String;
use alloc::vec::Vec;

use cap_format::manifest::{LocalAttentionRecord, Manifest, RopeScaling};
use cap_format::{CapFile, FormatError};
use cap_kernels::cpu;

use crate::caplinear::CapLinear;
use crate::config::{Arch, Config, LocalAttention, RopeScaling as DevRope};
use crate::model::{Block, Head, Model, ShapeError};
use crate::tensors::{Naming, Role, TensorInfo, tensor_name};
use crate::tokenizer::{RecordError, Tokenizer, TokenizerError, TokenizerSpec};

/// A model read in place from a `.cap` file.
pub type CapModel<'a> = Model<CapLinear<'a>, CapLinear<'a>>;

/// Why a `.cap` file cannot be run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file's structure (see [`FormatError`]).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A tensor the architecture needs is missing.
    #[error("tensor {name} is missing")]
    Missing {
        /// The tensor's name in the file.
        name: String,
    },
    /// The model record names an architecture this runtime does not run.
    #[error("unsupported architecture {name:?}")]
    UnsupportedArchitecture {
        /// The record's architecture name.
        name: String,
    },
    /// The model record's configuration is inconsistent.
    #[error("model record: {reason}")]
    ModelRecord {
        /// What is wrong.
        reason: &'static str,
    },
    /// A norm weight or bias is not a dense vector of the expected length.
    #[error("tensor {name}: expected {len} dense values")]
    NotDenseVector {
        /// The tensor's name.
        name: String,
        /// Values expected.
        len: usize,
    },
    /// The token embedding is not stored dense (rows are gathered by token id).
    #[error("tensor {name}: the token embedding must be stored dense")]
    EmbeddingNotDense {
        /// The tensor's name.
        name: String,
    },
    /// The tensors' shapes do not fit the model record.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// The file carries no tokenizer.
    #[error("the file carries no tokenizer")]
    NoTokenizer,
    /// The tokenizer record cannot be used.
    #[error("tokenizer record")]
    TokenizerRecord(#[source] RecordError),
    /// The tokenizer record does not form a tokenizer.
    #[error("tokenizer")]
    Tokenizer(#[source] TokenizerError),
    /// The tokenizer has more tokens than the embedding has rows.
    #[error("the tokenizer has {tokens} tokens, more than the {rows} rows of the token embedding")]
    TokenizerVocab {
        /// Tokens of the tokenizer.
        tokens: usize,
        /// Rows of the embedding (the model record's vocabulary size).
        rows: usize,
    },
    /// The model record claims more layers than the file has tensors for (checked
    /// before anything is sized by the layer count).
    #[error(
        "model record: {layers} layers, but the file has only {tensors} tensors (a layer needs {per_layer})"
    )]
    LayerCount {
        /// The record's layer count.
        layers: usize,
        /// Tensors in the file.
        tensors: usize,
        /// Tensors one layer needs.
        per_layer: usize,
    },
}

/// Tensors every block has (two norms, four attention and three MLP projections).
const TENSORS_PER_LAYER: usize = 9;

/// Maps the file at `path` read-only: the bytes [`model`] borrows on a machine with
/// an OS (a board without one passes its flash as `&[u8]` instead).
#[cfg(feature = "std")]
pub fn map_file(path: &std::path::Path) -> std::io::Result<memmap2::Mmap> {
    let f = std::fs::File::open(path)?;
    // SAFETY: a read-only private map. A concurrent writer could change what is read,
    // as with any read of a file, but not break memory safety: the parser validates
    // every byte it relies on and the kernels bound every read.
    unsafe { memmap2::Mmap::map(&f) }
}

/// The tokenizer a file carries, rebuilt from its manifest record.
pub fn tokenizer(m: &Manifest) -> Result<Tokenizer, LoadError> {
    let r = m.tokenizer.as_ref().ok_or(LoadError::NoTokenizer)?;
    let spec = TokenizerSpec::from_record(r).map_err(LoadError::TokenizerRecord)?;
    let tok = Tokenizer::new(spec).map_err(LoadError::Tokenizer)?;
    // Token ids index the embedding's rows (the record's vocabulary size): a larger
    // tokenizer is refused. A smaller one is accepted on purpose: real models pad their
    // embedding past the tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens in its
    // Hugging Face tokenizer), as the host's import accepts.
    if tok.vocab_size() > m.model.vocab_size as usize {
        return Err(LoadError::TokenizerVocab {
            tokens: tok.vocab_size(),
            rows: m.model.vocab_size as usize,
        });
    }
    Ok(tok)
}

/// The runtime configuration of a manifest's model record (and of its local-attention
/// record, for architectures that have one).
pub fn runtime_config(manifest: &Manifest) -> Result<Config, LoadError> {
    let m = &manifest.model;
    let arch =
        Arch::from_name(&m.architecture).ok_or_else(|| LoadError::UnsupportedArchitecture {
            name: m.architecture.clone(),
        })?;
    let rope_scaling = match &m.rope_scaling {
        RopeScaling::None => DevRope::None,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => DevRope::Llama3 {
            factor: *factor,
            low_freq_factor: *low_freq_factor,
            high_freq_factor: *high_freq_factor,
            original_max_position: *original_max_position as f32,
        },
        RopeScaling::PerFrequency { factors } => DevRope::FreqFactors(factors.clone()),
    };
    let c = Config {
        arch,
        vocab_size: m.vocab_size as usize,
        hidden_size: m.hidden_size as usize,
        intermediate_size: m.intermediate_size as usize,
        n_layers: m.num_layers as usize,
        n_heads: m.num_heads as usize,
        n_kv_heads: m.num_kv_heads as usize,
        head_dim: m.head_dim as usize,
        rope_theta: m.rope_theta,
        rope_scaling,
        rms_eps: m.rms_norm_eps,
        tie_embeddings: m.tie_word_embeddings,
        qkv_bias: m.qkv_bias,
        max_position: m.max_position as usize,
        sliding_window: None,
        local_attention: LocalAttentionRecord::from_manifest(manifest)?.map(|r| LocalAttention {
            window: r.window as usize,
            global_every: r.global_every as usize,
            rope_theta: r.rope_theta,
        }),
    };
    c.validate()
        .map_err(|reason| LoadError::ModelRecord { reason })?;
    Ok(c)
}

fn linear<'a>(file: &CapFile<'a>, name: &str) -> Result<CapLinear<'a>, LoadError> {
    let i = file
        .find(name)
        .ok_or_else(|| LoadError::Missing { name: name.into() })?;
    Ok(CapLinear::from_view(&file.tensor(i)?)?)
}

/// A dense vector tensor (norm weight, bias) of `len` values, as `f32`.
fn vector(file: &CapFile<'_>, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
    let l = linear(file, name)?;
    match l.dense {
        Some(v) if l.rows * l.cols == len => {
            let mut out = alloc::vec![0.0; len];
            cpu::rows_to_f32(cpu::kernels(), v, l.cols, 0, &mut out);
            Ok(out)
        }
        _ => Err(LoadError::NotDenseVector {
            name: name.into(),
            len,
        }),
    }
}

/// The model of a parsed file, borrowing its bytes. Tensors are looked up by the
/// names of the architecture's table ([`crate::tensors`]). Checks every shape against
/// the model record; does not verify checksums (call [`CapFile::verify_all`] first to
/// trust the numbers: the kernels are memory-safe on any bytes, but a flipped bit
/// would silently change results).
pub fn model<'a>(file: &CapFile<'a>) -> Result<CapModel<'a>, LoadError> {
    let config = runtime_config(file.manifest())?;
    let c = &config;
    let name = |role, layer| tensor_name(Naming::Gguf, role, layer);
    let vec_of = |role, layer| {
        let t = TensorInfo::new(c, role, layer);
        vector(file, &t.name, t.numel())
    };
    let embed_name = name(Role::Embed, 0);
    let embed = linear(file, &embed_name)?;
    if embed.dense.is_none() {
        return Err(LoadError::EmbeddingNotDense { name: embed_name });
    }
    // The record's numbers size allocations: a layer count of 4·10⁹ asked for terabytes
    // here before any tensor was looked up.
    if c.n_layers > file.len() / TENSORS_PER_LAYER {
        return Err(LoadError::LayerCount {
            layers: c.n_layers,
            tensors: file.len(),
            per_layer: TENSORS_PER_LAYER,
        });
    }
    let mut blocks = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let lin = |role| linear(file, &name(role, i));
        let qkv_bias = if c.qkv_bias {
            Some([
                vec_of(Role::QBias, i)?,
                vec_of(Role::KBias, i)?,
                vec_of(Role::VBias, i)?,
            ])
        } else {
            None
        };
        let qk_norm = if c.arch.qk_norm() {
            Some([vec_of(Role::QNorm, i)?, vec_of(Role::KNorm, i)?])
        } else {
            None
        };
        let post_norms = if c.arch.post_norms() {
            Some([
                vec_of(Role::PostAttnNorm, i)?,
                vec_of(Role::PostMlpNorm, i)?,
            ])
        } else {
            None
        };
        blocks.push(Block {
            attn_norm: vec_of(Role::AttnNorm, i)?,
            qk_norm,
            post_norms,
            q: lin(Role::Q)?,
            k: lin(Role::K)?,
            v: lin(Role::V)?,
            o: lin(Role::O)?,
            qkv_bias,
            mlp_norm: vec_of(Role::MlpNorm, i)?,
            gate: lin(Role::Gate)?,
            up: lin(Role::Up)?,
            down: lin(Role::Down)?,
        });
    }
    let head = if c.tie_embeddings {
        Head::Tied
    } else {
        Head::Separate(linear(file, &name(Role::Head, 0))?)
    };
    let model = Model {
        norm: vec_of(Role::FinalNorm, 0)?,
        config,
        embed,
        blocks,
        head,
    };
    model.validate()?;
    Ok(model)
}

/// Bytes of weight data one decoded token reads: every linear layer (and the output
/// head: the tied embedding in full), plus one embedding row.
pub fn weight_bytes_per_token(m: &CapModel<'_>) -> usize {
    let blocks: usize = m
        .blocks
        .iter()
        .flat_map(|b| b.linears().map(|(_, l)| l.weight_bytes()))
        .sum();
    let head = match &m.head {
        Head::Tied => m.embed.weight_bytes(),
        Head::Separate(l) => l.weight_bytes() + m.embed.weight_bytes() / m.embed.rows.max(1),
    };
    blocks + head
}
