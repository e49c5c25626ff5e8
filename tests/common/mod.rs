//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The texts shipped in the repository (`data/`).
pub fn data_dir() -> PathBuf {
    root().join("data")
}

/// WikiText-2 raw validation text.
pub fn wikitext_valid() -> PathBuf {
    data_dir().join("wikitext-2-raw/wiki.valid.raw")
}

/// The real test model (SmolLM2-135M-Instruct Q4_1), or `None` when the run opted out
/// with `CAP_SKIP_MODEL_TESTS=1`. A missing model is a failure, not a silent pass.
/// `CAP_MODEL` replaces it.
pub fn real_model() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CAP_MODEL") {
        return cached_model_at(PathBuf::from(p), "");
    }
    cached_model("SmolLM2-135M-Instruct.Q4_1.gguf", "")
}

/// One of the models `scripts/fetch-model.sh NAME` caches (`file` in
/// `~/.cache/cap/model`), or `None` when the run opted out with
/// `CAP_SKIP_MODEL_TESTS=1`. A missing model is a failure, not a silent pass.
pub fn cached_model(file: &str, fetch_name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    cached_model_at(home.join(".cache/cap/model").join(file), fetch_name)
}

fn cached_model_at(path: PathBuf, fetch_name: &str) -> Option<PathBuf> {
    if std::env::var_os("CAP_SKIP_MODEL_TESTS").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: CAP_SKIP_MODEL_TESTS=1, real-model test not run");
        return None;
    }
    assert!(
        path.exists(),
        "test model {} is missing: run scripts/fetch-model.sh {fetch_name} (or CAP_SKIP_MODEL_TESTS=1 to skip)",
        path.display()
    );
    Some(path)
}

/// The calibration and evaluation settings (4 samples of 24 tokens; perplexity over 2
/// windows of 32) that keep compressing a tiny model to a fraction of a second; the
/// tests that want fast runs and not particular figures share them.
pub const SMALL_EVAL: [&str; 8] = [
    "--calib-samples",
    "4",
    "--calib-len",
    "24",
    "--eval-ctx",
    "32",
    "--eval-windows",
    "2",
];

/// `cap-host compress` arguments that keep a tiny model's run to a fraction of a
/// second: `--calib calib`, [`SMALL_EVAL`], a short allocation search on 2 threads and
/// the RPCA cache in `cache`.
pub fn small_args(calib: &str, cache: &str) -> Vec<String> {
    let search = [
        "--steps",
        "3",
        "--step-samples",
        "2",
        "--threads",
        "2",
        "--cache-dir",
        cache,
    ];
    ["--calib", calib]
        .into_iter()
        .chain(SMALL_EVAL)
        .chain(search)
        .map(String::from)
        .collect()
}

/// `cap-host compress --model model -o out`, then `extra`.
pub fn compress_to(model: &str, out: &str, extra: &[&str]) -> Vec<String> {
    ["compress", "--model", model, "-o", out]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

/// `cap-host compress --model model -o out --json`, then [`small_args`], then `extra`.
pub fn small_compress(
    model: &str,
    out: &str,
    calib: &str,
    cache: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut v = compress_to(model, out, &["--json"]);
    v.extend(small_args(calib, cache));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Every `--method` (with the variants that take another path) `compress` has.
pub const METHODS: [&[&str]; 9] = [
    &["--method", "cap"],
    &["--method", "cap", "--lowrank-share", "0.3"],
    &[
        "--method",
        "cap",
        "--variant",
        "paper",
        "--allocation",
        "reinforce",
    ],
    &[
        "--method",
        "cap",
        "--variant",
        "paper",
        "--allocation",
        "threshold",
    ],
    &["--method", "magnitude"],
    &["--method", "wanda"],
    &["--method", "svd"],
    &["--method", "sparsegpt"],
    &["--method", "admm"],
];

/// Runs `cap-host args`, asserts success and parses its `--json` output.
pub fn run_json<S: AsRef<str>>(args: &[S]) -> serde_json::Value {
    let a: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
    let (code, out, err) = cap_host(&a);
    assert_eq!(code, 0, "cap-host {a:?} failed: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Writes a calibration text of about 12k characters in paragraphs into `dir` and
/// returns its path.
pub fn calib_text(dir: &std::path::Path) -> String {
    let words = [
        "the", "model", "runs", "on", "a", "small", "board", "with", "little", "memory", "and",
        "every", "byte", "counts", "when", "weights", "are", "stored", "in", "flash",
    ];
    let mut s = String::new();
    for p in 0..60 {
        for i in 0..40 {
            s.push_str(words[(i * 7 + p * 3) % words.len()]);
            s.push(if i % 9 == 8 { '.' } else { ' ' });
        }
        s.push_str("\n\n");
    }
    let path = dir.join("calib.txt");
    std::fs::write(&path, s).unwrap();
    path.display().to_string()
}

/// Asserts a clean failure of `cap-host args`: exit code 1, one line on stderr
/// containing every `needle`, and no panic.
pub fn assert_clean_failure<S: AsRef<str>>(args: &[S], needles: &[&str]) {
    let args: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
    let (code, _out, err) = cap_host(&args);
    assert_eq!(code, 1, "expected exit 1 for {args:?}, stderr: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line for {args:?}, got: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr for {args:?} lacks {n:?}: {err}");
    }
}

/// Runs the `cap-host` binary; returns (exit code, stdout, stderr).
pub fn cap_host(args: &[&str]) -> (i32, String, String) {
    cap_host_with(&[], args)
}

/// Runs the `cap-host` binary with extra environment variables `envs`; returns (exit
/// code, stdout, stderr).
pub fn cap_host_with(envs: &[(&str, &std::ffi::OsStr)], args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cap-host"))
        .envs(envs.iter().copied())
        .args(args)
        .output()
        .expect("run cap-host");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A GGUF metadata value for [`gguf_bytes`].
#[derive(Clone)]
pub enum Kv {
    /// u32 (type 4).
    U32(u32),
    /// f32 (type 6).
    F32(f32),
    /// string (type 8).
    Str(&'static str),
    /// array of strings.
    Strs(Vec<String>),
}

/// Serializes a GGUF v3 file: metadata, then tensors `(name, dims, ggml type id, data)`
/// aligned to 32 bytes. Data lengths are the caller's business (bad files are the point).
pub fn gguf_bytes(kv: &[(&str, Kv)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    fn s(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        s(&mut b, k);
        match v {
            Kv::U32(x) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Kv::F32(x) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Kv::Str(x) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                s(&mut b, x);
            }
            Kv::Strs(xs) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&8u32.to_le_bytes());
                b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
                for x in xs {
                    s(&mut b, x);
                }
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for (_, _, _, data) in tensors {
        offsets.push(offset);
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    for ((name, dims, ty, _), off) in tensors.iter().zip(&offsets) {
        s(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        b.extend_from_slice(data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    b
}

/// A complete one-layer LLaMA GGUF (hidden 8, 2 heads, vocab 256 byte tokens) with F32
/// zeros for weights, whose `blk.0.ffn_up.weight` has the GGML type `up_type` (and the
/// right byte length for it when known). `arch` sets `general.architecture`.
pub fn tiny_llama_gguf(arch: &'static str, up_type: u32, up_bytes: usize) -> Vec<u8> {
    tiny_llama_gguf_with(arch, up_type, up_bytes, &mut |_, _| {})
}

/// [`tiny_llama_gguf`] after `edit(metadata, tensors)` changed its metadata or tensor
/// data (see [`set_kv`]: the reader takes a key's first occurrence).
#[allow(clippy::type_complexity)]
pub fn tiny_llama_gguf_with(
    arch: &'static str,
    up_type: u32,
    up_bytes: usize,
    edit: &mut dyn FnMut(
        &mut Vec<(&'static str, Kv)>,
        &mut Vec<(&'static str, Vec<u64>, u32, Vec<u8>)>,
    ),
) -> Vec<u8> {
    let (h, inter, vocab) = (8u64, 256u64, 256u64);
    let f32s = |n: u64| vec![0u8; n as usize * 4];
    // The hyper-parameters under the architecture's own prefix, as llama.cpp writes them.
    // The keys are leaked to `'static` (a few bytes per test file) so `edit` can match
    // and replace them like the fixed ones.
    let mut kv: Vec<(&'static str, Kv)> = vec![("general.architecture", Kv::Str(arch))];
    kv.extend(
        [
            ("block_count", Kv::U32(1)),
            ("context_length", Kv::U32(64)),
            ("embedding_length", Kv::U32(h as u32)),
            ("feed_forward_length", Kv::U32(inter as u32)),
            ("attention.head_count", Kv::U32(2)),
            ("attention.head_count_kv", Kv::U32(2)),
            ("attention.layer_norm_rms_epsilon", Kv::F32(1e-5)),
            ("rope.freq_base", Kv::F32(10000.0)),
        ]
        .into_iter()
        .map(|(k, v)| (&*Box::leak(format!("{arch}.{k}").into_boxed_str()), v)),
    );
    kv.extend([
        ("tokenizer.ggml.model", Kv::Str("gpt2")),
        ("tokenizer.ggml.pre", Kv::Str("default")),
    ]);
    // GPT-2 byte-level vocabulary: the 256 byte symbols.
    let toks: Vec<String> = (0..=255u8).map(|b| gpt2_byte_char(b).to_string()).collect();
    kv.push(("tokenizer.ggml.tokens", Kv::Strs(toks)));
    let t = vec![
        ("token_embd.weight", vec![h, vocab], 0, f32s(h * vocab)),
        ("output_norm.weight", vec![h], 0, f32s(h)),
        ("blk.0.attn_norm.weight", vec![h], 0, f32s(h)),
        ("blk.0.attn_q.weight", vec![h, h], 0, f32s(h * h)),
        ("blk.0.attn_k.weight", vec![h, h], 0, f32s(h * h)),
        ("blk.0.attn_v.weight", vec![h, h], 0, f32s(h * h)),
        ("blk.0.attn_output.weight", vec![h, h], 0, f32s(h * h)),
        ("blk.0.ffn_norm.weight", vec![h], 0, f32s(h)),
        ("blk.0.ffn_gate.weight", vec![h, inter], 0, f32s(h * inter)),
        (
            "blk.0.ffn_up.weight",
            vec![h, inter],
            up_type,
            vec![0u8; up_bytes],
        ),
        ("blk.0.ffn_down.weight", vec![inter, h], 0, f32s(h * inter)),
    ];
    let mut t = t;
    edit(&mut kv, &mut t);
    gguf_bytes(&kv, &t)
}

/// Sets metadata `key` to `value` in place, or appends it.
pub fn set_kv(kv: &mut Vec<(&'static str, Kv)>, key: &'static str, value: Kv) {
    match kv.iter_mut().find(|(k, _)| *k == key) {
        Some(e) => e.1 = value,
        None => kv.push((key, value)),
    }
}

/// GPT-2's printable stand-in for a byte (the `bytes_to_unicode` table).
pub fn gpt2_byte_char(b: u8) -> char {
    let direct =
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if direct {
        return b as char;
    }
    let mut n = 0u32;
    for x in 0..b {
        let d =
            (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
        if !d {
            n += 1;
        }
    }
    char::from_u32(256 + n).unwrap()
}

/// The GGUF of tiny fixture `name` (`tests/fixtures/tiny/NAME/NAME.gguf`).
pub fn tiny(name: &str) -> String {
    root()
        .join(format!("tests/fixtures/tiny/{name}/{name}.gguf"))
        .display()
        .to_string()
}

/// Asserts that `cap-device selftest FILE` passes: exit 0 and `"pass": true`.
pub fn self_test(path: &Path) {
    let out = Command::new(cap_device())
        .args(["selftest", &path.display().to_string(), "--json"])
        .output()
        .expect("run cap-device");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "selftest: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["pass"], serde_json::Value::Bool(true), "{v}");
}

/// The x86-64 `cap-device`: beside `cap-host` when the workspace's tests were built
/// (`cargo test --workspace`), else built here into a target directory of its own.
pub fn cap_device() -> PathBuf {
    let host = PathBuf::from(env!("CARGO_BIN_EXE_cap-host"));
    let beside = host.with_file_name("cap-device");
    if beside.exists() {
        return beside;
    }
    let dir = root().join("target/device-cli");
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "-p",
            "cap-device",
            "--bin",
            "cap-device",
            "--target-dir",
        ])
        .arg(&dir)
        .current_dir(root())
        .status()
        .expect("run cargo");
    assert!(st.success(), "building cap-device failed");
    dir.join("debug/cap-device")
}

/// Whether tensor `name` is a block linear (what `compress` compresses).
pub fn is_linear(name: &str) -> bool {
    [
        "attn_q.",
        "attn_k.",
        "attn_v.",
        "attn_output.",
        "ffn_gate.",
        "ffn_up.",
        "ffn_down.",
    ]
    .iter()
    .any(|p| name.contains(p))
}

/// A profile like `targets/host.toml` with another name and memory.
pub fn write_profile(dir: &Path, name: &str, total: u64, reserved: u64) {
    let text = std::fs::read_to_string(root().join("targets/host.toml")).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let line = if line.starts_with("name =") {
            format!("name = \"{name}\"")
        } else if line.starts_with("total_memory_bytes =") {
            format!("total_memory_bytes = {total}")
        } else if line.starts_with("reserved_bytes =") {
            format!("reserved_bytes = {reserved}")
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(dir.join(format!("{name}.toml")), out).unwrap();
}

/// Rewrites the `.cap` file `src` into `dst` with its manifest changed by `edit`, through
/// the host's own re-stamp (`compress`'s last step), so every checksum is valid and only
/// the contents are what the test made them.
pub fn restamped(src: &Path, dst: &Path, edit: impl FnOnce(&mut cap_format::Manifest)) {
    let bytes = std::fs::read(src).unwrap();
    let mut m = cap_format::CapFile::parse(&bytes)
        .unwrap()
        .manifest()
        .clone();
    edit(&mut m);
    cap_host::compress::stamp::restamp(src, dst, m).unwrap();
}

/// What [`cap_host_peak_memory`] saw of a run.
pub struct PeakMemory {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// The largest anonymous resident memory (`RssAnon`) sampled: heap and anonymous
    /// maps, what cannot be paged back to a file.
    pub anon: u64,
    /// The largest resident memory (`VmRSS`) sampled, file-backed pages included.
    pub rss: u64,
}

/// Runs `cap-host` with `envs` and samples its `/proc/PID/status` every 5 ms until it
/// exits. A sampled peak can miss an allocation that lives less than 5 ms; the large
/// ones (a block, its Hessians, the calibration streams) live for seconds.
pub fn cap_host_peak_memory(envs: &[(&str, &std::ffi::OsStr)], args: &[&str]) -> PeakMemory {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cap-host"))
        .envs(envs.iter().copied())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run cap-host");
    let status_path = format!("/proc/{}/status", child.id());
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = pipe(Box::new(child.stdout.take().expect("stdout")));
    let err = pipe(Box::new(child.stderr.take().expect("stderr")));
    let kib = |status: &str, key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    let (mut anon, mut rss) = (0, 0);
    let code = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            anon = anon.max(kib(&s, "RssAnon:"));
            rss = rss.max(kib(&s, "VmRSS:"));
        }
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code().unwrap_or(-1);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    PeakMemory {
        code,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        anon,
        rss,
    }
}
