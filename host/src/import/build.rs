//! Assembles a runtime [`Model`] from any tensor source: names and shapes come from
//! the tensor table ([`cap_device::tensors`]).

use std::path::PathBuf;

use cap_device::config::{Arch, Config};
use cap_device::model::{Block, DenseLinear, Head, Model};
use rayon::prelude::*;

use cap_device::tensors::TensorInfo;

use super::arch::{Naming, Role, tensor_name, unpermute_qk};

/// Why a checkpoint could not be imported. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// A GGUF-level problem.
    #[error(transparent)]
    Gguf(#[from] super::gguf::GgufError),
    /// The file or directory could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A safetensors file is malformed.
    #[error("{path}: corrupt safetensors file: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        msg: String,
    },
    /// The architecture is not one cap runs.
    #[error("{path}: architecture '{arch}' is not supported (cap supports: {supported})")]
    UnsupportedArch {
        /// The file.
        path: PathBuf,
        /// The architecture found.
        arch: String,
        /// The supported architectures.
        supported: String,
    },
    /// Hyper-parameters are missing or inconsistent.
    #[error("{path}: {msg}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer could not be read.
    #[error(transparent)]
    TokenizerImport(#[from] super::tokenizer::TokenizerImportError),
    /// The tokenizer was read but is not usable.
    #[error("{}: invalid tokenizer: {msg}", .path.display())]
    Tokenizer {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer has more tokens than the embedding has rows.
    #[error("{}: the tokenizer has {tokens} tokens, more than the {rows} rows of the token embedding", .path.display())]
    TokenizerVocab {
        /// The checkpoint.
        path: PathBuf,
        /// Tokens of the tokenizer.
        tokens: usize,
        /// Rows of the embedding (the configuration's vocabulary size).
        rows: usize,
    },
    /// A required tensor is absent.
    #[error("{path}: tensor '{name}' is missing")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A tensor's shape does not match the hyper-parameters.
    #[error("{path}: tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What the config implies.
        expected: Vec<usize>,
        /// What the file holds.
        found: Vec<usize>,
    },
}

impl ImportError {
    /// The error for an unsupported architecture name.
    pub fn unsupported_arch(path: PathBuf, arch: &str) -> Self {
        let supported: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
        ImportError::UnsupportedArch {
            path,
            arch: arch.into(),
            supported: supported.join(", "),
        }
    }
}

/// Anything that can hand out named tensors as row-major `f32`.
pub trait TensorSource: Sync {
    /// The file or directory, for messages.
    fn path(&self) -> PathBuf;
    /// Whether a tensor exists.
    fn has(&self, name: &str) -> bool;
    /// A tensor as row-major `f32` values and its shape (outermost dimension first).
    fn load(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), ImportError>;
}

struct Loader<'a> {
    src: &'a dyn TensorSource,
    naming: Naming,
    config: &'a Config,
}

impl Loader<'_> {
    fn name(&self, role: Role, layer: usize) -> String {
        tensor_name(self.naming, role, layer)
    }

    fn has(&self, role: Role, layer: usize) -> bool {
        self.src.has(&self.name(role, layer))
    }

    /// Loads a tensor and checks it against the table's shape for the configuration
    /// (vectors may be stored with any shape of their length; matrices must match
    /// exactly).
    fn load(&self, role: Role, layer: usize) -> Result<Vec<f32>, ImportError> {
        let t = TensorInfo::new(self.config, role, layer);
        let name = self.name(role, layer);
        if !self.src.has(&name) {
            return Err(ImportError::MissingTensor {
                path: self.src.path(),
                name,
            });
        }
        let (data, found) = self.src.load(&name)?;
        let (ok, expected) = if t.rows == 1 {
            (data.len() == t.cols, vec![t.cols])
        } else {
            let shape = vec![t.rows, t.cols];
            (found == shape, shape)
        };
        if !ok {
            return Err(ImportError::Shape {
                path: self.src.path(),
                name,
                expected,
                found,
            });
        }
        Ok(data)
    }

    fn linear(&self, role: Role, layer: usize) -> Result<DenseLinear, ImportError> {
        let t = TensorInfo::new(self.config, role, layer);
        Ok(DenseLinear {
            weight: self.load(role, layer)?,
            out_features: t.rows,
            in_features: t.cols,
        })
    }
}

/// Builds a dense model from `src`. With `gguf_qk_order`, q/k weights (and biases) are
/// in llama.cpp's interleaved row order and are converted to cap's (Hugging Face) order.
pub fn build_model(
    config: Config,
    src: &dyn TensorSource,
    naming: Naming,
    gguf_qk_order: bool,
) -> Result<Model<DenseLinear>, ImportError> {
    let mut model = build_skeleton(config, src, naming)?;
    let blocks = (0..model.config.n_layers)
        .into_par_iter()
        .map(|i| build_block(&model.config, src, naming, gguf_qk_order, i, true))
        .collect::<Result<Vec<_>, ImportError>>()?;
    model.blocks = blocks;
    model.validate().map_err(|e| ImportError::Config {
        path: src.path(),
        msg: e.to_string(),
    })?;
    Ok(model)
}

/// The model without its blocks (`blocks` is empty): the configuration, the token
/// embedding, the final norm and an untied head. What a block-by-block driver keeps
/// for the whole run while it loads one block at a time ([`build_block`]).
pub fn build_skeleton(
    config: Config,
    src: &dyn TensorSource,
    naming: Naming,
) -> Result<Model<DenseLinear>, ImportError> {
    config.validate().map_err(|m| ImportError::Config {
        path: src.path(),
        msg: m.into(),
    })?;
    let ld = Loader {
        src,
        naming,
        config: &config,
    };
    let embed = ld.load(Role::Embed, 0)?;
    let norm = ld.load(Role::FinalNorm, 0)?;
    let head = if config.tie_embeddings {
        Head::Tied
    } else {
        Head::Separate(ld.linear(Role::Head, 0)?)
    };
    Ok(Model {
        config,
        embed,
        blocks: vec![],
        norm,
        head,
    })
}

/// Block `i` of the model in `src`. With `linears` false its seven projections are
/// left empty (their shapes set, `weight` empty): the norms and biases alone, which a
/// writer needs beside linears it already encoded.
pub fn build_block(
    c: &Config,
    src: &dyn TensorSource,
    naming: Naming,
    gguf_qk_order: bool,
    i: usize,
    linears: bool,
) -> Result<Block<DenseLinear>, ImportError> {
    let path = src.path();
    let ld = Loader {
        src,
        naming,
        config: c,
    };
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    let linear = |role: Role, heads: Option<usize>| -> Result<DenseLinear, ImportError> {
        if !linears {
            let t = TensorInfo::new(c, role, i);
            return Ok(DenseLinear {
                weight: vec![],
                out_features: t.rows,
                in_features: t.cols,
            });
        }
        let mut l = ld.linear(role, i)?;
        if let (true, Some(h)) = (gguf_qk_order, heads) {
            l.weight = unpermute_qk(&l.weight, l.out_features, l.in_features, h);
        }
        Ok(l)
    };
    let qkv_bias = if c.qkv_bias {
        let mut bq = ld.load(Role::QBias, i)?;
        let mut bk = ld.load(Role::KBias, i)?;
        if gguf_qk_order {
            bq = unpermute_qk(&bq, qd, 1, c.n_heads);
            bk = unpermute_qk(&bk, kvd, 1, c.n_kv_heads);
        }
        Some([bq, bk, ld.load(Role::VBias, i)?])
    } else {
        for role in [Role::QBias, Role::KBias, Role::VBias] {
            if ld.has(role, i) {
                return Err(ImportError::Config {
                    path: path.clone(),
                    msg: format!(
                        "tensor '{}' is present but the architecture has no q/k/v biases",
                        ld.name(role, i)
                    ),
                });
            }
        }
        None
    };
    let qk_norm = if c.arch.qk_norm() {
        Some([ld.load(Role::QNorm, i)?, ld.load(Role::KNorm, i)?])
    } else {
        None
    };
    let post_norms = if c.arch.post_norms() {
        Some([
            ld.load(Role::PostAttnNorm, i)?,
            ld.load(Role::PostMlpNorm, i)?,
        ])
    } else {
        None
    };
    Ok(Block {
        attn_norm: ld.load(Role::AttnNorm, i)?,
        qk_norm,
        post_norms,
        q: linear(Role::Q, Some(c.n_heads))?,
        k: linear(Role::K, Some(c.n_kv_heads))?,
        v: linear(Role::V, None)?,
        o: linear(Role::O, None)?,
        qkv_bias,
        mlp_norm: ld.load(Role::MlpNorm, i)?,
        gate: linear(Role::Gate, None)?,
        up: linear(Role::Up, None)?,
        down: linear(Role::Down, None)?,
    })
}
