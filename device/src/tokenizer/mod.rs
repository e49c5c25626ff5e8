//! The tokenizer that runs on the device: byte-level BPE (GPT-2 style: SmolLM2,
//! LLaMA-3, Qwen2) and SentencePiece-style BPE (LLaMA-1/2), built from plain data
//! ([`TokenizerSpec`]) so it can travel inside a model file.
//!
//! It reproduces Hugging Face `tokenizers` exactly (tested on the whole WikiText-2
//! validation text): special tokens are split out first, then the pre-tokenizer's
//! pieces are merged by BPE rank (byte-level) or by score (SentencePiece).

mod pretokenize;
mod unicode_tables;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

/// The tokenization algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// GPT-2 byte-level BPE: bytes map to printable chars, merges by rank.
    ByteLevelBpe,
    /// SentencePiece BPE: `▁` for spaces, merges by score, `<0xXX>` byte fallback.
    SentencePieceBpe,
}

/// How text is split before BPE (byte-level only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regular expression.
    Gpt2,
    /// Every digit on its own, then GPT-2's expression (SmolLM, StarCoder).
    SmolLm,
    /// LLaMA-3's expression (numbers in groups of up to 3).
    Llama3,
    /// Qwen2's expression (LLaMA-3's with single digits).
    Qwen2,
}

/// Everything needed to build a [`Tokenizer`], as plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerSpec {
    /// Algorithm.
    pub kind: TokenizerKind,
    /// Pre-tokenizer (byte-level BPE).
    pub pre: PreTokenizer,
    /// Token strings by id (byte-level: in GPT-2's printable byte alphabet).
    pub tokens: Vec<String>,
    /// Merge scores by id (SentencePiece), empty otherwise.
    pub scores: Vec<f32>,
    /// Ids of special tokens that are matched literally in the text before anything else.
    pub special: Vec<u32>,
    /// Merges as pairs of token strings, highest priority first (byte-level).
    pub merges: Vec<(String, String)>,
    /// Take a whole piece as one token when it is in the vocabulary (LLaMA-3).
    pub ignore_merges: bool,
    /// Beginning-of-sequence token.
    pub bos_id: Option<u32>,
    /// End-of-sequence token.
    pub eos_id: Option<u32>,
    /// Unknown token.
    pub unk_id: Option<u32>,
    /// Whether encoding with special tokens prepends BOS.
    pub add_bos: bool,
    /// SentencePiece: prepend a space to the text.
    pub add_space_prefix: bool,
}

/// Why a spec does not form a tokenizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerError {
    /// The vocabulary is empty.
    EmptyVocabulary,
    /// A merge names a string that is not a token.
    UnknownMerge(String),
    /// A special-token or BOS/EOS/UNK id is out of range.
    IdOutOfRange(u32),
    /// Byte-level BPE needs a token for each of the 256 byte symbols.
    MissingByteToken(u8),
    /// SentencePiece needs one score per token.
    ScoresLength,
}

impl core::fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TokenizerError::EmptyVocabulary => write!(f, "the vocabulary is empty"),
            TokenizerError::UnknownMerge(m) => {
                write!(f, "merge {m:?} names a string that is not a token")
            }
            TokenizerError::IdOutOfRange(i) => write!(f, "token id {i} is outside the vocabulary"),
            TokenizerError::MissingByteToken(b) => write!(f, "no token for byte 0x{b:02X}"),
            TokenizerError::ScoresLength => {
                write!(f, "SentencePiece scores do not match the vocabulary")
            }
        }
    }
}

/// GPT-2's `bytes_to_unicode`: the printable char standing for each byte.
pub fn byte_char(b: u8) -> char {
    let direct = |x: u8| {
        (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x)
    };
    if direct(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !direct(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('?')
}

/// A ready-to-use tokenizer.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    spec: TokenizerSpec,
    ids: BTreeMap<String, u32>,
    /// Byte-level: `(left, right) → (rank, merged)`.
    merges: BTreeMap<(u32, u32), (u32, u32)>,
    /// Byte-level: the id of each byte's symbol; SentencePiece: the `<0xXX>` tokens.
    byte_ids: [Option<u32>; 256],
    /// Decoding: the bytes each token stands for.
    bytes: Vec<Vec<u8>>,
    /// Special tokens, longest first, for literal matching.
    special: Vec<(String, u32)>,
}

impl Tokenizer {
    /// Builds the lookup tables of a spec.
    pub fn new(spec: TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        for id in spec
            .special
            .iter()
            .chain(&spec.bos_id)
            .chain(&spec.eos_id)
            .chain(&spec.unk_id)
        {
            if *id as usize >= n {
                return Err(TokenizerError::IdOutOfRange(*id));
            }
        }
        let mut ids = BTreeMap::new();
        for (i, t) in spec.tokens.iter().enumerate() {
            // The first id wins for duplicate strings, as in Hugging Face's vocab map.
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let mut byte_ids = [None; 256];
        let mut merges = BTreeMap::new();
        let bytes: Vec<Vec<u8>>;
        match spec.kind {
            TokenizerKind::ByteLevelBpe => {
                let mut rev = BTreeMap::new();
                for b in 0..=255u8 {
                    let c = byte_char(b);
                    rev.insert(c, b);
                    let mut s = String::new();
                    s.push(c);
                    byte_ids[b as usize] = ids.get(&s).copied();
                }
                for (rank, (a, b)) in spec.merges.iter().enumerate() {
                    let get = |s: &str| ids.get(s).copied();
                    let mut ab = a.clone();
                    ab.push_str(b);
                    let (Some(ia), Some(ib), Some(iab)) = (get(a), get(b), get(&ab)) else {
                        return Err(TokenizerError::UnknownMerge(alloc::format!("{a} {b}")));
                    };
                    merges.entry((ia, ib)).or_insert((rank as u32, iab));
                }
                let special: Vec<bool> =
                    (0..n).map(|i| spec.special.contains(&(i as u32))).collect();
                bytes = spec
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        if special[i] {
                            return t.as_bytes().to_vec();
                        }
                        t.chars()
                            .map(|c| rev.get(&c).copied().unwrap_or(b'?'))
                            .collect()
                    })
                    .collect();
            }
            TokenizerKind::SentencePieceBpe => {
                if spec.scores.len() != n {
                    return Err(TokenizerError::ScoresLength);
                }
                for b in 0..=255u8 {
                    byte_ids[b as usize] = ids.get(&alloc::format!("<0x{b:02X}>")).copied();
                }
                bytes = spec
                    .tokens
                    .iter()
                    .map(|t| match parse_byte_token(t) {
                        Some(b) => alloc::vec![b],
                        None => t.replace('\u{2581}', " ").into_bytes(),
                    })
                    .collect();
            }
        }
        let mut special: Vec<(String, u32)> = spec
            .special
            .iter()
            .map(|&i| (spec.tokens[i as usize].clone(), i))
            .filter(|(s, _)| !s.is_empty())
            .collect();
        special.sort_by_key(|s| core::cmp::Reverse(s.0.len()));
        Ok(Tokenizer {
            spec,
            ids,
            merges,
            byte_ids,
            bytes,
            special,
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
    /// Whether [`encode`](Self::encode) with `add_special` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.spec.add_bos && self.spec.bos_id.is_some()
    }

    /// Token ids of `text`. With `add_special`, BOS is prepended when the tokenizer
    /// adds one (Hugging Face's `add_special_tokens=True`).
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        if add_special && self.adds_bos() {
            out.extend(self.spec.bos_id);
        }
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token (longest on ties) splits the text.
            let hit = self
                .special
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|p| (p, s.len(), *id)))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let (plain, next) = match hit {
                Some((p, len, id)) => (&rest[..p], Some((id, p + len))),
                None => (rest, None),
            };
            self.encode_plain(plain, &mut out);
            match next {
                Some((id, end)) => {
                    out.push(id);
                    rest = &rest[end..];
                }
                None => break,
            }
        }
        out
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        match self.spec.kind {
            TokenizerKind::ByteLevelBpe => {
                let mut piece = |p: &str| self.bpe_piece(p, out);
                match self.spec.pre {
                    PreTokenizer::Gpt2 => pretokenize::split(text, pretokenize::gpt2, &mut piece),
                    PreTokenizer::Llama3 => {
                        pretokenize::split(text, |s| pretokenize::llama3(s, 3), &mut piece)
                    }
                    PreTokenizer::Qwen2 => {
                        pretokenize::split(text, |s| pretokenize::llama3(s, 1), &mut piece)
                    }
                    PreTokenizer::SmolLm => {
                        // Digits are isolated first, then each stretch between them is split
                        // by GPT-2's expression.
                        let mut start = 0;
                        for (i, c) in text.char_indices() {
                            if pretokenize::is_number(c) {
                                pretokenize::split(&text[start..i], pretokenize::gpt2, &mut piece);
                                piece(&text[i..i + c.len_utf8()]);
                                start = i + c.len_utf8();
                            }
                        }
                        pretokenize::split(&text[start..], pretokenize::gpt2, &mut piece);
                    }
                }
            }
            TokenizerKind::SentencePieceBpe => self.spm(text, out),
        }
    }

    /// Byte-level BPE of one pre-tokenized piece.
    fn bpe_piece(&self, piece: &str, out: &mut Vec<u32>) {
        if self.spec.ignore_merges {
            let s: String = piece.bytes().map(byte_char).collect();
            if let Some(&id) = self.ids.get(&s) {
                out.push(id);
                return;
            }
        }
        let mut syms: Vec<u32> = piece
            .bytes()
            .filter_map(|b| self.byte_ids[b as usize].or(self.spec.unk_id))
            .collect();
        loop {
            let best = syms
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0], w[1])).map(|&(r, m)| (r, i, m)))
                .min();
            let Some((_, i, m)) = best else { break };
            syms[i] = m;
            syms.remove(i + 1);
        }
        out.extend_from_slice(&syms);
    }

    /// SentencePiece BPE (llama.cpp's `llm_tokenizer_spm`): repeatedly merge the adjacent
    /// pair whose concatenation is the best-scoring token (leftmost on ties), using a
    /// heap over a linked list of symbols so long texts stay O(n log n); unknown symbols
    /// fall back to `<0xXX>` byte tokens.
    fn spm(&self, text: &str, out: &mut Vec<u32>) {
        use alloc::collections::BinaryHeap;
        let mut norm = String::with_capacity(text.len() + 3);
        if self.spec.add_space_prefix {
            norm.push('\u{2581}');
        }
        for c in text.chars() {
            norm.push(if c == ' ' { '\u{2581}' } else { c });
        }
        // Symbols are byte ranges of `norm`, linked left/right; `len == 0` marks a merged-away one.
        let start: Vec<usize> = norm.char_indices().map(|(i, _)| i).collect();
        let n = start.len();
        let mut len: Vec<usize> = (0..n)
            .map(|i| start.get(i + 1).copied().unwrap_or(norm.len()) - start[i])
            .collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut heap = BinaryHeap::new();
        let try_push =
            |heap: &mut BinaryHeap<Bigram>, l: usize, r: usize, start: &[usize], len: &[usize]| {
                let s = &norm[start[l]..start[r] + len[r]];
                if let Some(&id) = self.ids.get(s) {
                    heap.push(Bigram {
                        score: self.spec.scores[id as usize],
                        left: l,
                        size: s.len(),
                    });
                }
            };
        for i in 1..n {
            try_push(&mut heap, i - 1, i, &start, &len);
        }
        while let Some(b) = heap.pop() {
            let l = b.left;
            let r = next[l];
            // Stale entries: one side was merged since this bigram was pushed.
            if len[l] == 0 || r >= n || len[l] + len[r] != b.size {
                continue;
            }
            len[l] += len[r];
            len[r] = 0;
            next[l] = next[r];
            if next[l] < n {
                prev[next[l]] = l;
            }
            if prev[l] < n {
                try_push(&mut heap, prev[l], l, &start, &len);
            }
            if next[l] < n {
                try_push(&mut heap, l, next[l], &start, &len);
            }
        }
        let mut i = 0;
        while i < n {
            let s = &norm[start[i]..start[i] + len[i]];
            match self.ids.get(s) {
                Some(&id) => out.push(id),
                None => {
                    for b in s.bytes() {
                        out.extend(self.byte_ids[b as usize].or(self.spec.unk_id));
                    }
                }
            }
            i = next[i];
        }
    }

    /// The bytes token `id` stands for (empty for ids out of range).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b.as_slice())
    }

    /// Text of a token sequence (invalid UTF-8 is replaced). SentencePiece drops the
    /// space its encoder prepended.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut b = Vec::new();
        for &id in ids {
            if Some(id) == self.spec.bos_id && self.spec.kind == TokenizerKind::SentencePieceBpe {
                continue;
            }
            b.extend_from_slice(self.token_bytes(id));
        }
        let mut s = String::from_utf8_lossy(&b).into_owned();
        if self.spec.kind == TokenizerKind::SentencePieceBpe
            && self.spec.add_space_prefix
            && s.starts_with(' ')
        {
            s.remove(0);
        }
        s
    }
}

/// A candidate merge in [`Tokenizer::spm`]: best score first, then leftmost.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == core::cmp::Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> core::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

/// `<0xAB>` → `0xAB`.
fn parse_byte_token(t: &str) -> Option<u8> {
    let h = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if h.len() != 2 {
        return None;
    }
    u8::from_str_radix(h, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    /// The 256 byte symbols plus `extra` tokens, with `merges`.
    fn byte_level_spec(merges: &[(&str, &str)], extra: &[&str]) -> TokenizerSpec {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
        tokens.extend(extra.iter().map(|s| s.to_string()));
        TokenizerSpec {
            kind: TokenizerKind::ByteLevelBpe,
            pre: PreTokenizer::Gpt2,
            tokens,
            scores: vec![],
            special: vec![],
            merges: merges
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ignore_merges: false,
            bos_id: None,
            eos_id: None,
            unk_id: None,
            add_bos: false,
            add_space_prefix: false,
        }
    }

    fn byte_level(merges: &[(&str, &str)], extra: &[&str]) -> Tokenizer {
        Tokenizer::new(byte_level_spec(merges, extra)).unwrap()
    }

    #[test]
    fn byte_char_table_matches_gpt2() {
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(0), 'Ā');
        assert_eq!(byte_char(0xAD), 'Ń');
    }

    #[test]
    fn merges_apply_by_rank() {
        // "Ġ" + "a" ranks before "a" + "b": " ab" → "Ġa", "b".
        let t = byte_level(&[("Ġ", "a"), ("a", "b")], &["Ġa", "ab"]);
        assert_eq!(t.encode(" ab", false), vec![256, b'b' as u32]);
        assert_eq!(t.decode(&t.encode(" ab ü\n", false)), " ab ü\n");
    }

    #[test]
    fn bad_merge_is_an_error() {
        let spec = byte_level_spec(&[("q", "z")], &["xy"]);
        assert_eq!(
            Tokenizer::new(spec).unwrap_err(),
            TokenizerError::UnknownMerge("q z".into())
        );
    }
}
