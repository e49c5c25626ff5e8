//! `cap-device` end to end: a file written by `cap-host compress` passes its self-test
//! (the board recomputes the host's stored figure), generation reports its speeds,
//! bad input fails cleanly, and on the three real models (SmolLM2, Qwen2.5, Gemma-3)
//! the aarch64 build under qemu computes the same perplexity as the x86 build, within
//! peak memory of file + KV cache + overhead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{cap_device, root};

/// The self-test tolerance `cap-device` applies (its `SELFTEST_REL_TOLERANCE`).
const SELFTEST_TOL: f64 = 1e-3;

/// Peak resident memory beyond the file (mapped, every page touched) and the KV
/// cache: the workspace (activations of one 256-token chunk, attention scores, one
/// block of 64 × vocab logits: about 25 MB for SmolLM2 at ctx 2048), the tokenizer
/// and manifest (about 10 MB), the program, its libraries and thread stacks.
const RSS_OVERHEAD: u64 = 96 << 20;

fn run(bin: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("run cap-device");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(bin: &Path, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = run(bin, args);
    assert_eq!(code, 0, "{args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
}

/// Clean failure: exit 2, no panic, the message names `needle`.
fn fails(bin: &Path, args: &[&str], needle: &str) {
    let (code, _, err) = run(bin, args);
    assert_eq!(code, 2, "{args:?}: expected exit 2, stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

/// Compresses `model` into `out` with `args` (small settings) and returns the report.
fn compress(model: &str, out: &Path, calib: &Path, extra: &[&str]) -> serde_json::Value {
    let o = out.display().to_string();
    let c = calib.display().to_string();
    let mut a = vec![
        "compress",
        "--model",
        model,
        "-o",
        &o,
        "--calib",
        &c,
        "--json",
        "--no-source-eval",
    ];
    a.extend_from_slice(extra);
    let (code, stdout, err) = common::cap_host(&a);
    assert_eq!(code, 0, "compress failed: {err}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn tiny_model_self_test_generation_and_bad_input() {
    let bin = cap_device();
    let dir = tempfile::tempdir().unwrap();
    let calib = PathBuf::from(common::calib_text(dir.path()));
    let model = root().join("tests/fixtures/tiny/llama-tied/llama-tied.gguf");
    let out = dir.path().join("t.cap");
    let o = out.display().to_string();
    compress(
        &model.display().to_string(),
        &out,
        &calib,
        &[
            &["--ratio", "0.5"][..],
            &common::SMALL_EVAL,
            &["--method", "wanda"],
        ]
        .concat(),
    );
    // The self-test reproduces the stored figure on the stored text.
    let s = json(&bin, &["selftest", &o, "--json", "--threads", "2"]);
    assert_eq!(s["pass"], true, "{s}");
    assert!(s["relative_difference"].as_f64().unwrap() <= SELFTEST_TOL);
    assert_eq!(s["protocol"], "llama-cpp");
    // Tokens decoded one at a time (the matrix-vector kernels) score as in a batch.
    assert_eq!(s["decode_check_pass"], true, "{s}");
    assert!(s["decode_check_max_nll_diff"].as_f64().unwrap() < 1e-3);
    // The default device (`auto`): the CPU here (no GPU, or a binary built without
    // `cuda`), the same figure as asking for the CPU; asking for the GPU is then one
    // line and exit status 2, never a silent fall-back.
    let cpu = json(
        &bin,
        &[
            "selftest",
            &o,
            "--json",
            "--threads",
            "2",
            "--device",
            "cpu",
        ],
    );
    assert_eq!(cpu["device"], "cpu");
    if s["device"] == "cpu" {
        assert_eq!(cpu["ppl"], s["ppl"]);
        fails(
            &bin,
            &["selftest", &o, "--device", "cuda"],
            "--device cuda: ",
        );
        fails(
            &bin,
            &["generate", &o, "--prompt", "the", "--device", "cuda"],
            "--device cuda: ",
        );
    }
    // Forcing the scalar reference kernels gives the same figure.
    let out_scalar = Command::new(&bin)
        .args(["selftest", &o, "--json"])
        .env("CAP_FORCE_SCALAR", "1")
        .output()
        .unwrap();
    let sc: serde_json::Value = serde_json::from_slice(&out_scalar.stdout).unwrap();
    assert_eq!(sc["kernels"], "scalar");
    assert_eq!(sc["pass"], true, "{sc}");
    // Generation: deterministic under a seed, and reports its speeds.
    let g = |seed: &str| {
        json(
            &bin,
            &[
                "generate",
                &o,
                "--prompt",
                "the model runs",
                "-n",
                "8",
                "--seed",
                seed,
                "--json",
            ],
        )
    };
    let (a, b) = (g("3"), g("3"));
    assert_eq!(a["tokens"], b["tokens"]);
    assert!(a["generated_tokens"].as_u64().unwrap() >= 1);
    assert!(a["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    // Every generated token but the first comes from a decode step (and one more when
    // the last step produced end-of-sequence); the speed is those steps over their time.
    let generated = a["generated_tokens"].as_u64().unwrap();
    let decoded = a["decoded_tokens"].as_u64().unwrap();
    assert!(decoded == generated - 1 || decoded == generated, "{a}");
    assert!(decoded >= 1, "-n 8 decodes at least one token: {a}");
    let (tps, secs) = (
        a["decode_tokens_per_s"].as_f64().unwrap(),
        a["decode_seconds"].as_f64().unwrap(),
    );
    assert!(tps > 0.0 && secs > 0.0, "{a}");
    assert!(
        (tps - decoded as f64 / secs).abs() <= 1e-9 * tps,
        "decode speed {tps} is not {decoded} tokens / {secs} s"
    );
    let info = json(&bin, &["info", &o, "--json"]);
    assert_eq!(info["checksums"], "ok");
    assert_eq!(
        info["file_bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );

    // Bad input: clean errors, exit 2.
    let bytes = std::fs::read(&out).unwrap();
    let corrupt = dir.path().join("corrupt.cap");
    let mut c = bytes.clone();
    let mid = c.len() / 3;
    c[mid] ^= 0x40;
    std::fs::write(&corrupt, &c).unwrap();
    fails(
        &bin,
        &["selftest", &corrupt.display().to_string()],
        "checksum",
    );
    let truncated = dir.path().join("truncated.cap");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    fails(
        &bin,
        &["selftest", &truncated.display().to_string()],
        "not a usable .cap file",
    );
    let newer = dir.path().join("newer.cap");
    let mut n = bytes.clone();
    // The major version is the u16 after the 8-byte magic (SPEC.md §2).
    n[8] = n[8].wrapping_add(1);
    std::fs::write(&newer, &n).unwrap();
    fails(&bin, &["info", &newer.display().to_string()], "version");
    fails(
        &bin,
        &[
            "generate",
            &o,
            "--prompt",
            &"the model runs ".repeat(40),
            "--ctx",
            "16",
        ],
        "longer than the context",
    );
    fails(
        &bin,
        &["selftest", &o, "--text", "/nonexistent/text.txt"],
        "cannot read",
    );
    fails(&bin, &["info", "/nonexistent/file.cap"], "cannot open");
    fails(
        &bin,
        &["generate", &o, "--prompt", "the", "-n", "1000000000000"],
        "exceeds the model's",
    );
    fails(
        &bin,
        &["generate", &o, "--prompt", "the", "--top-p", "0"],
        "--top-p",
    );
}

/// Runs `cap-device` for aarch64 under qemu, if built and qemu is installed. CI
/// (`.ci/run`) builds it and sets `CAP_REQUIRE_QEMU=1`, which turns a skip into a
/// failure.
fn aarch64_device() -> Option<(PathBuf, PathBuf)> {
    // <target dir>/debug/cap-host → <target dir>/aarch64-unknown-linux-gnu/release/.
    let host = PathBuf::from(env!("CARGO_BIN_EXE_cap-host"));
    let target_dir = host
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| root().join("target"), Path::to_path_buf);
    let bin = target_dir.join("aarch64-unknown-linux-gnu/release/cap-device");
    let qemu = ["qemu-aarch64", "qemu-aarch64-static"]
        .iter()
        .find(|q| Command::new(q).arg("--version").output().is_ok())
        .map(PathBuf::from);
    let required = std::env::var_os("CAP_REQUIRE_QEMU").is_some_and(|v| v == "1");
    match (bin.exists(), qemu) {
        (true, Some(q)) => Some((q, bin)),
        (has_bin, q) => {
            let why = if has_bin {
                "qemu-aarch64 is not installed".to_string()
            } else {
                format!(
                    "{} is not built (cargo build --release -p cap-device --target aarch64-unknown-linux-gnu)",
                    bin.display()
                )
            };
            assert!(
                !required || q.is_some() && has_bin,
                "CAP_REQUIRE_QEMU=1 but {why}"
            );
            eprintln!("SKIPPED: aarch64 self-test: {why}");
            None
        }
    }
}

#[test]
fn smollm2_self_test_on_x86_and_aarch64() {
    let Some(model) = common::real_model() else {
        return;
    };
    // Short windows: under qemu the aarch64 build runs about 1 token/s.
    let settings = Settings {
        method: &["--ratio", "0.5", "--method", "wanda"],
        eval: ["32", "2"],
        decode_check: "4",
        overhead: RSS_OVERHEAD,
    };
    self_test_on_x86_and_aarch64("SmolLM2", &model, &settings);
}

/// Qwen2 (q/k/v biases, an untied head) in 2:4 with 4-bit values: the 2:4 encoding and
/// the quantized kernels on both machines.
#[test]
fn qwen2_self_test_on_x86_and_aarch64() {
    let Some(model) =
        common::cached_model("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "qwen2.5-0.5b")
    else {
        return;
    };
    // One window of 16: the 151,936-row head makes qemu ten times slower than on
    // SmolLM2.
    let settings = Settings {
        method: &["--pattern", "2:4", "--method", "wanda", "--values", "q4"],
        eval: ["16", "1"],
        decode_check: "2",
        overhead: big_vocab_overhead(151_936),
    };
    self_test_on_x86_and_aarch64("Qwen2.5", &model, &settings);
}

/// Gemma-3 (q/k norms, output norms, GeGLU, scaled embedding, local layers) with
/// unstructured 50% sparsity in f16 bitmasks.
#[test]
fn gemma3_self_test_on_x86_and_aarch64() {
    let Some(model) = common::cached_model("gemma-3-270m-q4_k_m.gguf", "gemma3-270m") else {
        return;
    };
    let settings = Settings {
        method: &["--ratio", "0.5", "--method", "wanda"],
        eval: ["16", "1"],
        decode_check: "2",
        overhead: big_vocab_overhead(262_144),
    };
    self_test_on_x86_and_aarch64("Gemma-3", &model, &settings);
}

/// [`RSS_OVERHEAD`] plus what a large vocabulary adds: one block of 64 rows of logits
/// and a tokenizer of that many tokens (with merges or scores), about 1 KB a token.
fn big_vocab_overhead(vocab: u64) -> u64 {
    RSS_OVERHEAD + 64 * vocab * 4 + vocab * 1024
}

/// How a self-test case compresses and measures.
struct Settings {
    /// Method and budget arguments of `compress`.
    method: &'static [&'static str],
    /// `--eval-ctx` and `--eval-windows`: the stored figure the boards recompute.
    eval: [&'static str; 2],
    /// `--decode-check` tokens under qemu.
    decode_check: &'static str,
    /// Peak resident memory allowed beyond the mapped file and the KV cache.
    overhead: u64,
}

/// Compresses `model` (small calibration), then: the x86 self-test recomputes the
/// stored figure within peak memory of file + KV cache + overhead, generation runs, and
/// the aarch64 build under qemu computes the same perplexity.
fn self_test_on_x86_and_aarch64(name: &str, model: &Path, s: &Settings) {
    let bin = cap_device();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.cap");
    let o = out.display().to_string();
    let calib = root().join("data/c4/c4_sample.json");
    let mut args = s.method.to_vec();
    args.extend([
        "--calib-samples",
        "8",
        "--calib-len",
        "128",
        "--eval-ctx",
        s.eval[0],
        "--eval-windows",
        s.eval[1],
    ]);
    let r = compress(&model.display().to_string(), &out, &calib, &args);
    let stored = r["self_test"]["ppl"].as_f64().unwrap();
    let x86 = json(&bin, &["selftest", &o, "--json", "--threads", "2"]);
    assert_eq!(x86["pass"], true, "{x86}");
    let ppl = x86["ppl"].as_f64().unwrap();
    assert!((ppl - stored).abs() / stored <= SELFTEST_TOL);
    // Peak memory: the mapped file, the KV cache and a stated overhead.
    let file = x86["file_bytes"].as_u64().unwrap();
    let kv = x86["kv_cache_bytes"].as_u64().unwrap();
    let rss = x86["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        rss <= file + kv + s.overhead,
        "peak RSS {rss} > file {file} + KV {kv} + {}",
        s.overhead
    );
    let g = json(
        &bin,
        &[
            "generate",
            &o,
            "--prompt",
            "The capital of France is",
            "-n",
            "16",
            "--temp",
            "0",
            "--json",
            "--ctx",
            "256",
        ],
    );
    assert_eq!(g["generated_tokens"].as_u64().unwrap(), 16, "{g}");
    let rss = g["peak_rss_bytes"].as_u64().unwrap();
    let kv = g["kv_cache_bytes"].as_u64().unwrap();
    assert!(rss <= file + kv + s.overhead, "generate: peak RSS {rss}");

    let Some((qemu, arm)) = aarch64_device() else {
        return;
    };
    let sysroot = "/usr/aarch64-linux-gnu";
    let out = Command::new(&qemu)
        .args(["-L", sysroot])
        .arg(&arm)
        .args([
            "selftest",
            &o,
            "--json",
            "--threads",
            "2",
            "--decode-check",
            s.decode_check,
        ])
        .output()
        .expect("run qemu");
    assert!(
        out.status.success(),
        "aarch64 selftest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(a["kernels"], "neon", "{a}");
    assert_eq!(a["pass"], true, "{a}");
    assert_eq!(a["decode_check_pass"], true, "{a}");
    let arm_ppl = a["ppl"].as_f64().unwrap();
    eprintln!("{name} self-test: stored {stored}, x86 {ppl}, aarch64 (qemu) {arm_ppl}");
    assert!((arm_ppl - ppl).abs() / ppl <= SELFTEST_TOL);
}
