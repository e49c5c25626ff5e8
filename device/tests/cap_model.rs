//! A `.cap` file run in place (every encoding, through the selected kernels) against a
//! dense `f32` reference model holding the same weights, built without the loader.

mod common;

use cap_device::forward::{KvCache, KvDtype, Runner, Workspace};
use std::collections::BTreeSet;

use cap_device::caplinear::{CapLinear, SparsePart};
use cap_device::load;
use cap_device::model::{DenseLinear, Head, Model};
use cap_format::CapFile;

/// Logits of `tokens` fed as a prompt, then one at a time, on both models.
fn compare(bytes: &[u8], reference: &Model<DenseLinear>, threads: usize, kv: KvDtype, tol: f32) {
    let file = CapFile::parse(bytes).unwrap();
    file.verify_all().unwrap();
    let model = load::model(&file).unwrap();
    let c = &reference.config;
    let tokens: Vec<u32> = (0..40u32)
        .map(|i| (i * 37 + 5) % c.vocab_size as u32)
        .collect();
    let (prompt, rest) = tokens.split_at(25);
    let ctx = tokens.len();
    let want_runner = Runner::new(reference, ctx, 1);
    let mut want_kv = want_runner.new_cache();
    let mut want_hidden = Vec::new();
    want_runner
        .forward(&tokens, &mut want_kv, &mut want_hidden)
        .unwrap();
    let v = c.vocab_size;
    let mut want = vec![0.0f32; ctx * v];
    want_runner.logits(&want_hidden, &mut want);

    let runner = Runner::new(&model, ctx, threads);
    let mut cache = KvCache::new(&model.config, ctx, kv);
    let mut ws = Workspace::new();
    // The prompt takes the tiled GEMM path; the single tokens the matrix-vector kernels.
    let mut got = vec![
        runner
            .next_logits(prompt, &mut cache, &mut ws)
            .unwrap()
            .to_vec(),
    ];
    for &t in rest {
        got.push(
            runner
                .next_logits(&[t], &mut cache, &mut ws)
                .unwrap()
                .to_vec(),
        );
    }
    let mut worst = 0.0f32;
    assert_eq!(got.len(), rest.len() + 1, "one set of logits per call");
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.len(), v, "logits of call {i}");
        let pos = prompt.len() - 1 + i;
        for (a, b) in g.iter().zip(&want[pos * v..(pos + 1) * v]) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst < tol,
        "largest logit difference {worst} (tolerance {tol})"
    );
}

/// f32 everywhere, logits O(1): the two differ only by summation order (factored
/// `(x·Aᵀ)·Bᵀ` against the product formed first, SIMD against GEMM), which over 300
/// terms is ~1e-6; 2e-4 leaves a wide margin and still catches any wrong index.
const F32_TOL: f32 = 2e-4;
/// An f16 KV cache rounds keys and values to 11 significant bits (relative 4.9e-4).
const F16_KV_TOL: f32 = 2e-2;

#[test]
fn every_encoding_matches_the_dense_reference_tied() {
    let (bytes, reference) = common::tiny_cap(1, true, false);
    compare(&bytes, &reference, 1, KvDtype::F32, F32_TOL);
}

#[test]
fn untied_sparse_head_qkv_bias_two_threads() {
    let (bytes, reference) = common::tiny_cap(2, false, true);
    compare(&bytes, &reference, 2, KvDtype::F32, F32_TOL);
}

#[test]
fn f16_kv_cache_stays_close() {
    let (bytes, reference) = common::tiny_cap(3, true, false);
    compare(&bytes, &reference, 1, KvDtype::F16, F16_KV_TOL);
}

/// The perplexity path (`forward` + `nll`) on the file equals the reference's.
#[test]
fn perplexity_path_matches() {
    let (bytes, reference) = common::tiny_cap(4, true, false);
    let file = CapFile::parse(&bytes).unwrap();
    let model = load::model(&file).unwrap();
    let tokens: Vec<u32> = (0..300u32).map(|i| (i * 11 + 3) % 96).collect();
    let run = |nll: &dyn Fn() -> Vec<f64>| nll();
    let a = run(&|| {
        let r = Runner::new(&model, tokens.len(), 2);
        let mut kv = r.new_cache();
        let mut h = Vec::new();
        r.forward(&tokens, &mut kv, &mut h).unwrap();
        r.nll(&h[..299 * 36], &tokens[1..])
    });
    let b = run(&|| {
        let r = Runner::new(&reference, tokens.len(), 1);
        let mut kv = r.new_cache();
        let mut h = Vec::new();
        r.forward(&tokens, &mut kv, &mut h).unwrap();
        r.nll(&h[..299 * 36], &tokens[1..])
    });
    assert_eq!(a.len(), 299, "one NLL per scored token");
    assert_eq!(a.len(), b.len(), "both models score the same tokens");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
}

/// The loader borrows the weights: every stored part of every layer (dense values,
/// both factors, and the sparse part's mask, block pointers, column indices, 2:4
/// metadata and values) lies inside the file's buffer (no copy was made), for every
/// encoding the file holds, the untied sparse head included.
#[test]
fn weights_are_borrowed_from_the_file() {
    let (bytes, _) = common::tiny_cap(5, false, false);
    let file = CapFile::parse(&bytes).unwrap();
    let model = load::model(&file).unwrap();
    let range = bytes.as_ptr_range();
    let inside = |s: &[u8]| range.contains(&s.as_ptr()) && s.as_ptr_range().end <= range.end;
    let mut seen = BTreeSet::new();
    let mut check = |l: &CapLinear<'_>| {
        let mut parts = Vec::new();
        if let Some(d) = l.dense {
            parts.push(d.bytes);
        }
        if let Some(lr) = &l.low_rank {
            parts.extend([lr.a.bytes, lr.b.bytes]);
        }
        let sparse = l.sparse.as_ref().map(|s| match s {
            SparsePart::Bitmask { mask, values, .. } => {
                parts.extend([*mask, values.bytes]);
                "bitmask"
            }
            SparsePart::Csr(c) => {
                parts.extend([c.block_ptr, c.col_idx, c.values.bytes]);
                "block-csr"
            }
            SparsePart::TwoFour(t) => {
                parts.extend([t.meta, t.values.bytes]);
                "2:4"
            }
        });
        assert!(!parts.is_empty(), "a layer with no stored part");
        for p in &parts {
            assert!(!p.is_empty(), "an empty part");
            assert!(inside(p), "a part outside the file's buffer");
        }
        seen.insert((l.dense.is_some(), l.low_rank.is_some(), sparse));
    };
    for b in &model.blocks {
        for (_, l) in b.linears() {
            check(l);
        }
    }
    match &model.head {
        Head::Separate(l) => check(l),
        Head::Tied => panic!("the fixture's head is untied"),
    }
    check(&model.embed);
    // Every encoding of the fixture was seen: dense, low-rank, each sparse kind alone,
    // and low-rank with a bitmask and with block-CSR.
    let want = BTreeSet::from([
        (true, false, None),
        (false, true, None),
        (false, false, Some("bitmask")),
        (false, false, Some("block-csr")),
        (false, false, Some("2:4")),
        (false, true, Some("bitmask")),
        (false, true, Some("block-csr")),
    ]);
    assert_eq!(seen, want);
}
