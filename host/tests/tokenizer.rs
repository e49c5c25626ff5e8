//! cap's device tokenizer against Hugging Face `tokenizers` on the whole WikiText-2
//! validation text, on tricky strings and on fuzzed strings: the real SmolLM2 tokenizer
//! (from the GGUF), and small byte-level and SentencePiece tokenizers through both
//! import paths (tokenizer.json and GGUF).
//!
//! Fixtures: host/tests/fixtures/tokenizer/ (see its README.md), made by
//! scripts/reference/tokenizer_reference.py and tokenizer_fixtures.py.
//! `CAP_TOKENIZER_FIXTURES=DIR` reads them from elsewhere (e.g. a larger fuzz run).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cap_device::tokenizer::{PreTokenizer, SpacePrefix, Tokenizer, TokenizerKind, byte_char};
use cap_host::import::gguf::GgufFile;
use cap_host::import::tokenizer::{from_gguf, from_tokenizer_json};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Bound on encoding the whole WikiText-2 validation text (about 1.1 MB). The target is
/// well under a second in release; this only catches gross (e.g. quadratic) slowdowns
/// on a loaded CI machine.
const WIKI_TIME_LIMIT: Duration = Duration::from_secs(3);

fn fixtures() -> PathBuf {
    match std::env::var_os("CAP_TOKENIZER_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer"),
    }
}

fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The whole WikiText-2 validation file (`data/` in the repository).
fn wiki() -> &'static str {
    static W: OnceLock<String> = OnceLock::new();
    W.get_or_init(|| {
        String::from_utf8(read(&common::wikitext_valid())).expect("wiki.valid.raw is UTF-8")
    })
}

/// The tricky and fuzzed strings of cases.json, and the sha256 of the file.
struct Cases {
    tricky: Vec<String>,
    fuzz: Vec<String>,
    sha256: String,
}

fn cases() -> &'static Cases {
    static C: OnceLock<Cases> = OnceLock::new();
    C.get_or_init(|| {
        let raw = read(&fixture("cases.json"));
        let v: Value = serde_json::from_slice(&raw).expect("cases.json");
        let strings = |k: &str| -> Vec<String> {
            v[k].as_array()
                .expect("cases.json lists")
                .iter()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        };
        Cases {
            tricky: strings("tricky"),
            fuzz: strings("fuzz"),
            sha256: hex(&Sha256::digest(&raw)),
        }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn ids_sha256(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    hex(&Sha256::digest(&bytes))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// Compares `tok` with reference `r` (an ids.json or one of its variants): the whole
/// WikiText text when `r` has its summary, then every tricky and fuzzed string, and the
/// decode round trip. Collects all mismatches before failing.
fn check(tok: &Tokenizer, r: &Value, name: &str) {
    let mut bad: Vec<String> = Vec::new();
    let text = wiki();
    let t0 = Instant::now();
    let got = tok.encode(text, true);
    let took = t0.elapsed();
    eprintln!(
        "{name}: WikiText-2 validation ({} bytes) -> {} tokens in {took:.2?}",
        text.len(),
        got.len()
    );
    assert!(
        took < WIKI_TIME_LIMIT,
        "{name}: encoding took {took:?} (limit {WIKI_TIME_LIMIT:?})"
    );
    assert_eq!(
        got.len() as u64,
        r["n_tokens"].as_u64().expect("n_tokens"),
        "{name}: WikiText token count"
    );
    assert_eq!(
        ids_sha256(&got),
        r["sha256_u32le"].as_str().expect("sha256_u32le"),
        "{name}: WikiText ids sha256"
    );
    let first = ids(&r["first"]);
    assert_eq!(&got[..first.len()], &first[..], "{name}: first ids");
    let last = ids(&r["last"]);
    assert_eq!(
        &got[got.len() - last.len()..],
        &last[..],
        "{name}: last ids"
    );

    let c = cases();
    assert_eq!(
        r["cases_sha256"].as_str(),
        Some(c.sha256.as_str()),
        "{name}: made from another cases.json; rerun the scripts in scripts/reference"
    );
    let tricky = r["tricky"].as_array().expect("tricky");
    assert_eq!(tricky.len(), c.tricky.len(), "{name}: tricky cases");
    for (s, want) in c.tricky.iter().zip(tricky) {
        let got = tok.encode(s, true);
        if got != ids(want) {
            bad.push(format!("tricky {s:?}: got {got:?}, want {want}"));
        }
    }
    let fuzz = r["fuzz_sha256"].as_array().expect("fuzz_sha256");
    assert_eq!(fuzz.len(), c.fuzz.len(), "{name}: fuzz cases");
    for (s, want) in c.fuzz.iter().zip(fuzz) {
        let got = tok.encode(s, true);
        if ids_sha256(&got)[..16] != *want.as_str().expect("a digest") {
            bad.push(format!("fuzz {s:?}: got {got:?}"));
        }
    }

    // Decoding: byte-level BPE is lossless where every byte has a token (SmolLM2's
    // vocabulary lacks 21 of them, which encoding drops) and no space is put in front
    // (which decoding keeps, as Hugging Face's does); SentencePiece is where the
    // encoder's space prefix can be told apart (the LLaMA-1/2 rule), no special token is
    // written and no `▁` (which decodes to a space).
    let spec = tok.spec();
    let has_byte: Vec<bool> = (0..=255u8)
        .map(|b| tok.token_id(&byte_char(b).to_string()).is_some())
        .collect();
    let roundtrip = |s: &str| match spec.kind {
        TokenizerKind::ByteLevelBpe => {
            spec.space_prefix == SpacePrefix::Never && s.bytes().all(|b| has_byte[b as usize])
        }
        TokenizerKind::SentencePieceBpe => {
            spec.space_prefix == SpacePrefix::Always
                && !["<s>", "</s>", "<unk>", "\u{2581}"]
                    .iter()
                    .any(|x| s.contains(x))
        }
    };
    for s in std::iter::once(text)
        .chain(c.tricky.iter().map(String::as_str))
        .chain(c.fuzz.iter().map(String::as_str))
    {
        if roundtrip(s) && tok.decode(&tok.encode(s, true)) != s {
            let head: String = s.chars().take(80).collect();
            bad.push(format!("decode(encode(x)) != x for {head:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{name}: {} mismatches:\n{}",
        bad.len(),
        bad[..bad.len().min(20)].join("\n")
    );
}

/// Checks the variants of a tokenizer.json recorded in its ids file: each is the file
/// with the same edits as the script made (a JSON path and a new value).
fn check_variants(path: &Path, r: &Value, name: &str) -> usize {
    let dir = tempfile::tempdir().expect("temp dir");
    let original = json(path);
    let variants = r["variants"].as_object().expect("variants");
    for (variant, v) in variants {
        let mut j = original.clone();
        for edit in v["edit"].as_array().expect("edit") {
            let mut node = &mut j;
            for k in edit[0].as_array().expect("a JSON path") {
                node = &mut node[k.as_str().expect("a key")];
            }
            *node = edit[1].clone();
        }
        let p = dir.path().join(format!("{variant}.json"));
        std::fs::write(&p, serde_json::to_vec(&j).expect("json")).expect("write");
        let spec = from_tokenizer_json(&p).expect("import");
        check(
            &Tokenizer::new(spec).expect("tokenizer"),
            v,
            &format!("{name} ({variant})"),
        );
    }
    variants.len()
}

#[test]
fn smollm2_gguf_matches_the_reference_tokenizer() {
    let Some(path) = common::real_model() else {
        return;
    };
    let f = GgufFile::open(&path).expect("open the model");
    let spec = from_gguf(&f).expect("tokenizer metadata");
    // SmolLM2's original pre-tokenizer: digits isolated, then GPT-2's expression.
    assert_eq!(
        (spec.kind, spec.pre),
        (TokenizerKind::ByteLevelBpe, PreTokenizer::SmolLm)
    );
    assert_eq!(spec.special.len(), 17);
    let tok = Tokenizer::new(spec).expect("tokenizer");
    assert_eq!(tok.vocab_size(), 49152);
    assert!(!tok.adds_bos());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    let r = json(&fixture("smollm2_wikitext_valid.json"));
    check(&tok, &r, "smollm2");
    assert_eq!(
        tok.encode("<|im_start|>user\nhi<|im_end|>", false),
        ids(&r["tricky"][cases()
            .tricky
            .iter()
            .position(|s| s == "<|im_start|>user\nhi<|im_end|>")
            .expect("the chat case")])
    );
}

#[test]
fn byte_level_tokenizer_json_matches_hf() {
    for (name, pre) in [
        ("gpt2-bpe", PreTokenizer::Gpt2),
        ("smollm-bpe", PreTokenizer::SmolLm),
        ("llama3-bpe", PreTokenizer::Llama3),
        ("qwen2-bpe", PreTokenizer::Qwen2),
    ] {
        let path = fixture(&format!("{name}.json"));
        let spec = from_tokenizer_json(&path).expect("import");
        assert_eq!((spec.kind, spec.pre), (TokenizerKind::ByteLevelBpe, pre));
        let r = json(&fixture(&format!("{name}.ids.json")));
        check(&Tokenizer::new(spec).expect("tokenizer"), &r, name);
        check_variants(&path, &r, name);
    }
}

#[test]
fn sentencepiece_tokenizer_json_matches_hf() {
    let spec = from_tokenizer_json(&fixture("spm-bpe.json")).expect("import");
    assert_eq!(
        (spec.kind, spec.space_prefix, spec.add_bos),
        (TokenizerKind::SentencePieceBpe, SpacePrefix::Always, true)
    );
    let r = json(&fixture("spm-bpe.ids.json"));
    check(
        &Tokenizer::new(spec).expect("tokenizer"),
        &r,
        "spm-bpe.json",
    );
}

#[test]
fn sentencepiece_gguf_matches_hf_and_sentencepiece() {
    let f = GgufFile::open(&fixture("spm-bpe.gguf")).expect("open");
    let spec = from_gguf(&f).expect("import");
    assert!(spec.merges.is_empty() && !spec.scores.is_empty());
    let tok = Tokenizer::new(spec).expect("tokenizer");
    let r = json(&fixture("spm-bpe.ids.json"));
    // Hugging Face and sentencepiece (whose merge order, by score, the GGUF path
    // follows) agree on everything here; the script records any string where not.
    assert_eq!(r["sentencepiece_agrees_on_wiki"], true);
    assert_eq!(r["sentencepiece_differs"].as_array().map(Vec::len), Some(0));
    check(&tok, &r, "spm-bpe.gguf");
    let text = "Hello world, 2012 naïve 東京 🙂";
    assert_eq!(tok.decode(&tok.encode(text, true)), text);
}

#[test]
fn sentencepiece_metaspace_tokenizer_json_matches_hf() {
    let path = fixture("spm-bpe-metaspace.json");
    let spec = from_tokenizer_json(&path).expect("import");
    assert_eq!(
        (spec.kind, spec.pre, spec.space_prefix),
        (
            TokenizerKind::SentencePieceBpe,
            PreTokenizer::None,
            SpacePrefix::FirstUnlessSpace
        )
    );
    let r = json(&fixture("spm-bpe-metaspace.ids.json"));
    check(
        &Tokenizer::new(spec).expect("tokenizer"),
        &r,
        "spm-bpe-metaspace",
    );
    // prepend_scheme "always" and split: true.
    assert_eq!(check_variants(&path, &r, "spm-bpe-metaspace"), 2);
}

#[test]
fn unsupported_tokenizer_model_is_a_clear_error() {
    let d = tempfile::tempdir().expect("temp dir");
    let p = d.path().join("tokenizer.json");
    std::fs::write(&p, r#"{"model": {"type": "Unigram", "vocab": []}}"#).expect("write");
    let e = from_tokenizer_json(&p).unwrap_err().to_string();
    assert!(
        e.contains("unsupported tokenizer model 'Unigram'")
            && e.contains(&p.display().to_string())
            && e.contains("cap supports BPE (byte-level and SentencePiece-style)"),
        "{e}"
    );
}
