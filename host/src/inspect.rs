//! `cap-host inspect` for source checkpoints: architecture, dimensions, parameter
//! counts and stored bytes per tensor group, and dtypes.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::import::arch::{Naming, classify};
use crate::import::{Checkpoint, ImportError};

/// Parameters, bytes and dtypes of one tensor group.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupStats {
    /// Number of tensors.
    pub tensors: usize,
    /// Number of parameters.
    pub params: u64,
    /// Bytes the tensors occupy in the file.
    pub bytes: u64,
    /// Storage dtypes and how many tensors use each.
    pub dtypes: BTreeMap<String, usize>,
}

/// What `inspect` reports about a checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointReport {
    /// The file or directory.
    pub path: String,
    /// "gguf" or "safetensors".
    pub format: &'static str,
    /// Architecture name.
    pub arch: String,
    /// Hyper-parameters.
    pub dims: BTreeMap<&'static str, String>,
    /// Total parameters.
    pub params: u64,
    /// Total bytes of tensor data.
    pub bytes: u64,
    /// Size of the file(s).
    pub file_bytes: u64,
    /// Per group (embedding, attention, mlp, norms, head, other).
    pub groups: BTreeMap<String, GroupStats>,
}

/// Inspects a checkpoint without loading its weights.
pub fn inspect(ck: &Checkpoint) -> Result<CheckpointReport, ImportError> {
    let config = ck.config()?;
    let mut groups: BTreeMap<String, GroupStats> = BTreeMap::new();
    let mut add = |naming: Naming, name: &str, params: u64, bytes: u64, dtype: String| {
        let g = classify(naming, name).map_or("other", |(r, _)| r.group().name());
        let s = groups.entry(g.to_string()).or_default();
        s.tensors += 1;
        s.params += params;
        s.bytes += bytes;
        *s.dtypes.entry(dtype).or_default() += 1;
    };
    let (format, file_bytes) = match ck {
        Checkpoint::Gguf(f) => {
            for t in &f.tensors {
                let n = t.n_elements();
                let bytes = t
                    .ggml_type()
                    .and_then(|ty| ty.bytes_for(n as usize))
                    .unwrap_or(0) as u64;
                add(Naming::Gguf, &t.name, n, bytes, t.type_name().to_string());
            }
            ("gguf", f.file_size())
        }
        Checkpoint::HuggingFace(h) => {
            for (name, e) in &h.tensors {
                let n: usize = e.shape.iter().product();
                let bytes = (n * e.dtype.bitsize() / 8) as u64;
                add(
                    Naming::HuggingFace,
                    name,
                    n as u64,
                    bytes,
                    format!("{:?}", e.dtype),
                );
            }
            ("safetensors", h.file_size())
        }
    };
    let c = &config;
    let dims: BTreeMap<&'static str, String> = [
        ("vocab_size", c.vocab_size.to_string()),
        ("hidden_size", c.hidden_size.to_string()),
        ("intermediate_size", c.intermediate_size.to_string()),
        ("n_layers", c.n_layers.to_string()),
        ("n_heads", c.n_heads.to_string()),
        ("n_kv_heads", c.n_kv_heads.to_string()),
        ("head_dim", c.head_dim.to_string()),
        ("rope_theta", c.rope_theta.to_string()),
        (
            "rope_scaling",
            format!("{:?}", c.rope_scaling).chars().take(80).collect(),
        ),
        ("rms_eps", c.rms_eps.to_string()),
        ("tie_embeddings", c.tie_embeddings.to_string()),
        ("qkv_bias", c.qkv_bias.to_string()),
        ("max_position", c.max_position.to_string()),
    ]
    .into_iter()
    .chain(c.local_attention.map(|l| {
        (
            "local_attention",
            format!(
                "window {} in every layer but each {}th, RoPE base {}",
                l.window, l.global_every, l.rope_theta
            ),
        )
    }))
    .chain(
        (c.arch.activation() != cap_device::config::Activation::Silu)
            .then(|| ("activation", format!("{:?}", c.arch.activation()))),
    )
    .collect();
    Ok(CheckpointReport {
        path: ck.path().display().to_string(),
        format,
        arch: c.arch.name().to_string(),
        dims,
        params: groups.values().map(|g| g.params).sum(),
        bytes: groups.values().map(|g| g.bytes).sum(),
        file_bytes,
        groups,
    })
}

/// Human-readable rendering of a report.
pub fn render(r: &CheckpointReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({}, {} bytes on disk)",
        r.path, r.format, r.file_bytes
    );
    let _ = writeln!(s, "architecture: {}", r.arch);
    for (k, v) in &r.dims {
        let _ = writeln!(s, "  {k:<18} {v}");
    }
    let _ = writeln!(
        s,
        "{:<10} {:>8} {:>14} {:>14}  dtypes",
        "group", "tensors", "params", "bytes"
    );
    for (g, st) in &r.groups {
        let dt: Vec<String> = st.dtypes.iter().map(|(d, n)| format!("{d}×{n}")).collect();
        let _ = writeln!(
            s,
            "{g:<10} {:>8} {:>14} {:>14}  {}",
            st.tensors,
            st.params,
            st.bytes,
            dt.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "{:<10} {:>8} {:>14} {:>14}",
        "total", "", r.params, r.bytes
    );
    s
}
