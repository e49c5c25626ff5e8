//! Model import: GGUF files and Hugging Face checkpoint directories, turned into the
//! runtime's [`cap_device::model::Model`] with one internal weight convention (see
//! [`cap_device::model`]).
pub mod arch;
pub mod build;
pub mod dequant;
pub mod gguf;
pub mod gguf_model;
pub mod hf;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use cap_device::model::{DenseLinear, Model};

pub use build::{ImportError, TensorSource};

/// The storage a model was imported from.
pub enum Checkpoint {
    /// A GGUF file.
    Gguf(gguf::GgufFile),
    /// A Hugging Face directory.
    HuggingFace(hf::HfCheckpoint),
}

impl Checkpoint {
    /// Opens a GGUF file or a Hugging Face directory (decided by what `path` is).
    pub fn open(path: &Path) -> Result<Checkpoint, ImportError> {
        let meta = std::fs::metadata(path).map_err(|source| ImportError::Io {
            path: path.to_owned(),
            source,
        })?;
        if meta.is_dir() {
            Ok(Checkpoint::HuggingFace(hf::HfCheckpoint::open(path)?))
        } else {
            Ok(Checkpoint::Gguf(gguf::GgufFile::open(path)?))
        }
    }

    /// The file or directory.
    pub fn path(&self) -> PathBuf {
        match self {
            Checkpoint::Gguf(f) => f.path().to_owned(),
            Checkpoint::HuggingFace(h) => h.dir().to_owned(),
        }
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> Result<cap_device::config::Config, ImportError> {
        match self {
            Checkpoint::Gguf(f) => gguf_model::config(f),
            Checkpoint::HuggingFace(h) => h.config(),
        }
    }

    /// Loads every weight as dense `f32` in cap's convention.
    pub fn load_model(&self) -> Result<Model<DenseLinear>, ImportError> {
        let config = self.config()?;
        match self {
            Checkpoint::Gguf(f) => {
                let permuted = arch::gguf_permutes_qk(config.arch);
                build::build_model(config, f, arch::Naming::Gguf, permuted)
            }
            Checkpoint::HuggingFace(h) => {
                build::build_model(config, h, arch::Naming::HuggingFace, false)
            }
        }
    }
}

impl Checkpoint {
    /// The model's tokenizer: from GGUF metadata, or from `tokenizer.json` beside a
    /// Hugging Face checkpoint.
    pub fn tokenizer(&self) -> Result<cap_device::tokenizer::Tokenizer, ImportError> {
        let spec = match self {
            Checkpoint::Gguf(f) => tokenizer::from_gguf(f)?,
            Checkpoint::HuggingFace(h) => {
                tokenizer::from_tokenizer_json(&h.dir().join("tokenizer.json"))?
            }
        };
        cap_device::tokenizer::Tokenizer::new(spec).map_err(|e| ImportError::Tokenizer {
            path: self.path(),
            msg: e.to_string(),
        })
    }
}
