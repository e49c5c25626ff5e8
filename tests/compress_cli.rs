//! `cap-host compress` end to end: the budget is exact for `--ratio`, `--budget` and
//! `--target` (the written file's linear sections never exceed it and the printed
//! totals are the file's), the stored perplexity is the written file's, a custom
//! device profile that forces about half of SmolLM2's linear weights out is met with
//! the KV cache, bad input fails cleanly with nothing written, and Gemma-3 compresses
//! with every method into files `cap-device` self-tests.

mod common;

use std::path::{Path, PathBuf};

use cap_format::CapFile;
use common::{
    METHODS, assert_clean_failure, calib_text, cap_host, compress_to, is_linear, run_json,
    small_compress, tiny, write_profile,
};
use serde_json::Value;

/// Checks the written file against the report: the linear sections' bytes, the file
/// size, the per-layer ranks and non-zeros, and the stored perplexity. Returns the
/// paper's parameter count of what was kept.
fn check_file(report: &Value, path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let file = CapFile::parse(&bytes).unwrap();
    file.verify_all().unwrap();
    let m = file.manifest();
    let linear: u64 = m
        .tensors
        .iter()
        .filter(|t| is_linear(&t.name))
        .map(|t| t.len)
        .sum();
    assert_eq!(linear, report["linear_bytes"].as_u64().unwrap());
    assert_eq!(bytes.len() as u64, report["file_bytes"].as_u64().unwrap());
    let c = m.compression.as_ref().expect("compression record");
    let rows = report["layers"].as_array().unwrap();
    assert_eq!(c.layers.len(), rows.len());
    let mut params = 0;
    for (l, r) in c.layers.iter().zip(rows) {
        assert_eq!(l.tensor, r["name"].as_str().unwrap());
        assert_eq!(u64::from(l.rank), r["rank"][0].as_u64().unwrap());
        assert_eq!(l.nnz, r["nnz"][0].as_u64().unwrap());
        let t = &m.tensors[file.find(&l.tensor).unwrap()];
        assert_eq!(t.len, r["bytes"].as_u64().unwrap(), "{}", l.tensor);
        params += u64::from(l.rank) * u64::from(t.rows + t.cols) + l.nnz;
    }
    let p = c.perplexity.as_ref().expect("perplexity record");
    assert!(same_f64(
        p.value,
        report["self_test"]["ppl"].as_f64().unwrap()
    ));
    params
}

/// Equal up to the last bits serde_json's (not correctly rounded) float parser may
/// change: 1e-12 relative.
fn same_f64(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

fn dense_params(report: &Value) -> u64 {
    report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["shape"][0].as_u64().unwrap() * r["shape"][1].as_u64().unwrap())
        .sum()
}

/// Memory a profile must have for `plan` (a `--dry-run --json` report) with
/// `linear_bytes` left for the linears.
fn needed(plan: &Value, linear_bytes: u64) -> u64 {
    let taken: u64 = plan["budget"]["breakdown"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[1].as_u64().unwrap())
        .sum();
    taken + linear_bytes
}

#[test]
fn budgets_are_exact_for_every_method_and_budget_kind() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let cache = dir.path().join("rpca").display().to_string();
    for model in ["llama-tied", "llama3-scaled"] {
        let m = tiny(model);
        let out = dir.path().join(format!("{model}.cap"));
        let out_s = out.display().to_string();
        let base = |extra: &[&str]| small_compress(&m, &out_s, &calib, &cache, extra);
        // The model's fixed costs, from a dry run.
        let plan_args = base(&["--budget", "1000000000", "--dry-run"]);
        let plan = run_json(&plan_args);
        assert!(!out.exists(), "--dry-run wrote a file");
        let fixed = &plan["fixed"];
        let file_fixed = fixed["dense_tensor_bytes"].as_u64().unwrap()
            + fixed["file_overhead_bytes"].as_u64().unwrap();
        let half_linears = fixed["linear_dense_bytes"].as_u64().unwrap() / 2;
        let file_budget = file_fixed + half_linears;

        let tdir = dir.path().join("targets");
        std::fs::create_dir_all(&tdir).unwrap();
        let tplan_args = base(&["--target", "host", "--ctx", "64", "--dry-run"]);
        let tplan = run_json(&tplan_args);
        let reserved = 1 << 20;
        let total = needed(&tplan, half_linears) + reserved;
        write_profile(&tdir, "tiny-board", total, reserved);
        let tdir_s = tdir.display().to_string();

        for method in METHODS {
            // The paper's ratio: kept parameters ≤ ⌊0.5 · dense⌋.
            let mut a = base(method);
            a.extend(["--ratio", "0.5"].map(String::from));
            let r = run_json(&a);
            let kept = check_file(&r, &out);
            assert!(
                kept <= dense_params(&r) / 2,
                "{method:?}: {kept} params kept"
            );
            assert_eq!(kept, r["linear_cost"].as_u64().unwrap());
            // A file budget: the whole file within it.
            let mut a = base(method);
            let fb = file_budget.to_string();
            a.extend(["--budget".to_string(), fb]);
            let r = run_json(&a);
            check_file(&r, &out);
            assert!(
                r["file_bytes"].as_u64().unwrap() <= file_budget,
                "{method:?}: {r}"
            );
            assert!(r["linear_bytes"].as_u64().unwrap() <= r["budget"]["limit"].as_u64().unwrap());
            // A device profile: file + KV cache + scratch + runtime within its memory.
            let mut a = base(method);
            a.extend(
                [
                    "--target",
                    "tiny-board",
                    "--targets-dir",
                    &tdir_s,
                    "--ctx",
                    "64",
                ]
                .map(String::from),
            );
            let r = run_json(&a);
            check_file(&r, &out);
            let linear = r["linear_bytes"].as_u64().unwrap();
            assert!(
                linear <= r["budget"]["limit"].as_u64().unwrap(),
                "{method:?}: {r}"
            );
            // Independently: 2 layers × (k, v) × ctx 64 × kv_dim 32 × 4 bytes.
            let kv = 2 * 2 * 64 * 32 * 4;
            let scratch_runtime: u64 = r["budget"]["breakdown"].as_array().unwrap()[1..3]
                .iter()
                .map(|e| e[1].as_u64().unwrap())
                .sum();
            assert!(
                r["file_bytes"].as_u64().unwrap() + kv + scratch_runtime <= total - reserved,
                "{method:?}: does not fit the board"
            );
        }
    }
}

/// Runs `cap-device selftest path` and asserts that it passes: the device recomputes
/// the perplexity the host stored (within its own tolerance) and scores tokens decoded
/// one at a time as in a batch.
fn assert_device_selftest(device: &Path, path: &Path) {
    let out = std::process::Command::new(device)
        .args([
            "selftest",
            &path.display().to_string(),
            "--json",
            "--threads",
            "2",
        ])
        .output()
        .expect("run cap-device");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cap-device selftest failed: {err}");
    let s: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(s["pass"], true, "{s}");
    assert_eq!(s["decode_check_pass"], true, "{s}");
}

/// Gemma-3 (the tiny GGUF: 6 layers, q/k norms, norms after attention and MLP, layers
/// 0–4 local with a window of 8, so the 32-token evaluation windows slide) with every
/// method at `--ratio 0.5`, then with a device profile: each file verifies, holds the
/// linear bytes the report gives, and passes `cap-device selftest`.
#[test]
fn gemma3_compresses_with_every_method_and_self_tests() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let cache = dir.path().join("rpca").display().to_string();
    let device = common::cap_device();
    let m = tiny("gemma3");
    let out = dir.path().join("gemma3.cap");
    let out_s = out.display().to_string();
    let base = |extra: &[&str]| small_compress(&m, &out_s, &calib, &cache, extra);
    for method in METHODS {
        let mut a = base(method);
        a.extend(["--ratio", "0.5"].map(String::from));
        let r = run_json(&a);
        let kept = check_file(&r, &out);
        // 6 layers × 7 linears: every one of them went through the method.
        assert_eq!(r["layers"].as_array().unwrap().len(), 42, "{method:?}");
        assert!(
            kept <= dense_params(&r) / 2,
            "{method:?}: {kept} params kept"
        );
        assert_eq!(kept, r["linear_cost"].as_u64().unwrap());
        assert_device_selftest(&device, &out);
        std::fs::remove_file(&out).unwrap();
    }
    // A device profile with room for about half the dense linear bytes.
    let plan = run_json(&base(&["--budget", "1000000000", "--dry-run"]));
    let half_linears = plan["fixed"]["linear_dense_bytes"].as_u64().unwrap() / 2;
    let tplan = run_json(&base(&["--target", "host", "--ctx", "64", "--dry-run"]));
    let reserved = 1 << 20;
    let total = needed(&tplan, half_linears) + reserved;
    let tdir = dir.path().join("targets");
    std::fs::create_dir_all(&tdir).unwrap();
    write_profile(&tdir, "tiny-board", total, reserved);
    let tdir_s = tdir.display().to_string();
    let r = run_json(&base(&[
        "--target",
        "tiny-board",
        "--targets-dir",
        &tdir_s,
        "--ctx",
        "64",
    ]));
    check_file(&r, &out);
    let linear = r["linear_bytes"].as_u64().unwrap();
    assert!(linear <= r["budget"]["limit"].as_u64().unwrap(), "{r}");
    // Independently: 6 layers × (k, v) × ctx 64 × kv_dim 32 × 4 bytes (local layers
    // keep every position too).
    let kv = 6 * 2 * 64 * 32 * 4;
    let br = r["budget"]["breakdown"].as_array().unwrap();
    assert_eq!(br[0][1].as_u64().unwrap(), kv, "{r}");
    let scratch_runtime: u64 = br[1..3].iter().map(|e| e[1].as_u64().unwrap()).sum();
    assert!(
        r["file_bytes"].as_u64().unwrap() + kv + scratch_runtime <= total - reserved,
        "does not fit the board: {r}"
    );
    assert_device_selftest(&device, &out);
}

#[test]
fn the_stored_perplexity_is_the_written_files() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let cache = dir.path().join("rpca").display().to_string();
    let out = dir.path().join("t.cap");
    let (m, o) = (tiny("llama-tied"), out.display().to_string());
    let r = run_json(&small_compress(&m, &o, &calib, &cache, &["--ratio", "0.6"]));
    let bytes = std::fs::read(&out).unwrap();
    let file = CapFile::parse(&bytes).unwrap();
    let c = file.manifest().compression.clone().unwrap();
    let p = c.perplexity.unwrap();
    let text = dir.path().join("selftest.txt");
    std::fs::write(&text, &c.self_test_text).unwrap();
    let e = run_json(&[
        "eval",
        "--model",
        &o,
        "--text",
        &text.display().to_string(),
        "--ctx",
        &p.ctx.to_string(),
        "--max-windows",
        &p.windows.to_string(),
        "--threads",
        "2",
        "--protocol",
        "llama-cpp",
        "--json",
    ]);
    // Same file, text, windows, protocol and threads: the same sums in the same order.
    assert!(
        same_f64(e["ppl"].as_f64().unwrap(), p.value),
        "{e} vs {}",
        p.value
    );
    assert_eq!(e["windows"].as_u64().unwrap(), u64::from(p.windows));
    assert!(r["dense_eval"]["ppl"].as_f64().unwrap() > 1.0);
}

#[test]
fn smollm2_target_that_forces_half_the_linears_out_is_met() {
    let Some(model) = common::real_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let m = model.display().to_string();
    let c4 = common::data_dir()
        .join("c4/c4_sample.json")
        .display()
        .to_string();
    let out = dir.path().join("smol.cap");
    let o = out.display().to_string();
    let common_args = [
        "--calib",
        &c4,
        "--calib-samples",
        "4",
        "--calib-len",
        "128",
        "--eval-ctx",
        "128",
        "--eval-windows",
        "2",
        "--threads",
        "2",
        "--method",
        "wanda",
        "--ctx",
        "2048",
    ];
    let compress = ["compress", "--model", &m, "-o", &o, "--json"];
    let plan = run_json(
        &[
            &compress[..],
            &["--target", "host", "--dry-run"],
            &common_args,
        ]
        .concat(),
    );
    let linear_dense = plan["fixed"]["linear_dense_bytes"].as_u64().unwrap();
    let reserved = 256 << 20;
    let total = needed(&plan, linear_dense / 2) + reserved;
    let tdir = dir.path().join("targets");
    std::fs::create_dir_all(&tdir).unwrap();
    write_profile(&tdir, "half-board", total, reserved);
    let td = tdir.display().to_string();
    let target = ["--target", "half-board", "--targets-dir", &td];
    let r = run_json(&[&compress[..], &target, &common_args].concat());
    check_file(&r, &out);
    let linear = r["linear_bytes"].as_u64().unwrap();
    let limit = r["budget"]["limit"].as_u64().unwrap();
    assert!(linear <= limit);
    // About half the dense f16 linear bytes (the uniform rule fills all but a sliver).
    let frac = linear as f64 / linear_dense as f64;
    assert!((0.49..=0.5).contains(&frac), "linears at {frac} of dense");
    // File + f32 KV cache (30 layers × 2 × 2048 × 192 × 4, computed here) + the
    // scratch and runtime terms fit the usable memory.
    let kv: u64 = 30 * 2 * 2048 * 192 * 4;
    let br = r["budget"]["breakdown"].as_array().unwrap();
    assert_eq!(br[0][1].as_u64().unwrap(), kv);
    let rest: u64 = br[1..3].iter().map(|e| e[1].as_u64().unwrap()).sum();
    assert!(r["file_bytes"].as_u64().unwrap() + kv + rest <= total - reserved);
    // And the result is a working model: the held-out PPL is finite and above dense.
    let ppl = r["eval"]["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl >= r["dense_eval"]["ppl"].as_f64().unwrap());
    // The file stores its self-test figure (llama.cpp's rule on the same windows).
    let bytes = std::fs::read(&out).unwrap();
    let rec = CapFile::parse(&bytes)
        .unwrap()
        .manifest()
        .compression
        .clone()
        .unwrap();
    let stored = rec.perplexity.unwrap();
    assert_eq!(stored.protocol, cap_format::PerplexityProtocol::LlamaCpp);
    assert!(same_f64(
        stored.value,
        r["self_test"]["ppl"].as_f64().unwrap()
    ));
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "txt"))
        .collect()
}

#[test]
fn bad_input_fails_cleanly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let work = dir.path().join("out");
    std::fs::create_dir_all(&work).unwrap();
    let o = work.join("x.cap").display().to_string();
    let m = tiny("llama-tied");
    let cache = dir.path().join("rpca").display().to_string();
    let base = [
        "compress",
        "--model",
        &m,
        "-o",
        &o,
        "--calib",
        &calib,
        "--cache-dir",
        &cache,
        // Within the tiny model's 256 positions (the default 512 is refused first).
        "--eval-ctx",
        "32",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            with(&["--target", "no-such-board"]),
            vec![
                "unknown target `no-such-board`",
                "jetson-orin-nano-8gb",
                "raspberry-pi-5-8gb",
            ],
        ),
        (
            with(&["--ratio", "0.5", "--calib-len", "1000"]),
            vec![
                "a context of 1000 tokens exceeds the model's 256 positions",
                "--calib-len",
            ],
        ),
        (
            with(&["--budget", "1000"]),
            vec!["below what the model needs", "bytes are missing"],
        ),
        (with(&["--ratio", "0"]), vec!["--ratio must be in (0, 1]"]),
        (with(&["--ratio", "1.5"]), vec!["--ratio must be in (0, 1]"]),
        (with(&["--ratio", "NaN"]), vec!["--ratio must be in (0, 1]"]),
    ];
    for (args, needles) in cases {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        assert_clean_failure(&a, &needles);
        assert!(
            leftovers(&work).is_empty(),
            "{a:?} left {:?}",
            leftovers(&work)
        );
    }
    // Two budgets at once is a usage error (clap's exit code 2), also writing nothing.
    let a = with(&["--ratio", "0.5", "--budget", "100"]);
    let (code, _, err) = cap_host(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 2, "{err}");
    assert!(leftovers(&work).is_empty());
}

/// `cap-host compress` with `XDG_CACHE_HOME` (the data-free calibration cache) and
/// `SOURCE_DATE_EPOCH` set; returns (exit code, stdout, stderr).
fn cap_host_env<S: AsRef<str>>(cache_home: &Path, args: &[S]) -> (i32, String, String) {
    let args: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
    let epoch = std::ffi::OsStr::new("1700000000");
    common::cap_host_with(
        &[
            ("XDG_CACHE_HOME", cache_home.as_os_str()),
            ("SOURCE_DATE_EPOCH", epoch),
        ],
        &args,
    )
}

#[test]
fn data_free_calibration_without_calib() {
    let dir = tempfile::tempdir().unwrap();
    // A model whose tokenizer has no BOS or EOS cannot generate: one clear line.
    let o = dir.path().join("tiny.cap").display().to_string();
    let (code, _, err) = cap_host_env(
        dir.path(),
        &[
            "compress",
            "--model",
            &tiny("llama-tied"),
            "-o",
            &o,
            "--ratio",
            "0.5",
            "--eval-ctx",
            "32",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("BOS or EOS") && err.contains("--calib"),
        "{err}"
    );
    assert!(!Path::new(&o).exists());
    // SmolLM2 calibrates on its own text; the second run reads the cached text and
    // writes the same bytes; the held-out text is the shipped WikiText-2.
    let Some(model) = common::real_model() else {
        return;
    };
    let m = model.display().to_string();
    let mut files = Vec::new();
    for (i, how) in ["generated", "cached"].iter().enumerate() {
        let o = dir.path().join(format!("s{i}.cap")).display().to_string();
        let args = compress_to(
            &m,
            &o,
            &[
                "--ratio",
                "0.5",
                "--method",
                "wanda",
                "--calib-samples",
                "3",
                "--calib-len",
                "16",
                "--eval-ctx",
                "64",
                "--eval-windows",
                "1",
                "--no-source-eval",
                "--json",
            ],
        );
        let (code, out, err) = cap_host_env(dir.path(), &args);
        assert_eq!(code, 0, "{err}");
        let r: Value = serde_json::from_str(out.trim()).unwrap();
        let cal = r["calibration"].as_str().unwrap();
        assert!(
            cal.starts_with("data-free: 3 × 16 tokens") && cal.contains(how),
            "{cal}"
        );
        assert!(
            r["eval_text"].as_str().unwrap().contains("WikiText-2"),
            "{r}"
        );
        assert!(r["eval"]["ppl"].as_f64().unwrap().is_finite());
        files.push(std::fs::read(&o).unwrap());
    }
    assert!(
        files[0] == files[1],
        "the cached calibration text gave another file"
    );
    let cached: Vec<_> = std::fs::read_dir(dir.path().join("cap/selfcalib"))
        .unwrap()
        .collect();
    assert_eq!(cached.len(), 1);
}

/// `--min-tokens-per-s` with `--target`: the linears' limit is the closed form
/// `⌊bandwidth · 0.4 / N⌋ − dense bytes read − KV cache at half the context`, the
/// written file meets it, the report's prediction is that formula applied to the
/// written bytes, and impossible or malformed requirements fail cleanly.
#[test]
fn a_decode_speed_requirement_bounds_the_linears() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let cache = dir.path().join("rpca").display().to_string();
    let work = dir.path().join("out");
    std::fs::create_dir_all(&work).unwrap();
    let out = work.join("speed.cap");
    let o = out.display().to_string();
    let m = tiny("llama-tied");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v = small_compress(&m, &o, &calib, &cache, extra);
        v.extend(["--method", "magnitude", "--target", "host", "--ctx", "64"].map(String::from));
        v
    };
    let plan_args = base(&["--dry-run"]);
    let plan = run_json(&plan_args);
    let fixed = &plan["fixed"];
    let dense_read = fixed["dense_read_bytes"].as_u64().unwrap();
    let linear_dense = fixed["linear_dense_bytes"].as_u64().unwrap();
    // The tied embedding is the head: every dense tensor is read in full.
    assert!(dense_read > 0 && dense_read <= fixed["dense_tensor_bytes"].as_u64().unwrap());
    // Independently: 2 layers × (k, v) × 32 positions (half of ctx 64) × kv_dim 32 × 4.
    let kv_read: u64 = 2 * 2 * 32 * 32 * 4;
    let usable_bw = 24.9e9 * 0.4; // targets/host.toml's bandwidth × the planned share
    // A speed that leaves about half the dense linear bytes, as a whole number.
    let n = (usable_bw / (dense_read + kv_read + linear_dense / 2) as f64).floor();
    let ns = format!("{n}");
    let r = run_json(&base(&["--min-tokens-per-s", &ns]));
    check_file(&r, &out);
    let want_limit = (usable_bw / n).floor() as u64 - dense_read - kv_read;
    assert_eq!(
        r["budget"]["limit"].as_u64().unwrap(),
        want_limit,
        "{}",
        r["budget"]
    );
    assert_eq!(
        r["budget"]["speed"]["linear_limit"].as_u64().unwrap(),
        want_limit
    );
    let linear = r["linear_bytes"].as_u64().unwrap();
    assert!(
        linear <= want_limit && linear > want_limit / 2,
        "{linear} of {want_limit}"
    );
    let s = &r["speed"];
    assert_eq!(
        s["bytes_per_token"].as_u64().unwrap(),
        linear + dense_read + kv_read
    );
    let tps = s["tokens_per_s"].as_f64().unwrap();
    assert!(tps >= n, "predicted {tps} < required {n}");
    let want_tps = usable_bw / (linear + dense_read + kv_read) as f64;
    assert!(
        (tps - want_tps).abs() <= 1e-9 * want_tps,
        "{tps} vs {want_tps}"
    );
    assert!(s["dense_tokens_per_s"].as_f64().unwrap() < n);
    std::fs::remove_file(&out).unwrap();

    // Out of reach: even empty linears read more than N allows.
    assert_clean_failure(
        &base(&["--min-tokens-per-s", "1e12"]),
        &["out of reach", "with every compressed layer empty"],
    );
    for bad in ["0", "-5", "NaN", "inf"] {
        assert_clean_failure(
            &base(&[&format!("--min-tokens-per-s={bad}")]),
            &["--min-tokens-per-s must be a positive number"],
        );
    }
    assert!(leftovers(&work).is_empty(), "{:?}", leftovers(&work));
    // Without --target there is no bandwidth to predict from.
    assert_clean_failure(
        &compress_to(&m, &o, &["--ratio", "0.5", "--min-tokens-per-s", "10"]),
        &["--min-tokens-per-s needs --target"],
    );
    assert!(leftovers(&work).is_empty(), "{:?}", leftovers(&work));
}

/// SmolLM2 on the Orin Nano profile: the speed bound of the README's main command in
/// closed form from the model's shape (a tied 49152 × 576 f16 embedding as the head,
/// 61 f32 norm vectors of 576, an f32 KV cache of 30 layers × 2 × 192 at 1024
/// positions) and the profile's 68 GB/s.
#[test]
fn smollm2_speed_bound_on_the_orin_nano_is_the_closed_form() {
    let Some(model) = common::real_model() else {
        return;
    };
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("x.cap").display().to_string();
    let plan = run_json(&[
        "compress",
        "--model",
        &m,
        "-o",
        &o,
        "--target",
        "jetson-orin-nano-8gb",
        "--min-tokens-per-s",
        "120",
        "--dry-run",
        "--json",
    ]);
    let dense_read: u64 = 49152 * 576 * 2 + 61 * 576 * 4;
    let kv_read: u64 = 30 * 2 * 192 * 1024 * 4;
    assert_eq!(
        plan["fixed"]["dense_read_bytes"].as_u64().unwrap(),
        dense_read
    );
    let limit = (68.0e9 * 0.4 / 120.0f64).floor() as u64 - dense_read - kv_read;
    assert_eq!(plan["budget"]["limit"].as_u64().unwrap(), limit);
    assert_eq!(limit, 122_717_098);
}
