//! Decoding a token allocates nothing: a counting global allocator watches the steady
//! state of the decode loop (forward pass, logits and sampling).

mod common;

use std::sync::atomic::Ordering;

use cap_device::forward::{KvCache, KvDtype, Runner, Workspace};
use cap_device::load;
use cap_device::sample::{Sampler, SamplerConfig};
use cap_format::CapFile;
use cap_kernels::par;

// Every allocation of this test binary is counted (common::Counting).
#[global_allocator]
static A: common::Counting = common::Counting;

fn decode_allocations(threads: usize, kv: KvDtype) -> usize {
    let (bytes, _) = common::tiny_cap(9, true, false);
    let file = CapFile::parse(&bytes).unwrap();
    let model = load::model(&file).unwrap();
    let ctx = 64;
    let runner = Runner::new(&model, ctx, threads);
    let mut cache = KvCache::new(&model.config, ctx, kv);
    let mut ws = Workspace::new();
    let cfg = SamplerConfig {
        temperature: 0.8,
        top_p: 0.9,
        seed: 1,
    };
    let mut sampler = Sampler::new(cfg, model.config.vocab_size);
    let prompt: Vec<u32> = (1..12).collect();
    // Worker threads that start late would allocate inside the measured loop.
    par::warm_up();
    // As the binary does: everything runs on a worker thread of the pool. The prompt
    // and three warm-up tokens grow the workspace (and start the pool's threads).
    par::install(|| {
        let mut tok = sampler.sample(runner.next_logits(&prompt, &mut cache, &mut ws).unwrap());
        for _ in 0..3 {
            tok = sampler.sample(runner.next_logits(&[tok], &mut cache, &mut ws).unwrap());
        }
        let before = common::ALLOCS.load(Ordering::SeqCst);
        for _ in 0..30 {
            tok = sampler.sample(runner.next_logits(&[tok], &mut cache, &mut ws).unwrap());
        }
        common::ALLOCS.load(Ordering::SeqCst) - before
    })
}

/// One test function: the counter is process-wide, so concurrent tests would count
/// each other's allocations. With worker threads the kernels hand rows to rayon's
/// pool, whose steady state must not allocate either.
#[test]
fn decode_allocates_nothing_per_token() {
    assert_eq!(decode_allocations(1, KvDtype::F32), 0, "1 thread, f32 KV");
    assert_eq!(decode_allocations(1, KvDtype::F16), 0, "1 thread, f16 KV");
    assert_eq!(decode_allocations(2, KvDtype::F32), 0, "2 threads, f32 KV");
}
