//! Calibration and held-out evaluation text for `compress`.

use cap_device::forward::Runner;
use cap_device::model::Model;
use cap_device::ppl::{NllStats, Protocol, score_window};

use super::error::{CompressError, Result};

/// The first characters of `text` that hold about `tokens` tokens (≈ 8 characters a
/// token leaves room for texts that tokenize densely), cut at a character boundary.
pub fn prefix_for_tokens(text: &str, tokens: usize) -> &str {
    let mut end = tokens.saturating_mul(8).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The most calibration tokens (`--calib-samples × --calib-len`) `compress` takes:
/// 2²⁰, four times the papers' 128 × 2048 (a 2-core CPU takes minutes for the default
/// 32 × 256). Every token's activations are held per layer while pruning, so a count
/// of 10⁸ × 256 used to grow until the allocator aborted.
pub const MAX_CALIB_TOKENS: usize = 1 << 20;

/// Refuses `samples × len` above [`MAX_CALIB_TOKENS`] (before anything is drawn or
/// generated).
pub fn check_calib_tokens(samples: usize, len: usize) -> Result<()> {
    if samples
        .checked_mul(len)
        .is_none_or(|n| n > MAX_CALIB_TOKENS)
    {
        return Err(CompressError::Invalid(format!(
            "--calib-samples × --calib-len = {samples} × {len} is more than {MAX_CALIB_TOKENS} calibration tokens"
        )));
    }
    Ok(())
}

/// `samples` windows of `len` tokens at seeded random offsets of `tokens` (the
/// SparseGPT/Wanda way of drawing calibration sequences).
pub fn sample_windows(
    tokens: &[u32],
    samples: usize,
    len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if samples == 0 || len < 2 {
        return Err(CompressError::Invalid(
            "--calib-samples must be at least 1 and --calib-len at least 2".into(),
        ));
    }
    if tokens.len() < len {
        return Err(CompressError::Invalid(format!(
            "the calibration text has {} tokens, fewer than one sample of --calib-len {len}",
            tokens.len()
        )));
    }
    check_calib_tokens(samples, len)?;
    let mut rng = cap_device::rng::XorShift64Star::new(seed ^ 0xCA1B);
    let span = (tokens.len() - len + 1) as u64;
    Ok((0..samples)
        .map(|_| {
            let at = (rng.next_u64() % span) as usize;
            tokens[at..at + len].to_vec()
        })
        .collect())
}

/// Mean NLL of `model` over `windows` (all but each window's first token scored).
pub fn calibration_loss<L: cap_device::model::Linear>(
    model: &Model<L>,
    windows: &[&[u32]],
    threads: usize,
) -> Result<f64> {
    let ctx = windows.iter().map(|w| w.len()).max().unwrap_or(0);
    let runner = Runner::new(model, ctx, threads);
    let mut total = NllStats::default();
    for w in windows {
        let s = score_window(&runner, w, Protocol::Standard, None)
            .map_err(|e| CompressError::Numerical(format!("calibration forward pass: {e}")))?;
        total.merge(&s);
    }
    Ok(total.mean())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_seeded_slices() {
        let toks: Vec<u32> = (0..100).collect();
        let w = sample_windows(&toks, 5, 10, 3).unwrap();
        assert_eq!(w, sample_windows(&toks, 5, 10, 3).unwrap());
        for s in &w {
            assert_eq!(s.len(), 10);
            assert!(s.windows(2).all(|p| p[1] == p[0] + 1));
        }
        assert!(sample_windows(&toks, 1, 101, 0).is_err());
    }
}
