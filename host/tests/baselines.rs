//! The one-shot baselines against an independent NumPy reference on one real layer
//! (`scripts/reference/baselines_reference.py`, output committed as a fixture):
//! SmolLM2-135M's `blk.0.attn_v.weight` at the paper's ratio 0.5. Magnitude, Wanda,
//! SVD and SparseGPT must keep exactly the reference's set (and SparseGPT's updated
//! values). Skipped with `CAP_SKIP_MODEL_TESTS=1`.

#[path = "../../tests/common/mod.rs"]
mod common;

use cap_format::DType;
use cap_host::compress::budget::{Accounting, CostModel};
use cap_host::compress::methods::{Method, sparse_candidate, svd_candidate, uniform_groups};
use cap_host::compress::select::{Selection, uniform};
use cap_host::import::Checkpoint;

struct Fixture {
    windows: Vec<Vec<u32>>,
    rms: Vec<f32>,
    magnitude: Vec<bool>,
    wanda: Vec<bool>,
    svd_rank: usize,
    svd_sigma: Vec<f64>,
}

fn bits(hex: &str, n: usize) -> Vec<bool> {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    (0..n).map(|i| bytes[i / 8] >> (i % 8) & 1 == 1).collect()
}

fn fixture(n: usize) -> Fixture {
    let path = common::root()
        .join("tests/reference/smollm2-135m-instruct-q4_1/baselines_blk0_attn_v.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let f32s = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    Fixture {
        windows: v["windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                w.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect(),
        rms: f32s("rms").into_iter().map(|x| x as f32).collect(),
        magnitude: bits(v["magnitude_mask_hex"].as_str().unwrap(), n),
        wanda: bits(v["wanda_mask_hex"].as_str().unwrap(), n),
        svd_rank: v["svd_rank"].as_u64().unwrap() as usize,
        svd_sigma: f32s("svd_sigma"),
    }
}

/// The paper's accounting at ratio 0.5 of one layer.
fn half(rows: usize, cols: usize) -> (CostModel, u64) {
    (
        CostModel {
            accounting: Accounting::Params,
            dtype: DType::F16,
        },
        (rows * cols / 2) as u64,
    )
}

#[test]
fn baselines_keep_the_reference_sets_on_a_real_layer() {
    let Some(model_path) = common::real_model() else {
        return;
    };
    let model = Checkpoint::open(&model_path).unwrap().load_model().unwrap();
    let w = &model.blocks[0].v;
    let (rows, cols) = (w.out_features, w.in_features);
    let fx = fixture(rows * cols);
    let (cost, limit) = half(rows, cols);

    // Wanda's input norms from cap's own forward pass agree with the reference's f64
    // RMSNorm of the embeddings to f32 rounding (relative 1e-5: a norm over 512 rows).
    let windows: Vec<&[u32]> = fx.windows.iter().map(|w| w.as_slice()).collect();
    let norms = cap_host::calib::input_rms_windows(&model, &windows, 2, |_, _| {}).unwrap();
    let rms = &norms["blk.0.attn_v.weight"];
    for (j, (a, b)) in rms.iter().zip(&fx.rms).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1e-6),
            "rms[{j}]: {a} vs {b}"
        );
    }

    // Sparse baselines: exactly the reference's kept entries (ties to the lower index).
    let d = sparse_candidate(&w.weight, rows, cols);
    for (method, want, norm) in [
        (Method::Magnitude, &fx.magnitude, None),
        (Method::Wanda, &fx.wanda, Some(fx.rms.as_slice())),
    ] {
        let groups = uniform_groups(method, &d, norm);
        let (sel, _) = uniform(&[&d], &[groups], &cost, limit);
        let got: &Selection = &sel[0];
        assert_eq!(got.nnz(), (rows * cols / 2) as u64, "{method:?}");
        let differ = got
            .entries
            .iter()
            .zip(want.iter())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ, 0,
            "{method:?}: {differ} entries differ from the reference"
        );
    }

    // SVD: the same number of directions, and the same singular values (faer f32 vs
    // NumPy f64: relative 1e-4 of σ_max, the f32 SVD's accuracy on a 192×576 matrix).
    let d = svd_candidate(&w.weight, rows, cols).unwrap();
    let (sel, _) = uniform(
        &[&d],
        &[uniform_groups(Method::Svd, &d, None)],
        &cost,
        limit,
    );
    assert_eq!(sel[0].rank(), fx.svd_rank);
    assert!(sel[0].sigma[..fx.svd_rank].iter().all(|&k| k));
    let smax = fx.svd_sigma[0];
    for (i, (a, b)) in d.sigma().iter().zip(&fx.svd_sigma).enumerate() {
        assert!(
            (f64::from(*a) - b).abs() <= 1e-4 * smax,
            "σ[{i}]: {a} vs {b}"
        );
    }
}

/// SparseGPT's OBS pruning against the NumPy translation of the reference code on the
/// same layer, with the same Hessian: block 0's v input is `RMSNorm(embedding)·norm`,
/// computed here in f64 from the token ids (as NumPy does), `H = XᵀX` cast to f32 (what
/// `prune` receives from the forward pass). Both sides then work in f64, so the kept
/// set must be identical and values agree to 1e-9 of the largest (rounding of two
/// different Cholesky/inverse routes).
#[test]
fn sparsegpt_matches_the_reference_on_a_real_layer() {
    let Some(model_path) = common::real_model() else {
        return;
    };
    let model = Checkpoint::open(&model_path).unwrap().load_model().unwrap();
    let w = &model.blocks[0].v;
    let (rows, cols) = (w.out_features, w.in_features);
    let path = common::root()
        .join("tests/reference/smollm2-135m-instruct-q4_1/baselines_blk0_attn_v.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let fx = fixture(rows * cols);
    let h = model.config.hidden_size;
    let eps = f64::from(model.config.rms_eps);
    let norm = &model.blocks[0].attn_norm;
    let mut x: Vec<f64> = Vec::new();
    for &t in fx.windows.iter().flatten() {
        let e = &model.embed[t as usize * h..(t as usize + 1) * h];
        let ms = e.iter().map(|&a| f64::from(a) * f64::from(a)).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        x.extend(
            e.iter()
                .zip(norm)
                .map(|(&a, &g)| f64::from(a) * inv * f64::from(g)),
        );
    }
    let t = x.len() / h;
    let mut h32 = vec![0f32; h * h];
    for i in 0..h {
        for j in 0..h {
            let s: f64 = (0..t).map(|r| x[r * h + i] * x[r * h + j]).sum();
            h32[i * h + j] = s as f32;
        }
    }
    let mut wp = w.weight.clone();
    let mask = cap_host::compress::sparsegpt::prune(&mut wp, rows, cols, &h32, 0.5).unwrap();
    let want = bits(v["sparsegpt_mask_hex"].as_str().unwrap(), rows * cols);
    let differ = mask.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} kept flags differ from the reference");
    let kept: Vec<f32> = wp
        .iter()
        .zip(&mask)
        .filter(|(_, k)| **k)
        .map(|(v, _)| *v)
        .collect();
    let first: Vec<f64> = v["sparsegpt_first_values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_f64().unwrap())
        .collect();
    let scale = first.iter().fold(0f64, |m, a| m.max(a.abs()));
    for (i, (a, b)) in kept.iter().zip(&first).enumerate() {
        // f32 storage of the result: 2^-24 relative, plus the f64 routes' 1e-9.
        assert!(
            (f64::from(*a) - b).abs() <= 1e-7 * scale + 1e-7 * b.abs(),
            "value {i}: {a} vs {b}"
        );
    }
    let ss: f64 = kept.iter().map(|&a| f64::from(a) * f64::from(a)).sum();
    let want_ss = v["sparsegpt_value_sum_sq"].as_f64().unwrap();
    assert!((ss - want_ss).abs() <= 1e-6 * want_ss, "{ss} vs {want_ss}");
    // The layer's output error ‖(W' − W)·Xᵀ‖/‖W·Xᵀ‖ is the reference's (and, the point
    // of SparseGPT, far below magnitude pruning's at the same sparsity).
    let (mut num, mut den) = (0f64, 0f64);
    for r in 0..rows {
        for tok in 0..t {
            let xr = &x[tok * h..(tok + 1) * h];
            let (mut a, mut b) = (0f64, 0f64);
            for c in 0..cols {
                a += (f64::from(wp[r * cols + c]) - f64::from(w.weight[r * cols + c])) * xr[c];
                b += f64::from(w.weight[r * cols + c]) * xr[c];
            }
            num += a * a;
            den += b * b;
        }
    }
    let err = (num / den).sqrt();
    let want_err = v["sparsegpt_output_rel_error"].as_f64().unwrap();
    assert!(
        (err - want_err).abs() <= 1e-6 * want_err,
        "{err} vs {want_err}"
    );
    assert!(err < 0.5 * v["magnitude_output_rel_error"].as_f64().unwrap());
}
