//! The architecture table: which tensor plays which role, under GGUF and Hugging Face
//! names, as data (llama.cpp's tensor-info tables are the model). Per-architecture code
//! lives only where the math differs (q/k/v biases, RoPE scaling, q/k row order).

use cap_device::config::Arch;

/// The role a tensor plays in a LLaMA-family model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// RMSNorm before the MLP.
    MlpNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
    /// llama.cpp's per-frequency RoPE divisors.
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

impl Role {
    /// The group this role is reported under.
    pub fn group(self) -> Group {
        use Role::*;
        match self {
            Embed => Group::Embedding,
            Head => Group::Head,
            Q | K | V | O | QBias | KBias | VBias => Group::Attention,
            Gate | Up | Down => Group::Mlp,
            FinalNorm | AttnNorm | MlpNorm | RopeFreqs => Group::Norms,
        }
    }
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

/// `(role, GGUF name, Hugging Face name)`; `{}` stands for the block index.
pub const TENSORS: &[(Role, &str, &str)] = &[
    (
        Role::Embed,
        "token_embd.weight",
        "model.embed_tokens.weight",
    ),
    (Role::FinalNorm, "output_norm.weight", "model.norm.weight"),
    (Role::Head, "output.weight", "lm_head.weight"),
    (Role::RopeFreqs, "rope_freqs.weight", ""),
    (
        Role::AttnNorm,
        "blk.{}.attn_norm.weight",
        "model.layers.{}.input_layernorm.weight",
    ),
    (
        Role::Q,
        "blk.{}.attn_q.weight",
        "model.layers.{}.self_attn.q_proj.weight",
    ),
    (
        Role::K,
        "blk.{}.attn_k.weight",
        "model.layers.{}.self_attn.k_proj.weight",
    ),
    (
        Role::V,
        "blk.{}.attn_v.weight",
        "model.layers.{}.self_attn.v_proj.weight",
    ),
    (
        Role::O,
        "blk.{}.attn_output.weight",
        "model.layers.{}.self_attn.o_proj.weight",
    ),
    (
        Role::QBias,
        "blk.{}.attn_q.bias",
        "model.layers.{}.self_attn.q_proj.bias",
    ),
    (
        Role::KBias,
        "blk.{}.attn_k.bias",
        "model.layers.{}.self_attn.k_proj.bias",
    ),
    (
        Role::VBias,
        "blk.{}.attn_v.bias",
        "model.layers.{}.self_attn.v_proj.bias",
    ),
    (
        Role::MlpNorm,
        "blk.{}.ffn_norm.weight",
        "model.layers.{}.post_attention_layernorm.weight",
    ),
    (
        Role::Gate,
        "blk.{}.ffn_gate.weight",
        "model.layers.{}.mlp.gate_proj.weight",
    ),
    (
        Role::Up,
        "blk.{}.ffn_up.weight",
        "model.layers.{}.mlp.up_proj.weight",
    ),
    (
        Role::Down,
        "blk.{}.ffn_down.weight",
        "model.layers.{}.mlp.down_proj.weight",
    ),
];

/// Which naming scheme a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// llama.cpp's GGUF names.
    Gguf,
    /// Hugging Face `transformers` names.
    HuggingFace,
}

/// The tensor name for `role` (in block `layer`, for per-block roles).
pub fn tensor_name(naming: Naming, role: Role, layer: usize) -> String {
    let (_, g, h) = TENSORS
        .iter()
        .find(|(r, _, _)| *r == role)
        .copied()
        .unwrap_or((role, "", ""));
    let pat = match naming {
        Naming::Gguf => g,
        Naming::HuggingFace => h,
    };
    pat.replace("{}", &layer.to_string())
}

/// Classifies a tensor name, returning its role and block index (if any).
pub fn classify(naming: Naming, name: &str) -> Option<(Role, Option<usize>)> {
    for &(role, g, h) in TENSORS {
        let pat = match naming {
            Naming::Gguf => g,
            Naming::HuggingFace => h,
        };
        if pat.is_empty() {
            continue;
        }
        match pat.split_once("{}") {
            None if pat == name => return Some((role, None)),
            None => {}
            Some((pre, post)) => {
                if let Some(mid) = name.strip_prefix(pre).and_then(|r| r.strip_suffix(post))
                    && let Ok(i) = mid.parse()
                {
                    return Some((role, Some(i)));
                }
            }
        }
    }
    None
}

/// Whether llama.cpp's converter interleaved the q/k rows of this architecture for its
/// RoPE kernel (it does for LLaMA-style models, not for NeoX-style ones like Qwen2).
pub fn gguf_permutes_qk(arch: Arch) -> bool {
    matches!(arch, Arch::Llama | Arch::Mistral)
}

/// Undoes llama.cpp's q/k permutation of a row-major `rows × cols` weight (or a bias,
/// `cols == 1`) with `n_heads` heads: GGUF row `h·d + 2i + j` holds Hugging Face row
/// `h·d + j·d/2 + i`, for head width `d` (convert_hf_to_gguf's `permute`).
pub fn unpermute_qk(w: &[f32], rows: usize, cols: usize, n_heads: usize) -> Vec<f32> {
    let d = rows / n_heads;
    let half = d / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &(role, g, h) in TENSORS {
            for (naming, pat) in [(Naming::Gguf, g), (Naming::HuggingFace, h)] {
                if pat.is_empty() {
                    continue;
                }
                let layer = if pat.contains("{}") { Some(17) } else { None };
                let name = tensor_name(naming, role, 17);
                assert_eq!(classify(naming, &name), Some((role, layer)), "{name}");
            }
        }
        assert_eq!(classify(Naming::Gguf, "blk.x.attn_q.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        // convert_hf_to_gguf: w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(...)
        let (n_heads, d, cols) = (3, 8, 2);
        let rows = n_heads * d;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..n_heads {
            for two in 0..2 {
                for i in 0..d / 2 {
                    // After swapaxes the index order is (h, i, two).
                    let src = h * d + two * (d / 2) + i;
                    let dst = h * d + i * 2 + two;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_qk(&gguf, rows, cols, n_heads), hf);
    }
}
