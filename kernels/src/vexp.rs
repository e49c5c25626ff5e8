//! A branch-free `exp` for `f32` slices that the compiler vectorizes, and the row
//! operations built on it (softmax, log-sum-exp, SiLU). `libm::expf` is the scalar
//! reference; per-call libm is what made these rows a fifth of a forward pass.
//!
//! Method (Cephes `expf`): `e^x = 2^n · e^r` with `n = round(x·log2 e)` and
//! `r = x − n·ln 2` (ln 2 split in two parts so `r` is exact), `e^r` by a degree-6
//! polynomial on `|r| ≤ ln2/2`. Maximum relative error about 2 ULP over the range where
//! `e^x` is a normal `f32`; below that range the result flushes to 0.

const LOG2E: f32 = core::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Above this `e^x` overflows `f32`.
const MAX_X: f32 = 88.376_26;
/// Below this `e^x` is subnormal; we return 0 there.
const MIN_X: f32 = -87.336_55;

/// `e^x` for one value (inlined into the vector loops).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let xc = x.clamp(MIN_X, MAX_X);
    // Round to nearest by the 1.5·2^23 trick: no libm call, so the loop vectorizes.
    let n = (xc * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r2 + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = er * scale;
    // Out-of-range inputs: x = -inf (masked scores) or below MIN_X give 0, NaN stays NaN.
    if x < MIN_X {
        0.0
    } else if x > MAX_X {
        f32::INFINITY
    } else {
        y
    }
}

macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(all(feature = "std", target_arch = "x86_64"))]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
                    && !crate::force_scalar()
                {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Lanes of the independent accumulators below: a float reduction only vectorizes when
/// its order is spelled out, since the compiler may not reassociate `f32` additions.
const LANES: usize = 16;

#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    tail.iter()
        .chain(&acc)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn sum_of(row: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

dispatch! {
    /// In-place softmax of one row; `-inf` entries become 0.
    pub fn softmax(row: &mut [f32]) {
        let max = max_of(row);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        for v in row.iter_mut() {
            *v = exp_approx(*v - max);
        }
        let inv = 1.0 / sum_of(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

dispatch! {
    /// `log Σ exp(row)` with partial sums accumulated in `f64`, for NLLs.
    pub fn log_sum_exp(row: &[f32]) -> f64 {
        let max = max_of(row);
        if max == f32::NEG_INFINITY {
            return f64::NEG_INFINITY;
        }
        let mut buf = [0.0f32; 256];
        let mut total = 0.0f64;
        for chunk in row.chunks(256) {
            let b = &mut buf[..chunk.len()];
            for (o, &v) in b.iter_mut().zip(chunk) {
                *o = exp_approx(v - max);
            }
            total += sum_of(b) as f64;
        }
        max as f64 + libm::log(total)
    }
}

dispatch! {
    /// SiLU(g)·u element-wise, into `g`.
    pub fn silu_mul(g: &mut [f32], u: &[f32]) {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + exp_approx(-*g)) * u;
        }
    }
}

dispatch! {
    /// GELU(g)·u element-wise (tanh approximation), into `g`. `tanh(z)` is
    /// `1 − 2/(e^{2z} + 1)`, which saturates correctly at both ends (`e^{2z}` is 0 or
    /// `inf` there) and loses at most a few ULP of `1 + tanh` near 0, where GELU's
    /// factor `0.5·g` is small anyway.
    pub fn gelu_tanh_mul(g: &mut [f32], u: &[f32]) {
        use crate::ops::{GELU_BETA, GELU_KAPPA};
        for (g, &u) in g.iter_mut().zip(u) {
            let x = *g;
            let z = GELU_BETA * (x + GELU_KAPPA * x * x * x);
            let one_plus_tanh = 2.0 - 2.0 / (exp_approx(2.0 * z) + 1.0);
            *g = 0.5 * x * one_plus_tanh * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_within_3_ulp_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_approx(x), libm::expf(x));
            let ulp = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulp <= 3, "x={x}: {a} vs {b} ({ulp} ulp)");
            x += 0.01137;
        }
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(f32::NAN).is_nan());
    }

    #[test]
    fn row_ops_match_scalar_references() {
        let row: alloc::vec::Vec<f32> = (0..1001)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
            .collect();
        let mut a = row.clone();
        let mut b = row.clone();
        softmax(&mut a);
        crate::ops::softmax(&mut b);
        // 3-ULP exps and a differently ordered sum of 1001 terms: 1e-5 relative.
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * y + 1e-12, "{x} vs {y}");
        }
        let (l1, l2) = (log_sum_exp(&row), crate::ops::log_sum_exp(&row));
        assert!((l1 - l2).abs() < 1e-6, "{l1} vs {l2}");
        let u: alloc::vec::Vec<f32> = row.iter().map(|v| v * 0.5 + 1.0).collect();
        let (mut g1, mut g2) = (row.clone(), row.clone());
        silu_mul(&mut g1, &u);
        crate::ops::silu_mul(&mut g2, &u);
        for (x, y) in g1.iter().zip(&g2) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
        let (mut g1, mut g2) = (row.clone(), row.clone());
        gelu_tanh_mul(&mut g1, &u);
        crate::ops::gelu_tanh_mul(&mut g2, &u);
        for (x, y) in g1.iter().zip(&g2) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn gelu_tanh_matches_its_closed_form_in_f64() {
        // Independent of both f32 implementations: the formula in f64. For negative x
        // the factor 1 + tanh cancels in f32 (as in PyTorch's own f32 formula): its
        // absolute error is ~6e-8, times 0.5·|x|; hence 2e-6 relative or 1e-7·|x|.
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = x as f64;
            let want = 0.5
                * xd
                * (1.0
                    + libm::tanh(
                        (2.0f64 / core::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd),
                    ));
            for f in [gelu_tanh_mul, crate::ops::gelu_tanh_mul] {
                let mut g = [x];
                f(&mut g, &[1.0]);
                let err = (g[0] as f64 - want).abs();
                assert!(
                    err <= 2e-6 * want.abs() + 1e-7 * xd.abs().max(1.0),
                    "x={x}: {} vs {want}",
                    g[0]
                );
            }
            x += 0.0173;
        }
    }
}
