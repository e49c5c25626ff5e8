//! Hyper-parameters and tensors of a GGUF model file.

use std::path::PathBuf;

use cap_device::config::{Arch, Config, LocalAttention, RopeScaling};

use super::arch::Role;
use super::build::{ImportError, TensorSource};
use super::gguf::GgufFile;

impl TensorSource for GgufFile {
    fn path(&self) -> PathBuf {
        GgufFile::path(self).to_owned()
    }
    fn has(&self, name: &str) -> bool {
        self.tensor(name).is_some()
    }
    fn load(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), ImportError> {
        let shape = self.tensor(name).map(|t| t.shape()).unwrap_or_default();
        Ok((self.dequantize(name)?, shape))
    }
}

/// The architecture named by `general.architecture`.
pub fn arch(f: &GgufFile) -> Result<Arch, ImportError> {
    let path = f.path().to_owned();
    let name = f
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ImportError::Config {
            path: path.clone(),
            msg: "general.architecture is missing".into(),
        })?;
    Arch::from_name(name).ok_or_else(|| ImportError::unsupported_arch(path, name))
}

/// Reads the model's hyper-parameters from the `<arch>.*` metadata keys.
pub fn config(f: &GgufFile) -> Result<Config, ImportError> {
    let arch = arch(f)?;
    let path = f.path().to_owned();
    let a = arch.name();
    let missing = |k: &str| ImportError::Config {
        path: path.clone(),
        msg: format!("metadata key '{k}' is missing or not a number"),
    };
    let uint = |k: &str| -> Result<usize, ImportError> {
        let key = format!("{a}.{k}");
        f.get(&key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| missing(&key))
    };
    let float = |k: &str| -> Option<f64> { f.get(&format!("{a}.{k}")).and_then(|v| v.as_f64()) };

    let hidden_size = uint("embedding_length")?;
    let n_heads = uint("attention.head_count")?;
    let n_kv_heads = uint("attention.head_count_kv").unwrap_or(n_heads);
    let head_dim =
        uint("attention.key_length").unwrap_or(hidden_size.checked_div(n_heads).unwrap_or(0));
    let embd = f
        .tensor("token_embd.weight")
        .ok_or_else(|| ImportError::MissingTensor {
            path: path.clone(),
            name: "token_embd.weight".into(),
        })?;
    let vocab_size = uint("vocab_size").unwrap_or_else(|_| embd.shape()[0]);
    let rope_scaling = if f.tensor("rope_freqs.weight").is_some() {
        let (factors, _) = TensorSource::load(f, "rope_freqs.weight")?;
        RopeScaling::FreqFactors(factors)
    } else {
        match f
            .get(&format!("{a}.rope.scaling.type"))
            .and_then(|v| v.as_str())
        {
            None | Some("none") => RopeScaling::None,
            Some(other) => {
                return Err(ImportError::Config {
                    path,
                    msg: format!(
                        "RoPE scaling type '{other}' is not supported (cap supports none and llama3)"
                    ),
                });
            }
        }
    };
    let window = f
        .get(&format!("{a}.attention.sliding_window"))
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    // Gemma-3's local layers: llama.cpp (llama-model.cpp) fixes the period (every 6th
    // layer global) and the local RoPE base (10 000) for the architecture rather than
    // storing them, as Hugging Face's config defaults do (`sliding_window_pattern`,
    // `rope_local_base_freq`); only the window is in the file.
    let (sliding_window, local_attention) = match arch {
        Arch::Gemma3 => {
            let key = format!("{a}.attention.sliding_window");
            let window = window.ok_or_else(|| missing(&key))?;
            let local = LocalAttention {
                window,
                global_every: 6,
                rope_theta: 10_000.0,
            };
            (None, Some(local))
        }
        _ => (window, None),
    };
    Ok(Config {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: uint("feed_forward_length")?,
        n_layers: uint("block_count")?,
        n_heads,
        n_kv_heads,
        head_dim,
        rope_theta: float("rope.freq_base").unwrap_or(10000.0) as f32,
        rope_scaling,
        rms_eps: float("attention.layer_norm_rms_epsilon")
            .ok_or_else(|| missing(&format!("{a}.attention.layer_norm_rms_epsilon")))?
            as f32,
        tie_embeddings: f
            .tensor(&super::arch::tensor_name(
                super::arch::Naming::Gguf,
                Role::Head,
                0,
            ))
            .is_none(),
        qkv_bias: f
            .tensor(&super::arch::tensor_name(
                super::arch::Naming::Gguf,
                Role::QBias,
                0,
            ))
            .is_some(),
        max_position: uint("context_length").unwrap_or(0),
        sliding_window,
        local_attention,
    })
}
