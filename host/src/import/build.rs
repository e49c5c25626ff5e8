//! Assembles a runtime [`Model`] from any tensor source, using the architecture table.

use std::path::PathBuf;

use cap_device::config::{Arch, Config};
use cap_device::model::{Block, DenseLinear, Head, Model};
use rayon::prelude::*;

use super::arch::{Naming, Role, tensor_name, unpermute_qk};

/// Why a checkpoint could not be imported. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A GGUF-level problem.
    #[error(transparent)]
    Gguf(#[from] super::gguf::GgufError),
    /// The file or directory could not be read.
    #[error("cannot read {path}: {source}")]
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
}

impl Loader<'_> {
    fn name(&self, role: Role, layer: usize) -> String {
        tensor_name(self.naming, role, layer)
    }

    fn has(&self, role: Role, layer: usize) -> bool {
        self.src.has(&self.name(role, layer))
    }

    /// Loads a tensor and checks its element count against `shape` (1-D tensors may be
    /// stored with any shape of that size; 2-D ones must match exactly).
    fn load(&self, role: Role, layer: usize, shape: &[usize]) -> Result<Vec<f32>, ImportError> {
        let name = self.name(role, layer);
        if !self.src.has(&name) {
            return Err(ImportError::MissingTensor {
                path: self.src.path(),
                name,
            });
        }
        let (data, found) = self.src.load(&name)?;
        let n: usize = shape.iter().product();
        let ok = if shape.len() == 1 {
            data.len() == n
        } else {
            found == shape
        };
        if !ok {
            return Err(ImportError::Shape {
                path: self.src.path(),
                name,
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(data)
    }

    fn linear(
        &self,
        role: Role,
        layer: usize,
        out: usize,
        inp: usize,
    ) -> Result<DenseLinear, ImportError> {
        let w = self.load(role, layer, &[out, inp])?;
        Ok(DenseLinear {
            weight: w,
            out_features: out,
            in_features: inp,
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
    let path = src.path();
    config.validate().map_err(|m| ImportError::Config {
        path: path.clone(),
        msg: m.into(),
    })?;
    let ld = Loader { src, naming };
    let c = &config;
    let (h, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let embed = ld.load(Role::Embed, 0, &[c.vocab_size, h])?;
    let norm = ld.load(Role::FinalNorm, 0, &[h])?;
    let head = if c.tie_embeddings {
        Head::Tied
    } else {
        Head::Separate(ld.linear(Role::Head, 0, c.vocab_size, h)?)
    };
    let fix_qk = |mut l: DenseLinear, heads: usize| {
        if gguf_qk_order {
            l.weight = unpermute_qk(&l.weight, l.out_features, l.in_features, heads);
        }
        l
    };
    let blocks = (0..c.n_layers)
        .into_par_iter()
        .map(|i| {
            let qkv_bias = if c.qkv_bias {
                let mut bq = ld.load(Role::QBias, i, &[qd])?;
                let mut bk = ld.load(Role::KBias, i, &[kvd])?;
                if gguf_qk_order {
                    bq = unpermute_qk(&bq, qd, 1, c.n_heads);
                    bk = unpermute_qk(&bk, kvd, 1, c.n_kv_heads);
                }
                Some([bq, bk, ld.load(Role::VBias, i, &[kvd])?])
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
            Ok(Block {
                attn_norm: ld.load(Role::AttnNorm, i, &[h])?,
                q: fix_qk(ld.linear(Role::Q, i, qd, h)?, c.n_heads),
                k: fix_qk(ld.linear(Role::K, i, kvd, h)?, c.n_kv_heads),
                v: ld.linear(Role::V, i, kvd, h)?,
                o: ld.linear(Role::O, i, h, qd)?,
                qkv_bias,
                mlp_norm: ld.load(Role::MlpNorm, i, &[h])?,
                gate: ld.linear(Role::Gate, i, inter, h)?,
                up: ld.linear(Role::Up, i, inter, h)?,
                down: ld.linear(Role::Down, i, h, inter)?,
            })
        })
        .collect::<Result<Vec<_>, ImportError>>()?;
    let model = Model {
        config,
        embed,
        blocks,
        norm,
        head,
    };
    model.validate().map_err(|e| ImportError::Config {
        path,
        msg: e.to_string(),
    })?;
    Ok(model)
}
