//! Forward-pass throughput on a random model with SmolLM2-135M's shapes (no model file
//! needed): tokens/s of one window of prefill plus NLL scoring, as `eval` does it.
//!
//! `cargo bench -p cap-device --bench forward -- [CTX] [THREADS]`

use std::time::Instant;

use cap_device::config::{Arch, Config, RopeScaling};
use cap_device::forward::Runner;
use cap_device::model::{Block, DenseLinear, Head, Model};

fn lin(seed: &mut u64, out: usize, inp: usize) -> DenseLinear {
    let w = (0..out * inp)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
        })
        .collect();
    DenseLinear::new(w, out, inp).unwrap()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ctx = args.first().copied().unwrap_or(512);
    let threads = args.get(1).copied().unwrap_or(2);
    cap_kernels::par::init_threads(threads);
    let c = Config {
        arch: Arch::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        n_layers: 30,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        rope_theta: 1e5,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        tie_embeddings: true,
        qkv_bias: false,
        max_position: 8192,
        sliding_window: None,
        local_attention: None,
    };
    let mut s = 7u64;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let blocks = (0..c.n_layers)
        .map(|_| Block {
            attn_norm: vec![1.0; h],
            q: lin(&mut s, c.q_dim(), h),
            k: lin(&mut s, c.kv_dim(), h),
            v: lin(&mut s, c.kv_dim(), h),
            o: lin(&mut s, h, c.q_dim()),
            qkv_bias: None,
            qk_norm: None,
            post_norms: None,
            mlp_norm: vec![1.0; h],
            gate: lin(&mut s, i, h),
            up: lin(&mut s, i, h),
            down: lin(&mut s, h, i),
        })
        .collect();
    let embed = lin(&mut s, c.vocab_size, h).weight;
    let m = Model {
        config: c,
        embed,
        blocks,
        norm: vec![1.0; h],
        head: Head::Tied,
    };
    let runner = Runner::new(&m, ctx, threads);
    let tokens: Vec<u32> = (0..ctx as u32).map(|t| (t * 7919) % 49152).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        let mut kv = runner.new_cache();
        let mut hidden = Vec::new();
        runner.forward(&tokens, &mut kv, &mut hidden).unwrap();
        let nll = runner.nll(&hidden[..(ctx - 1) * h], &tokens[1..]);
        assert_eq!(nll.len(), ctx - 1);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!(
        "forward+nll ctx {ctx} threads {threads}: {:.3} s/window, {:.1} tokens/s",
        best,
        ctx as f64 / best
    );
}
