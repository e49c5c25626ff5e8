//! The tensor table: every tensor of a model, as data, read by every stage (import,
//! `pack`, `compress` and its budget, robust PCA, the board's loader). llama.cpp's
//! `LLM_TENSOR_NAMES` is the model: one row per tensor role with its GGUF name (the
//! name `.cap` files use), its Hugging Face name, its shape in terms of the model's
//! hyper-parameters, and when it exists.
//!
//! Order is part of the table: [`file_tensors`] lists the tensors of a `.cap` file in
//! the order they are written (the embedding, then block by block, then the final norm
//! and an untied head). Stages pair a model's layers with names through [`linear`],
//! [`part`] and [`named_linears`], which look a layer up by its role and block, never
//! by position in a list.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use cap_format::{DType, Encoding, TensorDesc};

use crate::config::{Arch, Config};
use crate::model::{Block, Head, Model};

/// The role a tensor plays in a LLaMA-family model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Token embedding.
    Embed,
    /// Final RMSNorm.
    FinalNorm,
    /// Untied output head.
    Head,
    /// RMSNorm before attention.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// Query bias.
    QBias,
    /// Key bias.
    KBias,
    /// Value bias.
    VBias,
    /// RMSNorm of each query head (Gemma-3).
    QNorm,
    /// RMSNorm of each key head (Gemma-3).
    KNorm,
    /// RMSNorm of the attention output, before the residual add (Gemma-3).
    PostAttnNorm,
    /// RMSNorm of the MLP output, before the residual add (Gemma-3).
    PostMlpNorm,
    /// RMSNorm before the MLP.
    MlpNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
    /// llama.cpp's per-frequency RoPE divisors (read by import into the configuration;
    /// never written to a `.cap` file).
    RopeFreqs,
}

/// Where a tensor belongs when sizes are reported by group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// Token embedding (and a tied head).
    Embedding,
    /// q/k/v/o projections and their biases.
    Attention,
    /// gate/up/down projections.
    Mlp,
    /// RMSNorm weights and RoPE factors.
    Norms,
    /// An untied output head.
    Head,
}

impl Group {
    /// Lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Group::Embedding => "embedding",
            Group::Attention => "attention",
            Group::Mlp => "mlp",
            Group::Norms => "norms",
            Group::Head => "head",
        }
    }
}

/// One dimension of a tensor's shape, in terms of the model's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// 1 (the row count of a vector tensor).
    One,
    /// `vocab_size`.
    Vocab,
    /// `hidden_size`.
    Hidden,
    /// `n_heads · head_dim`.
    QDim,
    /// `n_kv_heads · head_dim`.
    KvDim,
    /// `intermediate_size`.
    Inter,
    /// `head_dim / 2` (one RoPE factor per rotated pair).
    HalfHead,
    /// `head_dim`.
    HeadDim,
}

impl Dim {
    /// The size of this dimension for `c`.
    pub fn size(self, c: &Config) -> usize {
        match self {
            Dim::One => 1,
            Dim::Vocab => c.vocab_size,
            Dim::Hidden => c.hidden_size,
            Dim::QDim => c.q_dim(),
            Dim::KvDim => c.kv_dim(),
            Dim::Inter => c.intermediate_size,
            Dim::HalfHead => c.head_dim / 2,
            Dim::HeadDim => c.head_dim,
        }
    }
}

/// When a tensor of the table exists in a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// In every model.
    Always,
    /// Only when the configuration has q/k/v biases (`Config::qkv_bias`).
    QkvBias,
    /// Only when the head is not tied to the embedding (`!Config::tie_embeddings`).
    UntiedHead,
    /// Only when the architecture normalizes query and key heads (`Arch::qk_norm`).
    QkNorm,
    /// Only when the architecture normalizes attention and MLP outputs
    /// (`Arch::post_norms`).
    PostNorms,
    /// Only in a source checkpoint, optionally; import folds it into the configuration
    /// and it is never written to a `.cap` file.
    SourceOnly,
}

/// How a tensor's values are stored in a `.cap` file when written dense.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// In the file's weight dtype (`pack --dtype`, `compress --dtype`): the embedding
    /// and the weight matrices.
    Weight,
    /// Always `f32`: norm weights, biases, RoPE factors (small, and precision-critical).
    F32,
}

/// One row of the table: a tensor role and everything every stage needs to know of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// The role.
    pub role: Role,
    /// llama.cpp's GGUF name, also the name inside `.cap` files; `{}` stands for the
    /// block index.
    pub gguf: &'static str,
    /// The Hugging Face `transformers` name (`{}` for the block index), where there is
    /// one.
    pub hf: Option<&'static str>,
    /// Rows and columns (`out × in` for a linear; `1 × n` for a vector).
    pub shape: (Dim, Dim),
    /// When the tensor exists.
    pub presence: Presence,
    /// How it is stored when written dense.
    pub storage: Storage,
    /// Whether the forward pass applies it as a linear layer (`y = x·Wᵀ`): the block
    /// projections and an untied head. Robust PCA decomposes exactly these.
    pub linear: bool,
    /// Whether `compress` may compress it (low-rank, sparse): the block projections.
    /// Everything else is written dense.
    pub compressible: bool,
}

impl TensorSpec {
    /// Whether the tensor is one per block (its names contain `{}`).
    pub fn per_block(&self) -> bool {
        self.gguf.contains("{}")
    }

    /// Whether a model with configuration `c` has this tensor in its `.cap` file.
    pub fn in_file(&self, c: &Config) -> bool {
        match self.presence {
            Presence::Always => true,
            Presence::QkvBias => c.qkv_bias,
            Presence::UntiedHead => !c.tie_embeddings,
            Presence::QkNorm => c.arch.qk_norm(),
            Presence::PostNorms => c.arch.post_norms(),
            Presence::SourceOnly => false,
        }
    }
}

const fn row(
    role: Role,
    gguf: &'static str,
    hf: Option<&'static str>,
    shape: (Dim, Dim),
    presence: Presence,
    storage: Storage,
    kind: (bool, bool),
) -> TensorSpec {
    TensorSpec {
        role,
        gguf,
        hf,
        shape,
        presence,
        storage,
        linear: kind.0,
        compressible: kind.1,
    }
}

/// `(linear, compressible)` of a block projection, an untied head, anything else.
const PROJ: (bool, bool) = (true, true);
const HEAD: (bool, bool) = (true, false);
const DATA: (bool, bool) = (false, false);

/// The table of the LLaMA family (LLaMA-1/2/3, SmolLM, TinyLlama, Mistral, Qwen2, and
/// Gemma-3 with its extra norms as rows of their own), in
/// file order: the rows before the per-block rows are written first, then every block
/// (its rows in this order), then the rows after. The per-block rows are contiguous.
pub const LLAMA: &[TensorSpec] = &[
    row(
        Role::Embed,
        "token_embd.weight",
        Some("model.embed_tokens.weight"),
        (Dim::Vocab, Dim::Hidden),
        Presence::Always,
        Storage::Weight,
        DATA,
    ),
    row(
        Role::AttnNorm,
        "blk.{}.attn_norm.weight",
        Some("model.layers.{}.input_layernorm.weight"),
        (Dim::One, Dim::Hidden),
        Presence::Always,
        Storage::F32,
        DATA,
    ),
    row(
        Role::Q,
        "blk.{}.attn_q.weight",
        Some("model.layers.{}.self_attn.q_proj.weight"),
        (Dim::QDim, Dim::Hidden),
        Presence::Always,
        Storage::Weight,
        PROJ,
    ),
    row(
        Role::K,
        "blk.{}.attn_k.weight",
        Some("model.layers.{}.self_attn.k_proj.weight"),
        (Dim::KvDim, Dim::Hidden),
        Presence::Always,
        Storage::Weight,
        PROJ,
    ),
    row(
        Role::V,
        "blk.{}.attn_v.weight",
        Some("model.layers.{}.self_attn.v_proj.weight"),
        (Dim::KvDim, Dim::Hidden),
        Presence::Always,
        Storage::Weight,
        PROJ,
    ),
    row(
        Role::QBias,
        "blk.{}.attn_q.bias",
        Some("model.layers.{}.self_attn.q_proj.bias"),
        (Dim::One, Dim::QDim),
        Presence::QkvBias,
        Storage::F32,
        DATA,
    ),
    row(
        Role::KBias,
        "blk.{}.attn_k.bias",
        Some("model.layers.{}.self_attn.k_proj.bias"),
        (Dim::One, Dim::KvDim),
        Presence::QkvBias,
        Storage::F32,
        DATA,
    ),
    row(
        Role::VBias,
        "blk.{}.attn_v.bias",
        Some("model.layers.{}.self_attn.v_proj.bias"),
        (Dim::One, Dim::KvDim),
        Presence::QkvBias,
        Storage::F32,
        DATA,
    ),
    row(
        Role::QNorm,
        "blk.{}.attn_q_norm.weight",
        Some("model.layers.{}.self_attn.q_norm.weight"),
        (Dim::One, Dim::HeadDim),
        Presence::QkNorm,
        Storage::F32,
        DATA,
    ),
    row(
        Role::KNorm,
        "blk.{}.attn_k_norm.weight",
        Some("model.layers.{}.self_attn.k_norm.weight"),
        (Dim::One, Dim::HeadDim),
        Presence::QkNorm,
        Storage::F32,
        DATA,
    ),
    row(
        Role::O,
        "blk.{}.attn_output.weight",
        Some("model.layers.{}.self_attn.o_proj.weight"),
        (Dim::Hidden, Dim::QDim),
        Presence::Always,
        Storage::Weight,
        PROJ,
    ),
    // Gemma's Hugging Face names differ from LLaMA's for the norms around the MLP
    // (`post_attention_layernorm` is the MLP's pre-norm in LLaMA), so cap reads Gemma
    // from GGUF only and these rows have no Hugging Face name.
    row(
        Role::PostAttnNorm,
        "blk.{}.post_attention_norm.weight",
        None,
        (Dim::One, Dim::Hidden),
        Presence::PostNorms,
        Storage::F32,
        DATA,
    ),
    row(
        Role::MlpNorm,
        "blk.{}.ffn_norm.weight",
        Some("model.layers.{}.post_attention_layernorm.weight"),
        (Dim::One, Dim::Hidden),
        Presence::Always,
        Storage::F32,
        DATA,
    ),
    row(
        Role::Gate,
        "blk.{}.ffn_gate.weight",
        Some("model.layers.{}.mlp.gate_proj.weight"),
        (Dim::Inter, Dim::Hidden),
        Presence::Always,
        Storage::Weight,
        PROJ,
    ),
    row(
        Role::Up,
        "blk.{}.ffn_up.weight",
        Some("model.layers.{}.mlp.up_proj.weight"),
        (Dim::Inter, Dim::Hidden),
        Presence::Always,
        Storage::Weight,
        PROJ,
    ),
    row(
        Role::Down,
        "blk.{}.ffn_down.weight",
        Some("model.layers.{}.mlp.down_proj.weight"),
        (Dim::Hidden, Dim::Inter),
        Presence::Always,
        Storage::Weight,
        PROJ,
    ),
    row(
        Role::PostMlpNorm,
        "blk.{}.post_ffw_norm.weight",
        None,
        (Dim::One, Dim::Hidden),
        Presence::PostNorms,
        Storage::F32,
        DATA,
    ),
    row(
        Role::FinalNorm,
        "output_norm.weight",
        Some("model.norm.weight"),
        (Dim::One, Dim::Hidden),
        Presence::Always,
        Storage::F32,
        DATA,
    ),
    row(
        Role::Head,
        "output.weight",
        Some("lm_head.weight"),
        (Dim::Vocab, Dim::Hidden),
        Presence::UntiedHead,
        Storage::Weight,
        HEAD,
    ),
    row(
        Role::RopeFreqs,
        "rope_freqs.weight",
        None,
        (Dim::One, Dim::HalfHead),
        Presence::SourceOnly,
        Storage::F32,
        DATA,
    ),
];

/// The table of an architecture. The supported ones share the LLaMA layout; their
/// differences (q/k/v biases, Gemma's extra norms) are [`Presence`] rows driven by the
/// configuration.
pub fn table(arch: Arch) -> &'static [TensorSpec] {
    match arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Gemma3 => LLAMA,
    }
}

/// The table row of `role` (every architecture's table has the same roles).
pub fn spec(role: Role) -> &'static TensorSpec {
    LLAMA
        .iter()
        .find(|s| s.role == role)
        .unwrap_or_else(|| unreachable!("the table has a row for every role"))
}

impl Role {
    /// The group this role is reported under.
    pub fn group(self) -> Group {
        use Role::*;
        match self {
            Embed => Group::Embedding,
            Head => Group::Head,
            Q | K | V | O | QBias | KBias | VBias => Group::Attention,
            Gate | Up | Down => Group::Mlp,
            FinalNorm | AttnNorm | MlpNorm | RopeFreqs | QNorm | KNorm | PostAttnNorm
            | PostMlpNorm => Group::Norms,
        }
    }

    /// This role's row of the table.
    pub fn spec(self) -> &'static TensorSpec {
        spec(self)
    }
}

/// Which naming scheme a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// llama.cpp's GGUF names (also those of `.cap` files).
    Gguf,
    /// Hugging Face `transformers` names.
    HuggingFace,
}

fn pattern(naming: Naming, s: &TensorSpec) -> Option<&'static str> {
    match naming {
        Naming::Gguf => Some(s.gguf),
        Naming::HuggingFace => s.hf,
    }
}

/// The tensor name for `role` (in block `layer`, for per-block roles; ignored for the
/// others), or `""` when the naming has none for the role.
pub fn tensor_name(naming: Naming, role: Role, layer: usize) -> String {
    pattern(naming, spec(role)).map_or_else(String::new, |p| p.replace("{}", &layer.to_string()))
}

/// Classifies a tensor name, returning its role and block index (if any).
pub fn classify(naming: Naming, name: &str) -> Option<(Role, Option<usize>)> {
    for s in LLAMA {
        let Some(pat) = pattern(naming, s) else {
            continue;
        };
        match pat.split_once("{}") {
            None if pat == name => return Some((s.role, None)),
            None => {}
            Some((pre, post)) => {
                if let Some(mid) = name.strip_prefix(pre).and_then(|r| r.strip_suffix(post))
                    && let Ok(i) = mid.parse()
                {
                    return Some((s.role, Some(i)));
                }
            }
        }
    }
    None
}

/// One tensor of one model: a table row instantiated for a configuration and a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The name inside a `.cap` file (GGUF naming), e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// The Hugging Face name, where there is one.
    pub hf_name: Option<String>,
    /// The role.
    pub role: Role,
    /// The block, for per-block tensors.
    pub layer: Option<usize>,
    /// Rows (output features of a linear; 1 for a vector).
    pub rows: usize,
    /// Columns (input features of a linear; the length of a vector).
    pub cols: usize,
}

impl TensorInfo {
    /// The tensor of `role` (in block `layer` for per-block roles) of a model with
    /// configuration `c`.
    pub fn new(c: &Config, role: Role, layer: usize) -> TensorInfo {
        let s = spec(role);
        let layer = s.per_block().then_some(layer);
        let at = layer.unwrap_or(0);
        TensorInfo {
            name: tensor_name(Naming::Gguf, role, at),
            hf_name: s.hf.map(|_| tensor_name(Naming::HuggingFace, role, at)),
            role,
            layer,
            rows: s.shape.0.size(c),
            cols: s.shape.1.size(c),
        }
    }

    /// The table row.
    pub fn spec(&self) -> &'static TensorSpec {
        spec(self.role)
    }

    /// Number of values (`rows · cols`).
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the forward pass applies it as a linear layer (see [`TensorSpec::linear`]).
    pub fn is_linear(&self) -> bool {
        self.spec().linear
    }

    /// Whether `compress` may compress it (see [`TensorSpec::compressible`]).
    pub fn is_compressible(&self) -> bool {
        self.spec().compressible
    }

    /// How it is stored when written dense.
    pub fn storage(&self) -> Storage {
        self.spec().storage
    }

    /// Its dtype when written dense in a file whose weights are in `weight_dtype`.
    pub fn dense_dtype(&self, weight_dtype: DType) -> DType {
        match self.storage() {
            Storage::Weight => weight_dtype,
            Storage::F32 => DType::F32,
        }
    }

    /// Its descriptor when written dense in a file whose weights are in `weight_dtype`
    /// (`None` if a dimension does not fit the format's `u32`): what the budget counts
    /// for every tensor of [`dense_tensors`].
    pub fn dense_desc(&self, weight_dtype: DType) -> Option<TensorDesc> {
        Some(TensorDesc {
            rows: u32::try_from(self.rows).ok()?,
            cols: u32::try_from(self.cols).ok()?,
            encoding: Encoding::Dense {
                dtype: self.dense_dtype(weight_dtype),
            },
        })
    }
}

/// Every tensor of a `.cap` file for a model with configuration `c`, in the order they
/// are written (the table's order, blocks expanded where the per-block rows stand).
pub fn file_tensors(c: &Config) -> Vec<TensorInfo> {
    let rows = table(c.arch);
    let mut out = Vec::new();
    let mut blocks_done = false;
    for s in rows {
        if !s.per_block() {
            if s.in_file(c) {
                out.push(TensorInfo::new(c, s.role, 0));
            }
        } else if !blocks_done {
            blocks_done = true;
            for layer in 0..c.n_layers {
                for b in rows.iter().filter(|b| b.per_block() && b.in_file(c)) {
                    out.push(TensorInfo::new(c, b.role, layer));
                }
            }
        }
    }
    out
}

/// The names of [`file_tensors`], in file order.
pub fn file_tensor_names(c: &Config) -> Vec<String> {
    file_tensors(c).into_iter().map(|t| t.name).collect()
}

/// The linear layers of the model (block projections, then an untied head), in file
/// order: what robust PCA decomposes.
pub fn linears(c: &Config) -> Vec<TensorInfo> {
    file_tensors(c)
        .into_iter()
        .filter(TensorInfo::is_linear)
        .collect()
}

/// The tensors `compress` may compress (the block projections: q, k, v, o, gate, up,
/// down of every block), in file order.
pub fn compressible(c: &Config) -> Vec<TensorInfo> {
    file_tensors(c)
        .into_iter()
        .filter(TensorInfo::is_compressible)
        .collect()
}

/// The tensors always written dense (embedding, norms, biases, an untied head), in file
/// order; [`TensorInfo::dense_dtype`] gives each one's dtype.
pub fn dense_tensors(c: &Config) -> Vec<TensorInfo> {
    file_tensors(c)
        .into_iter()
        .filter(|t| !t.is_compressible())
        .collect()
}

/// One tensor of a model in memory, as [`part`] finds it.
#[derive(Debug)]
pub enum Part<'m, L, E> {
    /// The token embedding.
    Embedding(&'m E),
    /// A linear layer (block projection or untied head).
    Linear(&'m L),
    /// A vector (norm weight or bias).
    Vector(&'m [f32]),
}

/// The block projection of `role` in `b` (`None` for a role that is not one).
pub fn block_linear<L>(b: &Block<L>, role: Role) -> Option<&L> {
    Some(match role {
        Role::Q => &b.q,
        Role::K => &b.k,
        Role::V => &b.v,
        Role::O => &b.o,
        Role::Gate => &b.gate,
        Role::Up => &b.up,
        Role::Down => &b.down,
        _ => return None,
    })
}

/// The tensor `role` of block `layer` (ignored for whole-model roles) of `m`, or `None`
/// when the model has no such tensor (a tied head, absent biases, a block out of
/// range, a role never held in memory).
pub fn part<L, E>(m: &Model<L, E>, role: Role, layer: usize) -> Option<Part<'_, L, E>> {
    let bias = |i: usize| {
        m.blocks
            .get(layer)
            .and_then(|b| b.qkv_bias.as_ref())
            .map(|q| Part::Vector(q[i].as_slice()))
    };
    let qk_norm = |i: usize| {
        m.blocks
            .get(layer)
            .and_then(|b| b.qk_norm.as_ref())
            .map(|q| Part::Vector(q[i].as_slice()))
    };
    let post_norm = |i: usize| {
        m.blocks
            .get(layer)
            .and_then(|b| b.post_norms.as_ref())
            .map(|q| Part::Vector(q[i].as_slice()))
    };
    match role {
        Role::Embed => Some(Part::Embedding(&m.embed)),
        Role::FinalNorm => Some(Part::Vector(&m.norm)),
        Role::Head => match &m.head {
            Head::Tied => None,
            Head::Separate(h) => Some(Part::Linear(h)),
        },
        Role::RopeFreqs => None,
        Role::AttnNorm => m.blocks.get(layer).map(|b| Part::Vector(&b.attn_norm)),
        Role::MlpNorm => m.blocks.get(layer).map(|b| Part::Vector(&b.mlp_norm)),
        Role::QBias => bias(0),
        Role::KBias => bias(1),
        Role::VBias => bias(2),
        Role::QNorm => qk_norm(0),
        Role::KNorm => qk_norm(1),
        Role::PostAttnNorm => post_norm(0),
        Role::PostMlpNorm => post_norm(1),
        Role::Q | Role::K | Role::V | Role::O | Role::Gate | Role::Up | Role::Down => m
            .blocks
            .get(layer)
            .and_then(|b| block_linear(b, role))
            .map(Part::Linear),
    }
}

/// The linear layer `t` names in `m` (a block projection or an untied head).
pub fn linear<'m, L, E>(m: &'m Model<L, E>, t: &TensorInfo) -> Option<&'m L> {
    match part(m, t.role, t.layer.unwrap_or(0))? {
        Part::Linear(l) => Some(l),
        _ => None,
    }
}

/// Pairs every tensor of `which` with its linear layer in `m`, looked up by role and
/// block; `Err` with the first name `m` has no linear for.
pub fn named_linears<'m, 't, L, E>(
    m: &'m Model<L, E>,
    which: &'t [TensorInfo],
) -> Result<Vec<(&'t TensorInfo, &'m L)>, &'t str> {
    which
        .iter()
        .map(|t| linear(m, t).map(|l| (t, l)).ok_or(t.name.as_str()))
        .collect()
}

/// The mutable counterpart of [`named_linears`], for stages that swap layers in place
/// (the budget search): every tensor of `which` must be a distinct linear of `m`.
pub fn named_linears_mut<'m, 't, L, E>(
    m: &'m mut Model<L, E>,
    which: &'t [TensorInfo],
) -> Result<Vec<(&'t TensorInfo, &'m mut L)>, &'t str> {
    // Every linear of the model, keyed by (role, block), taken out at most once.
    type Slot<'m, L> = ((Role, Option<usize>), Option<&'m mut L>);
    let mut slots: Vec<Slot<'m, L>> = Vec::new();
    for (i, b) in m.blocks.iter_mut().enumerate() {
        let Block {
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
            ..
        } = b;
        for (role, l) in [
            (Role::Q, q),
            (Role::K, k),
            (Role::V, v),
            (Role::O, o),
            (Role::Gate, gate),
            (Role::Up, up),
            (Role::Down, down),
        ] {
            slots.push(((role, Some(i)), Some(l)));
        }
    }
    if let Head::Separate(h) = &mut m.head {
        slots.push(((Role::Head, None), Some(h)));
    }
    which
        .iter()
        .map(|t| {
            slots
                .iter_mut()
                .find(|(key, _)| *key == (t.role, t.layer))
                .and_then(|(_, l)| l.take())
                .map(|l| (t, l))
                .ok_or(t.name.as_str())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RopeScaling;

    fn config(qkv_bias: bool, tie: bool) -> Config {
        Config {
            arch: Arch::Qwen2,
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-5,
            tie_embeddings: tie,
            qkv_bias,
            max_position: 64,
            sliding_window: None,
            local_attention: None,
        }
    }

    #[test]
    fn names_round_trip() {
        for s in LLAMA {
            for (naming, pat) in [(Naming::Gguf, Some(s.gguf)), (Naming::HuggingFace, s.hf)] {
                let Some(pat) = pat else { continue };
                let layer = if pat.contains("{}") { Some(17) } else { None };
                let name = tensor_name(naming, s.role, 17);
                assert_eq!(classify(naming, &name), Some((s.role, layer)), "{name}");
            }
        }
        assert_eq!(classify(Naming::Gguf, "blk.x.attn_q.weight"), None);
    }

    #[test]
    fn per_block_rows_are_contiguous_and_every_role_has_one_row() {
        let first = LLAMA.iter().position(TensorSpec::per_block).unwrap();
        let n = LLAMA.iter().filter(|s| s.per_block()).count();
        assert!(LLAMA[first..first + n].iter().all(TensorSpec::per_block));
        for s in LLAMA {
            assert_eq!(LLAMA.iter().filter(|t| t.role == s.role).count(), 1);
        }
    }

    #[test]
    fn file_order_and_shapes() {
        let names = file_tensor_names(&config(true, false));
        let want = [
            "token_embd.weight",
            "blk.0.attn_norm.weight",
            "blk.0.attn_q.weight",
            "blk.0.attn_k.weight",
            "blk.0.attn_v.weight",
            "blk.0.attn_q.bias",
            "blk.0.attn_k.bias",
            "blk.0.attn_v.bias",
            "blk.0.attn_output.weight",
            "blk.0.ffn_norm.weight",
            "blk.0.ffn_gate.weight",
            "blk.0.ffn_up.weight",
            "blk.0.ffn_down.weight",
        ];
        assert_eq!(&names[..want.len()], want);
        assert_eq!(names.len(), 1 + 2 * 12 + 2);
        assert_eq!(
            names[names.len() - 2..],
            ["output_norm.weight", "output.weight"]
        );
        let tied = file_tensor_names(&config(false, true));
        assert_eq!(tied.len(), 1 + 2 * 9 + 1);
        assert!(
            !tied
                .iter()
                .any(|n| n.contains("bias") || n == "output.weight")
        );

        let c = config(true, false);
        let k = TensorInfo::new(&c, Role::K, 1);
        assert_eq!((k.rows, k.cols, k.layer), (4, 8, Some(1)));
        assert_eq!(
            k.hf_name.as_deref(),
            Some("model.layers.1.self_attn.k_proj.weight")
        );
        assert_eq!(compressible(&c).len(), 14);
        assert_eq!(linears(&c).last().unwrap().name, "output.weight");
        assert_eq!(
            dense_tensors(&c).len() + compressible(&c).len(),
            file_tensors(&c).len()
        );
        let bias = TensorInfo::new(&c, Role::QBias, 0);
        assert_eq!((bias.rows, bias.cols), (1, 8));
        assert_eq!(bias.dense_dtype(DType::F16), DType::F32);
        assert_eq!(
            bias.dense_desc(DType::BF16),
            Some(TensorDesc {
                rows: 1,
                cols: 8,
                encoding: Encoding::Dense { dtype: DType::F32 }
            })
        );
        assert_eq!(
            TensorInfo::new(&c, Role::Head, 0).dense_dtype(DType::F16),
            DType::F16
        );
    }

    #[test]
    fn linears_are_found_by_role_and_block() {
        use crate::model::DenseLinear;
        let c = config(false, false);
        let lin = |t: &TensorInfo, tag: usize| DenseLinear {
            weight: alloc::vec![tag as f32; t.numel()],
            out_features: t.rows,
            in_features: t.cols,
        };
        let info = |r, l| TensorInfo::new(&c, r, l);
        let blocks = (0..c.n_layers)
            .map(|i| Block {
                attn_norm: alloc::vec![0.0; 8],
                q: lin(&info(Role::Q, i), 10 * i),
                k: lin(&info(Role::K, i), 10 * i + 1),
                v: lin(&info(Role::V, i), 10 * i + 2),
                o: lin(&info(Role::O, i), 10 * i + 3),
                qkv_bias: None,
                qk_norm: None,
                post_norms: None,
                mlp_norm: alloc::vec![0.0; 8],
                gate: lin(&info(Role::Gate, i), 10 * i + 4),
                up: lin(&info(Role::Up, i), 10 * i + 5),
                down: lin(&info(Role::Down, i), 10 * i + 6),
            })
            .collect();
        let mut m = Model {
            embed: alloc::vec![0.0; 88],
            norm: alloc::vec![0.0; 8],
            head: Head::Separate(lin(&info(Role::Head, 0), 99)),
            blocks,
            config: c.clone(),
        };
        let all = linears(&c);
        let pairs = named_linears(&m, &all).unwrap();
        assert_eq!(pairs.len(), 15);
        let tag = |l: &DenseLinear| l.weight[0] as usize;
        assert_eq!(tag(pairs[8].1), 11); // blk.1.attn_k.weight
        assert_eq!(pairs[8].0.name, "blk.1.attn_k.weight");
        assert_eq!(tag(pairs[14].1), 99);
        let mut twice = all.clone();
        twice.push(all[0].clone());
        assert!(named_linears_mut(&mut m, &twice).is_err());
        for (t, l) in named_linears_mut(&mut m, &all).unwrap() {
            l.weight[0] = t.layer.map_or(-1.0, |x| x as f32);
        }
        assert_eq!(m.blocks[1].down.weight[0], 1.0);
        m.head = Head::Tied;
        assert_eq!(named_linears(&m, &all).unwrap_err(), "output.weight");
    }
}
