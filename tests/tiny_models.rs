//! Every supported architecture (LLaMA with llama3 RoPE scaling, tied LLaMA, Mistral,
//! Qwen2 with q/k/v biases, Gemma-3 with sliding local layers), imported from Hugging Face
//! safetensors (f32, f16, sharded bf16) and from GGUF (with llama.cpp's q/k row
//! permutation for LLaMA, and its +1 on Gemma's norm weights), against logits computed by
//! PyTorch + transformers on the same random weights (tests/fixtures/tiny/, made by
//! scripts/reference/make_tiny_models.py).

mod common;

use std::path::{Path, PathBuf};

use cap_device::config::Arch;
use cap_device::forward::Runner;
use cap_host::import::Checkpoint;
use serde_json::Value;

/// Tiny models (2 layers, Gemma-3 6, width 64, weights ~0.1): f32 logits agree with
/// PyTorch to a few ULP of their magnitude; 1e-4 absolute leaves room for summation order
/// (the script's float64 numpy pass is within 3e-6 of the same references).
const TINY_LOGIT_TOL: f32 = 1e-4;

/// `tests/fixtures/tiny`.
fn tiny_dir() -> PathBuf {
    common::root().join("tests/fixtures/tiny")
}

/// Runs `ck` on the reference tokens and returns the largest logit difference.
fn max_logit_diff(ck: &Checkpoint, reference: &Path) -> f32 {
    let r: Value = serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let tokens: Vec<u32> = r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<Vec<f32>> = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let model = ck.load_model().unwrap_or_else(|e| panic!("{e}"));
    let runner = Runner::new(&model, tokens.len(), 1);
    let mut kv = runner.new_cache();
    let mut hidden = Vec::new();
    runner.forward(&tokens, &mut kv, &mut hidden).unwrap();
    let vocab = model.config.vocab_size;
    let mut logits = vec![0.0f32; tokens.len() * vocab];
    runner.logits(&hidden, &mut logits);
    assert_eq!(want.len(), tokens.len());
    let mut worst = 0.0f32;
    for (i, row) in want.iter().enumerate() {
        assert_eq!(row.len(), vocab);
        for (a, b) in row.iter().zip(&logits[i * vocab..(i + 1) * vocab]) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

#[test]
fn every_tiny_checkpoint_matches_transformers() {
    let mut checked = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(tiny_dir())
        .expect("tests/fixtures/tiny")
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        let reference = p.join("reference.json");
        // GGUF-only folders (gemma3: cap refuses Gemma-3 safetensors) have no
        // config.json and their own test below.
        if !p.is_dir() || !reference.exists() || !p.join("config.json").exists() {
            continue;
        }
        let ck = Checkpoint::open(&p).unwrap_or_else(|e| panic!("{e}"));
        let worst = max_logit_diff(&ck, &reference);
        eprintln!("{}: max |logit − transformers| = {worst:.2e}", p.display());
        assert!(worst < TINY_LOGIT_TOL, "{}: {worst}", p.display());
        checked.push(p.file_name().unwrap().to_string_lossy().into_owned());
        // A GGUF copy made the way llama.cpp's converter does, if there is one.
        for g in std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()) {
            if g.extension().is_some_and(|x| x == "gguf") {
                let ck = Checkpoint::open(&g).unwrap_or_else(|e| panic!("{e}"));
                let worst = max_logit_diff(&ck, &reference);
                eprintln!("{}: max |logit − transformers| = {worst:.2e}", g.display());
                assert!(worst < TINY_LOGIT_TOL, "{}: {worst}", g.display());
                checked.push(g.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    eprintln!("checked: {checked:?}");
    assert!(
        checked.len() >= 6,
        "expected the tiny fixtures (4 architectures, sharded bf16, f16, GGUF), found {checked:?}"
    );
}

/// Gemma-3 from a GGUF written as llama.cpp's converter writes one (norm weights + 1,
/// q/k rows not permuted, window in `gemma3.attention.sliding_window`): 6 layers and a
/// window of 8 over the 40 reference tokens, so layers 0–4 attend to a sliding window
/// at the local RoPE base and layer 5 globally at base 1e6.
#[test]
fn gemma3_gguf_matches_transformers() {
    let dir = tiny_dir().join("gemma3");
    let ck = Checkpoint::open(&dir.join("gemma3.gguf")).unwrap_or_else(|e| panic!("{e}"));
    // The file must import as the model the reference ran, or the comparison below
    // would test another architecture.
    let c = ck.config().unwrap();
    assert_eq!(c.arch, Arch::Gemma3);
    assert_eq!((c.n_layers, c.head_dim, c.vocab_size), (6, 16, 256));
    assert_eq!(c.rope_theta, 1e6);
    assert!(c.tie_embeddings);
    let l = c.local_attention.expect("local attention");
    assert_eq!((l.window, l.global_every, l.rope_theta), (8, 6, 10_000.0));
    let local: Vec<bool> = (0..c.n_layers)
        .map(|i| c.layer_window(i).is_some())
        .collect();
    assert_eq!(local, [true, true, true, true, true, false]);
    let worst = max_logit_diff(&ck, &dir.join("reference.json"));
    eprintln!("gemma3.gguf: max |logit − transformers| = {worst:.2e}");
    assert!(worst < TINY_LOGIT_TOL, "gemma3.gguf: {worst}");
}

#[test]
fn inspect_reports_architecture_and_parameter_counts() {
    // Qwen2 tiny: embed 256·64, head 256·64, per layer q 64·64 + k,v 32·64 each + o 64·64
    // + biases 64+32+32 + mlp 3·96·64 + 2 norms of 64; final norm 64.
    let per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + (64 + 32 + 32) + 3 * 96 * 64 + 2 * 64;
    let want = 2 * 256 * 64 + 2 * per_layer + 64;
    let dir = tiny_dir().join("qwen2");
    let (code, out, err) = common::cap_host(&["inspect", dir.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["arch"], "qwen2");
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["params"].as_u64().unwrap(), want as u64);
    assert_eq!(v["bytes"].as_u64().unwrap(), 4 * want as u64, "f32 storage");
    assert_eq!(v["groups"]["head"]["params"].as_u64().unwrap(), 256 * 64);
    let gguf = tiny_dir().join("llama-tied/llama-tied.gguf");
    let (code, out, err) = common::cap_host(&["inspect", gguf.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("architecture: llama") && out.contains("F32"),
        "{out}"
    );
}
