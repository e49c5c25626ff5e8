//! cap's device tokenizer against Hugging Face `tokenizers` (and, for SentencePiece,
//! `sentencepiece` itself) on the whole WikiText-2 validation text and on tricky strings.
//! Fixtures: host/tests/fixtures/tokenizer/, made by
//! scripts/reference/make_tokenizer_fixtures.py.

use std::path::PathBuf;

use cap_device::tokenizer::{Tokenizer, TokenizerKind};
use cap_host::import::gguf::GgufFile;
use cap_host::import::tokenizer::{from_gguf, from_tokenizer_json};
use serde_json::Value;
use sha2::Digest;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name)
}

fn wiki() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/wikitext-2-raw/wiki.valid.raw");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Compares `tok` with the reference ids in `<name>.ids.json`.
fn check(tok: &Tokenizer, name: &str) {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{name}.ids.json"))).unwrap(),
    )
    .unwrap();
    let text = wiki();
    let t0 = std::time::Instant::now();
    let got = tok.encode(&text, true);
    eprintln!("{name}: {} tokens in {:?}", got.len(), t0.elapsed());
    let w = &r["wiki"];
    assert_eq!(
        got.len() as u64,
        w["n_tokens"].as_u64().unwrap(),
        "{name}: token count"
    );
    let first = ids(&w["first"]);
    assert_eq!(&got[..first.len()], &first[..], "{name}: first ids");
    let last = ids(&w["last"]);
    assert_eq!(
        &got[got.len() - last.len()..],
        &last[..],
        "{name}: last ids"
    );
    let bytes: Vec<u8> = got.iter().flat_map(|t| t.to_le_bytes()).collect();
    assert_eq!(
        format!("{:x}", sha2::Sha256::digest(&bytes)),
        w["sha256_u32le"].as_str().unwrap(),
        "{name}: sha256"
    );
    for case in r["tricky"].as_array().unwrap() {
        let s = case[0].as_str().unwrap();
        assert_eq!(tok.encode(s, true), ids(&case[1]), "{name}: {s:?}");
    }
    if tok.spec().kind == TokenizerKind::ByteLevelBpe {
        assert_eq!(tok.decode(&got), text, "{name}: decode(encode(x)) != x");
    }
}

#[test]
fn byte_level_tokenizer_json_matches_hf() {
    for name in ["gpt2-bpe", "smollm-bpe", "llama3-bpe", "qwen2-bpe"] {
        let spec = from_tokenizer_json(&fixture(&format!("{name}.json"))).unwrap();
        check(&Tokenizer::new(spec).unwrap(), name);
    }
}

#[test]
fn sentencepiece_tokenizer_json_matches_hf_and_sentencepiece() {
    let spec = from_tokenizer_json(&fixture("spm-bpe.json")).unwrap();
    assert_eq!(spec.kind, TokenizerKind::SentencePieceBpe);
    check(&Tokenizer::new(spec).unwrap(), "spm-bpe");
}

#[test]
fn sentencepiece_gguf_matches_hf_and_sentencepiece() {
    let f = GgufFile::open(&fixture("spm-bpe.gguf")).unwrap();
    let tok = Tokenizer::new(from_gguf(&f).unwrap()).unwrap();
    check(&tok, "spm-bpe");
    let text = "Hello world, 2012 naïve";
    assert_eq!(tok.decode(&tok.encode(text, true)), text);
}

#[test]
fn unsupported_tokenizer_model_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tokenizer.json");
    std::fs::write(&p, r#"{"model": {"type": "Unigram", "vocab": []}}"#).unwrap();
    let e = from_tokenizer_json(&p).unwrap_err().to_string();
    assert!(e.contains("Unigram") && e.contains("tokenizer.json"), "{e}");
}
