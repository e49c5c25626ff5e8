//! Choosing the next token from logits: greedy, or temperature + nucleus (top-p)
//! sampling with a seeded generator, without allocating per token.

use alloc::vec::Vec;

use crate::rng::SplitMix64;

/// Sampling settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities sum to at least
    /// this (`1` = the whole vocabulary).
    pub top_p: f32,
    /// Seed of the random generator (same seed, same logits: same tokens).
    pub seed: u64,
}

/// A sampler with its buffers (sized to the vocabulary on first use).
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: SplitMix64,
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for `vocab` tokens; its buffers are allocated here, once.
    pub fn new(cfg: SamplerConfig, vocab: usize) -> Self {
        Sampler {
            cfg,
            rng: SplitMix64::new(cfg.seed),
            cand: Vec::with_capacity(vocab),
        }
    }

    /// The next token given `logits` (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                    if v > b.1 { (i, v) } else { b }
                })
                .0 as u32
        };
        if self.cfg.temperature.is_nan() || self.cfg.temperature <= 0.0 || logits.is_empty() {
            return argmax();
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for &v in logits {
            sum += f64::from(libm::expf((v - max) * inv_t));
        }
        // Tokens below this probability cannot be in any nucleus of mass top_p (the
        // others would hold more than top_p): skipping them keeps the sort short.
        let n = logits.len();
        let top_p = self.cfg.top_p.clamp(0.0, 1.0);
        let cutoff = if top_p < 1.0 {
            (1.0 - top_p) / (n.max(2) - 1) as f32
        } else {
            0.0
        };
        self.cand.clear();
        for (i, &v) in logits.iter().enumerate() {
            let p = (f64::from(libm::expf((v - max) * inv_t)) / sum) as f32;
            if p >= cutoff {
                self.cand.push((p, i as u32));
            }
        }
        if self.cand.is_empty() {
            return argmax();
        }
        self.cand
            .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut mass = 0.0f32;
        let mut last = self.cand.len() - 1;
        for (k, &(p, _)) in self.cand.iter().enumerate() {
            mass += p;
            if mass >= top_p {
                last = k;
                break;
            }
        }
        let u = self.rng.uniform_f32();
        let kept = &self.cand[..=last];
        let total: f32 = kept.iter().map(|c| c.0).sum();
        let mut r = u * total;
        for &(p, id) in kept {
            r -= p;
            if r < 0.0 {
                return id;
            }
        }
        kept[last].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let cfg = SamplerConfig {
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
        };
        assert_eq!(Sampler::new(cfg, 4).sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn small_nucleus_keeps_only_the_top_token() {
        // p = softmax([5, 0, 0, 0]) ≈ [0.98, 0.007, ...]: a nucleus of 0.5 is token 0.
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
        };
        let mut s = Sampler::new(cfg, 4);
        for _ in 0..50 {
            assert_eq!(s.sample(&[5.0, 0.0, 0.0, 0.0]), 0);
        }
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        // Two tokens with logits ln 3 and 0: probabilities 3/4 and 1/4. Over 20,000
        // draws the count of token 0 has sd sqrt(n·p·q) ≈ 61; allow 5 sd.
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let mut s = Sampler::new(cfg, 2);
        let logits = [3f32.ln(), 0.0];
        let n = 20_000;
        let zeros = (0..n).filter(|_| s.sample(&logits) == 0).count() as f64;
        assert!((zeros - 0.75 * n as f64).abs() < 5.0 * 61.3, "{zeros}");
    }

    #[test]
    fn same_seed_same_tokens() {
        let cfg = SamplerConfig {
            temperature: 0.8,
            top_p: 0.9,
            seed: 3,
        };
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = || {
            let mut s = Sampler::new(cfg, 100);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
