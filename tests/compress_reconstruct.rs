//! `compress --reconstruct`: block reconstruction after pruning keeps every mask the
//! pruning chose and changes the kept values, lowers each step's error on the held-out
//! calibration sequences or leaves the block as it was, writes a file that passes its
//! self-test, and refuses what it cannot do in one line.

mod common;

use std::path::Path;

use cap_format::{CapFile, SparseView, TensorData};
use common::{assert_clean_failure, calib_text, is_linear, run_json, self_test, small_compress};
use serde_json::Value;

/// Each sparse linear of `path`: its name, bitmask and stored value bytes.
fn bitmasks(path: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = CapFile::parse(&bytes).unwrap();
    let mut out = vec![];
    for (i, t) in file.manifest().tensors.iter().enumerate() {
        if !is_linear(&t.name) {
            continue;
        }
        match file.tensor(i).unwrap().data().unwrap() {
            TensorData::Sparse(SparseView::Bitmask { mask, values }) => {
                out.push((t.name.clone(), mask.to_vec(), values.bytes.to_vec()));
            }
            _ => panic!("{}: expected a bitmask at ratio 0.5", t.name),
        }
    }
    out
}

/// On a llama and on Gemma-3 (q/k norms, post-norms, GELU, local layers; the unit
/// tests in `reconstruct.rs` cover Qwen2's biases):
/// the reconstructed file has the plain run's masks in block 0, other values, one log per
/// block and step whose held-out error never rises, at least one step that lowers
/// it, and it passes `cap-device selftest`.
#[test]
fn reconstruction_keeps_the_masks_and_lowers_the_block_error() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let cache = dir.path().join("rpca").display().to_string();
    for name in ["llama-tied", "gemma3"] {
        let model = common::tiny(name);
        let plain = dir.path().join(format!("{name}-plain.cap"));
        let recon = dir.path().join(format!("{name}-recon.cap"));
        let base = ["--ratio", "0.5", "--method", "sparsegpt"];
        let extra = [
            "--reconstruct",
            "attn,mlp,block",
            "--reconstruct-epochs",
            "3",
            "--reconstruct-lr",
            "1e-2",
        ];
        let r0 = run_json(&small_compress(
            &model,
            &plain.display().to_string(),
            &calib,
            &cache,
            &base,
        ));
        assert_eq!(r0["reconstruction"], Value::Array(vec![]));
        let r = run_json(&small_compress(
            &model,
            &recon.display().to_string(),
            &calib,
            &cache,
            &[&base[..], &extra[..]].concat(),
        ));
        let logs = r["reconstruction"].as_array().unwrap();
        let blocks = bitmasks(&plain).len() / 7;
        assert_eq!(logs.len(), 3 * blocks, "{name}: {logs:?}");
        let mut improved = 0;
        for l in logs {
            let (b, a) = (
                l["heldout_before"].as_f64().unwrap(),
                l["heldout_after"].as_f64().unwrap(),
            );
            assert!(a <= b, "{name}: {l}");
            improved += usize::from(a < b);
        }
        assert!(improved > 0, "{name}: no step helped: {logs:?}");
        // Block 0's masks are chosen from the same inputs in both runs (later blocks'
        // inputs come from the reconstructed blocks before them, so their masks may
        // differ): the same masks, other values.
        let (p, q) = (bitmasks(&plain), bitmasks(&recon));
        assert_eq!(p.len(), q.len());
        let mut changed = 0;
        for ((n, mp, vp), (_, mq, vq)) in p.iter().zip(&q) {
            if n.starts_with("blk.0.") {
                assert_eq!(mp, mq, "{name} {n}: the mask changed");
                changed += usize::from(vp != vq);
            }
        }
        assert!(changed > 0, "{name}: no value of block 0 changed");
        self_test(&recon);

        // Aimed at the dense model's outputs: block 0's inputs are the dense model's
        // own, so it is refit exactly as above; later blocks' targets come from the
        // dense stream, which the pruned one has left, so they differ.
        let global = dir.path().join(format!("{name}-global.cap"));
        run_json(&small_compress(
            &model,
            &global.display().to_string(),
            &calib,
            &cache,
            &[&base[..], &extra[..], &["--reconstruct-target", "model"]].concat(),
        ));
        let g = bitmasks(&global);
        let mut later_differ = false;
        for ((n, mq, vq), (_, mg, vg)) in q.iter().zip(&g) {
            if n.starts_with("blk.0.") {
                assert!(mq == mg && vq == vg, "{name} {n}: block 0 differs");
            } else {
                later_differ |= mq != mg || vq != vg;
            }
        }
        assert!(
            later_differ,
            "{name}: the dense model's stream was not followed"
        );
        self_test(&global);
    }
}

/// What reconstruction cannot do fails in one line, before any work, nothing written.
#[test]
fn reconstruction_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let cache = dir.path().join("rpca").display().to_string();
    let model = common::tiny("llama-tied");
    let out = dir.path().join("bad.cap");
    let out_s = out.display().to_string();
    for (extra, needles) in [
        (
            &["--method", "wanda", "--reconstruct", "block"][..],
            &["--reconstruct", "wanda"][..],
        ),
        (
            &["--variant", "paper", "--reconstruct", "block"],
            &["--reconstruct", "paper"],
        ),
        (
            &["--values", "q4", "--reconstruct", "block"],
            &["--reconstruct", "quantized"],
        ),
        (
            &["--reconstruct", "block", "--reconstruct-epochs", "0"],
            &["--reconstruct-epochs"],
        ),
        (
            &["--reconstruct", "block", "--reconstruct-lr", "0"],
            &["--reconstruct-lr"],
        ),
    ] {
        let mut v = small_compress(&model, &out_s, &calib, &cache, &["--ratio", "0.5"]);
        v.extend(extra.iter().map(|s| s.to_string()));
        assert_clean_failure(&v, needles);
        assert!(!out.exists());
    }
    // An unknown step is a usage error (clap's exit status 2) naming the step.
    let mut v = small_compress(&model, &out_s, &calib, &cache, &["--ratio", "0.5"]);
    v.extend(["--reconstruct", "attn,ffn"].map(String::from));
    let args: Vec<&str> = v.iter().map(String::as_str).collect();
    let (code, _, err) = common::cap_host(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ffn"), "{err}");
    assert!(!out.exists());
}

/// `--distill-epochs` (end-to-end distillation after pruning): on a llama and on
/// Gemma-3 the file keeps every mask of the plain run (distillation runs after all
/// blocks are pruned, so every block's masks are the plain run's), changes kept values,
/// logs a held-out divergence that the kept epoch does not raise, and passes its
/// self-test.
#[test]
fn distillation_keeps_every_mask_and_passes_the_self_test() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let cache = dir.path().join("rpca").display().to_string();
    for name in ["llama-tied", "gemma3"] {
        let model = common::tiny(name);
        let plain = dir.path().join(format!("{name}-plain.cap"));
        let dist = dir.path().join(format!("{name}-distill.cap"));
        let base = ["--ratio", "0.5", "--method", "sparsegpt"];
        let r0 = run_json(&small_compress(
            &model,
            &plain.display().to_string(),
            &calib,
            &cache,
            &base,
        ));
        assert!(r0.get("distillation").is_none(), "{r0}");
        let extra = ["--distill-epochs", "3", "--distill-lr", "1e-2"];
        let r = run_json(&small_compress(
            &model,
            &dist.display().to_string(),
            &calib,
            &cache,
            &[&base[..], &extra[..]].concat(),
        ));
        let log = &r["distillation"];
        let held: Vec<f64> = log["heldout"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(held.len(), 4, "{name}: {log}");
        let kept = log["kept_epoch"].as_u64().unwrap() as usize;
        assert!(held[kept] <= held[0], "{name}: {log}");
        let (p, q) = (bitmasks(&plain), bitmasks(&dist));
        assert_eq!(p.len(), q.len());
        let mut changed = 0;
        for ((n, mp, vp), (_, mq, vq)) in p.iter().zip(&q) {
            assert_eq!(mp, mq, "{name} {n}: the mask changed");
            changed += usize::from(vp != vq);
        }
        // No epoch kept: the plain run's values, byte for byte.
        if kept == 0 {
            assert_eq!(changed, 0, "{name}");
        } else {
            assert!(changed > 0, "{name}: epoch {kept} kept, no value changed");
        }
        self_test(&dist);
    }
}

/// What distillation cannot do fails in one line, before any work, nothing written.
#[test]
fn distillation_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let cache = dir.path().join("rpca").display().to_string();
    let model = common::tiny("llama-tied");
    let out = dir.path().join("bad.cap");
    let out_s = out.display().to_string();
    for (extra, needles) in [
        (
            &["--method", "magnitude", "--distill-epochs", "1"][..],
            &["--distill-epochs", "magnitude"][..],
        ),
        (
            &["--variant", "paper", "--distill-epochs", "1"],
            &["--distill-epochs", "paper"],
        ),
        (
            &["--values", "q8", "--distill-epochs", "1"],
            &["--distill-epochs", "quantized"],
        ),
        (
            &["--stream", "--distill-epochs", "1"],
            &["--distill-epochs", "--stream"],
        ),
        (
            &["--distill-epochs", "1", "--distill-lr", "0"],
            &["--distill-lr"],
        ),
    ] {
        let mut v = small_compress(&model, &out_s, &calib, &cache, &["--ratio", "0.5"]);
        v.extend(extra.iter().map(|s| s.to_string()));
        assert_clean_failure(&v, needles);
        assert!(!out.exists());
    }
}
