//! Hugging Face checkpoint directories: `config.json`, one or more `*.safetensors`
//! files (sharded through `model.safetensors.index.json`), memory-mapped, in f32, f16
//! or bf16.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cap_device::config::{Arch, Config, RopeScaling};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::build::{ImportError, TensorSource};

/// Where one tensor lives in the mapped shards.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    shard: usize,
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A Hugging Face checkpoint directory with its shards mapped.
pub struct HfCheckpoint {
    dir: PathBuf,
    shards: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor index by name.
    pub tensors: HashMap<String, TensorEntry>,
    /// The parsed `config.json`.
    pub config_json: Value,
}

impl std::fmt::Debug for HfCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCheckpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.to_owned(),
        source,
    }
}

impl HfCheckpoint {
    /// Opens a checkpoint directory.
    pub fn open(dir: &Path) -> Result<HfCheckpoint, ImportError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
        let config_json: Value = serde_json::from_str(&text).map_err(|e| ImportError::Config {
            path: cfg_path.clone(),
            msg: format!("invalid JSON: {e}"),
        })?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| ImportError::Config {
                path: index.clone(),
                msg: format!("invalid JSON: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| ImportError::Config {
                    path: index.clone(),
                    msg: "no \"weight_map\" object".into(),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            names.sort_unstable();
            names.dedup();
            names.iter().map(|n| dir.join(n)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(ImportError::Config {
                    path: dir.to_owned(),
                    msg: "no model.safetensors or model.safetensors.index.json in the directory"
                        .into(),
                });
            }
            vec![single]
        };
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (i, p) in files.into_iter().enumerate() {
            let file = std::fs::File::open(&p).map_err(io(&p))?;
            // SAFETY: read-only map of a checkpoint file that cap never writes.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&p))?;
            let bad = |msg: String| ImportError::Safetensors {
                path: p.clone(),
                msg,
            };
            let (header, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if base + e > map.len() || s > e {
                    return Err(bad(format!(
                        "tensor '{name}' lies past the end of the file"
                    )));
                }
                let entry = TensorEntry {
                    shard: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + s,
                    end: base + e,
                };
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(bad(format!(
                        "tensor '{name}' appears in more than one shard"
                    )));
                }
            }
            shards.push((p, map));
        }
        Ok(HfCheckpoint {
            dir: dir.to_owned(),
            shards,
            tensors,
            config_json,
        })
    }

    /// Raw bytes of a tensor.
    pub fn bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.shards[e.shard].1[e.start..e.end]
    }

    /// Hands the mapped shards' resident pages back to the kernel.
    pub fn release_pages(&self) {
        for (_, m) in &self.shards {
            super::release(m);
        }
    }

    /// Total size of the shards in bytes.
    pub fn file_size(&self) -> u64 {
        self.shards.iter().map(|(_, m)| m.len() as u64).sum()
    }

    /// The shard files.
    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|(p, _)| p.as_path())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The architecture named by `model_type`.
    pub fn arch(&self) -> Result<Arch, ImportError> {
        let path = self.dir.join("config.json");
        let name = self
            .config_json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ImportError::Config {
                path: path.clone(),
                msg: "\"model_type\" is missing".into(),
            })?;
        match Arch::from_name(name) {
            // Gemma's Hugging Face tensor names for the norms around the MLP collide
            // with LLaMA's (see cap_device::tensors); its GGUF files are read instead.
            Some(Arch::Gemma3) => Err(ImportError::Config {
                path,
                msg: format!(
                    "\"model_type\": \"{name}\" is read from GGUF files only (convert with llama.cpp's convert_hf_to_gguf.py)"
                ),
            }),
            Some(a) => Ok(a),
            None => Err(ImportError::unsupported_arch(path, name)),
        }
    }

    /// Hyper-parameters from `config.json` (transformers 4 and 5 spellings).
    pub fn config(&self) -> Result<Config, ImportError> {
        let arch = self.arch()?;
        let path = self.dir.join("config.json");
        let j = &self.config_json;
        let err = |msg: String| ImportError::Config {
            path: path.clone(),
            msg,
        };
        let uint = |k: &str| j.get(k).and_then(Value::as_u64).map(|v| v as usize);
        let req =
            |k: &str| uint(k).ok_or_else(|| err(format!("\"{k}\" is missing or not an integer")));
        let hidden_size = req("hidden_size")?;
        let n_heads = req("num_attention_heads")?;
        if n_heads == 0 {
            return Err(err("\"num_attention_heads\" is 0".into()));
        }
        // transformers 5 moved rope settings into `rope_parameters`.
        let rope = j
            .get("rope_parameters")
            .or_else(|| j.get("rope_scaling"))
            .filter(|v| !v.is_null());
        let rope_theta = j
            .get("rope_theta")
            .or_else(|| rope.and_then(|r| r.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0) as f32;
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str);
        let rope_scaling = match rope_type {
            None | Some("default") => RopeScaling::None,
            Some("llama3") => {
                let r = rope.unwrap_or(&Value::Null);
                let f = |k: &str| r.get(k).and_then(Value::as_f64).map(|v| v as f32);
                let need =
                    |k: &str| f(k).ok_or_else(|| err(format!("llama3 rope scaling lacks \"{k}\"")));
                RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position: need("original_max_position_embeddings")?,
                }
            }
            Some(other) => {
                return Err(err(format!(
                    "RoPE scaling type '{other}' is not supported (cap supports default and llama3)"
                )));
            }
        };
        for flag in ["mlp_bias"] {
            if j.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(err(format!("\"{flag}\": true is not supported")));
            }
        }
        let qkv_bias = match arch {
            Arch::Qwen2 => true,
            _ => {
                if j.get("attention_bias").and_then(Value::as_bool) == Some(true) {
                    return Err(err(
                        "\"attention_bias\": true is not supported for this architecture".into(),
                    ));
                }
                false
            }
        };
        let sliding_window = match arch {
            Arch::Mistral => uint("sliding_window"),
            Arch::Qwen2 if j.get("use_sliding_window").and_then(Value::as_bool) == Some(true) => {
                uint("sliding_window")
            }
            _ => None,
        };
        Ok(Config {
            arch,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            n_layers: req("num_hidden_layers")?,
            n_heads,
            n_kv_heads: uint("num_key_value_heads").unwrap_or(n_heads),
            head_dim: uint("head_dim").unwrap_or(hidden_size / n_heads),
            rope_theta,
            rope_scaling,
            rms_eps: j
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            tie_embeddings: j
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias,
            max_position: uint("max_position_embeddings").unwrap_or(0),
            sliding_window,
            local_attention: None,
        })
    }
}

impl TensorSource for HfCheckpoint {
    fn path(&self) -> PathBuf {
        self.dir.clone()
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn load(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), ImportError> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ImportError::MissingTensor {
                path: self.dir.clone(),
                name: name.into(),
            })?;
        let b = self.bytes(e);
        let n: usize = e.shape.iter().product();
        let bad = |msg: String| ImportError::Safetensors {
            path: self.shards[e.shard].0.clone(),
            msg,
        };
        let width = match e.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(bad(format!(
                    "tensor '{name}' has dtype {other:?}; cap reads F32, F16 and BF16"
                )));
            }
        };
        if b.len() != n * width {
            return Err(bad(format!(
                "tensor '{name}' holds {} bytes, its shape needs {}",
                b.len(),
                n * width
            )));
        }
        let data = crate::capmodel::raw_f32(
            match e.dtype {
                Dtype::F32 => cap_format::DType::F32,
                Dtype::F16 => cap_format::DType::F16,
                _ => cap_format::DType::BF16,
            },
            b,
        );
        Ok((data, e.shape.clone()))
    }
}
