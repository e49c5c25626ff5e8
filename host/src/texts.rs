//! The texts shipped in the repository (`data/`, origins and licences in
//! `data/README.md`), compiled into the binary so that `compress` has held-out text to
//! measure on wherever it runs, with no file beside it.

/// WikiText-2 raw validation text (CC BY-SA 3.0), as shipped: `compress`'s default
/// held-out text.
pub const WIKITEXT2_VALID: &str = include_str!("../../data/wikitext-2-raw/wiki.valid.raw");

/// The 200-document C4 sample (ODC-BY 1.0), as shipped (JSON lines with a `text`
/// field): the held-out text when the calibration text is WikiText-2 itself.
pub const C4_SAMPLE_JSONL: &str = include_str!("../../data/c4/c4_sample.json");

/// Display names of the shipped texts, as reports and the file's self-test record
/// name them.
pub const WIKITEXT2_VALID_NAME: &str =
    "WikiText-2 validation (shipped, data/wikitext-2-raw/wiki.valid.raw)";
/// See [`WIKITEXT2_VALID_NAME`].
pub const C4_SAMPLE_NAME: &str = "C4 sample (shipped, data/c4/c4_sample.json)";

/// The default held-out text for a run calibrated on `calib` (`None`: data-free):
/// WikiText-2 validation, unless the calibration text is that very text, then the C4
/// sample's documents (joined by blank lines, as `--calib` reads JSON lines). Returns
/// `(name, text)`.
pub fn default_held_out(calib: Option<&str>) -> (&'static str, String) {
    if calib.is_some_and(|c| c == WIKITEXT2_VALID) {
        (C4_SAMPLE_NAME, c4_text())
    } else {
        (WIKITEXT2_VALID_NAME, WIKITEXT2_VALID.to_string())
    }
}

/// The C4 sample's documents joined by blank lines.
pub fn c4_text() -> String {
    C4_SAMPLE_JSONL
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_string))
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// The compiled-in texts are the shipped files, byte for byte (sha256 from
    /// data/SHA256SUMS).
    #[test]
    fn shipped_texts_are_the_files() {
        let hex = |s: &str| crate::pack::to_hex(&Sha256::digest(s.as_bytes()));
        assert_eq!(
            hex(WIKITEXT2_VALID),
            "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"
        );
        assert_eq!(
            hex(C4_SAMPLE_JSONL),
            "7959cad37d238a29d5bbe342a601ae54f60dc4332708bc723df56846e191fd66"
        );
        assert_eq!(C4_SAMPLE_JSONL.lines().count(), 200);
    }

    #[test]
    fn the_held_out_text_is_never_the_calibration_text() {
        assert_eq!(default_held_out(None).0, WIKITEXT2_VALID_NAME);
        assert_eq!(default_held_out(Some("other text")).0, WIKITEXT2_VALID_NAME);
        let (name, text) = default_held_out(Some(WIKITEXT2_VALID));
        assert_eq!(name, C4_SAMPLE_NAME);
        assert!(text.len() > 700_000 && !text.contains("\"text\""));
    }
}
