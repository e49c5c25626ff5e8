//! A model whose linears hold quantized values (Q8, Q4; format 1.1), run in place,
//! against the same model with those tensors dequantized and stored dense `f32`:
//! the weights are the same numbers, so the logits agree to `f32` summation order.
//! Also: no allocation per decoded token (a counting allocator, as `decode_alloc.rs`).

mod common;

use std::sync::atomic::Ordering;

use cap_device::forward::{KvCache, KvDtype, Runner, Workspace};
use cap_device::load;
use cap_format::{CapFile, DType, Encoding};
use cap_kernels::par;

// Every allocation of this test binary is counted (common::Counting).
#[global_allocator]
static A: common::Counting = common::Counting;

/// The two sides compute with the same weight values; they differ by summation order
/// only (the quantized layers run the scalar kernels, the f32 ones AVX2/NEON or GEMM,
/// and a low-rank layer is `(x·Aᵀ)·Bᵀ` against the product formed first). Over at most
/// 300 terms of O(1) logits that is ~1e-6; 2e-4 (as `cap_model.rs`) leaves a wide
/// margin and still catches any misread value, which moves logits by ~1e-2.
const TOL: f32 = 2e-4;

/// Logits of a prompt (the tiled path) and then single tokens (the matrix-vector
/// kernels) on both files; returns the largest difference.
fn max_logit_diff(quant: &[u8], dense: &[u8], threads: usize) -> f32 {
    let run = |bytes: &[u8]| {
        let file = CapFile::parse(bytes).unwrap();
        file.verify_all().unwrap();
        let model = load::model(&file).unwrap();
        common::prompt_and_decode_logits(&model, threads)
    };
    let (a, b) = (run(quant), run(dense));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Allocations in 20 decoded tokens after a warm-up.
fn decode_allocations(bytes: &[u8], threads: usize) -> usize {
    let file = CapFile::parse(bytes).unwrap();
    let model = load::model(&file).unwrap();
    let ctx = 48;
    let runner = Runner::new(&model, ctx, threads);
    let mut cache = KvCache::new(&model.config, ctx, KvDtype::F32);
    let mut ws = Workspace::new();
    let prompt: Vec<u32> = (1..12).collect();
    par::warm_up();
    par::install(|| {
        runner.next_logits(&prompt, &mut cache, &mut ws).unwrap();
        for t in 0..3 {
            runner.next_logits(&[t], &mut cache, &mut ws).unwrap();
        }
        let before = common::ALLOCS.load(Ordering::SeqCst);
        for t in 0..20 {
            runner.next_logits(&[t + 3], &mut cache, &mut ws).unwrap();
        }
        common::ALLOCS.load(Ordering::SeqCst) - before
    })
}

/// One test function: the allocation counter is process-wide.
#[test]
fn quantized_model_matches_its_dequantized_f32_copy_and_decodes_without_allocating() {
    for tied in [true, false] {
        let (quant, dense) = common::tiny_quantized_cap(7, tied);
        // Every quantized encoding of the list is in the file, and it is a 1.1 file.
        let f = CapFile::parse(&quant).unwrap();
        assert_eq!(f.header().minor, 1);
        let quantized = f
            .manifest()
            .tensors
            .iter()
            .filter(|t| match t.encoding {
                Encoding::Dense { dtype } | Encoding::LowRank { dtype, .. } => dtype.is_quantized(),
                Encoding::Sparse(s) | Encoding::Composite { sparse: s, .. } => {
                    s.dtype().is_quantized()
                }
            })
            .count();
        // 3 layers × 7 linears, plus the embedding (tied) or the head.
        assert_eq!(quantized, 22, "tied {tied}");
        assert_eq!(
            CapFile::parse(&dense).unwrap().manifest().tensors[0].encoding,
            Encoding::Dense { dtype: DType::F32 }
        );
        for threads in [1, 2] {
            let d = max_logit_diff(&quant, &dense, threads);
            assert!(
                d < TOL,
                "tied {tied}, {threads} threads: logits differ by {d}"
            );
        }
        assert_eq!(decode_allocations(&quant, 1), 0, "tied {tied}, 1 thread");
        assert_eq!(decode_allocations(&quant, 2), 0, "tied {tied}, 2 threads");
    }
}
