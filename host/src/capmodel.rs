//! Builds a runnable model from a `.cap` file on the host: every tensor converted to
//! `f32`, compressed layers kept factored ([`FactoredLinear`]), so `eval` measures a
//! compressed file through the same forward pass as the source model.
//!
//! This copies the weights (the host has the memory); the board's runtime reads the
//! file in place instead.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use cap_device::config::{Arch, Config, RopeScaling as DevRope};
use cap_device::factored::FactoredLinear;
use cap_device::model::{Block, Head, Model};
use cap_device::tokenizer::Tokenizer;
use cap_device::tokenizer::TokenizerSpec;
use cap_format::manifest::{Manifest, ModelConfig, RopeScaling};
use cap_format::reader::{TensorData, Values};
use cap_format::sparse::decode_sparse;
use cap_format::{CapFile, DType, Encoding};

use crate::import::arch::{Naming, Role, tensor_name};

/// A `.cap` file loaded for the host.
pub struct LoadedCap {
    /// The model, every layer as stored (dense layers are rank-0 [`FactoredLinear`]s).
    pub model: Model<FactoredLinear>,
    /// The tokenizer, if the file carries one.
    pub tokenizer: Option<Tokenizer>,
    /// The manifest.
    pub manifest: Manifest,
}

/// The runtime configuration of a manifest's model record.
pub fn runtime_config(m: &ModelConfig) -> Result<Config> {
    let arch = Arch::from_name(&m.architecture)
        .ok_or_else(|| anyhow!("unsupported architecture {:?}", m.architecture))?;
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
    };
    c.validate().map_err(|e| anyhow!("model record: {e}"))?;
    Ok(c)
}

/// Little-endian values of any stored dtype as `f32`.
pub fn values_f32(v: &Values<'_>) -> Vec<f32> {
    raw_f32(v.dtype, v.bytes)
}

/// Little-endian raw values of `dtype` as `f32` (a trailing partial value is ignored).
pub fn raw_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// One tensor of the file as a [`FactoredLinear`] (`f32`, sparse part dense-with-zeros).
pub fn factored_tensor(file: &CapFile<'_>, name: &str) -> Result<FactoredLinear> {
    let t = file
        .tensor_by_name(name)
        .with_context(|| format!("tensor {name}"))?;
    let (rows, cols) = (t.rows as usize, t.cols as usize);
    let data = t.data().with_context(|| format!("tensor {name}"))?;
    let sparse = |view| -> Result<Vec<f32>> {
        let desc = match t.encoding {
            Encoding::Sparse(sp) | Encoding::Composite { sparse: sp, .. } => sp,
            _ => bail!("tensor {name}: sparse data in a non-sparse encoding"),
        };
        let raw = decode_sparse(t.rows, t.cols, desc, &view)
            .with_context(|| format!("tensor {name}: sparse part"))?;
        Ok(raw_f32(desc.dtype(), &raw))
    };
    let (a, b, s) = match data {
        TensorData::Dense(v) => (Vec::new(), Vec::new(), Some(values_f32(&v))),
        TensorData::LowRank { a, b } => (values_f32(&a), values_f32(&b), None),
        TensorData::Sparse(v) => (Vec::new(), Vec::new(), Some(sparse(v)?)),
        TensorData::Composite { a, b, sparse: v } => {
            (values_f32(&a), values_f32(&b), Some(sparse(v)?))
        }
    };
    let rank = a.len() / cols.max(1);
    let l = FactoredLinear {
        rows,
        cols,
        rank,
        a,
        b,
        s,
    };
    if !l.is_consistent() {
        bail!("tensor {name}: parts do not match its {rows}×{cols} shape");
    }
    Ok(l)
}

/// A vector tensor (norm weight, bias) as `f32`.
fn vector(file: &CapFile<'_>, name: &str, len: usize) -> Result<Vec<f32>> {
    let l = factored_tensor(file, name)?;
    match l.s {
        Some(v) if l.rank == 0 && v.len() == len => Ok(v),
        _ => bail!("tensor {name}: expected {len} dense values"),
    }
}

/// Parses, verifies (every checksum) and loads a `.cap` file.
pub fn load_cap(path: &Path) -> Result<LoadedCap> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let file = CapFile::parse(&bytes)
        .with_context(|| format!("{}: not a valid .cap file", path.display()))?;
    file.verify_all()
        .with_context(|| format!("{}: checksum verification failed", path.display()))?;
    let manifest = file.manifest().clone();
    let config = runtime_config(&manifest.model)?;
    let tokenizer = match &manifest.tokenizer {
        Some(r) => {
            let spec = TokenizerSpec::from_record(r)
                .map_err(|e| anyhow!("{}: tokenizer record: {e}", path.display()))?;
            Some(Tokenizer::new(spec).map_err(|e| anyhow!("{}: tokenizer: {e}", path.display()))?)
        }
        None => None,
    };
    let name = |role, layer| tensor_name(Naming::Gguf, role, layer);
    let h = config.hidden_size;
    let embed = {
        let e = factored_tensor(&file, &name(Role::Embed, 0))?;
        match e.s {
            Some(v) if e.rank == 0 => v,
            _ => bail!(
                "{}: the token embedding must be stored dense",
                path.display()
            ),
        }
    };
    let mut blocks = Vec::with_capacity(config.n_layers);
    for i in 0..config.n_layers {
        let lin = |role| factored_tensor(&file, &name(role, i));
        let qkv_bias = if config.qkv_bias {
            Some([
                vector(&file, &name(Role::QBias, i), config.q_dim())?,
                vector(&file, &name(Role::KBias, i), config.kv_dim())?,
                vector(&file, &name(Role::VBias, i), config.kv_dim())?,
            ])
        } else {
            None
        };
        blocks.push(Block {
            attn_norm: vector(&file, &name(Role::AttnNorm, i), h)?,
            q: lin(Role::Q)?,
            k: lin(Role::K)?,
            v: lin(Role::V)?,
            o: lin(Role::O)?,
            qkv_bias,
            mlp_norm: vector(&file, &name(Role::MlpNorm, i), h)?,
            gate: lin(Role::Gate)?,
            up: lin(Role::Up)?,
            down: lin(Role::Down)?,
        });
    }
    let head = if config.tie_embeddings {
        Head::Tied
    } else {
        Head::Separate(factored_tensor(&file, &name(Role::Head, 0))?)
    };
    let model = Model {
        norm: vector(&file, &name(Role::FinalNorm, 0), h)?,
        config,
        embed,
        blocks,
        head,
    };
    model
        .validate()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(LoadedCap {
        model,
        tokenizer,
        manifest,
    })
}
