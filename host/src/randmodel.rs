//! Random LLaMA-architecture Hugging Face checkpoints of a chosen size: the test input
//! that shows cap handles models larger than memory (it works block by block), and a
//! way to measure its speed at scale without downloading gigabytes.
//!
//! [`write_random_llama`] writes `config.json`, bf16 safetensors shards with Hugging
//! Face's LLaMA tensor names, `model.safetensors.index.json`, and a small byte-level
//! BPE `tokenizer.json` (+ `tokenizer_config.json`). The weights are noise (normal-ish,
//! std 0.02; norms 1.0), deterministic from a seed, so the perplexity of such a model
//! means nothing; its shapes, bytes and tensor layout are those of a real checkpoint.
//!
//! The shards are written streaming: each safetensors header is computed from names
//! and shapes alone, then every tensor's bytes are generated chunk by chunk
//! ([`CHUNK_VALUES`] values at a time) straight into the file. Memory stays at a few MB
//! whatever the model's size. The folder is assembled beside its destination and
//! renamed into place, so an interrupted run never leaves a half-written checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use half::bf16;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};

/// Values generated (and written) per chunk: 1 Mi values, 2 MiB of bf16.
pub const CHUNK_VALUES: usize = 1 << 20;

/// Standard deviation of the weight matrices' values (LLaMA's `initializer_range`).
pub const WEIGHT_STD: f32 = 0.02;

/// The default largest shard: 2 GB, Hugging Face's `max_shard_size="2GB"`.
pub const DEFAULT_SHARD_BYTES: u64 = 2_000_000_000;

/// Why a random checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RandModelError {
    /// A file-system operation failed.
    #[error("{}: {what}: {source}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done ("cannot create", "cannot write", ...).
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The destination exists and is not an empty folder.
    #[error(
        "{}: exists and is not an empty folder; choose another output or remove it",
        .0.display()
    )]
    NotEmpty(PathBuf),
    /// The shapes cannot form a LLaMA model (or the shard size is 0).
    #[error("invalid random model spec: {0}")]
    InvalidSpec(String),
    /// A parameter count (`50m`, `1.1b`, ...) could not be read.
    #[error(
        "invalid parameter count {0:?}: expected a number with an optional k, m, b or t suffix (50m, 1.1b, 125000000)"
    )]
    InvalidCount(String),
}

impl RandModelError {
    fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> RandModelError {
        let path = path.to_owned();
        move |source| RandModelError::Io { path, what, source }
    }
}

/// The shapes (and seed, shard size) of a random LLaMA checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RandomSpec {
    /// Model width (`hidden_size`).
    pub hidden: usize,
    /// MLP width (`intermediate_size`).
    pub intermediate: usize,
    /// Transformer blocks (`num_hidden_layers`).
    pub layers: usize,
    /// Query heads (`num_attention_heads`); `head_dim` is `hidden / heads`.
    pub heads: usize,
    /// Key/value heads (`num_key_value_heads`), dividing `heads`.
    pub kv_heads: usize,
    /// Embedding rows (`vocab_size`); at least the tokenizer's [`TOKENIZER_TOKENS`].
    pub vocab: usize,
    /// Context length (`max_position_embeddings`).
    pub max_positions: usize,
    /// Largest shard's tensor bytes; a tensor larger than this gets a shard of its own.
    pub shard_bytes: u64,
    /// Seed of the weights: the same spec and seed give the same bytes.
    pub seed: u64,
    /// Whether the output head shares the embedding (no `lm_head.weight`).
    pub tie_embeddings: bool,
}

/// A known model's shapes, used by [`RandomSpec::for_params`] near its nominal size.
struct Known {
    nominal: u64,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    max_positions: usize,
}

/// TinyLlama-1.1B, OpenLLaMA-3B, LLaMA-2-7B and LLaMA-2-13B (all vocab 32000, untied).
const KNOWN: [Known; 4] = [
    Known {
        nominal: 1_100_000_000,
        hidden: 2048,
        intermediate: 5632,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        max_positions: 2048,
    },
    Known {
        nominal: 3_000_000_000,
        hidden: 3200,
        intermediate: 8640,
        layers: 26,
        heads: 32,
        kv_heads: 32,
        max_positions: 2048,
    },
    Known {
        nominal: 7_000_000_000,
        hidden: 4096,
        intermediate: 11008,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        max_positions: 4096,
    },
    Known {
        nominal: 13_000_000_000,
        hidden: 5120,
        intermediate: 13824,
        layers: 40,
        heads: 40,
        kv_heads: 40,
        max_positions: 4096,
    },
];

/// The widest model [`RandomSpec::for_params`] scales to.
const MAX_HIDDEN: usize = 16384;

impl RandomSpec {
    /// LLaMA-like shapes of about `target_params` parameters.
    ///
    /// Within 10% of a known model's nominal size the known shapes are used exactly:
    /// 1.1 B → TinyLlama (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
    /// heads), 3 B → OpenLLaMA-3B (3200, 8640, 26 layers, 32 heads; 3.43 B parameters),
    /// 7 B → LLaMA-2-7B, 13 B → LLaMA-2-13B; all vocab 32000, untied.
    ///
    /// Otherwise the shapes are scaled: head_dim 64, hidden a multiple of 64,
    /// intermediate ≈ 2.75·hidden rounded to a multiple of 64, 4× grouped-query
    /// attention when there are at least 8 heads (and a multiple of 4), vocab 32000
    /// unless the embedding would take more than a third of the target (then a power of
    /// two down to 512), tied embeddings below 1 B. The width is the one whose layer
    /// count (what the budget leaves after the embedding, rounded) is closest to a
    /// LLaMA-like depth for that width, `max(hidden/128, 4·√(hidden/64))`.
    ///
    /// Seed 0 and [`DEFAULT_SHARD_BYTES`]; change the fields to taste.
    pub fn for_params(target_params: u64) -> RandomSpec {
        let base =
            |hidden, intermediate, layers, heads, kv_heads, vocab, max_positions, tie| RandomSpec {
                hidden,
                intermediate,
                layers,
                heads,
                kv_heads,
                vocab,
                max_positions,
                shard_bytes: DEFAULT_SHARD_BYTES,
                seed: 0,
                tie_embeddings: tie,
            };
        let t = target_params as f64;
        if let Some(k) = KNOWN
            .iter()
            .find(|k| (t - k.nominal as f64).abs() <= 0.1 * k.nominal as f64)
        {
            return base(
                k.hidden,
                k.intermediate,
                k.layers,
                k.heads,
                k.kv_heads,
                32000,
                k.max_positions,
                false,
            );
        }
        let tie = target_params < 1_000_000_000;
        let mut best: Option<(f64, RandomSpec)> = None;
        for hidden in (64..=MAX_HIDDEN).step_by(64) {
            let heads = hidden / 64;
            let kv_heads = if heads >= 8 && heads.is_multiple_of(4) {
                heads / 4
            } else {
                heads
            };
            let intermediate = ((hidden as f64 * 2.75 / 64.0).round() as usize).max(1) * 64;
            let per_row = if tie { hidden } else { 2 * hidden } as f64;
            let vocab = [32000usize, 16384, 8192, 4096, 2048, 1024, 512]
                .into_iter()
                .find(|&v| v as f64 * per_row <= t / 3.0)
                .unwrap_or(512);
            let mut s = base(hidden, intermediate, 1, heads, kv_heads, vocab, 2048, tie);
            let rest = t - (s.params() - s.block_params()) as f64;
            let layers_f = rest / s.block_params() as f64;
            if layers_f < 0.5 {
                // Wider models only leave less room: this width and those after fail.
                if best.is_none() {
                    best = Some((f64::INFINITY, s));
                }
                break;
            }
            s.layers = layers_f.round() as usize;
            let desired = (hidden as f64 / 128.0).max(4.0 * (hidden as f64 / 64.0).sqrt());
            let miss = (layers_f.ln() - desired.ln()).abs();
            if best.as_ref().is_none_or(|(m, _)| miss < *m) {
                best = Some((miss, s));
            }
        }
        // The loop's first width always records a candidate.
        best.map_or_else(|| base(64, 192, 1, 1, 1, 512, 2048, true), |(_, s)| s)
    }

    /// `hidden / heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    /// Parameters of one transformer block: q and o (`hidden²` each), k and v
    /// (`kv_heads·head_dim·hidden` each), gate, up and down (`hidden·intermediate`
    /// each), and the two RMSNorms (`hidden` each).
    pub fn block_params(&self) -> u64 {
        let (h, i) = (self.hidden as u64, self.intermediate as u64);
        let q = (self.heads * self.head_dim()) as u64 * h;
        let kv = (self.kv_heads * self.head_dim()) as u64 * h;
        2 * q + 2 * kv + 3 * h * i + 2 * h
    }

    /// Exact parameter count: embedding (and head unless tied), the blocks and the
    /// final norm.
    pub fn params(&self) -> u64 {
        let embed = self.vocab as u64 * self.hidden as u64;
        let head = if self.tie_embeddings { 0 } else { embed };
        embed + head + self.layers as u64 * self.block_params() + self.hidden as u64
    }

    /// Refuses shapes that do not form a LLaMA model cap can load.
    pub fn validate(&self) -> Result<(), RandModelError> {
        let bad = |m: String| Err(RandModelError::InvalidSpec(m));
        if self.hidden == 0 || self.intermediate == 0 || self.layers == 0 {
            return bad("hidden, intermediate and layers must be positive".into());
        }
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return bad(format!(
                "{} heads do not divide hidden {}",
                self.heads, self.hidden
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} must be even", self.head_dim()));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} KV heads do not divide {} heads",
                self.kv_heads, self.heads
            ));
        }
        if self.vocab < TOKENIZER_TOKENS {
            return bad(format!(
                "vocab {} is smaller than the tokenizer's {TOKENIZER_TOKENS} tokens",
                self.vocab
            ));
        }
        if self.max_positions == 0 {
            return bad("max_positions must be positive".into());
        }
        if self.shard_bytes == 0 {
            return bad("shard_bytes must be positive".into());
        }
        Ok(())
    }

    /// Every tensor in file order: name and shape (outermost first).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden, self.intermediate);
        let qd = self.heads * self.head_dim();
        let kvd = self.kv_heads * self.head_dim();
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            v.extend([
                (format!("{p}.self_attn.q_proj.weight"), vec![qd, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kvd, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kvd, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, qd]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            ]);
        }
        v.push(("model.norm.weight".into(), vec![h]));
        if !self.tie_embeddings {
            v.push(("lm_head.weight".into(), vec![self.vocab, h]));
        }
        v
    }
}

/// Reads a parameter count: a number with an optional `k`, `m`, `b` (or `g`) or `t`
/// suffix, any case: `50m`, `1.1b`, `3B`, `125000000`, `3e9`.
pub fn parse_param_count(s: &str) -> Result<u64, RandModelError> {
    let bad = || RandModelError::InvalidCount(s.to_string());
    let t = s.trim();
    let (num, scale) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let scale = match c.to_ascii_lowercase() {
                'k' => 1e3,
                'm' => 1e6,
                'b' | 'g' => 1e9,
                't' => 1e12,
                _ => return Err(bad()),
            };
            (&t[..i], scale)
        }
        _ => (t, 1.0),
    };
    let x: f64 = num.trim().parse().map_err(|_| bad())?;
    let n = (x * scale).round();
    if !(1.0..1e15).contains(&n) {
        return Err(bad());
    }
    Ok(n as u64)
}

/// What [`write_random_llama`] wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Parameters ([`RandomSpec::params`]).
    pub params: u64,
    /// Bytes of the safetensors shards (headers included).
    pub bytes: u64,
    /// Number of shards.
    pub shards: usize,
}

/// SplitMix64's output function (Steele, Lea & Flood 2014): a bijective mix of 64 bits.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The random stream of one tensor: the seed mixed with the FNV-1a hash of its name, so
/// every tensor's values are independent of the others and of the file order.
fn tensor_stream(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    mix64(seed ^ mix64(h))
}

/// Value `index` of a matrix's stream (before rounding to bf16): SplitMix64 at that
/// counter, its four 16-bit quarters summed (Irwin–Hall, n = 4: mean 2, variance 1/3),
/// centred and scaled to std [`WEIGHT_STD`]. Counter-based, so any position can be
/// computed on its own and chunks in parallel.
fn matrix_value(stream: u64, index: u64) -> f32 {
    let r = mix64(stream.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)));
    let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
    // Each quarter is (q + 0.5) / 65536, uniform on (0, 1).
    let u = (sum as f32 + 2.0) / 65536.0;
    (u - 2.0) * (3.0f32.sqrt() * WEIGHT_STD)
}

/// Whether a tensor is an RMSNorm weight (all ones) rather than a matrix (noise).
fn is_norm(name: &str) -> bool {
    name.ends_with("norm.weight")
}

/// The value stored at `index` (row-major) of tensor `name` in a checkpoint written
/// with `seed`, as f32 (exactly the bf16 in the file): 1.0 for the norms, noise of std
/// [`WEIGHT_STD`] for the matrices.
pub fn weight_value(seed: u64, name: &str, index: u64) -> f32 {
    if is_norm(name) {
        1.0
    } else {
        bf16::from_f32(matrix_value(tensor_stream(seed, name), index)).to_f32()
    }
}

/// Fills `out` (little-endian bf16, two bytes a value) with values `first..` of a
/// tensor, in parallel.
fn fill_bf16(out: &mut [u8], seed: u64, name: &str, first: u64) {
    if is_norm(name) {
        let one = bf16::ONE.to_le_bytes();
        out.chunks_exact_mut(2)
            .for_each(|c| c.copy_from_slice(&one));
        return;
    }
    let stream = tensor_stream(seed, name);
    const PIECE: usize = 16 * 1024;
    out.par_chunks_mut(2 * PIECE)
        .enumerate()
        .for_each(|(p, piece)| {
            let base = first + (p * PIECE) as u64;
            for (j, c) in piece.chunks_exact_mut(2).enumerate() {
                let v = bf16::from_f32(matrix_value(stream, base + j as u64));
                c.copy_from_slice(&v.to_le_bytes());
            }
        });
}

/// Special tokens of the tokenizer, ids 0, 1, 2 (as LLaMA's).
const SPECIAL: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// Byte-level BPE merges of the tokenizer (GPT-2's byte alphabet: `Ġ` is a space),
/// frequent English pieces; each side exists before the merge that uses it.
const MERGES: [(&str, &str); 36] = [
    ("Ġ", "t"),
    ("Ġ", "a"),
    ("h", "e"),
    ("i", "n"),
    ("r", "e"),
    ("o", "n"),
    ("Ġt", "he"),
    ("e", "r"),
    ("Ġ", "s"),
    ("a", "t"),
    ("Ġ", "w"),
    ("Ġ", "o"),
    ("e", "n"),
    ("Ġ", "c"),
    ("i", "t"),
    ("i", "s"),
    ("a", "n"),
    ("o", "r"),
    ("e", "s"),
    ("Ġ", "b"),
    ("e", "d"),
    ("Ġ", "f"),
    ("in", "g"),
    ("Ġ", "p"),
    ("o", "u"),
    ("Ġa", "n"),
    ("a", "l"),
    ("a", "r"),
    ("Ġt", "o"),
    ("Ġo", "f"),
    ("Ġ", "m"),
    ("Ġ", "in"),
    ("Ġ", "d"),
    ("Ġ", "h"),
    ("Ġan", "d"),
    ("Ġ", "i"),
];

/// Tokens of the generated tokenizer: 3 special, 256 bytes, one per merge.
pub const TOKENIZER_TOKENS: usize = SPECIAL.len() + 256 + MERGES.len();

/// The tokenizer's tokens in id order.
fn tokenizer_tokens() -> Vec<String> {
    let mut tokens: Vec<String> = SPECIAL.iter().map(|s| s.to_string()).collect();
    tokens.extend((0..=255u8).map(|b| cap_device::tokenizer::byte_char(b).to_string()));
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
    }
    tokens
}

/// `tokenizer.json`: GPT-2-style byte-level BPE (no prefix space), BOS added by a
/// template, with [`SPECIAL`] as added tokens.
fn tokenizer_json() -> Value {
    let tokens = tokenizer_tokens();
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let merges: Vec<Value> = MERGES.iter().map(|(a, b)| json!([a, b])).collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges
        }
    })
}

/// `tokenizer_config.json`: names BOS and EOS for cap and for transformers.
fn tokenizer_config_json(spec: &RandomSpec) -> Value {
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": spec.max_positions,
        "tokenizer_class": "PreTrainedTokenizerFast"
    })
}

/// `config.json` of a `LlamaForCausalLM` in bf16.
fn config_json(spec: &RandomSpec) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": spec.head_dim(),
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": WEIGHT_STD,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_positions,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "use_cache": true,
        "vocab_size": spec.vocab,
        "cap_random_model": {
            "seed": spec.seed,
            "note": "random weights from cap-host random-model: perplexity is meaningless"
        }
    })
}

/// One tensor's place in the plan.
struct Planned {
    name: String,
    shape: Vec<usize>,
    bytes: u64,
}

/// Tensors in file order, grouped greedily into shards of at most `shard_bytes` tensor
/// bytes (a larger tensor alone in its shard).
fn plan_shards(spec: &RandomSpec) -> Vec<Vec<Planned>> {
    let mut shards: Vec<Vec<Planned>> = Vec::new();
    let mut size = 0u64;
    for (name, shape) in spec.tensors() {
        let bytes = 2 * shape.iter().map(|&d| d as u64).product::<u64>();
        match shards.last_mut() {
            Some(s) if size + bytes <= spec.shard_bytes => {
                size += bytes;
                s.push(Planned { name, shape, bytes });
            }
            _ => {
                size = bytes;
                shards.push(vec![Planned { name, shape, bytes }]);
            }
        }
    }
    shards
}

/// A safetensors header for `tensors` (in that data order): the 8-byte length, then the
/// JSON padded with spaces to a multiple of 8 bytes.
fn safetensors_header(tensors: &[Planned]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in tensors {
        map.insert(
            t.name.clone(),
            json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [offset, offset + t.bytes]}),
        );
        offset += t.bytes;
    }
    let mut text = Value::Object(map).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out
}

/// Writes `value` as pretty JSON with a final newline.
fn write_json(path: &Path, value: &Value) -> Result<(), RandModelError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| RandModelError::InvalidSpec(format!("encoding JSON: {e}")))?;
    text.push('\n');
    crate::tempfiles::exclusive(|| std::fs::write(path, text))
        .map_err(RandModelError::io(path, "cannot write"))
}

/// Writes a random LLaMA checkpoint for `spec` into the folder `dir` (see the module
/// documentation for what it holds). `dir` must not exist or be an empty folder; it is
/// created with its parents. Atomic: the files are written into `DIR.tmp-PID` beside it
/// and the folder renamed into place at the end.
pub fn write_random_llama(dir: &Path, spec: &RandomSpec) -> Result<Summary, RandModelError> {
    write_random_llama_with_progress(dir, spec, &mut |_, _| {})
}

/// [`write_random_llama`], calling `progress(bytes_written, total_bytes)` (tensor bytes)
/// after every chunk.
pub fn write_random_llama_with_progress(
    dir: &Path,
    spec: &RandomSpec,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary, RandModelError> {
    spec.validate()?;
    if let Ok(m) = std::fs::symlink_metadata(dir) {
        let empty_dir = m.is_dir() && std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
        if !empty_dir {
            return Err(RandModelError::NotEmpty(dir.to_owned()));
        }
    }
    let name = dir.file_name().ok_or_else(|| {
        RandModelError::InvalidSpec(format!("{}: not a folder name", dir.display()))
    })?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.with_file_name(tmp_name);
    crate::tempfiles::remove_stale(dir);
    let _reg = crate::tempfiles::register(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let result = write_files(&tmp, spec, progress).and_then(|summary| {
        // Under the cleanup's lock: a signal either comes first (no rename, `tmp`
        // removed) or after (the complete folder stays).
        crate::tempfiles::exclusive(|| std::fs::rename(&tmp, dir))
            .map_err(RandModelError::io(dir, "cannot rename into place"))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
            && let Ok(d) = std::fs::File::open(parent)
        {
            let _ = d.sync_all();
        }
        Ok(summary)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes every file of the checkpoint into the (new) folder `tmp`.
fn write_files(
    tmp: &Path,
    spec: &RandomSpec,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary, RandModelError> {
    // Every entry of `tmp` is created through `tempfiles::exclusive`, so a signal's
    // cleanup never races with the creation of a file (which would leave `tmp` behind).
    crate::tempfiles::exclusive(|| std::fs::create_dir_all(tmp))
        .map_err(RandModelError::io(tmp, "cannot create"))?;
    write_json(&tmp.join("config.json"), &config_json(spec))?;
    write_json(&tmp.join("tokenizer.json"), &tokenizer_json())?;
    write_json(
        &tmp.join("tokenizer_config.json"),
        &tokenizer_config_json(spec),
    )?;

    let shards = plan_shards(spec);
    let n = shards.len();
    let total: u64 = shards.iter().flatten().map(|t| t.bytes).sum();
    let mut done = 0u64;
    let mut file_bytes = 0u64;
    let mut weight_map = serde_json::Map::new();
    let mut chunk = vec![0u8; 2 * CHUNK_VALUES];
    progress(0, total);
    for (k, tensors) in shards.iter().enumerate() {
        let shard_name = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let path = tmp.join(&shard_name);
        let file = crate::tempfiles::exclusive(|| std::fs::File::create(&path))
            .map_err(RandModelError::io(&path, "cannot create"))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let header = safetensors_header(tensors);
        w.write_all(&header)
            .map_err(RandModelError::io(&path, "cannot write"))?;
        file_bytes += header.len() as u64;
        for t in tensors {
            let values = t.bytes / 2;
            let mut first = 0u64;
            while first < values {
                let len = (values - first).min(CHUNK_VALUES as u64) as usize;
                let buf = &mut chunk[..2 * len];
                fill_bf16(buf, spec.seed, &t.name, first);
                w.write_all(buf)
                    .map_err(RandModelError::io(&path, "cannot write"))?;
                first += len as u64;
                done += 2 * len as u64;
                progress(done, total);
            }
            file_bytes += t.bytes;
            weight_map.insert(t.name.clone(), Value::String(shard_name.clone()));
        }
        let file = w
            .into_inner()
            .map_err(|e| RandModelError::io(&path, "cannot write")(e.into_error()))?;
        file.sync_all()
            .map_err(RandModelError::io(&path, "cannot write"))?;
    }
    let index = json!({
        "metadata": {"total_size": total, "total_parameters": spec.params()},
        "weight_map": weight_map
    });
    write_json(&tmp.join("model.safetensors.index.json"), &index)?;
    Ok(Summary {
        params: spec.params(),
        bytes: file_bytes,
        shards: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::Checkpoint;

    /// About 5 M parameters, with grouped-query attention, untied, several shards.
    fn small_spec() -> RandomSpec {
        RandomSpec {
            hidden: 256,
            intermediate: 704,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            vocab: 4096,
            max_positions: 512,
            shard_bytes: 3_000_000,
            seed: 42,
            tie_embeddings: false,
        }
    }

    /// The formula from the task, written out independently of `params()`.
    fn formula(s: &RandomSpec) -> u64 {
        let (v, h, i, l) = (
            s.vocab as u64,
            s.hidden as u64,
            s.intermediate as u64,
            s.layers as u64,
        );
        let hd = h / s.heads as u64;
        let attn = 2 * h * h + 2 * (s.kv_heads as u64 * hd) * h;
        let heads = if s.tie_embeddings { 1 } else { 2 };
        v * h * heads + l * (attn + 3 * h * i + 2 * h) + h
    }

    #[test]
    fn randmodel_known_shapes() {
        let s = RandomSpec::for_params(1_100_000_000);
        assert_eq!(
            (
                s.hidden,
                s.intermediate,
                s.layers,
                s.heads,
                s.kv_heads,
                s.vocab
            ),
            (2048, 5632, 22, 32, 4, 32000)
        );
        assert!(!s.tie_embeddings);
        assert_eq!(s.params(), formula(&s));
        assert_eq!(s.params(), 1_100_048_384);
        assert!((s.params() as f64 / 1.1e9 - 1.0).abs() < 0.01);
        assert_eq!(RandomSpec::for_params(1_000_000_000), s, "1b is TinyLlama");

        let s = RandomSpec::for_params(3_000_000_000);
        assert_eq!(
            (
                s.hidden,
                s.intermediate,
                s.layers,
                s.heads,
                s.kv_heads,
                s.vocab
            ),
            (3200, 8640, 26, 32, 32, 32000)
        );
        assert_eq!(s.params(), formula(&s));
        assert_eq!(s.params(), 3_426_473_600);
        assert!((s.params() as f64 / 3.4e9 - 1.0).abs() < 0.05);
        assert_eq!(s.block_params(), 123_910_400);

        let s = RandomSpec::for_params(7_000_000_000);
        assert_eq!(s.params(), 6_738_415_616, "LLaMA-2-7B");
    }

    #[test]
    fn randmodel_scaled_shapes() {
        for target in [
            1_000_000u64,
            5_000_000,
            20_000_000,
            50_000_000,
            100_000_000,
            135_000_000,
            500_000_000,
            2_000_000_000,
            20_000_000_000,
        ] {
            let s = RandomSpec::for_params(target);
            s.validate().unwrap();
            assert_eq!(s.params(), formula(&s));
            assert!(s.hidden.is_multiple_of(64) && s.head_dim() == 64, "{s:?}");
            assert!(s.intermediate.is_multiple_of(64), "{s:?}");
            assert!((s.intermediate as f64 - 2.75 * s.hidden as f64).abs() <= 32.0);
            assert!(s.vocab <= 32000 && s.vocab >= TOKENIZER_TOKENS, "{s:?}");
            let miss = (s.params() as f64 / target as f64 - 1.0).abs();
            let tol = if target >= 5_000_000 { 0.10 } else { 0.5 };
            assert!(miss < tol, "{target}: {} ({miss:.3}) {s:?}", s.params());
            if target >= 20_000_000 {
                assert!(s.layers >= 4, "{target}: {s:?}");
            }
        }
        // Tiny targets still give a valid model.
        RandomSpec::for_params(1).validate().unwrap();
    }

    #[test]
    fn randmodel_parse_counts() {
        assert_eq!(parse_param_count("1b").unwrap(), 1_000_000_000);
        assert_eq!(parse_param_count("3B").unwrap(), 3_000_000_000);
        assert_eq!(parse_param_count("1.1b").unwrap(), 1_100_000_000);
        assert_eq!(parse_param_count("50m").unwrap(), 50_000_000);
        assert_eq!(parse_param_count("125000000").unwrap(), 125_000_000);
        assert_eq!(parse_param_count("3e9").unwrap(), 3_000_000_000);
        assert_eq!(parse_param_count("64k").unwrap(), 64_000);
        for bad in ["", "b", "x", "1x", "-5m", "0", "nan", "1e30"] {
            assert!(parse_param_count(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn randmodel_tokenizer_merges_are_buildable() {
        let tokens = tokenizer_tokens();
        assert_eq!(tokens.len(), TOKENIZER_TOKENS);
        let mut seen = std::collections::HashSet::new();
        for t in &tokens {
            assert!(seen.insert(t.clone()), "duplicate token {t}");
        }
        for (i, (a, b)) in MERGES.iter().enumerate() {
            let before = &tokens[..SPECIAL.len() + 256 + i];
            assert!(before.iter().any(|t| t == a) && before.iter().any(|t| t == b));
        }
    }

    #[test]
    fn randmodel_writes_a_loadable_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("nested").join("rand");
        let spec = small_spec();
        let params = spec.params();
        assert!((4_000_000..6_000_000).contains(&params), "{params}");
        let mut calls = 0;
        let mut last = (0, 0);
        let summary = write_random_llama_with_progress(&dir, &spec, &mut |d, t| {
            calls += 1;
            last = (d, t);
        })
        .unwrap();
        assert_eq!(summary.params, params);
        assert!(calls > 1 && last.0 == last.1 && last.1 == 2 * params);
        // Nothing left beside it.
        let beside: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, vec![std::ffi::OsString::from("rand")]);

        let ck = Checkpoint::open(&dir).unwrap();
        let c = ck.config().unwrap();
        assert_eq!(c.arch, cap_device::config::Arch::Llama);
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.n_layers,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.max_position,
                c.tie_embeddings
            ),
            (4096, 256, 704, 4, 4, 2, 64, 512, false)
        );
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rms_eps, 1e-5);

        let tok = ck.tokenizer().unwrap();
        assert_eq!(tok.vocab_size(), TOKENIZER_TOKENS);
        let text = "the cat and the hat, it is one of them.\n";
        let ids = tok.encode(text, true);
        assert_eq!(ids[0], 1, "BOS first");
        assert!(ids.len() < text.len(), "merges apply: {ids:?}");
        assert_eq!(tok.decode(&ids[1..]), text);

        let m = ck.load_model().unwrap();
        assert_eq!(m.blocks.len(), 4);
        let seed = spec.seed;
        // Independent recomputation: SplitMix64 at counter i+1 from the tensor's stream.
        for (name, idx, got) in [
            ("model.embed_tokens.weight", 0u64, m.embed[0]),
            ("model.embed_tokens.weight", 12345, m.embed[12345]),
            (
                "model.layers.2.self_attn.k_proj.weight",
                777,
                m.blocks[2].k.weight[777],
            ),
            (
                "model.layers.3.mlp.down_proj.weight",
                180_000,
                m.blocks[3].down.weight[180_000],
            ),
        ] {
            let mut h: u64 = 0xcbf29ce484222325;
            for b in name.bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100000001b3);
            }
            let stream = mix64(seed ^ mix64(h));
            let r = mix64(stream.wrapping_add((idx + 1).wrapping_mul(0x9e3779b97f4a7c15)));
            let s: u64 = (0..4).map(|q| (r >> (16 * q)) & 0xffff).sum();
            let want = ((s as f64 + 2.0) / 65536.0 - 2.0) * 3f64.sqrt() * 0.02;
            assert!(
                (got as f64 - want).abs() <= want.abs() / 128.0 + 1e-9,
                "{name}[{idx}]"
            );
            assert_eq!(got, weight_value(seed, name, idx));
        }
        assert!(m.blocks[1].attn_norm.iter().all(|&x| x == 1.0));
        assert!(m.norm.iter().all(|&x| x == 1.0));
        match &m.head {
            cap_device::model::Head::Separate(l) => {
                assert_eq!(l.weight[99], weight_value(seed, "lm_head.weight", 99));
                assert_ne!(l.weight[99], m.embed[99]);
            }
            _ => panic!("untied head expected"),
        }
        // The values look like N(0, 0.02²).
        let w = &m.blocks[0].gate.weight;
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
        let std =
            (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
            "{mean} {std}"
        );

        // Same seed, same bytes; another seed, other bytes.
        let again = root.path().join("again");
        write_random_llama(&again, &spec).unwrap();
        let other = root.path().join("other");
        write_random_llama(
            &other,
            &RandomSpec {
                seed: 7,
                ..spec.clone()
            },
        )
        .unwrap();
        let shard = format!("model-00001-of-{:05}.safetensors", summary.shards);
        assert!(summary.shards > 1);
        let a = std::fs::read(dir.join(&shard)).unwrap();
        assert_eq!(a, std::fs::read(again.join(&shard)).unwrap());
        assert_ne!(a, std::fs::read(other.join(&shard)).unwrap());
    }

    #[test]
    fn randmodel_shards_and_index_agree() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("rand");
        let spec = RandomSpec {
            shard_bytes: 1_000_000,
            tie_embeddings: true,
            ..small_spec()
        };
        let summary = write_random_llama(&dir, &spec).unwrap();
        let index: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let names: Vec<String> = spec.tensors().into_iter().map(|t| t.0).collect();
        assert_eq!(map.len(), names.len());
        assert!(!map.contains_key("lm_head.weight"));
        assert_eq!(index["metadata"]["total_size"], 2 * spec.params());

        let mut shard_files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        shard_files.sort();
        assert_eq!(shard_files.len(), summary.shards);
        assert!(summary.shards > 5, "{}", summary.shards);
        let mut seen = std::collections::HashMap::new();
        let mut bytes = 0u64;
        for (k, f) in shard_files.iter().enumerate() {
            assert_eq!(
                *f,
                format!("model-{:05}-of-{:05}.safetensors", k + 1, summary.shards)
            );
            let data = std::fs::read(dir.join(f)).unwrap();
            bytes += data.len() as u64;
            let st = safetensors::SafeTensors::deserialize(&data).unwrap();
            let mut tensor_bytes = 0u64;
            for (name, view) in st.tensors() {
                assert_eq!(view.dtype(), safetensors::Dtype::BF16);
                assert_eq!(map[&name], f.as_str(), "{name}");
                assert!(
                    seen.insert(name.clone(), f.clone()).is_none(),
                    "{name} twice"
                );
                tensor_bytes += view.data().len() as u64;
            }
            assert!(
                tensor_bytes <= spec.shard_bytes || st.len() == 1,
                "{f}: {tensor_bytes} bytes in {} tensors",
                st.len()
            );
        }
        assert_eq!(bytes, summary.bytes);
        assert_eq!(seen.len(), names.len());
        // Tied: loads without a head.
        let m = Checkpoint::open(&dir).unwrap().load_model().unwrap();
        assert!(matches!(m.head, cap_device::model::Head::Tied));
    }

    #[test]
    fn randmodel_refuses_a_non_empty_folder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("taken");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("keep.txt"), "mine").unwrap();
        let err = write_random_llama(&dir, &small_spec()).unwrap_err();
        assert!(matches!(err, RandModelError::NotEmpty(_)), "{err}");
        assert!(err.to_string().contains("not an empty folder"), "{err}");
        let inside: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(inside.len(), 1);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        // A file in the way too.
        let file = root.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            write_random_llama(&file, &small_spec()),
            Err(RandModelError::NotEmpty(_))
        ));
        // An empty folder is filled.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let tiny = RandomSpec {
            layers: 1,
            ..small_spec()
        };
        write_random_llama(&empty, &tiny).unwrap();
        assert!(empty.join("config.json").is_file());
        // An invalid spec writes nothing.
        let bad = root.path().join("bad");
        let spec = RandomSpec {
            kv_heads: 3,
            ..small_spec()
        };
        assert!(matches!(
            write_random_llama(&bad, &spec),
            Err(RandModelError::InvalidSpec(_))
        ));
        assert!(!bad.exists());
    }
}
