//! `compress --pattern N:M`: every pruning method keeps at most N of every M
//! consecutive weights of each row of each linear, as the written file's masks show,
//! the file passes its self-test, and impossible combinations fail in one line.

mod common;

use std::path::Path;

use cap_format::{CapFile, SparseView, TensorData};
use common::{
    assert_clean_failure, calib_text, is_linear, run_json, self_test, small_compress, tiny,
};

/// Kept positions of a sparse tensor, row-major `rows × cols`.
fn kept_positions(data: TensorData<'_>, rows: usize, cols: usize) -> Vec<bool> {
    let mut kept = vec![false; rows * cols];
    match data {
        TensorData::Sparse(SparseView::Bitmask { mask, .. }) => {
            for (i, k) in kept.iter_mut().enumerate() {
                *k = mask[i / 8] >> (i % 8) & 1 == 1;
            }
        }
        TensorData::Sparse(SparseView::BlockCsr(c)) => {
            let nb = cols.div_ceil(256);
            let ptr = |j: usize| c.block_ptr_at(j).unwrap() as usize;
            for r in 0..rows {
                for b in 0..nb {
                    for e in ptr(r * nb + b)..ptr(r * nb + b + 1) {
                        kept[r * cols + b * 256 + usize::from(c.col_idx[e])] = true;
                    }
                }
            }
        }
        TensorData::Sparse(SparseView::TwoFour { meta, .. }) => {
            for g in 0..rows * cols / 4 {
                let nib = meta[g / 2] >> (4 * (g % 2)) & 0xF;
                kept[4 * g + usize::from(nib & 3)] = true;
                kept[4 * g + usize::from(nib >> 2)] = true;
            }
        }
        _ => panic!("a pruned linear that is not sparse"),
    }
    kept
}

/// The linears of `path` follow `n:m`: at most `n` kept in every `m` columns of a row,
/// and (the pruned weights being non-zero but for exact zeros the encoders drop) at
/// least 99% of `n/m` of every linear kept; 2:4 is stored in the 2:4 encoding. With
/// `low_rank`, every linear is low-rank + sparse (rank at least 1) and its sparse part
/// follows the pattern (stored as a bitmask: the format's composite has no 2:4 part).
fn check_pattern(path: &Path, n: usize, m: usize, low_rank: bool) {
    let bytes = std::fs::read(path).unwrap();
    let file = CapFile::parse(&bytes).unwrap();
    let mut seen = 0;
    for (i, t) in file.manifest().tensors.iter().enumerate() {
        if !is_linear(&t.name) {
            continue;
        }
        let (rows, cols) = (t.rows as usize, t.cols as usize);
        assert_eq!(cols % m, 0, "the tiny model's rows are whole groups");
        let mut data = file.tensor(i).unwrap().data().unwrap();
        if low_rank {
            let cap_format::Encoding::Composite { rank, .. } = t.encoding else {
                panic!("{}: not low-rank + sparse", t.name);
            };
            let TensorData::Composite { sparse, .. } = data else {
                panic!("{}: not low-rank + sparse data", t.name);
            };
            assert!(rank >= 1, "{}: rank {rank}", t.name);
            data = TensorData::Sparse(sparse);
        } else {
            // 2:4 masks are written in the 2:4 encoding (every kept weight non-zero).
            let two_four = matches!(data, TensorData::Sparse(SparseView::TwoFour { .. }));
            assert_eq!(two_four, (n, m) == (2, 4), "{}: {}", path.display(), t.name);
        }
        let kept = kept_positions(data, rows, cols);
        for r in 0..rows {
            for g in (0..cols).step_by(m) {
                let k = kept[r * cols + g..r * cols + g + m]
                    .iter()
                    .filter(|&&k| k)
                    .count();
                assert!(k <= n, "{}: row {r} columns {g}.. keep {k} > {n}", t.name);
            }
        }
        let total = kept.iter().filter(|&&k| k).count();
        let want = rows * cols / m * n;
        assert!(
            total * 100 >= want * 99 && total <= want,
            "{}: {total} of {want}",
            t.name
        );
        seen += 1;
    }
    assert!(seen > 0);
}

#[test]
fn every_pruning_method_follows_the_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_text(dir.path());
    let cache = dir.path().join("rpca").display().to_string();
    let model = tiny("llama-tied");
    let all = ["cap", "sparsegpt", "admm", "magnitude", "wanda"];
    for (pattern, n, m, methods) in [("2:4", 2, 4, &all[..]), ("4:8", 4, 8, &all[..2])] {
        for &method in methods {
            let out = dir.path().join(format!("{method}-{n}-{m}.cap"));
            let out_s = out.display().to_string();
            let args = ["--pattern", pattern, "--method", method];
            let r = run_json(&small_compress(&model, &out_s, &calib, &cache, &args));
            check_pattern(&out, n, m, false);
            let bytes = std::fs::read(&out).unwrap();
            let file = CapFile::parse(&bytes).unwrap();
            let c = file.manifest().compression.as_ref().unwrap();
            assert_eq!(c.method, format!("{method} {pattern}"));
            assert!(r["allocation_search"].is_null(), "nothing to allocate: {r}");
            self_test(&out);
        }
    }
    // The 2:4 sections hold what magnitude 2:4 keeps, at the right columns: the two
    // largest |W| of every group of 4 (found here by sorting, ties to the lower
    // column), each the source weight rounded to f16.
    let src = cap_host::import::Checkpoint::open(Path::new(&model))
        .unwrap()
        .load_model()
        .unwrap();
    let bytes = std::fs::read(dir.path().join("magnitude-2-4.cap")).unwrap();
    let file = CapFile::parse(&bytes).unwrap();
    let names = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    for (b, block) in src.blocks.iter().enumerate() {
        for (name, (_, l)) in names.iter().zip(block.linears()) {
            let t = file
                .tensor_by_name(&format!("blk.{b}.{name}.weight"))
                .unwrap();
            let TensorData::Sparse(SparseView::TwoFour { values, meta }) = t.data().unwrap() else {
                panic!("blk.{b}.{name}: not 2:4");
            };
            let (rows, cols) = (l.out_features, l.in_features);
            let stored = values.bytes;
            for g in 0..rows * cols / 4 {
                let w = &l.weight[4 * g..4 * g + 4];
                let mut order = [0usize, 1, 2, 3];
                order.sort_by(|&a, &c| w[c].abs().total_cmp(&w[a].abs()).then(a.cmp(&c)));
                let mut want = [order[0], order[1]];
                want.sort();
                let nib = meta[g / 2] >> (4 * (g % 2)) & 0xF;
                assert_eq!(
                    [usize::from(nib & 3), usize::from(nib >> 2)],
                    want,
                    "group {g}"
                );
                for (k, &j) in want.iter().enumerate() {
                    let at = 2 * (2 * g + k);
                    let h = u16::from_le_bytes([stored[at], stored[at + 1]]);
                    let rounded = cap_kernels::cpu::f16_to_f32(cap_kernels::cpu::f32_to_f16(w[j]));
                    assert_eq!(
                        cap_kernels::cpu::f16_to_f32(h),
                        rounded,
                        "group {g} slot {k}"
                    );
                }
            }
        }
    }

    // Any value type but auto: quantized kept values under the pattern.
    let out = dir.path().join("q4.cap");
    let out_s = out.display().to_string();
    let args = ["--pattern", "2:4", "--values", "q4", "--group", "16"];
    let r = run_json(&small_compress(&model, &out_s, &calib, &cache, &args));
    assert_eq!(r["values"], "q4/g16");
    check_pattern(&out, 2, 4, false);
    self_test(&out);

    // cap's low-rank part on top of the pattern, fit jointly with it, and swap passes:
    // the sparse parts still follow the pattern, the ranks are what the share buys
    // (a 64×64 linear keeps 2048 at 2:4; 0.2 of that is ⌊409.6 / 128⌋ = 3 directions),
    // and the parameters are the pattern's plus at most the share.
    let out = dir.path().join("lr.cap");
    let out_s = out.display().to_string();
    let args = [
        "--pattern",
        "2:4",
        "--lowrank-share",
        "0.2",
        "--lowrank-fit",
        "joint",
        "--swap-passes",
        "1",
    ];
    let r = run_json(&small_compress(&model, &out_s, &calib, &cache, &args));
    check_pattern(&out, 2, 4, true);
    let q = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(q["shape"], serde_json::json!([64, 64]));
    assert_eq!(q["rank"][0], 3, "{q}");
    let ratio = r["param_ratio"].as_f64().unwrap();
    assert!(ratio > 0.5 && ratio <= 0.6, "{ratio}");
    self_test(&out);

    let bad = |extra: &[&str], needles: &[&str]| {
        let out = dir.path().join("bad.cap");
        let out_s = out.display().to_string();
        let mut v = common::compress_to(&model, &out_s, &[]);
        v.extend(common::small_args(&calib, &cache));
        v.extend(extra.iter().map(|s| s.to_string()));
        assert_clean_failure(&v, needles);
        assert!(!out.exists());
    };
    // Usage errors (clap's exit status 2), one line each.
    for (extra, needles) in [
        (&["--pattern", "2:6"][..], &["--pattern", "N:M"][..]),
        (&["--pattern", "4:4"], &["--pattern", "N:M"]),
        (
            &["--pattern", "2:4", "--ratio", "0.5"],
            &["--pattern", "--ratio"],
        ),
    ] {
        let out = dir.path().join("bad.cap");
        let mut v = common::compress_to(&model, &out.display().to_string(), &[]);
        v.extend(common::small_args(&calib, &cache));
        v.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = v.iter().map(String::as_str).collect();
        let (code, _, err) = common::cap_host(&args);
        assert_eq!(code, 2, "{extra:?}: {err}");
        let first = err.lines().next().unwrap_or("");
        for n in needles {
            assert!(first.contains(n), "{extra:?}: {first}");
        }
        assert!(!out.exists());
    }
    bad(
        &["--pattern", "2:4", "--method", "svd"],
        &["--pattern", "svd"],
    );
    bad(
        &["--pattern", "2:4", "--variant", "paper"],
        &["--pattern", "paper"],
    );
    bad(
        &["--pattern", "7:8", "--lowrank-share", "0.2"],
        &["--pattern 7:8", "--lowrank-share", "dense"],
    );
    bad(
        &["--pattern", "2:4", "--values", "auto"],
        &["--pattern", "auto"],
    );
}
