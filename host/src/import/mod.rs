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

/// Drops the resident pages of a read-only file map from this process: a block-by-block
/// pass reads each block once, and without this every page it read would stay counted
/// in its resident memory until the end. Advice only: a failure changes nothing.
fn release(map: &memmap2::Mmap) {
    // SAFETY: MADV_DONTNEED on a read-only file mapping never changes what the mapping
    // reads (the pages come back from the file, which cap never writes, at the next
    // touch), so slices borrowed from it stay valid and keep their contents.
    let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
}

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
    /// How tensors are named and whether q/k rows need reordering.
    fn layout(
        &self,
        config: &cap_device::config::Config,
    ) -> (&dyn TensorSource, arch::Naming, bool) {
        match self {
            Checkpoint::Gguf(f) => (f, arch::Naming::Gguf, arch::gguf_permutes_qk(config.arch)),
            Checkpoint::HuggingFace(h) => (h, arch::Naming::HuggingFace, false),
        }
    }

    /// The model without its blocks ([`build::build_skeleton`]): what a block-by-block
    /// driver holds for the whole run.
    pub fn skeleton(&self) -> Result<Model<DenseLinear>, ImportError> {
        let config = self.config()?;
        let (src, naming, _) = self.layout(&config);
        build::build_skeleton(config, src, naming)
    }

    /// Block `i` of a model with configuration `config` (from [`Checkpoint::config`]),
    /// read from the mapped file now; with `linears` false, its norms and biases only
    /// ([`build::build_block`]). The pages read are handed back to the kernel
    /// afterwards, so a pass over every block leaves no more of the file resident than
    /// one block's.
    pub fn block(
        &self,
        config: &cap_device::config::Config,
        i: usize,
        linears: bool,
    ) -> Result<cap_device::model::Block<DenseLinear>, ImportError> {
        let (src, naming, permuted) = self.layout(config);
        let b = build::build_block(config, src, naming, permuted, i, linears)?;
        self.release_pages();
        Ok(b)
    }

    /// Drops the mapped file's resident pages from this process (they are read again
    /// from the file when touched again; nothing is lost: the maps are read-only).
    fn release_pages(&self) {
        match self {
            Checkpoint::Gguf(f) => f.release_pages(),
            Checkpoint::HuggingFace(h) => h.release_pages(),
        }
    }

    /// The model's tokenizer: from GGUF metadata, or from `tokenizer.json` beside a
    /// Hugging Face checkpoint. A tokenizer with more tokens than the embedding has
    /// rows is refused ([`ImportError::TokenizerVocab`]); one with fewer is accepted.
    pub fn tokenizer(&self) -> Result<cap_device::tokenizer::Tokenizer, ImportError> {
        let spec = match self {
            Checkpoint::Gguf(f) => tokenizer::from_gguf(f)?,
            Checkpoint::HuggingFace(h) => {
                tokenizer::from_tokenizer_json(&h.dir().join("tokenizer.json"))?
            }
        };
        let tok =
            cap_device::tokenizer::Tokenizer::new(spec).map_err(|e| ImportError::Tokenizer {
                path: self.path(),
                msg: e.to_string(),
            })?;
        // Token ids index the embedding's rows, so a token past them has no row: refused
        // now (pack, compress, eval, tokenize), not at the first text that uses it, and
        // the board refuses such a file too (`cap_device::load::tokenizer`).
        //
        // Fewer tokens than rows is accepted, deliberately: real models pad their
        // embedding past the tokenizer (Qwen2.5's has 151,936 rows, rounded up for GPU
        // kernels, while its Hugging Face tokenizer has 151,665 tokens; its GGUF pads
        // the tokenizer instead, with [PAD151665].. tokens). The extra rows are never
        // looked up by a token, and the head's scores for them are the model's own.
        let rows = self.config()?.vocab_size;
        if tok.vocab_size() > rows {
            return Err(ImportError::TokenizerVocab {
                path: self.path(),
                tokens: tok.vocab_size(),
                rows,
            });
        }
        Ok(tok)
    }
}
