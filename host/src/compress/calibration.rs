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
///
/// The windows may overlap, so any text of `len` tokens could fill any number of
/// them; but then the same tokens are counted many times and the calibration is
/// smaller than asked for. So the request is bounded by the text: `samples × len`
/// must not exceed its tokens (one window of `len` must fit, and as many tokens as
/// are asked for must exist), else one line names the numbers.
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
    // Cannot overflow: `check_calib_tokens` bounds the product.
    let asked = samples * len;
    if tokens.len() < asked {
        return Err(CompressError::Invalid(format!(
            "the calibration text has {} tokens, fewer than the --calib-samples × --calib-len = {samples} × {len} = {asked} asked for (give a longer text, or fewer or shorter sequences)",
            tokens.len()
        )));
    }
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

    #[test]
    fn a_request_beyond_the_text_is_refused_with_its_numbers() {
        let toks: Vec<u32> = (0..100).collect();
        // Exactly the text's tokens: accepted (the windows may still overlap).
        assert_eq!(sample_windows(&toks, 10, 10, 1).unwrap().len(), 10);
        assert_eq!(
            sample_windows(&toks, 1, 100, 1).unwrap(),
            vec![toks.clone()]
        );
        let e = sample_windows(&toks, 11, 10, 1).unwrap_err().to_string();
        assert!(
            e.contains("100 tokens") && e.contains("11 × 10 = 110"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    /// The default request (32 × 256) on the shipped C4 sample fits, and draws the
    /// windows it drew before the bound: under a one-token-per-byte tokenizer (the
    /// tiny fixtures') the 758,473-byte text gives offsets 535512, 555440, 147960,
    /// 273282, …, 215619 (worked out apart from this code, in Python, from the
    /// xorshift64* definition and the seed 0 ^ 0xCA1B).
    #[test]
    fn the_default_request_on_the_shipped_c4_sample_is_unchanged() {
        let text = crate::texts::c4_text();
        let toks: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(toks.len(), 758_473);
        let w = sample_windows(&toks, 32, 256, 0).unwrap();
        assert_eq!(w.len(), 32);
        for (i, at) in [
            (0, 535_512),
            (1, 555_440),
            (2, 147_960),
            (3, 273_282),
            (31, 215_619),
        ] {
            assert_eq!(w[i].as_slice(), &toks[at..at + 256], "window {i}");
        }
    }
}
