//! `cap-host pack`, `verify` and `inspect` on `.cap` files, end to end through the
//! binary: round trip of the tiny fixtures, a corrupted byte, a truncated file, and an
//! output that cannot be written.

mod common;

use common::{assert_clean_failure, cap_host, root};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/tiny").join(name)
}

fn json(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Packs `src` with the CLI, returns the `.cap` path and pack's JSON report.
fn pack(src: &std::path::Path, dir: &std::path::Path, dtype: &str) -> (PathBuf, Value) {
    let out = dir.join(format!("m-{dtype}.cap"));
    let (code, stdout, err) = cap_host(&[
        "pack",
        "--model",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--dtype",
        dtype,
        "--json",
    ]);
    assert_eq!(code, 0, "pack failed: {err}");
    (out, json(&stdout))
}

#[test]
fn pack_verify_inspect_round_trip() {
    let d = tempfile::tempdir().unwrap();
    for (src, tokenizer) in [
        (fixture("llama-tied").join("llama-tied.gguf"), true),
        (fixture("qwen2"), false),
        (fixture("llama-tied-bf16-sharded"), false),
    ] {
        for dtype in ["f16", "bf16", "f32"] {
            let (cap, rep) = pack(&src, d.path(), dtype);
            let len = std::fs::metadata(&cap).unwrap().len();
            assert_eq!(rep["file_bytes"].as_u64(), Some(len), "{}", src.display());
            assert_eq!(rep["dtype"], dtype);
            assert_eq!(rep["tokenizer"], tokenizer, "{}", src.display());

            let (code, out, err) = cap_host(&["verify", cap.to_str().unwrap(), "--json"]);
            assert_eq!(code, 0, "verify failed: {err}");
            let v = json(&out);
            assert_eq!(v["tensors"], rep["tensors"]);
            assert_eq!(v["file_bytes"].as_u64(), Some(len));

            // `.cap` inspection agrees with the source's own inspection.
            let (code, out, err) = cap_host(&["inspect", cap.to_str().unwrap(), "--json"]);
            assert_eq!(code, 0, "inspect failed: {err}");
            let i = json(&out);
            let (code, out, err) = cap_host(&["inspect", src.to_str().unwrap(), "--json"]);
            assert_eq!(code, 0, "inspect failed: {err}");
            let s = json(&out);
            assert_eq!(i["architecture"], s["arch"]);
            let dim = |k: &str| s["dims"][k].as_str().unwrap().parse::<u64>().unwrap();
            assert_eq!(i["num_layers"].as_u64(), Some(dim("n_layers")));
            assert_eq!(i["hidden_size"].as_u64(), Some(dim("hidden_size")));
            assert_eq!(i["vocab_size"].as_u64(), Some(dim("vocab_size")));
            assert_eq!(i["stored_values"], rep["params"]);
            assert_eq!(i["stored_values"], s["params"], "{}", src.display());
            assert_eq!(i["file_bytes"].as_u64(), Some(len));
        }
    }
}

#[test]
fn pack_is_deterministic_but_for_the_time() {
    // Same input, same sections and manifest apart from `created_unix`: compare the
    // directories and the data regions byte for byte.
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let src = fixture("llama3-scaled").join("llama3-scaled.gguf");
    let (a, _) = pack(&src, d1.path(), "f16");
    let (b, _) = pack(&src, d2.path(), "f16");
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    let fa = cap_format::CapFile::parse(&a).unwrap();
    let fb = cap_format::CapFile::parse(&b).unwrap();
    assert_eq!(fa.manifest().tensors, fb.manifest().tensors);
    assert_eq!(fa.manifest().tokenizer, fb.manifest().tokenizer);
    let h = fa.header();
    let data = h.data_offset as usize..(h.data_offset + h.data_len) as usize;
    assert!(a[data.clone()] == b[data], "tensor sections differ");
}

#[test]
fn verify_names_the_tensor_of_a_flipped_byte() {
    let d = tempfile::tempdir().unwrap();
    let (cap, _) = pack(&fixture("mistral"), d.path(), "f32");
    let mut bytes = std::fs::read(&cap).unwrap();
    let h = *cap_format::CapFile::parse(&bytes).unwrap().header();
    // Inside the data region, well away from the header and the manifest.
    let at = (h.data_offset + h.data_len / 2) as usize;
    bytes[at] ^= 0x10;
    let bad = d.path().join("bad.cap");
    std::fs::write(&bad, &bytes).unwrap();
    assert_clean_failure(&["verify", bad.to_str().unwrap()], &["bad.cap", "tensor"]);
}

#[test]
fn verify_rejects_a_truncated_file_and_a_non_cap_file() {
    let d = tempfile::tempdir().unwrap();
    let (cap, _) = pack(&fixture("qwen2"), d.path(), "f16");
    let bytes = std::fs::read(&cap).unwrap();
    for cut in [4, 40, bytes.len() / 2, bytes.len() - 1] {
        let t = d.path().join("cut.cap");
        std::fs::write(&t, &bytes[..cut]).unwrap();
        assert_clean_failure(&["verify", t.to_str().unwrap()], &["cut.cap"]);
    }
    let gguf = fixture("llama-tied").join("llama-tied.gguf");
    let (code, _out, err) = cap_host(&["verify", gguf.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("llama-tied.gguf"), "{err}");
}

#[test]
fn pack_into_a_missing_directory_fails_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("no/such/dir/m.cap");
    let src = fixture("qwen2");
    assert_clean_failure(
        &[
            "pack",
            "--model",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &["m.cap"],
    );
    assert!(!out.exists());
}

/// Runs `cap-host` with `SOURCE_DATE_EPOCH` set; returns (exit code, stderr).
fn cap_host_at(epoch: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cap-host"))
        .env("SOURCE_DATE_EPOCH", epoch)
        .args(args)
        .output()
        .expect("run cap-host");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn files_are_byte_identical_under_source_date_epoch() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("llama3-scaled").join("llama3-scaled.gguf");
    let src = src.to_str().unwrap();
    let calib = common::calib_text(d.path());
    let cache = d.path().join("rpca").display().to_string();
    let out = |n: &str| d.path().join(n).display().to_string();
    let (a, b, c, e) = (out("a.cap"), out("b.cap"), out("c.cap"), out("e.cap"));
    for (o, epoch) in [(&a, "1700000000"), (&b, "1700000000"), (&c, "1700000001")] {
        let (code, err) = cap_host_at(epoch, &["pack", "--model", src, "-o", o]);
        assert_eq!(code, 0, "pack failed: {err}");
    }
    let (a, b, c) = (
        std::fs::read(a).unwrap(),
        std::fs::read(b).unwrap(),
        std::fs::read(c).unwrap(),
    );
    assert!(a == b, "two packs at the same SOURCE_DATE_EPOCH differ");
    assert!(a != c, "the creation time is not stamped");
    let created = cap_format::CapFile::parse(&a)
        .unwrap()
        .manifest()
        .provenance
        .created_unix;
    assert_eq!(created, Some(1_700_000_000));
    // compress: the same twice, for a method with a search and one without.
    for method in ["cap", "wanda"] {
        let mut files = Vec::new();
        for n in ["x.cap", "y.cap"] {
            let o = out(&format!("{method}-{n}"));
            let args = [
                &[
                    "compress", "--model", src, "-o", &o, "--ratio", "0.5", "--method", method,
                    "--calib", &calib,
                ][..],
                &common::SMALL_EVAL,
                &["--threads", "2", "--cache-dir", &cache],
            ]
            .concat();
            let (code, err) = cap_host_at("1700000000", &args);
            assert_eq!(code, 0, "compress failed: {err}");
            files.push(std::fs::read(&o).unwrap());
        }
        assert!(files[0] == files[1], "two {method} runs differ");
    }
    let (code, err) = cap_host_at("yesterday", &["pack", "--model", src, "-o", &e]);
    assert_eq!(code, 1, "a bad SOURCE_DATE_EPOCH was accepted: {err}");
    assert!(err.contains("SOURCE_DATE_EPOCH"), "{err}");
    assert!(!Path::new(&e).exists(), "a file was written");
}
