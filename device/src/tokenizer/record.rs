//! The tokenizer as it travels in a `.cap` manifest ([`cap_format::Tokenizer`]): the
//! conversion both ways, so the host writes exactly what the device rebuilds.

use alloc::string::{String, ToString};

use cap_format::manifest::{
    SpacePrefix as RecPrefix, Tokenizer as Record, TokenizerKind as RecKind,
};

use super::{PreTokenizer, SpacePrefix, TokenizerKind, TokenizerSpec};

/// The manifest names of the pre-tokenizers, in one place for both directions.
const PRE_NAMES: [(PreTokenizer, &str); 6] = [
    (PreTokenizer::None, ""),
    (PreTokenizer::SplitSpaces, "split_spaces"),
    (PreTokenizer::Gpt2, "gpt2"),
    (PreTokenizer::SmolLm, "smollm"),
    (PreTokenizer::Llama3, "llama3"),
    (PreTokenizer::Qwen2, "qwen2"),
];

/// Why a manifest's tokenizer record cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The pre-tokenizer name is not one this runtime implements.
    #[error("unknown pre-tokenizer {0:?} (supported: {list}, or none)", list = SupportedPre)]
    UnknownPreTokenizer(String),
}

/// The names of the implemented pre-tokenizers, comma-separated (for messages).
struct SupportedPre;

impl core::fmt::Display for SupportedPre {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, (_, name)) in PRE_NAMES.iter().enumerate().skip(1) {
            write!(f, "{}{name}", if i > 1 { ", " } else { "" })?;
        }
        Ok(())
    }
}

impl TokenizerSpec {
    /// The manifest record of this tokenizer (everything [`TokenizerSpec::from_record`]
    /// needs to rebuild it).
    pub fn to_record(&self) -> Record {
        let pre = PRE_NAMES
            .iter()
            .find(|(p, _)| *p == self.pre)
            .map_or("", |(_, n)| n);
        Record {
            kind: match self.kind {
                TokenizerKind::ByteLevelBpe => RecKind::ByteLevelBpe,
                TokenizerKind::SentencePieceBpe => RecKind::SentencePieceBpe,
            },
            pre_tokenizer: pre.to_string(),
            tokens: self.tokens.clone(),
            scores: self.scores.clone(),
            special_ids: self.special.clone(),
            merges: self.merges.clone(),
            ignore_merges: self.ignore_merges,
            bos_id: self.bos_id,
            eos_id: self.eos_id,
            unk_id: self.unk_id,
            add_bos: self.add_bos,
            space_prefix: match self.space_prefix {
                SpacePrefix::Never => RecPrefix::Never,
                SpacePrefix::Always => RecPrefix::Always,
                SpacePrefix::UnlessSpace => RecPrefix::UnlessSpace,
                SpacePrefix::FirstUnlessSpace => RecPrefix::FirstUnlessSpace,
            },
            byte_fallback: self.byte_fallback,
        }
    }

    /// Rebuilds a spec from a manifest record.
    pub fn from_record(r: &Record) -> Result<Self, RecordError> {
        let pre = PRE_NAMES
            .iter()
            .find(|(_, n)| *n == r.pre_tokenizer)
            .map(|(p, _)| *p)
            .ok_or_else(|| RecordError::UnknownPreTokenizer(r.pre_tokenizer.clone()))?;
        Ok(TokenizerSpec {
            kind: match r.kind {
                RecKind::ByteLevelBpe => TokenizerKind::ByteLevelBpe,
                RecKind::SentencePieceBpe => TokenizerKind::SentencePieceBpe,
            },
            pre,
            tokens: r.tokens.clone(),
            scores: r.scores.clone(),
            special: r.special_ids.clone(),
            merges: r.merges.clone(),
            ignore_merges: r.ignore_merges,
            byte_fallback: r.byte_fallback,
            bos_id: r.bos_id,
            eos_id: r.eos_id,
            unk_id: r.unk_id,
            add_bos: r.add_bos,
            space_prefix: match r.space_prefix {
                RecPrefix::Never => SpacePrefix::Never,
                RecPrefix::Always => SpacePrefix::Always,
                RecPrefix::UnlessSpace => SpacePrefix::UnlessSpace,
                RecPrefix::FirstUnlessSpace => SpacePrefix::FirstUnlessSpace,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn every_setting_survives_the_round_trip() {
        for (pre, _) in PRE_NAMES {
            for space_prefix in [
                SpacePrefix::Never,
                SpacePrefix::Always,
                SpacePrefix::UnlessSpace,
                SpacePrefix::FirstUnlessSpace,
            ] {
                let spec = TokenizerSpec {
                    kind: TokenizerKind::SentencePieceBpe,
                    pre,
                    tokens: vec!["a".into(), "b".into(), "ab".into()],
                    scores: vec![0.0, -1.0, -2.0],
                    special: vec![0],
                    merges: vec![("a".into(), "b".into())],
                    ignore_merges: true,
                    byte_fallback: true,
                    bos_id: Some(0),
                    eos_id: None,
                    unk_id: Some(1),
                    add_bos: true,
                    space_prefix,
                };
                assert_eq!(TokenizerSpec::from_record(&spec.to_record()).unwrap(), spec);
            }
        }
    }

    #[test]
    fn an_unknown_pre_tokenizer_is_named() {
        let mut r = TokenizerSpec {
            kind: TokenizerKind::ByteLevelBpe,
            pre: PreTokenizer::Gpt2,
            tokens: vec!["a".into()],
            scores: vec![],
            special: vec![],
            merges: vec![],
            ignore_merges: false,
            byte_fallback: false,
            bos_id: None,
            eos_id: None,
            unk_id: None,
            add_bos: false,
            space_prefix: SpacePrefix::Never,
        }
        .to_record();
        r.pre_tokenizer = "falcon".into();
        let e = TokenizerSpec::from_record(&r).unwrap_err();
        assert!(e.to_string().contains("\"falcon\""), "{e}");
        assert!(e.to_string().contains("smollm"), "{e}");
    }
}
