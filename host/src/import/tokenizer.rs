//! Tokenizer import: GGUF metadata (`tokenizer.ggml.*`) and Hugging Face
//! `tokenizer.json`, both turned into the device's [`TokenizerSpec`].
//!
//! Only what the device reproduces exactly is accepted: BPE models, byte-level (GPT-2,
//! SmolLM, LLaMA-3, Qwen2 pre-tokenizers) or SentencePiece-style (LLaMA-1/2). Anything
//! else (Unigram, WordPiece, unknown pre-tokenizers or normalizers, added tokens that
//! strip whitespace, ...) is an error naming the file and the feature, rather than a
//! tokenizer that silently gives other ids than the reference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cap_device::tokenizer::{PreTokenizer, SpacePrefix, TokenizerKind, TokenizerSpec};
use serde_json::Value;

use super::gguf::GgufFile;

/// Why a tokenizer could not be imported. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerImportError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The tokenizer is malformed or incomplete.
    #[error("{path}: {msg}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong or missing.
        msg: String,
    },
    /// The tokenizer is of a kind cap does not run.
    #[error("{what} in {path}; cap supports BPE (byte-level and SentencePiece-style) tokenizers")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        what: String,
    },
}

fn invalid(path: &Path, msg: impl Into<String>) -> TokenizerImportError {
    TokenizerImportError::Invalid {
        path: path.to_owned(),
        msg: msg.into(),
    }
}

fn unsupported(path: &Path, what: impl Into<String>) -> TokenizerImportError {
    TokenizerImportError::Unsupported {
        path: path.to_owned(),
        what: what.into(),
    }
}

/// GPT-2's pre-tokenizer expression (Hugging Face `ByteLevel` with `use_regex`).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// LLaMA-3's `Split` expression.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's `Split` expression.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer of a `tokenizer.ggml.pre` name: llama.cpp's (llama-vocab.cpp)
/// names whose splitting rule is one cap implements, as Hugging Face applies it.
fn pre_from_gguf(name: &str) -> Option<PreTokenizer> {
    Some(match name {
        // "default" is GPT-2's ByteLevel expression in Hugging Face's GGUF conversion.
        "default" | "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es"
        | "jina-de" | "jina-v2-es" | "jina-v2-de" => PreTokenizer::Gpt2,
        // `\p{N}` isolated, then GPT-2's expression (`Digits` + `ByteLevel`).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => PreTokenizer::SmolLm,
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" => PreTokenizer::Llama3,
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" => PreTokenizer::Qwen2,
        _ => return None,
    })
}

/// GGUF token types (llama.cpp's `llama_token_type`) matched literally in the text:
/// unknown (2), control (3), user-defined (4).
fn is_special_type(t: i64) -> bool {
    matches!(t, 2..=4)
}

/// Builds a spec from a GGUF file's `tokenizer.ggml.*` metadata.
pub fn from_gguf(f: &GgufFile) -> Result<TokenizerSpec, TokenizerImportError> {
    let path = f.path();
    let strs = |key: &str| -> Result<Option<Vec<String>>, TokenizerImportError> {
        let Some(v) = f.get(key) else { return Ok(None) };
        let a = v
            .as_array()
            .ok_or_else(|| invalid(path, format!("metadata '{key}' is not an array")))?;
        a.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid(path, format!("metadata '{key}' holds a non-string")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    let id = |key: &str| -> Result<Option<u32>, TokenizerImportError> {
        match f.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| invalid(path, format!("metadata '{key}' is not a token id: {v}"))),
        }
    };
    let flag = |key: &str| f.get(key).and_then(|v| v.as_bool());
    let model = f
        .get("tokenizer.ggml.model")
        .ok_or_else(|| invalid(path, "metadata 'tokenizer.ggml.model' is missing"))?
        .as_str()
        .ok_or_else(|| invalid(path, "metadata 'tokenizer.ggml.model' is not a string"))?;
    let kind = match model {
        "gpt2" => TokenizerKind::ByteLevelBpe,
        "llama" => TokenizerKind::SentencePieceBpe,
        other => {
            let what = match other {
                "bert" => " (WordPiece)",
                "t5" => " (Unigram)",
                _ => "",
            };
            return Err(unsupported(
                path,
                format!("unsupported tokenizer model '{other}'{what}"),
            ));
        }
    };
    let tokens = strs("tokenizer.ggml.tokens")?
        .ok_or_else(|| invalid(path, "metadata 'tokenizer.ggml.tokens' is missing"))?;
    let mut special = Vec::new();
    if let Some(types) = f.get("tokenizer.ggml.token_type") {
        let types = types
            .as_array()
            .ok_or_else(|| invalid(path, "metadata 'tokenizer.ggml.token_type' is not an array"))?;
        if types.len() != tokens.len() {
            return Err(invalid(
                path,
                format!(
                    "'tokenizer.ggml.token_type' has {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                ),
            ));
        }
        for (i, t) in types.iter().enumerate() {
            if t.as_i64().is_some_and(is_special_type) {
                special.push(i as u32);
            }
        }
    }
    let spm = kind == TokenizerKind::SentencePieceBpe;
    let (pre, merges, scores) = if spm {
        let scores = f
            .get("tokenizer.ggml.scores")
            .ok_or_else(|| invalid(path, "metadata 'tokenizer.ggml.scores' is missing"))?
            .as_array()
            .ok_or_else(|| invalid(path, "metadata 'tokenizer.ggml.scores' is not an array"))?
            .iter()
            .map(|x| {
                x.as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| invalid(path, "'tokenizer.ggml.scores' holds a non-number"))
            })
            .collect::<Result<Vec<f32>, _>>()?;
        (PreTokenizer::None, Vec::new(), scores)
    } else {
        let pre_name = match f.get("tokenizer.ggml.pre") {
            None => "default",
            Some(v) => v
                .as_str()
                .ok_or_else(|| invalid(path, "metadata 'tokenizer.ggml.pre' is not a string"))?,
        };
        let pre = pre_from_gguf(pre_name).ok_or_else(|| {
            unsupported(
                path,
                format!(
                    "unsupported pre-tokenizer 'tokenizer.ggml.pre' = '{pre_name}' (cap implements \
                     default/gpt-2, smollm/starcoder, llama-bpe, qwen2)"
                ),
            )
        })?;
        // A vocabulary of bare byte symbols may have no merges.
        let merges = strs("tokenizer.ggml.merges")?
            .unwrap_or_default()
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
                None => Err(invalid(path, format!("merge {m:?} is not two tokens"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        (pre, merges, Vec::new())
    };
    // SentencePiece: a space before every stretch of text (llama.cpp's default: on).
    // Byte-level: Hugging Face's conversion turns the flag into ByteLevel's
    // add_prefix_space (a space unless there is one); llama.cpp's default: off.
    let space_prefix = match (spm, flag("tokenizer.ggml.add_space_prefix")) {
        (true, Some(true) | None) => SpacePrefix::Always,
        (false, Some(true)) => SpacePrefix::UnlessSpace,
        (_, _) => SpacePrefix::Never,
    };
    Ok(TokenizerSpec {
        kind,
        pre,
        // llama.cpp takes whole words for the LLaMA-3 family, as its tokenizer.json does.
        ignore_merges: pre == PreTokenizer::Llama3,
        byte_fallback: spm,
        tokens,
        scores,
        special,
        merges,
        bos_id: id("tokenizer.ggml.bos_token_id")?,
        eos_id: id("tokenizer.ggml.eos_token_id")?,
        // Byte-level BPE drops bytes without a token (llama.cpp, and Hugging Face's
        // conversion of the GGUF, whose BPE has no unk_token); SentencePiece falls back
        // to bytes, then to the unknown token.
        unk_id: if spm {
            id("tokenizer.ggml.unknown_token_id")?
        } else {
            None
        },
        // llama.cpp's defaults: SentencePiece and LLaMA-3 add BOS, other BPE does not.
        add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(spm || pre == PreTokenizer::Llama3),
        space_prefix,
    })
}

/// The `type` of a JSON object, or "" when it has none.
fn ty(v: &Value) -> &str {
    v["type"].as_str().unwrap_or("")
}

/// The parts of a `Sequence` (or the one component).
fn parts<'a>(v: &'a Value, key: &str) -> Vec<&'a Value> {
    match v[key].as_array() {
        Some(a) if ty(v) == "Sequence" => a.iter().collect(),
        _ if v.is_null() => Vec::new(),
        _ => vec![v],
    }
}

/// A token name in a `tokenizer_config.json`: a string or `{"content": ...}`.
fn config_token(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

/// What the pre-tokenizer and normalizer of a `tokenizer.json` amount to.
struct Pipeline {
    kind: TokenizerKind,
    pre: PreTokenizer,
    space_prefix: SpacePrefix,
}

fn pipeline(j: &Value, path: &Path) -> Result<Pipeline, TokenizerImportError> {
    let what = |s: String| unsupported(path, s);
    // Normalizer: none, or LLaMA-1/2's `Prepend("▁")` + `Replace(" ", "▁")`.
    let mut prepend = false;
    let mut replace = false;
    for n in parts(&j["normalizer"], "normalizers") {
        match ty(n) {
            "Prepend" if n["prepend"] == "\u{2581}" => prepend = true,
            "Replace" if n["pattern"]["String"] == " " && n["content"] == "\u{2581}" => {
                replace = true
            }
            _ => return Err(what(format!("unsupported normalizer {n}"))),
        }
    }
    if prepend && !replace {
        return Err(what(
            "unsupported normalizer: Prepend without Replace".into(),
        ));
    }
    let pres = parts(&j["pre_tokenizer"], "pretokenizers");
    let mut digits = false;
    let mut split: Option<&str> = None;
    let mut byte_level: Option<(bool, bool)> = None;
    let mut metaspace: Option<(SpacePrefix, bool)> = None;
    for p in &pres {
        match ty(p) {
            "Digits" if p["individual_digits"] == true => digits = true,
            "Split"
                if p["behavior"] == "Isolated"
                    && p["invert"] != true
                    && p["pattern"]["Regex"].is_string() =>
            {
                split = p["pattern"]["Regex"].as_str()
            }
            "ByteLevel" => {
                byte_level = Some((
                    p["add_prefix_space"].as_bool().unwrap_or(true),
                    p["use_regex"].as_bool().unwrap_or(true),
                ))
            }
            "Metaspace" if p["replacement"] == "\u{2581}" => {
                // `prepend_scheme` (tokenizers >= 0.14) or the older `add_prefix_space`.
                let scheme = match (
                    p["prepend_scheme"].as_str(),
                    p["add_prefix_space"].as_bool(),
                ) {
                    (Some("always"), _) | (None, Some(true) | None) => SpacePrefix::UnlessSpace,
                    (Some("first"), _) => SpacePrefix::FirstUnlessSpace,
                    (Some("never"), _) | (None, Some(false)) => SpacePrefix::Never,
                    (Some(s), _) => {
                        return Err(what(format!("unsupported Metaspace scheme '{s}'")));
                    }
                };
                metaspace = Some((scheme, p["split"].as_bool().unwrap_or(true)));
            }
            _ => return Err(what(format!("unsupported pre-tokenizer {p}"))),
        }
    }
    if let Some((add_prefix_space, use_regex)) = byte_level {
        if prepend || replace || metaspace.is_some() {
            return Err(what(
                "unsupported mix of ByteLevel and SentencePiece steps".into(),
            ));
        }
        let pre = match (digits, split, use_regex) {
            (false, None, true) => PreTokenizer::Gpt2,
            (true, None, true) => PreTokenizer::SmolLm,
            (false, Some(LLAMA3_PATTERN), false) => PreTokenizer::Llama3,
            (false, Some(QWEN2_PATTERN), false) => PreTokenizer::Qwen2,
            (false, Some(GPT2_PATTERN), false) => PreTokenizer::Gpt2,
            (d, s, _) => {
                return Err(what(format!(
                    "unsupported pre-tokenizer combination (Digits: {d}, Split: {s:?}, ByteLevel use_regex: {use_regex})"
                )));
            }
        };
        if add_prefix_space && (digits || split.is_some()) {
            // ByteLevel would prefix every piece of the earlier steps, not the text.
            return Err(what(
                "unsupported ByteLevel add_prefix_space after Digits/Split".into(),
            ));
        }
        let space_prefix = if add_prefix_space {
            SpacePrefix::UnlessSpace
        } else {
            SpacePrefix::Never
        };
        return Ok(Pipeline {
            kind: TokenizerKind::ByteLevelBpe,
            pre,
            space_prefix,
        });
    }
    if digits || split.is_some() {
        return Err(what(
            "unsupported pre-tokenizer: Digits/Split without ByteLevel".into(),
        ));
    }
    match (metaspace, replace) {
        (Some(_), true) => Err(what(
            "unsupported mix of a Replace normalizer and a Metaspace pre-tokenizer".into(),
        )),
        (Some((space_prefix, split)), false) => Ok(Pipeline {
            kind: TokenizerKind::SentencePieceBpe,
            pre: if split {
                PreTokenizer::SplitSpaces
            } else {
                PreTokenizer::None
            },
            space_prefix,
        }),
        (None, true) => Ok(Pipeline {
            kind: TokenizerKind::SentencePieceBpe,
            pre: PreTokenizer::None,
            space_prefix: if prepend {
                SpacePrefix::Always
            } else {
                SpacePrefix::Never
            },
        }),
        (None, false) => Err(what(
            "unsupported BPE without a ByteLevel pre-tokenizer or a SentencePiece '▁' \
             normalizer/Metaspace"
                .into(),
        )),
    }
}

/// Builds a spec from a Hugging Face `tokenizer.json` (a BPE model). The BOS token and
/// whether it is added come from the post-processor; the EOS token from
/// `tokenizer_config.json` beside it, when there is one.
pub fn from_tokenizer_json(path: &Path) -> Result<TokenizerSpec, TokenizerImportError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| TokenizerImportError::Io {
            path: p.to_owned(),
            source,
        })
    };
    let j: Value = serde_json::from_str(&read(path)?)
        .map_err(|e| invalid(path, format!("invalid JSON: {e}")))?;
    let model = &j["model"];
    if !model.is_object() {
        return Err(invalid(path, "'model' is missing"));
    }
    // Files without a type are recognized by their fields, as Hugging Face does.
    let mtype = match model["type"].as_str() {
        Some(t) => t,
        None if model["merges"].is_array() => "BPE",
        None if model["vocab"].is_array() => "Unigram",
        None if model["continuing_subword_prefix"].is_string() => "WordPiece",
        None => "unknown",
    };
    if mtype != "BPE" {
        return Err(unsupported(
            path,
            format!("unsupported tokenizer model '{mtype}'"),
        ));
    }
    if model["dropout"].as_f64().is_some_and(|d| d > 0.0) {
        return Err(unsupported(path, "unsupported BPE dropout"));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if model[key].as_str().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported(path, format!("unsupported BPE option '{key}'")));
        }
    }
    let p = pipeline(&j, path)?;

    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| invalid(path, "'model.vocab' is missing"))?;
    let mut pairs: Vec<(u64, String)> = Vec::with_capacity(vocab.len());
    for (s, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| invalid(path, format!("vocab entry {s:?} has no integer id")))?;
        pairs.push((id, s.clone()));
    }
    let mut special = Vec::new();
    for t in j["added_tokens"].as_array().map_or(&[][..], Vec::as_slice) {
        let (Some(id), Some(s)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(invalid(
                path,
                format!("added token {t} has no id or content"),
            ));
        };
        for flag in ["lstrip", "rstrip", "single_word"] {
            if t[flag] == true {
                return Err(unsupported(
                    path,
                    format!("unsupported added token {s:?} with '{flag}'"),
                ));
            }
        }
        pairs.push((id, s.to_owned()));
        special.push(id as u32);
    }
    let n = pairs.len();
    pairs.sort();
    pairs.dedup_by_key(|p| p.0);
    let size = pairs.last().map_or(0, |p| p.0 as usize + 1);
    if size > 2 * n + 1024 {
        return Err(invalid(
            path,
            format!(
                "token ids are not dense ({n} tokens, largest id {})",
                size - 1
            ),
        ));
    }
    let mut tokens = vec![String::new(); size];
    for (id, s) in pairs {
        tokens[id as usize] = s;
    }
    let id_of: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .rev()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let find = |name: &str| id_of.get(name).copied();

    let merges = model["merges"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|m| match m {
            Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
            Value::Array(a) => match (
                a.first().and_then(Value::as_str),
                a.get(1).and_then(Value::as_str),
            ) {
                (Some(x), Some(y)) if a.len() == 2 => Some((x.to_owned(), y.to_owned())),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| invalid(path, "'model.merges' holds an entry that is not a pair"))?;

    // BOS: the special tokens a TemplateProcessing puts before `$A`; no other template.
    let post = &j["post_processor"];
    let mut bos_id = None;
    for pp in parts(post, "processors") {
        match ty(pp) {
            "ByteLevel" => {}
            "TemplateProcessing" => {
                let single = pp["single"].as_array().map_or(&[][..], Vec::as_slice);
                for (i, item) in single.iter().enumerate() {
                    if let Some(name) = item["SpecialToken"]["id"].as_str() {
                        let ids = &pp["special_tokens"][name]["ids"];
                        let id = match ids.as_array().map(Vec::as_slice) {
                            Some([id]) => id.as_u64().map(|v| v as u32),
                            _ => find(name),
                        };
                        match id {
                            Some(id) if i == 0 && single.len() == 2 => bos_id = Some(id),
                            _ => {
                                return Err(unsupported(
                                    path,
                                    format!("unsupported post-processor template {}", pp["single"]),
                                ));
                            }
                        }
                    }
                }
            }
            other => {
                return Err(unsupported(
                    path,
                    format!("unsupported post-processor '{other}'"),
                ));
            }
        }
    }

    // EOS (and BOS, when no template names it) from tokenizer_config.json.
    let mut eos_id = None;
    let mut config_bos = None;
    let config = path.with_file_name("tokenizer_config.json");
    if config.exists() {
        let c: Value = serde_json::from_str(&read(&config)?)
            .map_err(|e| invalid(&config, format!("invalid JSON: {e}")))?;
        eos_id = config_token(&c["eos_token"]).and_then(find);
        config_bos = config_token(&c["bos_token"]).and_then(find);
    }
    let spm = p.kind == TokenizerKind::SentencePieceBpe;
    if spm {
        eos_id = eos_id.or_else(|| find("</s>"));
        config_bos = config_bos.or_else(|| find("<s>"));
    }
    let unk_id = match model["unk_token"].as_str() {
        Some(u) => {
            Some(find(u).ok_or_else(|| invalid(path, format!("unk_token {u:?} is not a token")))?)
        }
        None => None,
    };
    Ok(TokenizerSpec {
        kind: p.kind,
        pre: p.pre,
        tokens,
        scores: Vec::new(),
        special,
        merges,
        ignore_merges: model["ignore_merges"].as_bool().unwrap_or(false),
        byte_fallback: model["byte_fallback"].as_bool().unwrap_or(false),
        add_bos: bos_id.is_some(),
        bos_id: bos_id.or(config_bos),
        eos_id,
        unk_id,
        space_prefix: p.space_prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF metadata value for [`gguf`].
    enum Kv<'a> {
        Str(&'a str),
        Strs(&'a [&'a str]),
        I32s(&'a [i32]),
        Bool(bool),
    }

    /// A GGUF v3 file with metadata `kv` and no tensors.
    fn gguf(dir: &Path, kv: &[(&str, Kv)]) -> GgufFile {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (k, v) in kv {
            string(&mut b, k);
            match v {
                Kv::Str(s) => {
                    b.extend(8u32.to_le_bytes());
                    string(&mut b, s);
                }
                Kv::Strs(a) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(8u32.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    for s in *a {
                        string(&mut b, s);
                    }
                }
                Kv::I32s(a) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(5u32.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    for x in *a {
                        b.extend(x.to_le_bytes());
                    }
                }
                Kv::Bool(x) => {
                    b.extend(7u32.to_le_bytes());
                    b.push(*x as u8);
                }
            }
        }
        let p = dir.join("t.gguf");
        std::fs::write(&p, b).unwrap();
        GgufFile::open(&p).unwrap()
    }

    #[test]
    fn gguf_metadata_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let toks = ["a", "b", "ab", "<|x|>"];
        let e = |kv: &[(&str, Kv)]| from_gguf(&gguf(d.path(), kv)).unwrap_err().to_string();
        let msg = e(&[("tokenizer.ggml.model", Kv::Str("bert"))]);
        assert!(msg.contains("unsupported tokenizer model 'bert'") && msg.contains("t.gguf"));
        assert!(e(&[]).contains("'tokenizer.ggml.model' is missing"));
        let msg = e(&[("tokenizer.ggml.model", Kv::Str("gpt2"))]);
        assert!(msg.contains("'tokenizer.ggml.tokens' is missing"), "{msg}");
        let msg = e(&[
            ("tokenizer.ggml.model", Kv::Str("gpt2")),
            ("tokenizer.ggml.pre", Kv::Str("mystery")),
            ("tokenizer.ggml.tokens", Kv::Strs(&toks)),
        ]);
        assert!(msg.contains("'mystery'"), "{msg}");
        let msg = e(&[
            ("tokenizer.ggml.model", Kv::Str("gpt2")),
            ("tokenizer.ggml.tokens", Kv::Strs(&toks)),
            ("tokenizer.ggml.token_type", Kv::I32s(&[1, 1])),
        ]);
        assert!(msg.contains("2 entries for 4 tokens"), "{msg}");
        let msg = e(&[
            ("tokenizer.ggml.model", Kv::Str("llama")),
            ("tokenizer.ggml.tokens", Kv::Strs(&toks)),
        ]);
        assert!(msg.contains("'tokenizer.ggml.scores' is missing"), "{msg}");
        let msg = e(&[
            ("tokenizer.ggml.model", Kv::Str("gpt2")),
            ("tokenizer.ggml.tokens", Kv::Strs(&toks)),
            ("tokenizer.ggml.merges", Kv::Strs(&["ab"])),
        ]);
        assert!(msg.contains("is not two tokens"), "{msg}");

        let spec = from_gguf(&gguf(
            d.path(),
            &[
                ("tokenizer.ggml.model", Kv::Str("gpt2")),
                ("tokenizer.ggml.pre", Kv::Str("llama-bpe")),
                ("tokenizer.ggml.tokens", Kv::Strs(&toks)),
                ("tokenizer.ggml.token_type", Kv::I32s(&[1, 1, 1, 3])),
                ("tokenizer.ggml.merges", Kv::Strs(&["a b"])),
                ("tokenizer.ggml.add_space_prefix", Kv::Bool(false)),
            ],
        ))
        .unwrap();
        assert_eq!(
            (spec.kind, spec.pre, spec.ignore_merges, spec.add_bos),
            (
                TokenizerKind::ByteLevelBpe,
                PreTokenizer::Llama3,
                true,
                true
            )
        );
        assert_eq!(spec.special, [3]);
        assert_eq!(spec.merges, [("a".to_owned(), "b".to_owned())]);
        assert_eq!(spec.space_prefix, SpacePrefix::Never);
    }

    fn write(dir: &Path, json: &str) -> PathBuf {
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    #[test]
    fn unsupported_models_and_steps_are_named() {
        let d = tempfile::tempdir().unwrap();
        for (json, want) in [
            (
                r#"{"model": {"type": "Unigram", "vocab": []}}"#,
                "unsupported tokenizer model 'Unigram'",
            ),
            (
                r#"{"model": {"type": "WordPiece", "vocab": {}}}"#,
                "unsupported tokenizer model 'WordPiece'",
            ),
            (
                r#"{"model": {"vocab": [["a", 0.0]]}}"#,
                "unsupported tokenizer model 'Unigram'",
            ),
            (
                r#"{"normalizer": {"type": "NFKC"}, "model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
                "unsupported normalizer",
            ),
            (
                r#"{"pre_tokenizer": {"type": "Whitespace"}, "model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
                "unsupported pre-tokenizer",
            ),
        ] {
            let p = write(d.path(), json);
            let e = from_tokenizer_json(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(e.contains("cap supports BPE"), "{e}");
        }
    }

    #[test]
    fn malformed_files_are_errors() {
        let d = tempfile::tempdir().unwrap();
        for json in [
            "not json",
            r#"{"nomodel": 1}"#,
            r#"{"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "merges": []}}"#,
            r#"{"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": {"a": "x"}, "merges": []}}"#,
            r#"{"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": {"a": 4000000000}, "merges": []}}"#,
            r#"{"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": [1]}}"#,
        ] {
            let p = write(d.path(), json);
            let e = from_tokenizer_json(&p).unwrap_err().to_string();
            assert!(e.contains("tokenizer.json"), "{e}");
        }
        let e = from_tokenizer_json(&d.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.json"), "{e}");
    }

    #[test]
    fn pipelines_are_recognized() {
        let d = tempfile::tempdir().unwrap();
        let bpe = r#""model": {"type": "BPE", "vocab": {"a": 0, "<s>": 1}, "merges": []}"#;
        let cases = [
            (
                r#""pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}"#,
                TokenizerKind::ByteLevelBpe,
                PreTokenizer::Gpt2,
                SpacePrefix::Never,
            ),
            (
                r#""pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}]}"#,
                TokenizerKind::ByteLevelBpe,
                PreTokenizer::SmolLm,
                SpacePrefix::Never,
            ),
            (
                r#""pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}"#,
                TokenizerKind::SentencePieceBpe,
                PreTokenizer::None,
                SpacePrefix::FirstUnlessSpace,
            ),
            (
                r#""pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}"#,
                TokenizerKind::SentencePieceBpe,
                PreTokenizer::SplitSpaces,
                SpacePrefix::UnlessSpace,
            ),
            (
                r#""normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}"#,
                TokenizerKind::SentencePieceBpe,
                PreTokenizer::None,
                SpacePrefix::Always,
            ),
        ];
        for (pipe, kind, pre, prefix) in cases {
            let p = write(d.path(), &format!("{{{pipe}, {bpe}}}"));
            let s = from_tokenizer_json(&p).unwrap();
            assert_eq!(
                (s.kind, s.pre, s.space_prefix),
                (kind, pre, prefix),
                "{pipe}"
            );
        }
    }
}
