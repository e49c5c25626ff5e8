//! Hostile and careless input, round two: special output paths, interrupted writes,
//! files with valid checksums but impossible contents, absurd flags. Every case must
//! end with a non-zero exit, one clear line on stderr, no panic or abort, bounded
//! memory (each run is limited with `prlimit --as`), and nothing left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cap_format::CapFile;
use cap_format::manifest::{Manifest, RopeScaling};
use common::{Kv, cap_device, root, set_kv, tiny, tiny_llama_gguf_with};

/// The address-space limit every run here gets (`prlimit --as`): far below the
/// allocations the hostile inputs used to ask for (5 TB for 4·10⁹ layers, 96 GB for a
/// context of 4·10⁹), yet above what a tiny model's run reserves. It is address space,
/// not memory used: faer's GEMM (the host's SVD) reserves about 1 GiB per thread that
/// it never touches, so a 2-thread `compress` of a tiny model needs 3–4 GiB of it.
const AS_LIMIT: u64 = 8 << 30;

/// A command limited to [`AS_LIMIT`] bytes of address space when `prlimit` exists.
fn limited(bin: &Path) -> Command {
    if Path::new("/usr/bin/prlimit").exists() {
        let mut c = Command::new("/usr/bin/prlimit");
        c.arg(format!("--as={AS_LIMIT}")).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn host_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cap-host"))
}

/// Runs `bin args` under the memory limit with `envs`; (exit code, stdout, stderr).
fn run(bin: &Path, args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = limited(bin)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts that `bin args` exits with `code`, prints exactly one non-empty line on
/// stderr containing every needle, and neither panicked nor aborted.
fn refused(bin: &Path, args: &[&str], code: i32, needles: &[&str]) -> String {
    let (c, _, err) = run(bin, args, &[]);
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert!(
        !err.contains("memory allocation"),
        "allocation failure for {args:?}: {err}"
    );
    assert_eq!(c, code, "exit code for {args:?}, stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line for {args:?}, got: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr for {args:?} lacks {n:?}: {err}");
    }
    err
}

/// `cap-host args` must fail with exit 1 and one line holding every needle.
fn host_refuses(args: &[&str], needles: &[&str]) -> String {
    refused(&host_bin(), args, 1, needles)
}

/// `cap-device args` must fail with exit 2 (unusable file or wrong argument) and one line.
fn device_refuses(args: &[&str], needles: &[&str]) -> String {
    refused(&cap_device(), args, 2, needles)
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().expect("mkfifo");
    assert!(st.success());
}

// --- 1. Outputs -------------------------------------------------------------------

#[test]
fn outputs_that_are_not_regular_files_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny("llama-tied");
    let fifo = d.path().join("fifo.cap");
    mkfifo(&fifo);
    let dir = d.path().join("dir.cap");
    std::fs::create_dir(&dir).unwrap();
    let (a, b) = (d.path().join("a.cap"), d.path().join("b.cap"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let calib = common::calib_text(d.path());
    let before = entries(d.path());
    for (out, what) in [
        ("/dev/full", "a character device"),
        ("/dev/null", "a character device"),
        (s(&fifo), "a FIFO"),
        (s(&dir), "a directory"),
        (s(&a), "symbolic links"),
    ] {
        host_refuses(&["pack", "--model", &model, "-o", out], &[what]);
        host_refuses(
            &[
                "compress", "--model", &model, "-o", out, "--ratio", "0.5", "--calib", &calib,
            ],
            &[what],
        );
    }
    assert_eq!(std::fs::metadata("/dev/full").unwrap().len(), 0);
    assert!(!std::fs::metadata("/dev/full").unwrap().is_file());
    assert_eq!(
        entries(d.path()),
        before,
        "nothing written, nothing replaced"
    );
}

#[test]
fn a_symbolic_link_output_is_written_through_to_its_target() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny("llama-tied");
    let real_dir = d.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let target = real_dir.join("model.cap");
    std::fs::write(&target, b"old").unwrap();
    let link = d.path().join("link.cap");
    std::os::unix::fs::symlink("real/model.cap", &link).unwrap();
    let (c, _, err) = run(
        &host_bin(),
        &["pack", "--model", &model, "-o", s(&link)],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("real/model.cap")
    );
    let bytes = std::fs::read(&target).unwrap();
    assert_eq!(&bytes[..8], &cap_format::MAGIC);
    assert_eq!(entries(&real_dir), vec!["model.cap"]);
    // A dangling link: its target is created.
    std::fs::remove_file(&target).unwrap();
    let (c, _, err) = run(
        &host_bin(),
        &["pack", "--model", &model, "-o", s(&link)],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    assert!(target.is_file());
    assert_eq!(entries(d.path()), vec!["link.cap", "real"]);
}

/// Starts `cap-host args` with every tensor write slowed down, waits until a file whose
/// name contains `marker` appears in `dir`, then sends `signal`; returns the exit status.
fn interrupt(args: &[&str], dir: &Path, marker: &str, signal: &str) -> std::process::ExitStatus {
    let mut child = Command::new(host_bin())
        .args(args)
        .env("CAP_TEST_WRITE_DELAY_MS", "200")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !entries(dir).iter().any(|n| n.contains(marker)) {
        assert!(
            t0.elapsed().as_secs() < 60,
            "no {marker} file appeared in {:?}",
            entries(dir)
        );
        assert!(child.try_wait().unwrap().is_none(), "finished too early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    child.wait().unwrap()
}

#[test]
fn an_interrupted_pack_or_compress_leaves_nothing_behind() {
    use std::os::unix::process::ExitStatusExt;
    let d = tempfile::tempdir().unwrap();
    let model = tiny("llama-tied");
    let out = d.path().join("x.cap");
    for sig in ["-INT", "-TERM"] {
        let st = interrupt(
            &["pack", "--model", &model, "-o", s(&out)],
            d.path(),
            ".tmp-",
            sig,
        );
        assert!(!st.success());
        assert!(st.signal().is_some() || st.code() != Some(0), "{st:?}");
        assert_eq!(entries(d.path()), Vec::<String>::new(), "after {sig}");
    }
    let work = tempfile::tempdir().unwrap();
    let calib = common::calib_text(work.path());
    let cache = work.path().join("cache");
    let mut args = vec![
        "compress",
        "--model",
        &model,
        "-o",
        s(&out),
        "--ratio",
        "0.5",
    ];
    let small = common::small_args(&calib, s(&cache));
    args.extend(small.iter().map(String::as_str));
    let st = interrupt(&args, d.path(), ".unmeasured-", "-INT");
    assert!(!st.success());
    assert_eq!(entries(d.path()), Vec::<String>::new());
}

#[test]
fn stale_temporary_files_of_a_killed_run_are_removed() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny("llama-tied");
    // PIDs above the kernel's maximum (4194304) belong to no process.
    let stale = [
        "x.cap.tmp-4194399",
        "x.cap.unmeasured-4194398",
        "x.cap.unmeasured-4194398.tmp-4194398",
    ];
    for n in stale {
        std::fs::write(d.path().join(n), b"debris").unwrap();
    }
    // A live process's file (PID 1) and other names are not touched.
    for n in ["x.cap.tmp-1", "x.cap.bak", "y.cap.tmp-4194399"] {
        std::fs::write(d.path().join(n), b"keep").unwrap();
    }
    let out = d.path().join("x.cap");
    let (c, _, err) = run(
        &host_bin(),
        &["pack", "--model", &model, "-o", s(&out)],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    assert_eq!(
        entries(d.path()),
        vec!["x.cap", "x.cap.bak", "x.cap.tmp-1", "y.cap.tmp-4194399"]
    );
}

#[test]
fn an_os_error_is_printed_once() {
    let err = host_refuses(
        &[
            "pack",
            "--model",
            &tiny("llama-tied"),
            "-o",
            "/no/such/dir/x.cap",
        ],
        &["/no/such/dir/x.cap", "No such file or directory"],
    );
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

// --- 3. Non-finite and impossible numbers ------------------------------------------

/// A text of `n` bytes (one token per byte under the tiny models' byte vocabulary).
fn text_file(dir: &Path, n: usize) -> String {
    let body: String = "the model runs on a small board. "
        .chars()
        .cycle()
        .take(n)
        .collect();
    let p = dir.join("text.txt");
    std::fs::write(&p, body).unwrap();
    s(&p).to_string()
}

/// Writes the tiny GGUF after `edit` into `dir/name` and returns its path.
#[allow(clippy::type_complexity)]
fn gguf_with(
    dir: &Path,
    name: &str,
    edit: &mut dyn FnMut(
        &mut Vec<(&'static str, Kv)>,
        &mut Vec<(&'static str, Vec<u64>, u32, Vec<u8>)>,
    ),
) -> String {
    let p = dir.join(name);
    std::fs::write(&p, tiny_llama_gguf_with("llama", 0, 8 * 256 * 4, edit)).unwrap();
    s(&p).to_string()
}

#[test]
fn non_finite_or_impossible_gguf_settings_are_refused_at_import() {
    let d = tempfile::tempdir().unwrap();
    let text = text_file(d.path(), 200);
    let cases: [(&str, &'static str, Kv, &str); 7] = [
        (
            "eps-nan",
            "llama.attention.layer_norm_rms_epsilon",
            Kv::F32(f32::NAN),
            "rms_norm_eps",
        ),
        (
            "eps-neg",
            "llama.attention.layer_norm_rms_epsilon",
            Kv::F32(-1.0),
            "rms_norm_eps",
        ),
        (
            "eps-inf",
            "llama.attention.layer_norm_rms_epsilon",
            Kv::F32(f32::INFINITY),
            "rms_norm_eps",
        ),
        (
            "theta-nan",
            "llama.rope.freq_base",
            Kv::F32(f32::NAN),
            "rope_theta",
        ),
        (
            "theta-0",
            "llama.rope.freq_base",
            Kv::F32(0.0),
            "rope_theta",
        ),
        (
            "theta-neg",
            "llama.rope.freq_base",
            Kv::F32(-10000.0),
            "rope_theta",
        ),
        ("ctx-0", "llama.context_length", Kv::U32(0), "max_position"),
    ];
    for (name, key, value, field) in cases {
        let mut value = Some(value);
        let m = gguf_with(d.path(), &format!("{name}.gguf"), &mut |kv, _| {
            set_kv(kv, key, value.take().unwrap())
        });
        host_refuses(
            &["eval", "--model", &m, "--text", &text, "--ctx", "16"],
            &[&m, field],
        );
        let out = d.path().join("out.cap");
        host_refuses(&["pack", "--model", &m, "-o", s(&out)], &[&m, field]);
        assert!(!out.exists());
    }
}

#[test]
fn a_perplexity_that_is_not_finite_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let text = text_file(d.path(), 200);
    // One infinite embedding value: every logit becomes NaN.
    let m = gguf_with(d.path(), "inf.gguf", &mut |_, t| {
        let e = t.iter_mut().find(|x| x.0 == "token_embd.weight").unwrap();
        for v in e.3.chunks_exact_mut(4) {
            v.copy_from_slice(&f32::INFINITY.to_le_bytes());
        }
    });
    host_refuses(
        &["eval", "--model", &m, "--text", &text, "--ctx", "16"],
        &["not finite"],
    );
}

/// A copy of tiny HF fixture `name` in `dir` with its config.json edited by `edit`.
fn hf_with(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let src = root().join("tests/fixtures/tiny").join(name);
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    s(&dst).to_string()
}

#[test]
fn impossible_hugging_face_settings_are_refused_at_pack() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.cap");
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 6] = [
        ("eps", |c| c["rms_norm_eps"] = (-1.0).into(), "rms_norm_eps"),
        ("theta", |c| c["rope_theta"] = 0.0.into(), "rope_theta"),
        (
            "factor",
            |c| c["rope_parameters"]["factor"] = 0.0.into(),
            "rope_scaling.factor",
        ),
        (
            "lowhigh",
            |c| c["rope_parameters"]["low_freq_factor"] = 4.0.into(),
            "must differ",
        ),
        (
            "maxpos",
            |c| c["max_position_embeddings"] = 0.into(),
            "max_position",
        ),
        (
            "orig",
            |c| c["rope_parameters"]["original_max_position_embeddings"] = 0.into(),
            "original_max_position",
        ),
    ];
    for (tag, edit, field) in cases {
        let m = hf_with(&d.path().join(tag), "llama3-scaled", edit);
        host_refuses(&["pack", "--model", &m, "-o", s(&out)], &[field]);
        assert!(!out.exists());
    }
}

#[test]
fn non_finite_flags_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny("llama-tied");
    let out = d.path().join("o.cap");
    let calib = common::calib_text(d.path());
    let base = [
        "compress",
        "--model",
        &model,
        "-o",
        s(&out),
        "--calib",
        &calib,
    ];
    for (extra, name) in [
        (&["--ratio", "0.5", "--lr", "nan"][..], "--lr"),
        (&["--ratio", "0.5", "--lr=-1"], "--lr"),
        (&["--ratio", "0.5", "--lr", "inf"], "--lr"),
        (&["--ratio", "nan"], "--ratio"),
        (
            &["--ratio", "0.5", "--lowrank-share", "nan"],
            "--lowrank-share",
        ),
        (&["--ratio", "0.5", "--lambda-scale", "nan"], "lambda scale"),
        (&["--ratio", "0.5", "--tol", "nan"], "tolerance"),
        (
            &["--target", "host", "--min-tokens-per-s", "nan"],
            "--min-tokens-per-s",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        host_refuses(&args, &[name]);
    }
    assert_eq!(entries(d.path()), vec!["calib.txt"]);
    let cap = packed(d.path());
    for (extra, name) in [
        (&["--temp", "nan"][..], "--temp"),
        (&["--temp=-1"], "--temp"),
        (&["--top-p", "nan"], "--top-p"),
        (&["--top-p", "0"], "--top-p"),
    ] {
        let mut args = vec!["generate", &cap, "--prompt", "the"];
        args.extend(extra);
        device_refuses(&args, &[name]);
    }
}

/// The tiny tied llama packed into `dir/tiny.cap`.
fn packed(dir: &Path) -> String {
    let out = dir.join("tiny.cap");
    let (c, _, err) = run(
        &host_bin(),
        &["pack", "--model", &tiny("llama-tied"), "-o", s(&out)],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    s(&out).to_string()
}

/// [`common::restamped`] from a path string, returning `dst`'s: the checksums are all
/// valid, only the contents are impossible.
fn restamped(src: &str, dst: &Path, edit: impl FnOnce(&mut Manifest)) -> String {
    common::restamped(Path::new(src), dst, edit);
    s(dst).to_string()
}

#[test]
fn cap_files_with_valid_checksums_and_impossible_numbers_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let cap = packed(d.path());
    let text = text_file(d.path(), 400);
    type Edit = fn(&mut Manifest);
    let cases: [(&str, Edit, &str); 7] = [
        ("layers", |m| m.model.num_layers = 4_000_000_000, "layers"),
        ("eps", |m| m.model.rms_norm_eps = f32::NAN, "rms_norm_eps"),
        ("theta", |m| m.model.rope_theta = -1.0, "rope_theta"),
        ("maxpos", |m| m.model.max_position = 0, "max_position"),
        ("heads", |m| m.model.num_heads = 4_000_000_000, "heads"),
        ("vocab", |m| m.model.vocab_size = 4_000_000_000, "vocab"),
        (
            "factor",
            |m| {
                m.model.rope_scaling = RopeScaling::Llama3 {
                    factor: 0.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position: 64,
                }
            },
            "rope_scaling.factor",
        ),
    ];
    for (tag, edit, what) in cases {
        let f = restamped(&cap, &d.path().join(format!("{tag}.cap")), edit);
        host_refuses(
            &["eval", "--model", &f, "--text", &text, "--ctx", "16"],
            &[what],
        );
        for cmd in [
            vec!["info", &f],
            vec!["generate", &f, "--prompt", "the", "-n", "4"],
            vec!["selftest", &f, "--text", &text, "--ctx", "16"],
        ] {
            device_refuses(&cmd, &[what]);
        }
    }
}

// --- 4. The self-test fails closed ---------------------------------------------------

/// The tiny tied llama compressed (ratio 0.5, small settings) into `dir/c.cap`: a file
/// with a stored self-test figure and text.
fn compressed(dir: &Path) -> String {
    let calib = common::calib_text(dir);
    let cache = dir.join("cache");
    let out = dir.join("c.cap");
    let model = tiny_model();
    let mut args = vec![
        "compress",
        "--model",
        &model,
        "-o",
        s(&out),
        "--ratio",
        "0.5",
    ];
    let small = common::small_args(&calib, s(&cache));
    args.extend(small.iter().map(String::as_str));
    let (c, _, err) = run(&host_bin(), &args, &[]);
    assert_eq!(c, 0, "{err}");
    s(&out).to_string()
}

fn tiny_model() -> String {
    tiny("llama-tied")
}

/// Sets the stored perplexity record's value, context and windows.
fn with_record(m: &mut Manifest, value: f64, ctx: Option<u32>, windows: Option<u32>) {
    let r = m
        .compression
        .as_mut()
        .and_then(|c| c.perplexity.as_mut())
        .expect("a stored figure");
    r.value = value;
    if let Some(c) = ctx {
        r.ctx = c;
    }
    if let Some(w) = windows {
        r.windows = w;
    }
}

#[test]
fn the_self_test_fails_closed_on_impossible_stored_figures() {
    let d = tempfile::tempdir().unwrap();
    let cap = compressed(d.path());
    let (c, _, err) = run(&cap_device(), &["selftest", &cap], &[]);
    assert_eq!(c, 0, "the untouched file passes: {err}");
    let stored = {
        let bytes = std::fs::read(&cap).unwrap();
        let f = CapFile::parse(&bytes).unwrap();
        f.manifest()
            .compression
            .as_ref()
            .unwrap()
            .perplexity
            .clone()
            .unwrap()
    };
    for (tag, value, ctx, windows, needle) in [
        ("neg", -5.0, None, None, "not a perplexity"),
        ("zero", 0.0, None, None, "not a perplexity"),
        ("nan", f64::NAN, None, None, "not a perplexity"),
        ("inf", f64::INFINITY, None, None, "not a perplexity"),
        ("many", stored.value, None, Some(4_000_000_000), "windows"),
        ("none", stored.value, None, Some(0), "windows"),
        ("long", stored.value, Some(4_000_000_000), None, "exceeds"),
        ("short", stored.value, Some(1), None, "at least 2"),
    ] {
        let f = restamped(&cap, &d.path().join(format!("{tag}.cap")), |m| {
            with_record(m, value, ctx, windows)
        });
        device_refuses(&["selftest", &f], &[needle]);
    }
}

// --- 2. Sizes from files and flags ---------------------------------------------------

#[test]
fn contexts_are_bounded_by_the_model_and_by_memory() {
    let d = tempfile::tempdir().unwrap();
    let cap = packed(d.path());
    let text = text_file(d.path(), 400);
    // 256 positions: host and board refuse 300 alike.
    host_refuses(
        &["eval", "--model", &cap, "--text", &text, "--ctx", "300"],
        &["exceeds the model's 256"],
    );
    host_refuses(
        &[
            "eval",
            "--model",
            &tiny_model(),
            "--text",
            &text,
            "--ctx",
            "300",
        ],
        &["exceeds the model's 256"],
    );
    device_refuses(
        &["selftest", &cap, "--text", &text, "--ctx", "300"],
        &["exceeds the model's 256"],
    );
    // A record claiming 4·10⁹ positions: the KV cache is checked before it is allocated.
    let big = restamped(&cap, &d.path().join("big.cap"), |m| {
        m.model.max_position = 4_000_000_000
    });
    device_refuses(
        &[
            "generate",
            &big,
            "--prompt",
            "the",
            "--ctx",
            "4000000000",
            "-n",
            "4000000000",
        ],
        &["bytes of KV cache"],
    );
    device_refuses(
        &[
            "generate",
            &big,
            "--prompt",
            "the",
            "-n",
            "100",
            "--max-memory",
            "1000",
        ],
        &["--max-memory"],
    );
    device_refuses(
        &[
            "selftest",
            &big,
            "--text",
            &text,
            "--ctx",
            "64",
            "--max-memory",
            "1000",
        ],
        &["--max-memory"],
    );
    // The KV size `info` prints saturates instead of wrapping around.
    let (c, out, err) = run(
        &cap_device(),
        &["info", &cap, "--ctx", "400319966877378", "--json"],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["kv_cache_bytes_f32"].as_u64().unwrap() > 1 << 40, "{v}");
}

// --- 5. Messages ---------------------------------------------------------------------

#[test]
fn messages_say_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let cap = packed(d.path());
    let text = text_file(d.path(), 400);
    host_refuses(
        &[
            "eval",
            "--model",
            &cap,
            "--text",
            &text,
            "--ctx",
            "16",
            "--max-windows",
            "0",
        ],
        &["at least 1"],
    );
    device_refuses(
        &[
            "selftest",
            &cap,
            "--text",
            &text,
            "--ctx",
            "16",
            "--max-windows",
            "0",
        ],
        &["at least 1"],
    );
    // tokenize reads a .cap file's tokenizer (it said "not a GGUF file").
    let (c, out, err) = run(
        &host_bin(),
        &["tokenize", "--model", &cap, "--text", &text],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    let (c2, out2, _) = run(
        &host_bin(),
        &["tokenize", "--model", &tiny_model(), "--text", &text],
        &[],
    );
    assert_eq!(c2, 0);
    assert_eq!(out, out2);
}

#[test]
fn absurd_flags_are_refused_before_anything_is_allocated() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let out = d.path().join("o.cap");
    let calib = common::calib_text(d.path());
    let text = text_file(d.path(), 400);
    let compress = [
        "compress",
        "--model",
        &model,
        "-o",
        s(&out),
        "--calib",
        &calib,
        "--ratio",
        "0.5",
    ];
    for (extra, needle) in [
        (&["--calib-samples", "100000000"][..], "calibration tokens"),
        (&["--threads", "5000"], "--threads 5000"),
        (&["--threads", "100000"], "--threads 100000"),
    ] {
        let args: Vec<&str> = compress.iter().chain(extra).copied().collect();
        host_refuses(&args, &[needle]);
    }
    assert!(!out.exists());
    host_refuses(
        &[
            "eval",
            "--model",
            &model,
            "--text",
            &text,
            "--ctx",
            "16",
            "--threads",
            "5000",
        ],
        &["--threads 5000"],
    );
    host_refuses(
        &["bench-rpca", "--sizes", "100000x100000"],
        &["100000x100000", "elements"],
    );
    host_refuses(
        &["bench-rpca", "--sizes", "64x64", "--threads", "5000"],
        &["--threads 5000"],
    );
    host_refuses(
        &["bench-rpca", "--sizes", "64x64", "--low-rank", "100"],
        &["--low-rank"],
    );
    let cap = packed(d.path());
    device_refuses(
        &[
            "selftest",
            &cap,
            "--text",
            &text,
            "--ctx",
            "16",
            "--threads",
            "5000",
        ],
        &["--threads 5000"],
    );
    device_refuses(
        &["generate", &cap, "--prompt", "the", "--threads", "100000"],
        &["--threads 100000"],
    );
}

#[test]
fn texts_are_read_with_a_size_limit_and_special_files_are_not_opened() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_model();
    host_refuses(
        &[
            "eval",
            "--model",
            &model,
            "--text",
            "/dev/zero",
            "--ctx",
            "16",
        ],
        &["/dev/zero", "longer than 1073741824 bytes"],
    );
    let cap = packed(d.path());
    device_refuses(
        &["selftest", &cap, "--text", "/dev/zero", "--ctx", "16"],
        &["/dev/zero", "longer than 1073741824 bytes"],
    );
    // A FIFO named as the model: refused, not waited on.
    let fifo = d.path().join("m.cap");
    mkfifo(&fifo);
    device_refuses(&["info", s(&fifo)], &["not a regular file"]);
    host_refuses(&["inspect", s(&fifo)], &[s(&fifo)]);
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let cap = packed(d.path());
    // The record says 128 rows; the embedding and tokenizer have 256.
    let f = restamped(&cap, &d.path().join("v.cap"), |m| m.model.vocab_size = 128);
    device_refuses(&["generate", &f, "--prompt", "the"], &["v.cap"]);
    // A GGUF whose tokenizer has more tokens than the embedding has rows.
    let m = gguf_with(d.path(), "tok.gguf", &mut |kv, _| {
        let mut toks: Vec<String> = (0..=255u8)
            .map(|b| common::gpt2_byte_char(b).to_string())
            .collect();
        toks.push("extra".into());
        set_kv(kv, "tokenizer.ggml.tokens", Kv::Strs(toks));
    });
    host_refuses(
        &["pack", "--model", &m, "-o", s(&d.path().join("t.cap"))],
        &["257 tokens", "256 rows"],
    );
    // compress and eval refuse it too (they used to write a file the board refuses, and
    // to evaluate as if the extra token had a row).
    let out = d.path().join("c.cap");
    let calib = common::calib_text(d.path());
    let mut args = vec!["compress", "--model", &m, "-o", s(&out), "--ratio", "0.5"];
    let small = common::small_args(&calib, s(&d.path().join("cache")));
    args.extend(small.iter().map(String::as_str));
    host_refuses(&args, &[&m, "257 tokens", "256 rows"]);
    assert!(!out.exists());
    let text = text_file(d.path(), 100);
    host_refuses(
        &["eval", "--model", &m, "--text", &text, "--ctx", "16"],
        &[&m, "257 tokens", "256 rows"],
    );
}

/// A tokenizer with fewer tokens than the embedding has rows is accepted on purpose:
/// real models pad their embedding (Qwen2.5: 151,936 rows, 151,665 tokens in its
/// Hugging Face tokenizer). The padded rows are scored by the head like the others.
#[test]
fn a_tokenizer_smaller_than_the_embedding_is_accepted() {
    let d = tempfile::tempdir().unwrap();
    // 256 byte tokens, 300 embedding rows (all zeros: every row scores alike).
    let m = gguf_with(d.path(), "padded.gguf", &mut |_, tensors| {
        let e = tensors
            .iter_mut()
            .find(|t| t.0 == "token_embd.weight")
            .expect("an embedding");
        e.1 = vec![8, 300];
        e.3 = vec![0u8; 8 * 300 * 4];
    });
    let text = text_file(d.path(), 100);
    let eval = |model: &str| {
        let (c, out, err) = run(
            &host_bin(),
            &["eval", "--model", model, "--text", &text, "--ctx", "16"],
            &[],
        );
        assert_eq!(c, 0, "{model}: {err}");
        out
    };
    // Uniform over the 300 rows, not the 256 tokens.
    assert!(eval(&m).starts_with("PPL 300.0000"), "{}", eval(&m));
    let cap = d.path().join("padded.cap");
    let (c, _, err) = run(&host_bin(), &["pack", "--model", &m, "-o", s(&cap)], &[]);
    assert_eq!(c, 0, "{err}");
    assert!(eval(s(&cap)).starts_with("PPL 300.0000"));
    let (c, _, err) = run(
        &cap_device(),
        &["generate", s(&cap), "--prompt", "the", "-n", "2"],
        &[],
    );
    assert_eq!(c, 0, "{err}");
}

// --- 2. Sizes from flags, bounded by the text, the model and the target ------------

/// `compress --model M -o OUT LIMIT --calib CALIB` with the small evaluation and search
/// settings, `extra`'s `--flag value` pairs replacing theirs (clap takes a flag once).
fn compress_args(
    model: &str,
    out: &Path,
    calib: &str,
    limit: &[&str],
    extra: &[&str],
) -> Vec<String> {
    let cache = out.with_extension("cache");
    let mut v: Vec<String> = ["compress", "--model", model, "-o", s(out)]
        .iter()
        .chain(limit)
        .map(|x| x.to_string())
        .collect();
    v.extend(common::small_args(calib, s(&cache)));
    for pair in extra.chunks(2) {
        match v.iter().position(|a| a == pair[0]) {
            Some(i) => v[i + 1] = pair[1].to_string(),
            None => v.extend(pair.iter().map(|x| x.to_string())),
        }
    }
    v
}

/// [`compress_args`] with `--ratio 0.5`.
fn small_compress_args(model: &str, out: &Path, calib: &str, extra: &[&str]) -> Vec<String> {
    compress_args(model, out, calib, &["--ratio", "0.5"], extra)
}

fn refuses_compress(args: &[String], needles: &[&str]) -> String {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    host_refuses(&a, needles)
}

#[test]
fn calibration_is_bounded_by_the_texts_tokens() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let out = d.path().join("o.cap");
    // 200 tokens (one a byte; the tiny tokenizer adds no BOS).
    let calib = text_file(d.path(), 200);
    let before = entries(d.path());
    // The windows may overlap, but more tokens than the text has are not asked for:
    // 10 × 24 = 240 > 200 (the old code drew them, counting tokens several times).
    refuses_compress(
        &small_compress_args(&model, &out, &calib, &["--calib-samples", "10"]),
        &[
            &calib,
            "has 200 tokens",
            "--calib-samples × --calib-len = 10 × 24 = 240",
        ],
    );
    // Not even one sequence.
    refuses_compress(
        &small_compress_args(
            &model,
            &out,
            &calib,
            &["--calib-samples", "1", "--calib-len", "201"],
        ),
        &[
            &calib,
            "200 tokens",
            "fewer than one sample of --calib-len 201",
        ],
    );
    assert_eq!(entries(d.path()), before, "nothing written");
}

#[test]
fn compress_contexts_are_bounded_by_the_models_positions() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let out = d.path().join("o.cap");
    let calib = common::calib_text(d.path());
    let before = entries(d.path());
    // The tiny model has 256 positions; `eval --ctx 300` is refused the same way.
    for (flag, value) in [("--eval-ctx", "300"), ("--calib-len", "257")] {
        refuses_compress(
            &small_compress_args(&model, &out, &calib, &[flag, value]),
            &[&format!(
                "a context of {value} tokens exceeds the model's 256 positions (lower {flag})"
            )],
        );
    }
    // The default --eval-ctx (512) too.
    let args: Vec<String> = [
        "compress",
        "--model",
        &model,
        "-o",
        s(&out),
        "--ratio",
        "0.5",
        "--calib",
        &calib,
    ]
    .map(String::from)
    .to_vec();
    refuses_compress(
        &args,
        &["512 tokens exceeds the model's 256 positions (lower --eval-ctx)"],
    );
    // Data-free calibration (the model would write the sequences) is checked first too.
    let args: Vec<String> = [
        "compress",
        "--model",
        &model,
        "-o",
        s(&out),
        "--ratio",
        "0.5",
        "--eval-ctx",
        "32",
        "--calib-len",
        "300",
    ]
    .map(String::from)
    .to_vec();
    refuses_compress(
        &args,
        &["300 tokens exceeds the model's 256 positions (lower --calib-len)"],
    );
    assert_eq!(entries(d.path()), before, "nothing written");
}

#[test]
fn a_kv_cache_beyond_the_target_is_refused_before_compressing() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let out = d.path().join("o.cap");
    let calib = common::calib_text(d.path());
    let targets = d.path().join("targets");
    std::fs::create_dir(&targets).unwrap();
    // 1 MiB usable: the tiny model's f32 KV cache at ctx 256 is 2 layers × 2 × 64 × 4
    // bytes a position (see the message), 256 KiB; four sequences fill it.
    // 1 MiB usable; the tiny model's f32 KV cache takes 2 layers × 2 × 32 KV dims × 4
    // bytes = 512 bytes a position: 128 KiB at ctx 256, so 16 sequences need 2 MiB.
    common::write_profile(&targets, "small-board", 2 << 20, 1 << 20);
    let before = entries(d.path());
    let target = |name: &str, ctx: &str, batch: &str| {
        let limit = [
            "--target",
            name,
            "--targets-dir",
            s(&targets),
            "--ctx",
            ctx,
            "--batch",
            batch,
        ];
        compress_args(&model, &out, &calib, &limit, &[])
    };
    refuses_compress(
        &target("small-board", "256", "16"),
        &[
            "target small-board: the KV cache for --ctx 256 × --batch 16 (f32, 2 layers × 32 KV dims) \
             takes 2097152 bytes, more than the 1048576 usable bytes (2097152 total − 1048576 reserved); \
             lower --ctx or --batch",
        ],
    );
    // A product past the machine's integers is refused, not wrapped around (or, in a
    // debug build, a panic).
    refuses_compress(
        &target("small-board", &usize::MAX.to_string(), "2"),
        &["takes more than 2^64 bytes"],
    );
    // The built-in profile, with its own figures.
    refuses_compress(
        &target("host", "100000000000", "1"),
        &[
            "target host: the KV cache for --ctx 100000000000 × --batch 1",
            "takes 51200000000000 bytes",
        ],
    );
    assert_eq!(entries(d.path()), before, "nothing written");
}

/// `inspect` and `verify` map the file (as the board does) instead of reading it into
/// memory: under a data limit far below the file's size they still answer.
#[test]
fn inspect_and_verify_map_the_file_instead_of_reading_it() {
    let d = tempfile::tempdir().unwrap();
    let cap = packed(d.path());
    // The same file, grown to 1 GiB by a hole after its end.
    let big = d.path().join("big.cap");
    std::fs::copy(&cap, &big).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    // RLIMIT_DATA counts heap and anonymous maps, not a read-only file map: the old
    // `std::fs::read` of 1 GiB aborted with "memory allocation of 1073741824 bytes
    // failed".
    let limited = |args: &[&str]| {
        let out = Command::new("/usr/bin/prlimit")
            .arg(format!("--data={}", 256u64 << 20))
            .arg(host_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for cmd in ["inspect", "verify"] {
        let (c, _, err) = limited(&[cmd, &cap]);
        assert_eq!(c, 0, "{cmd} of the packed file: {err}");
        let (c, _, err) = limited(&[cmd, s(&big)]);
        assert!(!err.contains("memory allocation"), "{cmd}: {err}");
        assert!(!err.contains("panicked"), "{cmd}: {err}");
        assert_eq!(c, 1, "{cmd}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{cmd}: {err}");
        assert!(err.contains(s(&big)), "{cmd}: {err}");
    }
}
