//! `cap-host inspect` / `cap-host verify` for `.cap` files: what a file holds
//! (architecture, dimensions, tensors with their encodings and bytes, bytes by group,
//! compression and provenance records), and full validation with every checksum.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use cap_format::manifest::RopeScaling;
use cap_format::{CapFile, Encoding, Sparse};
use serde::Serialize;

use crate::digest::to_hex;
use crate::import::arch::{Naming, classify};

/// Why a `.cap` file could not be inspected or verified; messages name the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CapInfoError {
    /// The file could not be read.
    #[error("{}: cannot read", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid `.cap` file (the first problem found).
    #[error("{}: {problem}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// One tensor of a `.cap` file.
#[derive(Clone, Debug, Serialize)]
pub struct CapTensor {
    /// Tensor name.
    pub name: String,
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub cols: u32,
    /// Encoding, in words (`dense f16`, `lowrank r=64 f16`, ...).
    pub encoding: String,
    /// Section bytes, padding included.
    pub bytes: u64,
    /// Report group (`embedding`, `attention`, `mlp`, `norms`, `head`, or `other`).
    pub group: String,
}

/// Tensors and bytes of one group.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CapGroup {
    /// Number of tensors.
    pub tensors: usize,
    /// Section bytes, padding included.
    pub bytes: u64,
}

/// The compression record, summarised.
#[derive(Clone, Debug, Serialize)]
pub struct CapCompression {
    /// Method name.
    pub method: String,
    /// Budget kind and value, in words.
    pub budget: String,
    /// Target device profile.
    pub target_profile: String,
    /// Number of per-tensor records.
    pub layers: usize,
    /// Host-measured perplexity, if recorded.
    pub perplexity: Option<f64>,
}

/// The provenance record.
#[derive(Clone, Debug, Serialize)]
pub struct CapProvenance {
    /// Source file name.
    pub source_file: String,
    /// SHA-256 of the source file (hex).
    pub source_sha256: String,
    /// Version of cap that wrote the file.
    pub cap_version: String,
    /// Unix time of writing, if recorded.
    pub created_unix: Option<u64>,
}

/// What `inspect` reports about a `.cap` file.
#[derive(Clone, Debug, Serialize)]
pub struct CapReport {
    /// File size in bytes.
    pub file_bytes: u64,
    /// Format version `major.minor`.
    pub format_version: String,
    /// Section alignment.
    pub alignment: u32,
    /// Architecture name.
    pub architecture: String,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Hidden size.
    pub hidden_size: u32,
    /// Feed-forward size.
    pub intermediate_size: u32,
    /// Number of blocks.
    pub num_layers: u32,
    /// Attention heads.
    pub num_heads: u32,
    /// Key/value heads.
    pub num_kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling, in words.
    pub rope_scaling: String,
    /// Whether the head is tied to the embedding.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v have biases.
    pub qkv_bias: bool,
    /// Trained context length.
    pub max_position: u32,
    /// Tokenizer vocabulary size, if the file carries a tokenizer.
    pub tokenizer_tokens: Option<usize>,
    /// Every tensor, in directory order.
    pub tensors: Vec<CapTensor>,
    /// Sum of all section bytes.
    pub tensor_bytes: u64,
    /// Stored values over all tensors (non-zeros and factor entries for compressed
    /// encodings).
    pub stored_values: u64,
    /// Bytes by group name.
    pub groups: BTreeMap<String, CapGroup>,
    /// Manifest bytes.
    pub manifest_bytes: u64,
    /// The compression record, if any.
    pub compression: Option<CapCompression>,
    /// The provenance record.
    pub provenance: CapProvenance,
}

fn sparse_values(s: Sparse, rows: u64, cols: u64) -> u64 {
    match s {
        Sparse::Bitmask { nnz, .. }
        | Sparse::BlockCsr { nnz, .. }
        | Sparse::QBitmask { nnz, .. }
        | Sparse::QBlockCsr { nnz, .. } => nnz,
        Sparse::TwoFour { .. } => rows * cols / 2,
    }
}

fn stored_values(e: &Encoding, rows: u32, cols: u32) -> u64 {
    let (r, c) = (u64::from(rows), u64::from(cols));
    match *e {
        Encoding::Dense { .. } => r * c,
        Encoding::LowRank { rank, .. } => u64::from(rank) * (r + c),
        Encoding::Sparse(s) => sparse_values(s, r, c),
        Encoding::Composite { rank, sparse, .. } => {
            u64::from(rank) * (r + c) + sparse_values(sparse, r, c)
        }
    }
}

/// Parses (structure only, no section checksums) and summarises a `.cap` file.
pub fn inspect_cap(bytes: &[u8]) -> Result<CapReport, String> {
    let f = CapFile::parse(bytes).map_err(|e| format!("invalid .cap file: {e}"))?;
    let h = f.header();
    let m = f.manifest();
    let mut tensors = Vec::with_capacity(m.tensors.len());
    let mut groups: BTreeMap<String, CapGroup> = BTreeMap::new();
    let mut tensor_bytes = 0u64;
    let mut values = 0u64;
    for t in &m.tensors {
        let group = classify(Naming::Gguf, &t.name)
            .map(|(role, _)| role.group().name())
            .unwrap_or("other")
            .to_string();
        let g = groups.entry(group.clone()).or_default();
        g.tensors += 1;
        g.bytes += t.len;
        tensor_bytes += t.len;
        values += stored_values(&t.encoding, t.rows, t.cols);
        tensors.push(CapTensor {
            name: t.name.clone(),
            rows: t.rows,
            cols: t.cols,
            encoding: t.encoding.to_string(),
            bytes: t.len,
            group,
        });
    }
    let mc = &m.model;
    let rope_scaling = match &mc.rope_scaling {
        RopeScaling::None => "none".to_string(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => format!(
            "llama3 factor={factor} low={low_freq_factor} high={high_freq_factor} original={original_max_position}"
        ),
        RopeScaling::PerFrequency { factors } => {
            format!("per-frequency ({} factors)", factors.len())
        }
    };
    let compression = m.compression.as_ref().map(|c| CapCompression {
        method: c.method.clone(),
        budget: format!("{:?} {}", c.budget.kind, c.budget.value),
        target_profile: c.target_profile.clone(),
        layers: c.layers.len(),
        perplexity: c.perplexity.as_ref().map(|p| p.value),
    });
    let p = &m.provenance;
    Ok(CapReport {
        file_bytes: bytes.len() as u64,
        format_version: format!("{}.{}", h.major, h.minor),
        alignment: h.alignment,
        architecture: mc.architecture.clone(),
        vocab_size: mc.vocab_size,
        hidden_size: mc.hidden_size,
        intermediate_size: mc.intermediate_size,
        num_layers: mc.num_layers,
        num_heads: mc.num_heads,
        num_kv_heads: mc.num_kv_heads,
        head_dim: mc.head_dim,
        rope_theta: mc.rope_theta,
        rope_scaling,
        tie_word_embeddings: mc.tie_word_embeddings,
        qkv_bias: mc.qkv_bias,
        max_position: mc.max_position,
        tokenizer_tokens: m.tokenizer.as_ref().map(|t| t.tokens.len()),
        tensors,
        tensor_bytes,
        stored_values: values,
        groups,
        manifest_bytes: h.manifest_len,
        compression,
        provenance: CapProvenance {
            source_file: p.source_file.clone(),
            source_sha256: to_hex(&p.source_sha256),
            cap_version: p.cap_version.clone(),
            created_unix: p.created_unix,
        },
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Renders a report as human-readable text.
pub fn render(r: &CapReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "format {}  alignment {}  {} bytes ({:.2} MiB)",
        r.format_version,
        r.alignment,
        r.file_bytes,
        mib(r.file_bytes)
    );
    let _ = writeln!(
        s,
        "architecture {}: vocab {}, hidden {}, intermediate {}, layers {}, heads {}/{} kv, head_dim {}",
        r.architecture,
        r.vocab_size,
        r.hidden_size,
        r.intermediate_size,
        r.num_layers,
        r.num_heads,
        r.num_kv_heads,
        r.head_dim
    );
    let _ = writeln!(
        s,
        "rope theta {} scaling {}; tied head {}; qkv bias {}; max position {}",
        r.rope_theta, r.rope_scaling, r.tie_word_embeddings, r.qkv_bias, r.max_position
    );
    match r.tokenizer_tokens {
        Some(n) => {
            let _ = writeln!(s, "tokenizer: {n} tokens");
        }
        None => {
            let _ = writeln!(s, "tokenizer: none");
        }
    }
    let _ = writeln!(
        s,
        "{} tensors, {} bytes of sections ({:.2} MiB), {} stored values; manifest {} bytes",
        r.tensors.len(),
        r.tensor_bytes,
        mib(r.tensor_bytes),
        r.stored_values,
        r.manifest_bytes
    );
    let _ = writeln!(s, "by group:");
    for (name, g) in &r.groups {
        let pct = if r.tensor_bytes > 0 {
            100.0 * g.bytes as f64 / r.tensor_bytes as f64
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "  {name:<10} {:>5} tensors {:>14} bytes {:>6.1}%",
            g.tensors, g.bytes, pct
        );
    }
    match &r.compression {
        Some(c) => {
            let _ = writeln!(
                s,
                "compression: {} (budget {}, profile {}, {} layer records{})",
                c.method,
                c.budget,
                c.target_profile,
                c.layers,
                c.perplexity
                    .map(|p| format!(", perplexity {p:.3}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(s, "compression: none (dense)");
        }
    }
    let p = &r.provenance;
    let _ = writeln!(
        s,
        "provenance: {} sha256 {} by cap {}{}",
        p.source_file,
        p.source_sha256,
        p.cap_version,
        p.created_unix
            .map(|t| format!(" at unix {t}"))
            .unwrap_or_default()
    );
    let _ = writeln!(s, "tensors:");
    for t in &r.tensors {
        let _ = writeln!(
            s,
            "  {:<28} {:>7}×{:<7} {:<28} {:>12} bytes",
            t.name, t.rows, t.cols, t.encoding, t.bytes
        );
    }
    s
}

/// What a successful [`verify_cap`] checked.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Tensors whose checksum and structure were verified.
    pub tensors: usize,
    /// Bytes covered by section checksums.
    pub tensor_bytes: u64,
    /// File size.
    pub file_bytes: u64,
}

/// Fully validates a `.cap` file: header, manifest, directory, every section checksum,
/// sparse index structure, and zero padding. Returns the first problem as one line
/// (naming the tensor when a section is at fault).
pub fn verify_cap(bytes: &[u8]) -> Result<VerifyReport, String> {
    let f = CapFile::parse(bytes).map_err(|e| format!("invalid .cap file: {e}"))?;
    let mut tensor_bytes = 0u64;
    for (i, t) in f.manifest().tensors.iter().enumerate() {
        f.tensor(i)
            .and_then(|v| v.verify())
            .map_err(|e| format!("tensor {:?} (#{i}): {e}", t.name))?;
        tensor_bytes += t.len;
    }
    f.verify_all()
        .map_err(|e| format!("invalid .cap file: {e}"))?;
    Ok(VerifyReport {
        tensors: f.len(),
        tensor_bytes,
        file_bytes: bytes.len() as u64,
    })
}

/// Maps the file read-only, as the board does ([`cap_device::load::map_file`]), so
/// that inspecting or verifying a multi-gigabyte file does not first copy it into
/// memory. Only a regular file is mapped: a FIFO would block the open until a writer
/// came, and a device has no size to map.
fn map(path: &Path) -> Result<memmap2::Mmap, CapInfoError> {
    let err = |source| CapInfoError::Read {
        path: path.to_owned(),
        source,
    };
    if !std::fs::metadata(path).map_err(err)?.is_file() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    cap_device::load::map_file(path).map_err(err)
}

fn invalid(path: &Path) -> impl FnOnce(String) -> CapInfoError + '_ {
    |problem| CapInfoError::Invalid {
        path: path.to_owned(),
        problem,
    }
}

/// [`inspect_cap`] on a file, memory-mapped (never read whole; like the board, it must
/// not be truncated meanwhile, see [`cap_device::open::map`]); errors name the file.
pub fn inspect_cap_file(path: &Path) -> Result<CapReport, CapInfoError> {
    let bytes = map(path)?;
    inspect_cap(&bytes).map_err(invalid(path))
}

/// [`verify_cap`] on a file, memory-mapped as in [`inspect_cap_file`]; errors name the
/// file.
pub fn verify_cap_file(path: &Path) -> Result<VerifyReport, CapInfoError> {
    let bytes = map(path)?;
    verify_cap(&bytes).map_err(invalid(path))
}
