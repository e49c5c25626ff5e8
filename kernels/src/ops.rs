//! Element-wise and row-wise operations of a transformer block, in `f32`.
//!
//! These mirror the PyTorch reference (Hugging Face `transformers`) operation by
//! operation, so results agree to rounding: RMSNorm computes the mean of squares in
//! `f32` and multiplies by `1/sqrt`, softmax subtracts the row maximum.

/// RMSNorm of each `weight.len()`-wide row of `x` into `out`:
/// `out = weight * x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    assert!(
        d > 0 && x.len() == out.len() && x.len().is_multiple_of(d),
        "rms_norm shape mismatch"
    );
    for (o, r) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let ss: f32 = r.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / libm::sqrtf(ss + eps);
        for ((o, &v), &w) in o.iter_mut().zip(r).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

/// [`rms_norm`] of each `weight.len()`-wide row of `x`, in place (the per-head q/k
/// norms of Gemma-3).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "rms_norm shape mismatch"
    );
    for r in x.chunks_exact_mut(d) {
        let ss: f32 = r.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / libm::sqrtf(ss + eps);
        for (v, &w) in r.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

/// `√(2/π)`, the constant of GELU's tanh approximation.
pub const GELU_BETA: f32 = 0.797_884_6;
/// The cubic coefficient of GELU's tanh approximation.
pub const GELU_KAPPA: f32 = 0.044_715;

/// GELU(g) · u element-wise, written into `g`, with PyTorch's tanh approximation
/// (`gelu(approximate="tanh")`: `0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))`).
pub fn gelu_tanh_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "gelu_tanh_mul shape mismatch");
    for (g, &u) in g.iter_mut().zip(u) {
        let x = *g;
        let inner = GELU_BETA * (x + GELU_KAPPA * x * x * x);
        *g = 0.5 * x * (1.0 + libm::tanhf(inner)) * u;
    }
}

/// SiLU(g) · u, element-wise, written into `g`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "silu_mul shape mismatch");
    for (g, &u) in g.iter_mut().zip(u) {
        let s = *g / (1.0 + libm::expf(-*g));
        *g = s * u;
    }
}

/// In-place softmax of one row; entries equal to `-inf` become 0.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = libm::expf(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `log(sum(exp(row)))`, computed stably with `f64` accumulation, for negative
/// log-likelihoods: `nll(t) = logsumexp(row) - row[t]`.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let s: f64 = row.iter().map(|&v| libm::exp((v - max) as f64)).sum();
    max as f64 + libm::log(s)
}

/// Applies rotary position embedding in the "rotate half" convention of Hugging Face
/// (pairs `(i, i + d/2)`) to one head vector `x` of width `2·cos.len()`.
pub fn rope_rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    assert!(
        x.len() == 2 * half && sin.len() == half,
        "rope shape mismatch"
    );
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x0, x1) = (a[i], b[i]);
        a[i] = x0 * cos[i] - x1 * sin[i];
        b[i] = x1 * cos[i] + x0 * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_closed_form() {
        // x = [3, 4]: mean square 12.5, so out = w * x / sqrt(12.5).
        let mut out = [0.0; 2];
        rms_norm(&mut out, &[3.0, 4.0], &[1.0, 2.0], 0.0);
        let r = 12.5f32.sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn softmax_and_lse_agree() {
        let mut row = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
        let lse = log_sum_exp(&row);
        let want = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((lse - want).abs() < 1e-9);
        softmax(&mut row);
        assert!((row[2] as f64 - (3.0 - want).exp()).abs() < 1e-6);
        assert_eq!(row[3], 0.0);
    }

    #[test]
    fn rope_quarter_turn() {
        // cos = 0, sin = 1 rotates (a, b) to (-b, a) in each pair.
        let mut x = [1.0, 2.0, 3.0, 4.0];
        rope_rotate_half(&mut x, &[0.0, 0.0], &[1.0, 1.0]);
        assert_eq!(x, [-3.0, -4.0, 1.0, 2.0]);
    }

    #[test]
    fn silu_known_values() {
        let mut g = [0.0f32, 1.0];
        silu_mul(&mut g, &[5.0, 2.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
    }
}
