//! Tokenizer import: GGUF metadata (`tokenizer.ggml.*`) and Hugging Face
//! `tokenizer.json`, both turned into the device's [`TokenizerSpec`].

use std::path::{Path, PathBuf};

use cap_device::tokenizer::{PreTokenizer, TokenizerKind, TokenizerSpec};
use serde_json::Value;

use super::gguf::GgufFile;

/// Why a tokenizer could not be imported. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerImportError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The tokenizer is malformed or of a kind cap does not run.
    #[error("{path}: {msg}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

fn invalid(path: &Path, msg: impl Into<String>) -> TokenizerImportError {
    TokenizerImportError::Invalid {
        path: path.to_owned(),
        msg: msg.into(),
    }
}

/// The pre-tokenizer llama.cpp associates with a `tokenizer.ggml.pre` name.
fn pre_from_gguf(name: &str) -> Option<PreTokenizer> {
    Some(match name {
        "default" | "gpt-2" | "gpt2" => PreTokenizer::Gpt2,
        "smollm" | "starcoder" | "refact" | "codeshell" => PreTokenizer::SmolLm,
        "llama3" | "llama-bpe" | "llama-v3" => PreTokenizer::Llama3,
        "qwen2" | "qwen35" => PreTokenizer::Qwen2,
        _ => return None,
    })
}

/// GGUF token types (llama.cpp's `llama_token_type`): 3 = control, 4 = user-defined.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Builds a spec from a GGUF file's `tokenizer.ggml.*` metadata.
pub fn from_gguf(f: &GgufFile) -> Result<TokenizerSpec, TokenizerImportError> {
    let path = f.path();
    let strs = |key: &str| -> Result<Vec<String>, TokenizerImportError> {
        let v = f
            .get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| invalid(path, format!("metadata '{key}' is missing")))?;
        v.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid(path, format!("'{key}' holds a non-string")))
            })
            .collect()
    };
    let id = |key: &str| f.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
    let flag = |key: &str| f.get(key).and_then(|v| v.as_bool());
    let model = f
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .ok_or_else(|| invalid(path, "metadata 'tokenizer.ggml.model' is missing"))?;
    let tokens = strs("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = f
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|x| x.as_i64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let special: Vec<u32> = types
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t == CONTROL || t == USER_DEFINED)
        .map(|(i, _)| i as u32)
        .collect();
    let (kind, pre, merges, scores) = match model {
        "gpt2" => {
            let pre_name = f
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            let pre = pre_from_gguf(pre_name).ok_or_else(|| {
                invalid(path, format!("pre-tokenizer '{pre_name}' is not supported (cap supports default/gpt-2, smollm/starcoder, llama-bpe, qwen2)"))
            })?;
            let merges = strs("tokenizer.ggml.merges")
                .unwrap_or_default()
                .into_iter()
                .map(|m| match m.split_once(' ') {
                    Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
                    None => Err(invalid(path, format!("merge {m:?} is not two tokens"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            (TokenizerKind::ByteLevelBpe, pre, merges, Vec::new())
        }
        "llama" => {
            let scores: Vec<f32> = f
                .get("tokenizer.ggml.scores")
                .and_then(|v| v.as_array())
                .ok_or_else(|| invalid(path, "metadata 'tokenizer.ggml.scores' is missing"))?
                .iter()
                .map(|x| x.as_f64().unwrap_or(0.0) as f32)
                .collect();
            (
                TokenizerKind::SentencePieceBpe,
                PreTokenizer::Gpt2,
                Vec::new(),
                scores,
            )
        }
        other => {
            return Err(invalid(
                path,
                format!(
                    "tokenizer model '{other}' is not supported (cap supports gpt2 byte-level BPE and llama SentencePiece BPE)"
                ),
            ));
        }
    };
    let spm = kind == TokenizerKind::SentencePieceBpe;
    Ok(TokenizerSpec {
        kind,
        pre,
        ignore_merges: pre == PreTokenizer::Llama3,
        tokens,
        scores,
        special,
        merges,
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_id: id("tokenizer.ggml.eos_token_id"),
        unk_id: id("tokenizer.ggml.unknown_token_id"),
        // llama.cpp's defaults: SentencePiece adds BOS and a space prefix, BPE neither.
        add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(spm),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix").unwrap_or(spm),
    })
}

/// Builds a spec from a Hugging Face `tokenizer.json` (a BPE model).
pub fn from_tokenizer_json(path: &Path) -> Result<TokenizerSpec, TokenizerImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerImportError::Io {
        path: path.to_owned(),
        source,
    })?;
    let j: Value =
        serde_json::from_str(&text).map_err(|e| invalid(path, format!("invalid JSON: {e}")))?;
    let model = &j["model"];
    let mtype = model["type"].as_str().unwrap_or("BPE");
    if mtype != "BPE" {
        return Err(invalid(
            path,
            format!(
                "unsupported tokenizer model '{mtype}'; cap supports BPE (byte-level and SentencePiece-style)"
            ),
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| invalid(path, "model.vocab is missing"))?;
    let mut pairs: Vec<(u64, String)> = Vec::with_capacity(vocab.len());
    for (s, id) in vocab {
        pairs.push((
            id.as_u64()
                .ok_or_else(|| invalid(path, format!("vocab entry {s:?} has no integer id")))?,
            s.clone(),
        ));
    }
    let mut special = Vec::new();
    for t in j["added_tokens"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        if let (Some(id), Some(s)) = (t["id"].as_u64(), t["content"].as_str()) {
            pairs.push((id, s.to_owned()));
            special.push(id as u32);
        }
    }
    pairs.sort();
    pairs.dedup_by_key(|p| p.0);
    let n = pairs.last().map_or(0, |p| p.0 as usize + 1);
    let mut tokens = vec![String::new(); n];
    for (id, s) in pairs {
        tokens[id as usize] = s;
    }
    let merges = model["merges"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|m| match m {
            Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
            Value::Array(a) => match (
                a.first().and_then(Value::as_str),
                a.get(1).and_then(Value::as_str),
            ) {
                (Some(x), Some(y)) => Some((x.to_owned(), y.to_owned())),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| invalid(path, "model.merges holds an entry that is not a pair"))?;
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    let json = text.as_str();
    let is_spm = byte_fallback || json.contains("\"\u{2581}\"") && !json.contains("\"ByteLevel\"");
    let find_id = |name: &str| tokens.iter().position(|t| t == name).map(|i| i as u32);
    // BOS is added when the post-processor's template starts with a special token.
    let post_first = j["post_processor"]["single"][0]["SpecialToken"]["id"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| {
            j["post_processor"]["processors"].as_array().and_then(|ps| {
                ps.iter().find_map(|p| {
                    p["single"][0]["SpecialToken"]["id"]
                        .as_str()
                        .map(str::to_owned)
                })
            })
        });
    let bos_id = post_first.as_deref().and_then(find_id);
    let (spm_bos, spm_eos) = (find_id("<s>"), find_id("</s>"));
    let unk_id = model["unk_token"].as_str().and_then(find_id);
    if is_spm {
        // SentencePiece-style BPE: merge priority is the merges' order; scores mirror it.
        let mut scores = vec![0.0f32; tokens.len()];
        let ids: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        for (rank, (a, b)) in merges.iter().enumerate() {
            if let Some(&i) = ids.get(format!("{a}{b}").as_str())
                && scores[i] == 0.0
            {
                scores[i] = -(rank as f32) - 1.0;
            }
        }
        for s in scores.iter_mut().filter(|s| **s == 0.0) {
            *s = f32::NEG_INFINITY;
        }
        let add_space_prefix =
            json.contains("\"Prepend\"") || json.contains("\"add_dummy_prefix\":true");
        return Ok(TokenizerSpec {
            kind: TokenizerKind::SentencePieceBpe,
            pre: PreTokenizer::Gpt2,
            tokens,
            scores,
            special,
            merges: Vec::new(),
            ignore_merges: false,
            bos_id: bos_id.or(spm_bos),
            eos_id: spm_eos,
            unk_id,
            add_bos: bos_id.is_some(),
            add_space_prefix,
        });
    }
    let pre = pre_from_json(&j["pre_tokenizer"]).ok_or_else(|| {
        invalid(path, "pre_tokenizer is not one cap implements (GPT-2, SmolLM digits + GPT-2, LLaMA-3, Qwen2 patterns)")
    })?;
    Ok(TokenizerSpec {
        kind: TokenizerKind::ByteLevelBpe,
        pre,
        ignore_merges: model["ignore_merges"].as_bool().unwrap_or(false),
        tokens,
        scores: Vec::new(),
        special,
        merges,
        bos_id,
        eos_id: None,
        unk_id,
        add_bos: bos_id.is_some(),
        add_space_prefix: false,
    })
}

/// Recognizes the byte-level pre-tokenizers cap implements.
fn pre_from_json(p: &Value) -> Option<PreTokenizer> {
    let parts: Vec<&Value> = match p["type"].as_str()? {
        "Sequence" => p["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![p],
    };
    let mut digits = false;
    let mut pattern: Option<&str> = None;
    let mut byte_level_regex = false;
    for q in parts {
        match q["type"].as_str()? {
            "Digits" => digits = q["individual_digits"].as_bool() == Some(true),
            "Split" => pattern = q["pattern"]["Regex"].as_str(),
            "ByteLevel" => byte_level_regex = q["use_regex"].as_bool().unwrap_or(true),
            _ => return None,
        }
    }
    match pattern {
        None if byte_level_regex && digits => Some(PreTokenizer::SmolLm),
        None if byte_level_regex => Some(PreTokenizer::Gpt2),
        Some(r) if r.contains("\\p{N}{1,3}") => Some(PreTokenizer::Llama3),
        Some(r) if r.contains("(?i:'s|'t|'re|'ve|'m|'ll|'d)") && r.contains("\\p{N}|") => {
            Some(PreTokenizer::Qwen2)
        }
        Some(r) if r.starts_with("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+") => {
            Some(if digits {
                PreTokenizer::SmolLm
            } else {
                PreTokenizer::Gpt2
            })
        }
        _ => None,
    }
}
