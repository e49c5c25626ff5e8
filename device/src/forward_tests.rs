//! The forward pass against a naive, independent reference: token by token, in `f64`,
//! with explicit loops and no GEMM, KV cache or blocking.

use alloc::vec;
use alloc::vec::Vec;

use crate::config::{Activation, Arch, Config, LocalAttention, RopeScaling};
use crate::forward::Runner;
use crate::model::{Block, DenseLinear, Head, Model};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
    fn lin(&mut self, out: usize, inp: usize) -> DenseLinear {
        DenseLinear::new(self.vec(out * inp), out, inp).unwrap()
    }
}

fn config(bias: bool, tied: bool, scaling: RopeScaling) -> Config {
    Config {
        arch: if bias { Arch::Qwen2 } else { Arch::Llama },
        vocab_size: 50,
        hidden_size: 24,
        intermediate_size: 40,
        n_layers: 2,
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        rope_scaling: scaling,
        rms_eps: 1e-5,
        tie_embeddings: tied,
        qkv_bias: bias,
        max_position: 512,
        sliding_window: None,
        local_attention: None,
    }
}

/// A Gemma-3-shaped configuration: local layers with a window of 16 (much shorter than
/// the 150 tokens [`check`] runs) and their own RoPE base, every third layer global.
fn gemma3_config() -> Config {
    Config {
        arch: Arch::Gemma3,
        n_layers: 4,
        rope_theta: 1_000_000.0,
        local_attention: Some(LocalAttention {
            window: 16,
            global_every: 3,
            rope_theta: 10_000.0,
        }),
        ..config(false, true, RopeScaling::None)
    }
}

fn random_model(c: Config, seed: u64) -> Model<DenseLinear> {
    let mut r = Lcg(seed);
    let (h, qd, kvd, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let blocks = (0..c.n_layers)
        .map(|_| Block {
            attn_norm: r.vec(h).iter().map(|v| 1.0 + v).collect(),
            q: r.lin(qd, h),
            k: r.lin(kvd, h),
            v: r.lin(kvd, h),
            o: r.lin(h, qd),
            qkv_bias: c.qkv_bias.then(|| [r.vec(qd), r.vec(kvd), r.vec(kvd)]),
            qk_norm: c.arch.qk_norm().then(|| {
                let hd = c.head_dim;
                [r.vec(hd), r.vec(hd)].map(|v| v.iter().map(|x| 1.0 + x).collect())
            }),
            post_norms: c
                .arch
                .post_norms()
                .then(|| [r.vec(h), r.vec(h)].map(|v| v.iter().map(|x| 1.0 + x).collect())),
            mlp_norm: r.vec(h).iter().map(|v| 1.0 + v).collect(),
            gate: r.lin(i, h),
            up: r.lin(i, h),
            down: r.lin(h, i),
        })
        .collect();
    let head = if c.tie_embeddings {
        Head::Tied
    } else {
        Head::Separate(r.lin(c.vocab_size, h))
    };
    Model {
        embed: r.vec(c.vocab_size * h),
        norm: r.vec(h).iter().map(|v| 1.0 + v).collect(),
        blocks,
        head,
        config: c,
    }
}

fn matvec(w: &DenseLinear, x: &[f64]) -> Vec<f64> {
    (0..w.out_features)
        .map(|o| {
            (0..w.in_features)
                .map(|i| w.weight[o * w.in_features + i] as f64 * x[i])
                .sum()
        })
        .collect()
}

fn rms(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    x.iter()
        .zip(w)
        .map(|(v, w)| v / (ms + eps).sqrt() * *w as f64)
        .collect()
}

/// Logits of every position, computed one token at a time.
fn naive_logits(m: &Model<DenseLinear>, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = &m.config;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let global: Vec<f64> = c.rope_inv_freq().iter().map(|&f| f as f64).collect();
    let local: Option<Vec<f64>> = c.local_attention.map(|l| {
        (0..hd / 2)
            .map(|i| 1.0 / (l.rope_theta as f64).powf(2.0 * i as f64 / hd as f64))
            .collect()
    });
    let rope = |v: &mut [f64], pos: usize, layer: usize| {
        let inv = match (&local, c.layer_window(layer)) {
            (Some(f), Some(_)) => f,
            _ => &global,
        };
        for head in v.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let a = pos as f64 * inv[i];
                let (x0, x1) = (head[i], head[i + hd / 2]);
                head[i] = x0 * a.cos() - x1 * a.sin();
                head[i + hd / 2] = x1 * a.cos() + x0 * a.sin();
            }
        }
    };
    let mut keys: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.n_layers];
    let mut vals: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.n_layers];
    let mut out = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        let scale = if c.arch.scales_embedding() {
            (h as f64).sqrt()
        } else {
            1.0
        };
        let mut x: Vec<f64> = m.embed[t as usize * h..(t as usize + 1) * h]
            .iter()
            .map(|&v| v as f64 * scale)
            .collect();
        for (l, b) in m.blocks.iter().enumerate() {
            let xn = rms(&x, &b.attn_norm, c.rms_eps as f64);
            let (mut q, mut k, mut v) = (matvec(&b.q, &xn), matvec(&b.k, &xn), matvec(&b.v, &xn));
            if let Some([bq, bk, bv]) = &b.qkv_bias {
                for (a, bias) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                    a.iter_mut()
                        .zip(bias.iter())
                        .for_each(|(a, b)| *a += *b as f64);
                }
            }
            if let Some([nq, nk]) = &b.qk_norm {
                let per_head = |v: &[f64], w: &[f32]| -> Vec<f64> {
                    v.chunks(hd)
                        .flat_map(|hv| rms(hv, w, c.rms_eps as f64))
                        .collect()
                };
                q = per_head(&q, nq);
                k = per_head(&k, nk);
            }
            rope(&mut q, pos, l);
            rope(&mut k, pos, l);
            // Keys before the window are never seen again by a local layer.
            let first = c.layer_window(l).map_or(0, |w| (pos + 1).saturating_sub(w));
            keys[l].push(k);
            vals[l].push(v);
            let mut att = vec![0.0; c.q_dim()];
            for head in 0..c.n_heads {
                let g = head / (c.n_heads / c.n_kv_heads);
                let qh = &q[head * hd..(head + 1) * hd];
                let s: Vec<f64> = keys[l][first..]
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[g * hd..(g + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (p, val) in e.iter().zip(&vals[l][first..]) {
                    for d in 0..hd {
                        att[head * hd + d] += p / z * val[g * hd + d];
                    }
                }
            }
            let mut o = matvec(&b.o, &att);
            if let Some([pa, _]) = &b.post_norms {
                o = rms(&o, pa, c.rms_eps as f64);
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = rms(&x, &b.mlp_norm, c.rms_eps as f64);
            let (g, u) = (matvec(&b.gate, &xn), matvec(&b.up, &xn));
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, u)| {
                    let a = match c.arch.activation() {
                        Activation::Silu => g / (1.0 + (-g).exp()),
                        Activation::GeluTanh => {
                            let z =
                                (2.0 / core::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
                            0.5 * g * (1.0 + libm::tanh(z))
                        }
                    };
                    a * u
                })
                .collect();
            let mut d = matvec(&b.down, &act);
            if let Some([_, pm]) = &b.post_norms {
                d = rms(&d, pm, c.rms_eps as f64);
            }
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        let xn = rms(&x, &m.norm, c.rms_eps as f64);
        out.push(match &m.head {
            Head::Tied => (0..c.vocab_size)
                .map(|v| (0..h).map(|i| m.embed[v * h + i] as f64 * xn[i]).sum())
                .collect(),
            Head::Separate(l) => matvec(l, &xn),
        });
    }
    out
}

fn check(model: &Model<DenseLinear>, threads: usize) {
    model.validate().unwrap();
    // Longer than one attention block (128) so blocking and causal masking are exercised.
    let tokens: Vec<u32> = (0..150u32).map(|i| (i * 7 + 3) % 50).collect();
    let want = naive_logits(model, &tokens);
    let runner = Runner::new(model, tokens.len(), threads);
    let mut kv = runner.new_cache();
    let mut hidden = Vec::new();
    // Uneven chunks: prefill through the KV cache must equal the token-by-token result;
    // one-token chunks take the decode path.
    let chunks = [
        &tokens[..1],
        &tokens[1..140],
        &tokens[140..141],
        &tokens[141..],
    ];
    for chunk in chunks {
        let mut hid = Vec::new();
        runner.forward(chunk, &mut kv, &mut hid).unwrap();
        hidden.extend_from_slice(&hid);
    }
    let v = model.config.vocab_size;
    let mut logits = vec![0.0f32; tokens.len() * v];
    runner.logits(&hidden, &mut logits);
    // f32 forward vs f64 reference with values O(1): 1e-4 absolute is ~100 ULP headroom.
    for (p, row) in want.iter().enumerate() {
        for (j, w) in row.iter().enumerate() {
            let g = logits[p * v + j] as f64;
            assert!((g - w).abs() < 1e-4, "pos {p} logit {j}: {g} vs {w}");
        }
    }
    // NLLs from the blocked scorer equal -log softmax of the reference logits.
    let targets: Vec<u32> = tokens[1..].to_vec();
    let nll = runner.nll(
        &hidden[..(tokens.len() - 1) * model.config.hidden_size],
        &targets,
    );
    for (p, (n, &t)) in nll.iter().zip(&targets).enumerate() {
        let row = &want[p];
        let mx = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        assert!((n - (lse - row[t as usize])).abs() < 1e-4);
    }
}

#[test]
fn dense_llama_matches_naive_reference() {
    check(&random_model(config(false, true, RopeScaling::None), 1), 1);
}

#[test]
fn qwen2_biases_untied_head_two_threads() {
    check(&random_model(config(true, false, RopeScaling::None), 2), 2);
}

#[test]
fn gemma3_norms_geglu_and_local_layers() {
    let m = random_model(gemma3_config(), 5);
    assert_eq!(
        (0..4).map(|l| m.config.layer_window(l)).collect::<Vec<_>>(),
        [Some(16), Some(16), None, Some(16)]
    );
    check(&m, 2);
}

#[test]
fn llama3_rope_scaling() {
    let s = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 64.0,
    };
    let m = random_model(config(false, true, s), 3);
    // With these numbers the three bands (kept, smoothed, divided) all occur.
    let base = config(false, true, RopeScaling::None).rope_inv_freq();
    let scaled = m.config.rope_inv_freq();
    assert_eq!(scaled[0], base[0]);
    assert!((scaled[1] - base[1] / 8.0).abs() < 1e-9);
    check(&m, 1);
}

#[test]
fn context_overflow_is_an_error() {
    let m = random_model(config(false, true, RopeScaling::None), 4);
    let runner = Runner::new(&m, 4, 1);
    let mut kv = runner.new_cache();
    let mut h = Vec::new();
    let e = runner
        .forward(&[1, 2, 3, 4, 5], &mut kv, &mut h)
        .unwrap_err();
    assert_eq!(
        e,
        crate::forward::ForwardError::ContextFull {
            capacity: 4,
            needed: 5
        }
    );
    let e = runner.forward(&[99], &mut kv, &mut h).unwrap_err();
    assert_eq!(
        e,
        crate::forward::ForwardError::TokenOutOfRange {
            token: 99,
            vocab: 50
        }
    );
}

/// Batched decoding (one token of each of several sequences per call, the linears run
/// once over all rows) gives each sequence the logits it gets alone. Tolerance 1e-4
/// absolute on logits of magnitude ~1: the batch runs the linears as one GEMM and the
/// single sequence as matrix-vector products, which round differently (f32, sums of
/// at most 40 products).
#[test]
fn batched_decoding_equals_one_sequence_at_a_time() {
    use crate::forward::{KvCache, KvDtype, Workspace};
    let cases = [
        (KvDtype::F32, 1, config(true, false, RopeScaling::None)),
        (KvDtype::F16, 2, config(true, false, RopeScaling::None)),
        // 20 decoded tokens after prompts of up to 5: past the window of 16.
        (KvDtype::F32, 2, gemma3_config()),
    ];
    for (kvd, threads, c) in cases {
        let model = random_model(c, 11);
        let runner = Runner::new(&model, 64, threads);
        let vocab = model.config.vocab_size;
        let prompts: [&[u32]; 3] = [&[1, 2, 3], &[7], &[4, 9, 9, 30, 2]];
        let mut kvs: Vec<KvCache> = prompts
            .iter()
            .map(|_| KvCache::new(&model.config, 64, kvd))
            .collect();
        let mut alone: Vec<KvCache> = kvs.clone();
        let mut ws = Workspace::new();
        for (p, kv) in prompts.iter().zip(&mut kvs) {
            let n = p.len() - 1;
            runner.next_logits(&p[..n], kv, &mut ws).unwrap();
        }
        for (p, kv) in prompts.iter().zip(&mut alone) {
            let n = p.len() - 1;
            runner.next_logits(&p[..n], kv, &mut ws).unwrap();
        }
        let mut next: Vec<u32> = prompts.iter().map(|p| p[p.len() - 1]).collect();
        for step in 0..20 {
            let batch = runner
                .next_logits_batch(&next, &mut kvs, &mut ws)
                .unwrap()
                .to_vec();
            assert_eq!(batch.len(), 3 * vocab);
            for (i, kv) in alone.iter_mut().enumerate() {
                let one = runner.next_logits(&next[i..i + 1], kv, &mut ws).unwrap();
                let row = &batch[i * vocab..(i + 1) * vocab];
                let worst = row
                    .iter()
                    .zip(one)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(worst < 1e-4, "step {step} seq {i}: {worst}");
                assert_eq!(kv.len(), kvs[i].len());
            }
            next = next
                .iter()
                .map(|t| (t * 7 + step + 3) % vocab as u32)
                .collect();
        }
        let err = runner.next_logits_batch(&next[..2], &mut kvs, &mut ws);
        assert!(matches!(
            err,
            Err(crate::forward::ForwardError::BatchMismatch { .. })
        ));
    }
}
