//! The whole model with its linear layers on a CUDA GPU (feature `cuda`,
//! `cap_device::gpu`) against the same file on the CPU: logits of a prompt (rows
//! through the GPU one at a time) and of decoded tokens, for files holding every
//! encoding (dense, low-rank, bitmask, block-CSR, 2:4, composite) with float values
//! and with Q8/Q4 values, tied and separate heads, with and without q/k/v biases.
//!
//! Without a usable GPU each test prints `SKIPPED` and why, and passes, unless
//! `CAP_REQUIRE_GPU=1` (scripts/gpu-check.sh sets it).
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use cap_device::load;
use cap_format::CapFile;
use cap_kernels::cuda::{self, Gpu};

/// Both sides multiply the same stored values; they differ in the order of `f32`
/// sums only (a warp adds 32 partial sums, the CPU SIMD lanes or a GEMM). The CPU
/// tests of these files allow 2e-4 between two CPU paths for the same reason
/// (`quantized_model.rs`); a misread value moves logits by ~1e-2.
const TOL: f32 = 2e-4;

fn gpu_or_skip(test: &str) -> Option<Arc<Gpu>> {
    match cuda::probe() {
        Ok(_) => match Gpu::new() {
            Ok(g) => Some(Arc::new(g)),
            Err(e) => panic!("{test}: a GPU was found but the kernels could not be loaded: {e}"),
        },
        Err(u) => {
            assert!(
                std::env::var_os("CAP_REQUIRE_GPU").is_none_or(|v| v != "1"),
                "{test}: CAP_REQUIRE_GPU=1 but {u}"
            );
            eprintln!("SKIPPED {test}: {u}");
            None
        }
    }
}

/// Largest logit difference between the CPU and the GPU on `bytes`.
fn cpu_gpu_diff(gpu: &Arc<Gpu>, bytes: &[u8]) -> f32 {
    let file = CapFile::parse(bytes).unwrap();
    file.verify_all().unwrap();
    let model = load::model(&file).unwrap();
    let on_gpu = cap_device::gpu::upload(gpu, &model).unwrap_or_else(|e| panic!("upload: {e}"));
    assert_eq!(
        on_gpu.weight_bytes(),
        model
            .blocks
            .iter()
            .flat_map(|b| b.linears().map(|(_, l)| l.weight_bytes() as u64))
            .sum::<u64>()
            + match &model.head {
                cap_device::model::Head::Tied => model.embed.weight_bytes() as u64,
                cap_device::model::Head::Separate(l) => l.weight_bytes() as u64,
            }
    );
    let (a, b) = (
        common::prompt_and_decode_logits(&model, 1),
        common::prompt_and_decode_logits(&on_gpu.model, 1),
    );
    assert_eq!(on_gpu.error(), None);
    assert_eq!(a.len(), b.len());
    assert!(b.iter().all(|v| v.is_finite()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn float_models_on_the_gpu_match_the_cpu() {
    let Some(gpu) = gpu_or_skip("float_models_on_the_gpu") else {
        return;
    };
    for (tied, bias) in [(true, false), (false, true)] {
        let (bytes, _) = common::tiny_cap(3, tied, bias);
        let d = cpu_gpu_diff(&gpu, &bytes);
        eprintln!("float, tied {tied}, bias {bias}: largest logit difference {d:e}");
        assert!(d < TOL, "tied {tied}, bias {bias}: logits differ by {d}");
    }
}

#[test]
fn quantized_models_on_the_gpu_match_the_cpu() {
    let Some(gpu) = gpu_or_skip("quantized_models_on_the_gpu") else {
        return;
    };
    for tied in [true, false] {
        let (bytes, _) = common::tiny_quantized_cap(7, tied);
        let d = cpu_gpu_diff(&gpu, &bytes);
        eprintln!("quantized, tied {tied}: largest logit difference {d:e}");
        assert!(d < TOL, "tied {tied}: logits differ by {d}");
    }
}
