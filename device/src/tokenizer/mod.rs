//! The tokenizer that runs on the device: byte-level BPE (GPT-2 style: SmolLM2,
//! LLaMA-3, Qwen2) and SentencePiece-style BPE (LLaMA-1/2), built from plain data
//! ([`TokenizerSpec`]) so it can travel inside a model file.
//!
//! It reproduces Hugging Face `tokenizers` (tested on the whole WikiText-2 validation
//! text and on fuzzed strings): special tokens are split out of the text first
//! (leftmost, longest), each stretch between them is pre-tokenized by a hand-written
//! copy of the model's regular expression ([`PreTokenizer`]), and every piece is
//! merged by BPE (lowest merge rank first, leftmost on ties).

mod bpe;
mod bytes;
mod pretokenize;
mod record;
mod unicode_tables;

use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;

use bpe::{Merge, Merger};
pub use bytes::{byte_char, char_byte};
pub use record::RecordError;

/// The tokenization algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// GPT-2 byte-level BPE: every byte is a printable char (see [`byte_char`]), merges
    /// by rank.
    ByteLevelBpe,
    /// SentencePiece BPE: spaces become `▁`, merges by rank (Hugging Face) or by the
    /// score of the merged token (llama.cpp, GGUF), unknown chars fall back to
    /// `<0xXX>` byte tokens.
    SentencePieceBpe,
}

/// How each stretch of text between special tokens is split before BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// No split: the stretch is one piece (SentencePiece, LLaMA-1/2).
    None,
    /// SentencePiece: a new piece before every `▁` (Hugging Face `Metaspace` with
    /// `split: true`).
    SplitSpaces,
    /// GPT-2's regular expression
    /// (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`).
    Gpt2,
    /// Every numeric char alone, then GPT-2's expression (SmolLM/SmolLM2, StarCoder:
    /// Hugging Face `Digits(individual_digits)` + `ByteLevel`).
    SmolLm,
    /// LLaMA-3's expression (contractions case-insensitive, numbers in groups of up to 3).
    Llama3,
    /// Qwen2's expression (LLaMA-3's with one digit per piece).
    Qwen2,
}

/// Whether a space is put in front of each stretch of text (between special tokens)
/// before tokenizing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpacePrefix {
    /// Never.
    Never,
    /// Always: SentencePiece's `add_dummy_prefix`, llama.cpp's `add_space_prefix`, and
    /// the `Prepend("▁")` normalizer of LLaMA-1/2's `tokenizer.json`.
    Always,
    /// Unless the stretch already starts with a space: Hugging Face `Metaspace` with
    /// `prepend_scheme: "always"`, `ByteLevel` with `add_prefix_space: true`.
    UnlessSpace,
    /// Only for the stretch at the very start of the text, unless it starts with a
    /// space: Hugging Face `Metaspace` with `prepend_scheme: "first"`.
    FirstUnlessSpace,
}

/// Everything needed to build a [`Tokenizer`], as plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerSpec {
    /// Algorithm.
    pub kind: TokenizerKind,
    /// Pre-tokenizer.
    pub pre: PreTokenizer,
    /// Token strings by id (byte-level: in GPT-2's printable byte alphabet, except
    /// special tokens, which are plain text).
    pub tokens: Vec<String>,
    /// SentencePiece without `merges`: the score of each token; the pair whose merge is
    /// the best-scoring token merges first (llama.cpp, GGUF). Empty otherwise.
    pub scores: Vec<f32>,
    /// Ids of the special (control and user-defined) tokens: matched literally in the
    /// text before anything else, and decoded as their plain text.
    pub special: Vec<u32>,
    /// Merges as pairs of token strings, highest priority first. Byte-level BPE needs
    /// them; SentencePiece uses them instead of `scores` when given (Hugging Face).
    pub merges: Vec<(String, String)>,
    /// Take a whole piece as one token when it is in the vocabulary (LLaMA-3).
    pub ignore_merges: bool,
    /// SentencePiece: chars outside the vocabulary become `<0xXX>` byte tokens
    /// (otherwise the unknown token).
    pub byte_fallback: bool,
    /// Beginning-of-sequence token.
    pub bos_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_id: Option<u32>,
    /// Unknown token: what BPE gives for a char (SentencePiece, after byte fallback) or a
    /// byte (byte-level) that has no token. Without one, such input is dropped, as
    /// Hugging Face's BPE without `unk_token` (and llama.cpp) does.
    pub unk_id: Option<u32>,
    /// Whether encoding with special tokens prepends BOS.
    pub add_bos: bool,
    /// Whether a space is put before each stretch of text.
    pub space_prefix: SpacePrefix,
}

/// Why a spec does not form a tokenizer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The vocabulary is empty.
    #[error("the vocabulary is empty")]
    EmptyVocabulary,
    /// The vocabulary or the merge list does not fit 32-bit ids.
    #[error("the vocabulary does not fit 32-bit ids")]
    TooLarge,
    /// A merge (`"left right"`) names a string that is not a token, or merges into one
    /// that is not.
    #[error("merge {0:?} names or makes a string that is not a token")]
    UnknownMerge(String),
    /// A special-token or BOS/EOS/UNK id is out of range.
    #[error("token id {0} is outside the vocabulary")]
    IdOutOfRange(u32),
    /// SentencePiece without merges needs one score per token.
    #[error("SentencePiece needs one score per token: {scores} scores for {tokens} tokens")]
    ScoresLength {
        /// Number of tokens.
        tokens: usize,
        /// Number of scores.
        scores: usize,
    },
    /// The pre-tokenizer does not go with the algorithm.
    #[error("pre-tokenizer {0:?} does not go with this tokenizer kind")]
    PreTokenizerMismatch(PreTokenizer),
}

/// Special tokens, found in the text by a first-byte filter and longest-first comparison.
#[derive(Clone, Debug)]
struct Specials {
    /// Whether some special token starts with this byte.
    first: [bool; 256],
    /// (text, id), longest first.
    list: Vec<(String, u32)>,
}

impl Specials {
    /// The leftmost (then longest) special token at or after byte `from`: (start, end, id).
    fn find(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        if self.list.is_empty() {
            return None;
        }
        let b = text.as_bytes();
        (from..b.len())
            .filter(|&i| self.first[b[i] as usize])
            .find_map(|i| {
                self.list
                    .iter()
                    .find(|(s, _)| b[i..].starts_with(s.as_bytes()))
                    .map(|(s, id)| (i, i + s.len(), *id))
            })
    }
}

/// A ready-to-use tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    spec: TokenizerSpec,
    /// Token string → id (the first id for duplicate strings).
    vocab: HashMap<String, u32>,
    /// (left, right) → merge.
    merges: HashMap<(u32, u32), Merge>,
    /// Byte-level: the token of each byte's symbol; SentencePiece: the `<0xXX>` tokens.
    byte_ids: [Option<u32>; 256],
    /// SentencePiece: the one-char tokens of ASCII chars.
    ascii_ids: [Option<u32>; 128],
    /// SentencePiece without a pre-tokenizer: no token has `▁` after another char, so
    /// the text can be cut before each run of `▁` without changing the result.
    cut_at_spaces: bool,
    /// Decoded bytes of token `i`: `text[starts[i]..starts[i + 1]]`.
    text: Vec<u8>,
    starts: Vec<u32>,
    special: Specials,
}

impl core::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.spec.kind)
            .field("pre", &self.spec.pre)
            .field("vocab_size", &self.spec.tokens.len())
            .field("merges", &self.merges.len())
            .field("special", &self.special.list.len())
            .finish_non_exhaustive()
    }
}

/// Scratch space of one [`Tokenizer::encode`] call.
#[derive(Default)]
struct Work {
    merger: Merger,
    buf: String,
}

/// `<0xAB>` → `0xAB`.
fn parse_byte_token(t: &str) -> Option<u8> {
    let h = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if h.len() != 2 {
        return None;
    }
    u8::from_str_radix(h, 16).ok()
}

impl Tokenizer {
    /// Builds the lookup tables of a spec.
    pub fn new(spec: TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        if n >= u32::MAX as usize || spec.merges.len() >= u32::MAX as usize {
            return Err(TokenizerError::TooLarge);
        }
        for &id in spec
            .special
            .iter()
            .chain(&spec.bos_id)
            .chain(&spec.eos_id)
            .chain(&spec.unk_id)
        {
            if id as usize >= n {
                return Err(TokenizerError::IdOutOfRange(id));
            }
        }
        let spm = spec.kind == TokenizerKind::SentencePieceBpe;
        let pre_ok = match spec.pre {
            PreTokenizer::None => true,
            PreTokenizer::SplitSpaces => spm,
            _ => !spm,
        };
        if !pre_ok {
            return Err(TokenizerError::PreTokenizerMismatch(spec.pre));
        }
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(n);
        for (i, t) in spec.tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let mut is_special = alloc::vec![false; n];
        for &id in &spec.special {
            is_special[id as usize] = true;
        }

        // Merges from the list: rank = position (a later duplicate replaces an earlier
        // one, as in Hugging Face's merge map).
        let mut merges: HashMap<(u32, u32), Merge> = HashMap::with_capacity(spec.merges.len());
        let mut ab = String::new();
        for (rank, (a, b)) in spec.merges.iter().enumerate() {
            ab.clear();
            ab.push_str(a);
            ab.push_str(b);
            let (Some(&ia), Some(&ib), Some(&id)) = (vocab.get(a), vocab.get(b), vocab.get(&ab))
            else {
                return Err(TokenizerError::UnknownMerge(alloc::format!("{a} {b}")));
            };
            merges.insert(
                (ia, ib),
                Merge {
                    rank: rank as u32,
                    id,
                },
            );
        }
        if spm && spec.merges.is_empty() {
            if spec.scores.len() != n {
                return Err(TokenizerError::ScoresLength {
                    tokens: n,
                    scores: spec.scores.len(),
                });
            }
            merges = merges_from_scores(&spec.tokens, &spec.scores, &vocab);
        }

        let mut byte_ids = [None; 256];
        let mut ascii_ids = [None; 128];
        let mut one = [0u8; 4];
        for b in 0..=255u8 {
            byte_ids[b as usize] = if spm {
                vocab.get(alloc::format!("<0x{b:02X}>").as_str()).copied()
            } else {
                vocab
                    .get(byte_char(b).encode_utf8(&mut one) as &str)
                    .copied()
            };
            if spm && b < 128 {
                ascii_ids[b as usize] = vocab
                    .get((b as char).encode_utf8(&mut one) as &str)
                    .copied();
            }
        }
        let cut_at_spaces = spm
            && spec.pre == PreTokenizer::None
            && !spec.tokens.iter().any(|t| {
                t.char_indices()
                    .skip(1)
                    .any(|(i, c)| c == '\u{2581}' && !t[..i].ends_with('\u{2581}'))
            });

        let mut text = Vec::new();
        let mut starts = Vec::with_capacity(n + 1);
        for (i, t) in spec.tokens.iter().enumerate() {
            starts.push(text.len() as u32);
            if is_special[i] {
                text.extend_from_slice(t.as_bytes());
            } else if spm {
                match parse_byte_token(t) {
                    Some(b) => text.push(b),
                    None => {
                        for c in t.chars() {
                            let c = if c == '\u{2581}' { ' ' } else { c };
                            text.extend_from_slice(c.encode_utf8(&mut one).as_bytes());
                        }
                    }
                }
            } else {
                for c in t.chars() {
                    match char_byte(c) {
                        Some(b) => text.push(b),
                        None => text.extend_from_slice(c.encode_utf8(&mut one).as_bytes()),
                    }
                }
            }
        }
        if text.len() >= u32::MAX as usize {
            return Err(TokenizerError::TooLarge);
        }
        starts.push(text.len() as u32);

        let mut list: Vec<(String, u32)> = spec
            .special
            .iter()
            .map(|&i| (spec.tokens[i as usize].clone(), i))
            .filter(|(s, _)| !s.is_empty())
            .collect();
        list.sort_by_key(|s| core::cmp::Reverse(s.0.len()));
        list.dedup_by(|a, b| a.0 == b.0);
        let mut first = [false; 256];
        for (s, _) in &list {
            first[s.as_bytes()[0] as usize] = true;
        }

        Ok(Tokenizer {
            spec,
            vocab,
            merges,
            byte_ids,
            ascii_ids,
            cut_at_spaces,
            text,
            starts,
            special: Specials { first, list },
        })
    }

    /// The spec this tokenizer was built from.
    pub fn spec(&self) -> &TokenizerSpec {
        &self.spec
    }
    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.spec.tokens.len()
    }
    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.spec.bos_id
    }
    /// End-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.spec.eos_id
    }
    /// Unknown token.
    pub fn unk_id(&self) -> Option<u32> {
        self.spec.unk_id
    }
    /// Whether [`encode`](Self::encode) with `add_special` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.spec.add_bos && self.spec.bos_id.is_some()
    }
    /// The id of a token string (as written in the vocabulary).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Token ids of `text`. With `add_special`, BOS is prepended when the tokenizer
    /// adds one (Hugging Face's `add_special_tokens=True`). Special tokens written in
    /// the text are always recognized.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        if add_special && self.adds_bos() {
            out.extend(self.spec.bos_id);
        }
        let mut work = Work::default();
        let mut pos = 0;
        loop {
            match self.special.find(text, pos) {
                Some((start, end, id)) => {
                    self.encode_stretch(&text[pos..start], pos == 0, &mut work, &mut out);
                    out.push(id);
                    pos = end;
                }
                None => {
                    self.encode_stretch(&text[pos..], pos == 0, &mut work, &mut out);
                    return out;
                }
            }
        }
    }

    /// Encodes text that holds no special token; `at_start`: it starts the text.
    fn encode_stretch(&self, s: &str, at_start: bool, work: &mut Work, out: &mut Vec<u32>) {
        if s.is_empty() {
            return;
        }
        // SentencePiece looks at the text after spaces became `▁`, so a `▁` written in
        // the text counts as a space here.
        let spm = self.spec.kind == TokenizerKind::SentencePieceBpe;
        let space = s.starts_with(' ') || (spm && s.starts_with('\u{2581}'));
        let prefix = match self.spec.space_prefix {
            SpacePrefix::Never => false,
            SpacePrefix::Always => true,
            SpacePrefix::UnlessSpace => !space,
            SpacePrefix::FirstUnlessSpace => at_start && !space,
        };
        match self.spec.kind {
            TokenizerKind::ByteLevelBpe => {
                let mut buf = String::new();
                let s = if prefix {
                    buf.reserve(s.len() + 1);
                    buf.push(' ');
                    buf.push_str(s);
                    buf.as_str()
                } else {
                    s
                };
                pretokenize::split(self.spec.pre, s, |p| self.byte_level_piece(p, work, out));
            }
            TokenizerKind::SentencePieceBpe => {
                let mut norm = String::with_capacity(s.len() + 3 * (s.len() / 4 + 1));
                if prefix {
                    norm.push('\u{2581}');
                }
                for c in s.chars() {
                    norm.push(if c == ' ' { '\u{2581}' } else { c });
                }
                if self.cut_at_spaces {
                    // Cut before each run of `▁`: no token spans such a cut.
                    let mut start = 0;
                    let mut prev_space = true;
                    for (i, c) in norm.char_indices() {
                        let space = c == '\u{2581}';
                        if space && !prev_space {
                            self.spm_piece(&norm[start..i], work, out);
                            start = i;
                        }
                        prev_space = space;
                    }
                    self.spm_piece(&norm[start..], work, out);
                } else {
                    pretokenize::split(self.spec.pre, &norm, |p| self.spm_piece(p, work, out));
                }
            }
        }
    }

    fn merge_of(&self, a: u32, b: u32) -> Option<Merge> {
        self.merges.get(&(a, b)).copied()
    }

    /// Byte-level BPE of one pre-tokenized piece.
    fn byte_level_piece(&self, piece: &str, work: &mut Work, out: &mut Vec<u32>) {
        if self.spec.ignore_merges && piece.len() > 1 {
            work.buf.clear();
            work.buf.extend(piece.bytes().map(byte_char));
            if let Some(&id) = self.vocab.get(work.buf.as_str()) {
                out.push(id);
                return;
            }
        }
        let syms = &mut work.merger.syms;
        syms.clear();
        // A byte without a symbol token becomes the unknown token, or is dropped
        // (Hugging Face's BPE without `unk_token`).
        syms.extend(
            piece
                .bytes()
                .filter_map(|b| self.byte_ids[b as usize].or(self.spec.unk_id)),
        );
        work.merger.run(|a, b| self.merge_of(a, b), out);
    }

    /// SentencePiece BPE of one normalized piece (spaces already `▁`).
    fn spm_piece(&self, piece: &str, work: &mut Work, out: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        let syms = &mut work.merger.syms;
        syms.clear();
        let mut one = [0u8; 4];
        let mut last_unk = false;
        for c in piece.chars() {
            let id = if c.is_ascii() {
                self.ascii_ids[c as usize]
            } else {
                self.vocab.get(c.encode_utf8(&mut one) as &str).copied()
            };
            if let Some(id) = id {
                syms.push(id);
                last_unk = false;
                continue;
            }
            let bytes = c.encode_utf8(&mut one).as_bytes();
            if self.spec.byte_fallback && bytes.iter().all(|&b| self.byte_ids[b as usize].is_some())
            {
                syms.extend(bytes.iter().filter_map(|&b| self.byte_ids[b as usize]));
                last_unk = false;
            } else if let Some(unk) = self.spec.unk_id {
                // Consecutive unknown chars fuse into one unknown token (`fuse_unk`).
                if !last_unk {
                    syms.push(unk);
                }
                last_unk = true;
            }
        }
        work.merger.run(|a, b| self.merge_of(a, b), out);
    }

    /// The bytes token `id` stands for (empty for ids out of range): for streaming output.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.starts.get(i), self.starts.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.text[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Text of a token sequence (invalid UTF-8 is replaced by U+FFFD). Byte-level BPE
    /// round-trips exactly: `decode(&encode(s, false)) == s`. SentencePiece drops a
    /// leading BOS and the space its encoder put in front of the text.
    pub fn decode(&self, ids: &[u32]) -> String {
        let spm = self.spec.kind == TokenizerKind::SentencePieceBpe;
        let ids = match ids.split_first() {
            Some((&first, rest)) if spm && Some(first) == self.spec.bos_id => rest,
            _ => ids,
        };
        let mut b = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            b.extend_from_slice(self.token_bytes(id));
        }
        let mut s = match String::from_utf8(b) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        if spm && self.spec.space_prefix != SpacePrefix::Never && s.starts_with(' ') {
            s.remove(0);
        }
        s
    }
}

/// SentencePiece merges from scores (llama.cpp): every split of a token into two
/// tokens is a pair whose merge is that token, ranked by its score (higher first,
/// equal scores equal rank, so ties go leftmost).
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> HashMap<(u32, u32), Merge> {
    let mut order: Vec<f32> = scores.to_vec();
    order.sort_by(|a, b| b.total_cmp(a));
    order.dedup_by(|a, b| a.total_cmp(b).is_eq());
    let rank_of = |s: f32| -> u32 {
        order
            .binary_search_by(|x| s.total_cmp(x))
            .unwrap_or_else(|i| i) as u32
    };
    let mut merges = HashMap::new();
    for (id, t) in tokens.iter().enumerate() {
        let id = id as u32;
        if vocab.get(t.as_str()) != Some(&id) {
            continue;
        }
        let rank = rank_of(scores[id as usize]);
        for (k, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&t[..k]), vocab.get(&t[k..])) {
                merges.insert((l, r), Merge { rank, id });
            }
        }
    }
    merges
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn spec(kind: TokenizerKind, tokens: Vec<String>, merges: &[(&str, &str)]) -> TokenizerSpec {
        TokenizerSpec {
            kind,
            pre: match kind {
                TokenizerKind::ByteLevelBpe => PreTokenizer::Gpt2,
                TokenizerKind::SentencePieceBpe => PreTokenizer::None,
            },
            tokens,
            scores: vec![],
            special: vec![],
            merges: merges
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ignore_merges: false,
            byte_fallback: true,
            bos_id: None,
            eos_id: None,
            unk_id: None,
            add_bos: false,
            space_prefix: SpacePrefix::Never,
        }
    }

    fn byte_tokens(extra: &[&str]) -> Vec<String> {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
        tokens.extend(extra.iter().map(|s| s.to_string()));
        tokens
    }

    #[test]
    fn merges_apply_by_rank() {
        // "Ġ" + "a" ranks before "a" + "b": " ab" → "Ġa", "b".
        let s = spec(
            TokenizerKind::ByteLevelBpe,
            byte_tokens(&["Ġa", "ab"]),
            &[("Ġ", "a"), ("a", "b")],
        );
        let t = Tokenizer::new(s).unwrap();
        assert_eq!(t.encode(" ab", false), vec![256, b'b' as u32]);
        assert_eq!(t.decode(&t.encode(" ab ü\n", false)), " ab ü\n");
        assert_eq!(t.token_bytes(256), b" a");
        assert_eq!(t.token_bytes(9999), b"");
    }

    #[test]
    fn special_tokens_split_first_leftmost_longest() {
        let mut s = spec(
            TokenizerKind::ByteLevelBpe,
            byte_tokens(&["<a>", "<a>b"]),
            &[],
        );
        s.special = vec![256, 257];
        s.bos_id = Some(256);
        s.add_bos = true;
        let t = Tokenizer::new(s).unwrap();
        assert_eq!(t.encode("x<a>b<a>", false), vec![b'x' as u32, 257, 256]);
        assert_eq!(t.encode("<a>", true), vec![256, 256]);
        assert_eq!(t.decode(&t.encode("x<a>b<a>", false)), "x<a>b<a>");
    }

    #[test]
    fn ignore_merges_takes_whole_pieces() {
        let mut s = spec(
            TokenizerKind::ByteLevelBpe,
            byte_tokens(&["ab", "abc"]),
            &[("a", "b")],
        );
        s.pre = PreTokenizer::Llama3;
        assert_eq!(
            Tokenizer::new(s.clone()).unwrap().encode("abc", false),
            vec![256, b'c' as u32]
        );
        s.ignore_merges = true;
        assert_eq!(Tokenizer::new(s).unwrap().encode("abc", false), vec![257]);
    }

    #[test]
    fn sentencepiece_scores_and_byte_fallback() {
        let tokens: Vec<String> = [
            "<unk>", "▁", "a", "b", "▁a", "ab", "▁ab", "<0xC3>", "<0xA9>",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut s = spec(TokenizerKind::SentencePieceBpe, tokens, &[]);
        s.scores = vec![0.0, -1.0, -1.0, -1.0, -2.0, -3.0, -4.0, 0.0, 0.0];
        s.unk_id = Some(0);
        s.space_prefix = SpacePrefix::Always;
        let t = Tokenizer::new(s.clone()).unwrap();
        // "▁ab": "▁a" (-2) beats "ab" (-3), then "▁ab".
        assert_eq!(t.encode("ab", false), vec![6]);
        assert_eq!(t.encode("b é", false), vec![1, 3, 1, 7, 8]);
        assert_eq!(t.decode(&t.encode("b é", false)), "b é");
        s.byte_fallback = false;
        let t = Tokenizer::new(s).unwrap();
        assert_eq!(t.encode("éé", false), vec![1, 0]);
    }

    #[test]
    fn malformed_specs_are_errors() {
        assert_eq!(
            Tokenizer::new(spec(TokenizerKind::ByteLevelBpe, vec![], &[])).unwrap_err(),
            TokenizerError::EmptyVocabulary
        );
        let bad = spec(
            TokenizerKind::ByteLevelBpe,
            byte_tokens(&["xy"]),
            &[("q", "z")],
        );
        assert_eq!(
            Tokenizer::new(bad).unwrap_err(),
            TokenizerError::UnknownMerge("q z".into())
        );
        let mut s = spec(TokenizerKind::ByteLevelBpe, byte_tokens(&[]), &[]);
        s.eos_id = Some(256);
        assert_eq!(
            Tokenizer::new(s).unwrap_err(),
            TokenizerError::IdOutOfRange(256)
        );
        let s = spec(TokenizerKind::SentencePieceBpe, byte_tokens(&[]), &[]);
        assert!(matches!(
            Tokenizer::new(s).unwrap_err(),
            TokenizerError::ScoresLength { .. }
        ));
        let mut s = spec(TokenizerKind::SentencePieceBpe, byte_tokens(&[]), &[]);
        s.pre = PreTokenizer::Gpt2;
        assert_eq!(
            Tokenizer::new(s).unwrap_err(),
            TokenizerError::PreTokenizerMismatch(PreTokenizer::Gpt2)
        );
    }
}
