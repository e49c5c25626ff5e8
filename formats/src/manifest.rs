//! The manifest: plain serde data, postcard-encoded at the end of the file.
//!
//! Postcard is not self-describing: a reader must know every field. Forward
//! compatibility within a major version therefore goes through [`Extension`]
//! records: a newer minor version adds information only as `(tag, bytes)` records in
//! the trailing `extensions` list of the [`Manifest`] or of a [`TensorEntry`], and
//! older readers skip tags they do not know. Anything a reader must understand to
//! load the model correctly (a new field in a struct, a new enum variant, a new
//! encoding) needs a new major version. Field order below is the wire order; never
//! reorder.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::{Encoding, FormatError};

/// One optional, forward-compatible record: a tag and opaque bytes. Readers ignore
/// tags they do not know. Tags below `0x8000_0000` are reserved for this spec;
/// the upper half is free for experiments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    /// What the bytes mean.
    pub tag: u32,
    /// The payload (its own encoding is defined by the tag).
    pub data: Vec<u8>,
}

/// The whole manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Architecture and hyper-parameters.
    pub model: ModelConfig,
    /// The tokenizer, if the file carries one (boards need it for the self-test).
    pub tokenizer: Option<Tokenizer>,
    /// How the weights were compressed, if they were.
    pub compression: Option<Compression>,
    /// Where the weights came from.
    pub provenance: Provenance,
    /// The tensor directory. The writer fills it; callers pass it empty.
    pub tensors: Vec<TensorEntry>,
    /// Forward-compatible extension records (see the module docs).
    pub extensions: Vec<Extension>,
}

/// Model architecture name and hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture name (`llama`, `qwen2`, ...).
    pub architecture: String,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Hidden (embedding) size.
    pub hidden_size: u32,
    /// Feed-forward intermediate size.
    pub intermediate_size: u32,
    /// Number of transformer blocks.
    pub num_layers: u32,
    /// Attention heads.
    pub num_heads: u32,
    /// Key/value heads (grouped-query attention).
    pub num_kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Whether the output projection reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have a bias.
    pub qkv_bias: bool,
    /// Longest context the model was trained for.
    pub max_position: u32,
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// LLaMA-3.1 style scaling.
    Llama3 {
        /// Overall factor.
        factor: f32,
        /// Low-frequency factor.
        low_freq_factor: f32,
        /// High-frequency factor.
        high_freq_factor: f32,
        /// Context length before scaling.
        original_max_position: u32,
    },
    /// Explicit per-frequency factors (one per rotary pair, `head_dim / 2`).
    PerFrequency {
        /// The factors.
        factors: Vec<f32>,
    },
}

/// Tokenizer family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenizerKind {
    /// GPT-2 style byte-level BPE.
    ByteLevelBpe,
    /// SentencePiece BPE (LLaMA-1/2 style, `▁` for spaces, byte fallback).
    SentencePieceBpe,
}

/// A tokenizer as plain data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tokenizer {
    /// Family.
    pub kind: TokenizerKind,
    /// Pre-tokenizer name (`gpt2`, `llama3`, `smollm`, ...), empty if none.
    pub pre_tokenizer: String,
    /// Token strings, indexed by id.
    pub tokens: Vec<String>,
    /// Per-token scores (empty when the tokenizer has none).
    pub scores: Vec<f32>,
    /// Ids of special (control) tokens.
    pub special_ids: Vec<u32>,
    /// BPE merges in priority order.
    pub merges: Vec<(String, String)>,
    /// Whether whole words found in the vocabulary skip merging.
    pub ignore_merges: bool,
    /// Beginning-of-sequence id.
    pub bos_id: Option<u32>,
    /// End-of-sequence id.
    pub eos_id: Option<u32>,
    /// Unknown-token id.
    pub unk_id: Option<u32>,
    /// Whether encoding prepends BOS.
    pub add_bos: bool,
    /// Where encoding puts a space before a stretch of text.
    pub space_prefix: SpacePrefix,
    /// SentencePiece: whether chars outside the vocabulary become `<0xXX>` byte tokens
    /// (otherwise the unknown token).
    pub byte_fallback: bool,
}

/// Where a tokenizer puts a space before each stretch of text (between special tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpacePrefix {
    /// Never.
    Never,
    /// Always (SentencePiece `add_dummy_prefix`, llama.cpp `add_space_prefix`).
    Always,
    /// Unless the stretch already starts with a space (`Metaspace` with
    /// `prepend_scheme: "always"`, `ByteLevel` with `add_prefix_space`).
    UnlessSpace,
    /// Only for the first stretch of the text, unless it starts with a space
    /// (`Metaspace` with `prepend_scheme: "first"`).
    FirstUnlessSpace,
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Tensor name (unique, 1..=`MAX_NAME_LEN` bytes of UTF-8).
    pub name: String,
    /// Rows (output features for a linear weight).
    pub rows: u32,
    /// Columns (input features).
    pub cols: u32,
    /// Encoding and its parameters.
    pub encoding: Encoding,
    /// Section offset relative to the data region (a multiple of the alignment).
    pub offset: u64,
    /// Section length, trailing padding included (= `encoded_bytes_aligned`).
    pub len: u64,
    /// CRC-32 (IEEE) of the whole section, padding included.
    pub crc32: u32,
    /// Forward-compatible per-tensor extension records.
    pub extensions: Vec<Extension>,
}

/// How the weights were compressed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Compression {
    /// Method name (`cap`, `wanda`, ...).
    pub method: String,
    /// The budget the search met.
    pub budget: Budget,
    /// Target device profile name.
    pub target_profile: String,
    /// Per-tensor ranks and non-zeros.
    pub layers: Vec<LayerCompression>,
    /// Host-measured perplexity on the self-test text, if measured.
    pub perplexity: Option<PerplexityRecord>,
    /// The self-test text itself, so the board needs nothing else.
    pub self_test_text: String,
}

/// What a budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BudgetKind {
    /// Bytes: the most the file (header, tensor sections, manifest) may take.
    TotalBytes,
    /// Fraction of the compressed linears' dense size, counted in parameters as the
    /// CAP paper does (`m + n` per kept singular value, 1 per kept sparse entry).
    FractionOfDense,
}

/// A budget.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// What `value` counts.
    pub kind: BudgetKind,
    /// The budget.
    pub value: f64,
}

/// Rank and non-zeros chosen for one tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerCompression {
    /// Tensor name.
    pub tensor: String,
    /// Low-rank rank (0 if none).
    pub rank: u32,
    /// Sparse non-zeros (0 if none).
    pub nnz: u64,
}

/// Perplexity protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PerplexityProtocol {
    /// SparseGPT/Wanda: non-overlapping windows, all but the first token scored.
    Standard,
    /// llama.cpp: second half of each window scored.
    LlamaCpp,
}

/// A host-measured perplexity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerplexityRecord {
    /// The perplexity.
    pub value: f64,
    /// Protocol used.
    pub protocol: PerplexityProtocol,
    /// Name of the text (e.g. `wikitext-2 valid`).
    pub text_name: String,
    /// Window length in tokens.
    pub ctx: u32,
    /// Windows scored.
    pub windows: u32,
}

/// Provenance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Source file (or directory) name.
    pub source_file: String,
    /// SHA-256 of the source file.
    pub source_sha256: [u8; 32],
    /// Version of cap that wrote the file.
    pub cap_version: String,
    /// Unix time of writing, only if the caller supplies it (files are otherwise
    /// deterministic).
    pub created_unix: Option<u64>,
}

/// The `Manifest.extensions` tag of a [`LocalAttentionRecord`].
pub const TAG_LOCAL_ATTENTION: u32 = 1;

/// Local (sliding-window) attention layers and their RoPE base, for architectures
/// that have them (Gemma-3). Stored postcard-encoded as the extension
/// [`TAG_LOCAL_ATTENTION`]: only architectures that need it carry it, and a reader
/// that predates it refuses those architectures by name, so it needs no new version.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalAttentionRecord {
    /// Positions a local layer's query sees, itself included.
    pub window: u32,
    /// Every `global_every`-th layer (1-based) is global, the others local.
    pub global_every: u32,
    /// RoPE base of the local layers.
    pub rope_theta: f32,
}

impl LocalAttentionRecord {
    /// The record as a manifest extension.
    pub fn to_extension(&self) -> Extension {
        Extension {
            tag: TAG_LOCAL_ATTENTION,
            // Serializing two integers and a float into a growable Vec cannot fail;
            // were it to, the empty payload would be refused when read.
            data: postcard::to_allocvec(self).unwrap_or_default(),
        }
    }

    /// The record a manifest carries, if any; an error if it is malformed or there are
    /// several.
    pub fn from_manifest(m: &Manifest) -> Result<Option<Self>, FormatError> {
        let mut found = m.extensions.iter().filter(|e| e.tag == TAG_LOCAL_ATTENTION);
        let Some(e) = found.next() else {
            return Ok(None);
        };
        if found.next().is_some() {
            return Err(FormatError::ManifestDecode);
        }
        let (r, rest) =
            postcard::take_from_bytes::<Self>(&e.data).map_err(|_| FormatError::ManifestDecode)?;
        if !rest.is_empty() {
            return Err(FormatError::ManifestTrailingBytes);
        }
        Ok(Some(r))
    }
}

/// Encodes a manifest with postcard (deterministic).
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>, FormatError> {
    postcard::to_allocvec(m).map_err(|_| FormatError::ManifestDecode)
}

/// Decodes a manifest, requiring every byte to be used.
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest, FormatError> {
    let (m, rest) =
        postcard::take_from_bytes::<Manifest>(bytes).map_err(|_| FormatError::ManifestDecode)?;
    if !rest.is_empty() {
        return Err(FormatError::ManifestTrailingBytes);
    }
    Ok(m)
}
