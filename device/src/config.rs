//! Model hyper-parameters, shared by every architecture cap runs.

use alloc::vec::Vec;

/// Architectures cap supports. They share one forward pass; the differences are data
/// here (biases, rope scaling), not code paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA-1/2/3, SmolLM, TinyLlama.
    Llama,
    /// Mistral (sliding window attention is not needed while ctx ≤ window).
    Mistral,
    /// Qwen2 (biases on q, k and v).
    Qwen2,
    /// Gemma-3: RMSNorm on each query and key head, norms after attention and after the
    /// MLP as well as before, GeGLU (tanh GELU), the embedding scaled by `√hidden`, and
    /// sliding-window layers with their own RoPE base between global ones
    /// ([`LocalAttention`]).
    Gemma3,
}

impl Arch {
    /// All supported architectures, for error messages.
    pub const ALL: [Arch; 4] = [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Gemma3];

    /// The name used by GGUF (`general.architecture`) and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Parses a GGUF architecture name or a Hugging Face `model_type`.
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            "gemma3" | "gemma3_text" => Some(Arch::Gemma3),
            _ => None,
        }
    }

    /// Whether each query and key head is RMS-normalized (with its own weight) before
    /// RoPE.
    pub fn qk_norm(self) -> bool {
        self == Arch::Gemma3
    }

    /// Whether the attention output and the MLP output are RMS-normalized before they
    /// are added to the residual stream (Gemma-2/3's "sandwich" norms).
    pub fn post_norms(self) -> bool {
        self == Arch::Gemma3
    }

    /// The MLP's gate activation.
    pub fn activation(self) -> Activation {
        match self {
            Arch::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }

    /// Whether token embeddings are multiplied by `√hidden_size` on the way in (not on
    /// the way out: a tied head uses the stored table).
    pub fn scales_embedding(self) -> bool {
        self == Arch::Gemma3
    }
}

/// The MLP's gate activation, `down(act(gate(x)) · up(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)` (SwiGLU).
    Silu,
    /// GELU's tanh approximation (GeGLU; PyTorch's `gelu(approximate="tanh")`).
    GeluTanh,
}

/// Layers that attend only to a window of recent positions, with their own RoPE base,
/// interleaved with global layers (Gemma-3: five local layers, then one global).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalAttention {
    /// Positions a local layer's query sees: itself and the `window - 1` before it
    /// (Hugging Face's `q - window < k ≤ q`; llama.cpp masks `q - k ≥ window`).
    pub window: usize,
    /// Every `global_every`-th layer (1-based: layers `global_every - 1`,
    /// `2·global_every - 1`, ...) is global; the others are local.
    pub global_every: usize,
    /// The RoPE base of the local layers (plain RoPE, no scaling); global layers use
    /// [`Config::rope_theta`] and [`Config::rope_scaling`].
    pub rope_theta: f32,
}

impl LocalAttention {
    /// Whether block `layer` (0-based) attends locally.
    pub fn is_local(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(self.global_every)
    }
}

/// How rotary frequencies are scaled beyond the base `theta^(-2i/d)`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// LLaMA-3.1 scaling, with the parameters of Hugging Face's `rope_scaling`.
    Llama3 {
        /// Divisor for low frequencies.
        factor: f32,
        /// Wavelength bound (as a fraction of the original context) of the low band.
        low_freq_factor: f32,
        /// Wavelength bound (as a fraction of the original context) of the high band.
        high_freq_factor: f32,
        /// The context length the model was pre-trained with.
        original_max_position: f32,
    },
    /// Per-frequency divisors, as llama.cpp stores them in `rope_freqs.weight`.
    FreqFactors(Vec<f32>),
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Architecture family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (grouped-query attention when < `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Whether the output head reuses the token embedding.
    pub tie_embeddings: bool,
    /// Whether q, k and v have biases (Qwen2).
    pub qkv_bias: bool,
    /// The longest context the model was trained for.
    pub max_position: usize,
    /// Sliding attention window, if the architecture has one (Mistral).
    pub sliding_window: Option<usize>,
    /// Local (sliding-window) layers between global ones (Gemma-3), if any.
    pub local_attention: Option<LocalAttention>,
}

impl Config {
    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.vocab_size == 0 || self.hidden_size == 0 || self.n_layers == 0 {
            return Err("vocabulary, hidden size and layer count must be positive");
        }
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err("query heads must be a positive multiple of key/value heads");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err("head dimension must be positive and even (RoPE rotates pairs)");
        }
        if let Some(l) = &self.local_attention
            && (l.window == 0
                || l.global_every == 0
                || !(l.rope_theta > 0.0 && l.rope_theta.is_finite()))
        {
            return Err("local attention needs a positive window, layer period and RoPE base");
        }
        if self.local_attention.is_some() != (self.arch == Arch::Gemma3) {
            return Err("local attention layers are part of the gemma3 architecture only");
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling
            && f.len() != self.head_dim / 2
        {
            return Err("rope frequency factors must have head_dim/2 entries");
        }
        self.validate_numbers()
    }

    /// The checks on numbers that are not shapes: a NaN, infinite, zero or negative
    /// value here does not fail loudly later, it turns every logit into NaN (or every
    /// position into the same rotation), so it is refused with the field named.
    fn validate_numbers(&self) -> Result<(), &'static str> {
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err("rms_norm_eps must be a finite number >= 0");
        }
        if !positive(self.rope_theta) {
            return Err("rope_theta (RoPE base) must be a finite number > 0");
        }
        if self.max_position == 0 {
            return Err("max_position (context length) must be positive");
        }
        // Products the forward pass and every size computation rely on must not wrap.
        let dims = [
            self.n_heads.checked_mul(self.head_dim),
            self.vocab_size.checked_mul(self.hidden_size),
            self.intermediate_size.checked_mul(self.hidden_size),
        ];
        if dims
            .iter()
            .any(|d| d.is_none_or(|d| d > isize::MAX as usize))
        {
            return Err("dimensions too large (their products overflow)");
        }
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::FreqFactors(f) => {
                if !f.iter().all(|&x| positive(x)) {
                    return Err("rope frequency factors must be finite numbers > 0");
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                if !positive(*factor) {
                    return Err("rope_scaling.factor must be a finite number > 0");
                }
                if !positive(*low_freq_factor) || !positive(*high_freq_factor) {
                    return Err("rope_scaling low/high_freq_factor must be finite numbers > 0");
                }
                // The smoothing divides by their difference.
                if low_freq_factor == high_freq_factor {
                    return Err("rope_scaling low_freq_factor and high_freq_factor must differ");
                }
                if !positive(*original_max_position) {
                    return Err(
                        "rope_scaling.original_max_position_embeddings must be a number > 0",
                    );
                }
            }
        }
        Ok(())
    }

    /// The rotary inverse frequencies `1/theta^(2i/d)` after scaling, computed in `f32`
    /// exactly as Hugging Face `transformers` does so positions agree to rounding.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let base = plain_inv_freq(self.rope_theta, self.head_dim);
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::FreqFactors(f) => base.iter().zip(f).map(|(b, f)| b / f).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * core::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // HF's `~(w < high) & ~(w > low)`; the wavelengths are finite, so this is
                        // the closed band [high, low].
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        if medium {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// `1/theta^(2i/d)` for `i < d/2`, in `f32` as Hugging Face computes it.
pub fn plain_inv_freq(theta: f32, d: usize) -> Vec<f32> {
    (0..d / 2)
        .map(|i| 1.0 / libm::powf(theta, (2 * i) as f32 / d as f32))
        .collect()
}

impl Config {
    /// The rotary inverse frequencies of local layers (plain RoPE at the local base),
    /// or `None` when every layer is global.
    pub fn local_rope_inv_freq(&self) -> Option<Vec<f32>> {
        self.local_attention
            .map(|l| plain_inv_freq(l.rope_theta, self.head_dim))
    }

    /// The attention window of block `layer`: `Some(w)` for a local layer.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.local_attention
            .filter(|l| l.is_local(layer))
            .map(|l| l.window)
    }
}
