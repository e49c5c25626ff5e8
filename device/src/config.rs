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
}

impl Arch {
    /// All supported architectures, for error messages.
    pub const ALL: [Arch; 3] = [Arch::Llama, Arch::Mistral, Arch::Qwen2];

    /// The name used by GGUF (`general.architecture`) and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// Parses a GGUF architecture name or a Hugging Face `model_type`.
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
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
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / libm::powf(self.rope_theta, (2 * i) as f32 / d as f32))
            .collect();
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
