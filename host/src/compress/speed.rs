//! Decode speed on a board, predicted from the bytes one decoded token reads.
//!
//! Decoding one token of a small model is memory-bound: every compressed linear, the
//! output head (the tied embedding when there is no separate head), the norms and the
//! KV cache written so far stream from memory once, and the arithmetic hides behind
//! the loads. So `tokens/s ≈ usable bandwidth / bytes read per token`, and a speed
//! requirement is a byte limit like the memory one. The usable bandwidth is the
//! profile's theoretical figure times [`DECODE_BANDWIDTH_EFFICIENCY`].

use serde::Serialize;

use cap_device::config::Config;
use cap_device::forward::{KvCache, KvDtype};

use crate::targets::Profile;

/// Share of a board's theoretical memory bandwidth a decode step is planned to get.
/// A planning figure, not a board measurement: cap-device's decode reads weights at
/// 52–73% of what a memory benchmark reaches on the x86 development machines (README,
/// "Board runtime"), and such a benchmark commonly reaches 70–80% of a DRAM system's
/// theoretical figure (not measured on a board here); 0.4 ≈ 0.6 × 0.7, rounded down.
pub const DECODE_BANDWIDTH_EFFICIENCY: f64 = 0.4;

/// What one decoded token reads besides the compressed linears, and at what rate.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DecodeCost {
    /// Usable bandwidth in bytes per second (theoretical × efficiency).
    pub bandwidth_bytes_per_s: f64,
    /// Dense tensors read per token: the output head in full, norms, biases and one
    /// embedding row when the head is separate.
    pub dense_read_bytes: u64,
    /// The KV cache read per decode step: `batch` sequences at the mean position of a
    /// `ctx`-token context (f32, as the host measures with).
    pub kv_read_bytes: u64,
}

impl DecodeCost {
    /// The cost of decoding on `profile` with `ctx` and `batch` for a model with
    /// `config` whose dense tensors read `dense_read_bytes` per token.
    pub fn new(
        profile: &Profile,
        config: &Config,
        ctx: usize,
        batch: usize,
        dense_read_bytes: u64,
    ) -> Self {
        DecodeCost {
            bandwidth_bytes_per_s: profile.memory_bandwidth_gbps
                * 1e9
                * DECODE_BANDWIDTH_EFFICIENCY,
            dense_read_bytes,
            kv_read_bytes: KvCache::bytes_for(config, (ctx / 2).max(1), KvDtype::F32)
                * batch as u64,
        }
    }

    /// Bytes read per decode step with compressed linears of `linear_bytes`.
    pub fn bytes_per_token(&self, linear_bytes: u64) -> u64 {
        linear_bytes + self.dense_read_bytes + self.kv_read_bytes
    }

    /// Predicted decode steps per second with compressed linears of `linear_bytes`.
    pub fn tokens_per_s(&self, linear_bytes: u64) -> f64 {
        self.bandwidth_bytes_per_s / self.bytes_per_token(linear_bytes) as f64
    }

    /// The most bytes the compressed linears may take for at least `tokens_per_s`
    /// decode steps per second; `None` when the rest alone is too slow.
    pub fn linear_limit(&self, tokens_per_s: f64) -> Option<u64> {
        let per_token = (self.bandwidth_bytes_per_s / tokens_per_s).floor();
        let rest = (self.dense_read_bytes + self.kv_read_bytes) as f64;
        (per_token >= rest).then_some((per_token - rest) as u64)
    }
}

/// The predicted decode speed of a written file on its target, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct SpeedEstimate {
    /// The profile's name.
    pub target: String,
    /// Theoretical bandwidth of the profile, GB/s.
    pub bandwidth_gbps: f64,
    /// The share of it planned for ([`DECODE_BANDWIDTH_EFFICIENCY`]).
    pub efficiency: f64,
    /// Bytes one decode step reads from the written file and the KV cache.
    pub bytes_per_token: u64,
    /// Predicted decode tokens per second of the written file.
    pub tokens_per_s: f64,
    /// The same for the linears kept dense (what `pack` writes).
    pub dense_tokens_per_s: f64,
    /// The speed asked for with `--min-tokens-per-s`, if any.
    pub required_tokens_per_s: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost() -> DecodeCost {
        DecodeCost {
            bandwidth_bytes_per_s: 1e9,
            dense_read_bytes: 1_000_000,
            kv_read_bytes: 3_000_000,
        }
    }

    #[test]
    fn the_limit_is_the_inverse_of_the_prediction() {
        let c = cost();
        // 100 tok/s at 1 GB/s: 10 MB a token, 4 MB of it dense tensors and KV.
        assert_eq!(c.linear_limit(100.0), Some(6_000_000));
        assert!((c.tokens_per_s(6_000_000) - 100.0).abs() < 1e-9);
        // A faster requirement leaves fewer bytes, and the prediction meets it.
        let l = c.linear_limit(137.0).unwrap();
        assert!(c.tokens_per_s(l) >= 137.0);
        assert!(c.tokens_per_s(l + 1000) < 137.0);
    }

    #[test]
    fn an_unreachable_speed_has_no_limit() {
        // 4 MB a token with empty linears: at most 250 tok/s.
        assert_eq!(cost().linear_limit(250.0), Some(0));
        assert_eq!(cost().linear_limit(251.0), None);
    }
}
