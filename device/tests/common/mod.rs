//! A tiny random model written as a `.cap` file with every encoding the format has
//! (dense f32/f16/bf16, low-rank, bitmask, block-CSR, 2:4, low-rank + sparse), and the
//! same weights as a dense `f32` reference model built independently of the loader.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};

use cap_device::config::{Arch, Config, RopeScaling};
use cap_device::forward::{KvCache, KvDtype, Runner, Workspace};
use cap_device::model::{Block, DenseLinear, Embedding, Head, Linear, Model};
use cap_format::manifest::{Manifest, ModelConfig, Provenance, RopeScaling as RecRope};
use cap_format::sparse::{SparseKind, encode_sparse};
use cap_format::{DType, Encoding, StreamWriter, TensorDesc, WriterOptions};

/// Deterministic generator.
pub struct Lcg(pub u64);
impl Lcg {
    /// Uniform in [-0.5, 0.5).
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// The tiny model's configuration (intermediate 300: not a multiple of 256, so
/// block-CSR rows have a short last block; all widths multiples of 4 for 2:4).
pub fn config(tied: bool, qkv_bias: bool) -> Config {
    Config {
        arch: if qkv_bias { Arch::Qwen2 } else { Arch::Llama },
        vocab_size: 96,
        hidden_size: 36,
        intermediate_size: 300,
        n_layers: 3,
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 6,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        tie_embeddings: tied,
        qkv_bias,
        max_position: 1024,
        sliding_window: None,
        local_attention: None,
    }
}

/// How one linear layer of a tiny test model is stored (float or quantized values).
#[derive(Clone, Copy, Debug)]
pub enum Enc {
    Dense(DType),
    LowRank(u32, DType),
    Sparse(SparseKind, f32, DType),
    Composite(u32, DType, SparseKind, f32, DType),
}

/// The encodings assigned to the linear layers in turn.
pub const ENCODINGS: [Enc; 9] = [
    Enc::Dense(DType::F16),
    Enc::LowRank(5, DType::F32),
    Enc::Sparse(SparseKind::Bitmask, 0.4, DType::BF16),
    Enc::Sparse(SparseKind::BlockCsr, 0.3, DType::F16),
    Enc::Sparse(SparseKind::TwoFour, 0.5, DType::F16),
    Enc::Composite(3, DType::F16, SparseKind::Bitmask, 0.2, DType::F16),
    Enc::Dense(DType::F32),
    Enc::Composite(2, DType::BF16, SparseKind::BlockCsr, 0.25, DType::F32),
    Enc::Dense(DType::BF16),
];

/// A sparse `rows × cols` matrix of density about `d` (2:4: at most 2 of each 4).
fn sparse_dense(r: &mut Lcg, rows: usize, cols: usize, kind: SparseKind, d: f32) -> Vec<f32> {
    let mut w = vec![0.0f32; rows * cols];
    for (i, v) in w.iter_mut().enumerate() {
        let keep = match kind {
            SparseKind::TwoFour => i % 4 == (i / cols) % 4 || i % 4 == (i / cols + 2) % 4,
            _ => r.next() + 0.5 < d,
        };
        let x = r.next();
        if keep {
            // Never exactly zero, so the encoders keep every chosen position.
            *v = if x == 0.0 { 0.25 } else { x };
        }
    }
    w
}

/// The widths of `c`: (hidden, q, kv, intermediate, vocabulary).
fn dims(c: &Config) -> (usize, usize, usize, usize, usize) {
    (
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.vocab_size,
    )
}

/// The `.cap` bytes and the dense reference model with the same (rounded) weights.
pub fn tiny_cap(seed: u64, tied: bool, qkv_bias: bool) -> (Vec<u8>, Model<DenseLinear>) {
    let c = config(tied, qkv_bias);
    let mut r = Lcg(seed);
    let mut w = StreamWriter::new(Cursor::new(Vec::new()), WriterOptions::default()).unwrap();
    let (h, qd, kvd, inter, vocab) = dims(&c);
    let add =
        |w: &mut StreamWriter<Cursor<Vec<u8>>>, name: &str, d: &TensorDesc, parts: &[Vec<u8>]| {
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            w.add_tensor(name, d, &refs).unwrap();
        };
    let vector =
        |w: &mut StreamWriter<Cursor<Vec<u8>>>, r: &mut Lcg, name: &str, n: usize, base: f32| {
            let v: Vec<f32> = (0..n).map(|_| base + r.next()).collect();
            let (b, v) = store_rows(&v, n, DType::F32);
            let d = TensorDesc {
                rows: 1,
                cols: n as u32,
                encoding: Encoding::Dense { dtype: DType::F32 },
            };
            add(w, name, &d, &[b]);
            v
        };
    let (ed, eparts, embed) = encode(&mut r, vocab, h, Enc::Dense(DType::F16));
    let refs: Vec<&[u8]> = eparts.iter().map(|p| p.as_slice()).collect();
    w.add_tensor("token_embd.weight", &ed, &refs).unwrap();
    let mut k = 0usize;
    let mut blocks = Vec::new();
    for l in 0..c.n_layers {
        let name = |s: &str| format!("blk.{l}.{s}");
        let attn_norm = vector(&mut w, &mut r, &name("attn_norm.weight"), h, 1.0);
        let mlp_norm = vector(&mut w, &mut r, &name("ffn_norm.weight"), h, 1.0);
        let qkv_bias = qkv_bias.then(|| {
            [
                vector(&mut w, &mut r, &name("attn_q.bias"), qd, 0.0),
                vector(&mut w, &mut r, &name("attn_k.bias"), kvd, 0.0),
                vector(&mut w, &mut r, &name("attn_v.bias"), kvd, 0.0),
            ]
        });
        let mut lin = |s: &str, rows: usize, cols: usize| {
            let (d, parts, wt) = encode(&mut r, rows, cols, ENCODINGS[k % ENCODINGS.len()]);
            k += 1;
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            w.add_tensor(&name(s), &d, &refs).unwrap();
            DenseLinear::new(wt, rows, cols).unwrap()
        };
        let q = lin("attn_q.weight", qd, h);
        let kk = lin("attn_k.weight", kvd, h);
        let v = lin("attn_v.weight", kvd, h);
        let o = lin("attn_output.weight", h, qd);
        let gate = lin("ffn_gate.weight", inter, h);
        let up = lin("ffn_up.weight", inter, h);
        let down = lin("ffn_down.weight", h, inter);
        blocks.push(Block {
            attn_norm,
            q,
            k: kk,
            v,
            o,
            qkv_bias,
            qk_norm: None,
            post_norms: None,
            mlp_norm,
            gate,
            up,
            down,
        });
    }
    let norm = vector(&mut w, &mut r, "output_norm.weight", h, 1.0);
    let head = if tied {
        Head::Tied
    } else {
        let (d, parts, wt) = encode(
            &mut r,
            vocab,
            h,
            Enc::Sparse(SparseKind::Bitmask, 0.6, DType::F16),
        );
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        w.add_tensor("output.weight", &d, &refs).unwrap();
        Head::Separate(DenseLinear::new(wt, vocab, h).unwrap())
    };
    let manifest = test_manifest(&c, vocab, h, inter, tied, qkv_bias, "tiny");
    let bytes = w.finish(manifest).unwrap().into_inner();
    let model = Model {
        config: c,
        embed,
        blocks,
        norm,
        head,
    };
    model.validate().unwrap();
    (bytes, model)
}

const fn q8(group: u16) -> DType {
    DType::Q8 { group }
}
const fn q4(group: u16) -> DType {
    DType::Q4 { group }
}

/// The quantized encodings assigned to the linear layers in turn: Q8 and Q4 values,
/// dense (hidden 36 and intermediate 300 are not multiples of the groups, so rows end
/// in partial groups), bitmask, block-CSR, 2:4, low-rank and low-rank + sparse.
pub const QUANT_ENCODINGS: [Enc; 10] = [
    Enc::Dense(q8(32)),
    Enc::Dense(q4(32)),
    Enc::Sparse(SparseKind::Bitmask, 0.4, q8(16)),
    Enc::Sparse(SparseKind::Bitmask, 0.5, q4(64)),
    Enc::Sparse(SparseKind::BlockCsr, 0.3, q4(16)),
    Enc::Sparse(SparseKind::TwoFour, 0.5, q8(32)),
    Enc::LowRank(4, q8(16)),
    Enc::Composite(3, q4(16), SparseKind::Bitmask, 0.2, q8(16)),
    Enc::Composite(2, DType::F16, SparseKind::BlockCsr, 0.25, q4(32)),
    Enc::Dense(q8(256)),
];

/// Stores `v` (row-major, `cols` wide) in `dtype` (each row one run); returns the
/// bytes and the values as stored, decoded by `cap_format`.
fn store_rows(v: &[f32], cols: usize, dtype: DType) -> (Vec<u8>, Vec<f32>) {
    let mut b = Vec::new();
    cap_format::extend_rows(&mut b, v, cols, dtype);
    let vals = cap_format::dequantize_rows(&b, dtype, v.len() / cols, cols).unwrap();
    (b, vals)
}

/// One encoded layer (float or quantized values): (desc, parts) for the writer, and
/// its dense `f32` reference weight, as the stored values decode.
fn encode(r: &mut Lcg, rows: usize, cols: usize, e: Enc) -> (TensorDesc, Vec<Vec<u8>>, Vec<f32>) {
    let (rows32, cols32) = (rows as u32, cols as u32);
    let low = |r: &mut Lcg, rank: u32, dt: DType| {
        let k = rank as usize;
        let a: Vec<f32> = (0..k * cols).map(|_| r.next()).collect();
        let b: Vec<f32> = (0..rows * k).map(|_| r.next()).collect();
        let (ab, av) = store_rows(&a, cols, dt);
        let (bb, bv) = store_rows(&b, k, dt);
        (vec![ab, bb], factor_product(&bv, &av, rows, cols, k))
    };
    let sparse = |r: &mut Lcg, kind: SparseKind, d: f32, dt: DType| {
        let s = sparse_dense(r, rows, cols, kind, d);
        // Quantized values: encoded as f32, then each row's kept values quantized.
        let float = if dt.is_quantized() { DType::F32 } else { dt };
        let raw = cap_format::to_bytes(&s, float);
        let (sp, parts) = encode_sparse(kind, rows32, cols32, float, &raw).unwrap();
        let (q, qp) = if dt.is_quantized() {
            cap_format::quantize_sparse(rows32, cols32, sp, parts, dt).unwrap()
        } else {
            (sp, parts)
        };
        let view = match kind {
            SparseKind::Bitmask => cap_format::SparseView::Bitmask {
                mask: &qp[0],
                values: cap_format::Values {
                    dtype: dt,
                    bytes: &qp[1],
                },
            },
            SparseKind::BlockCsr => cap_format::SparseView::BlockCsr(cap_format::CsrView {
                block_ptr: &qp[0],
                col_idx: &qp[1],
                values: cap_format::Values {
                    dtype: dt,
                    bytes: &qp[2],
                },
            }),
            SparseKind::TwoFour => cap_format::SparseView::TwoFour {
                values: cap_format::Values {
                    dtype: dt,
                    bytes: &qp[0],
                },
                meta: &qp[1],
            },
        };
        let w = cap_format::decode_sparse_f32(rows32, cols32, q, &view).unwrap();
        (q, qp, w)
    };
    let desc = |encoding| TensorDesc {
        rows: rows32,
        cols: cols32,
        encoding,
    };
    match e {
        Enc::Dense(dt) => {
            let w: Vec<f32> = (0..rows * cols).map(|_| r.next()).collect();
            let (b, v) = store_rows(&w, cols, dt);
            (desc(Encoding::Dense { dtype: dt }), vec![b], v)
        }
        Enc::LowRank(rank, dt) => {
            let (parts, w) = low(r, rank, dt);
            (desc(Encoding::LowRank { rank, dtype: dt }), parts, w)
        }
        Enc::Sparse(kind, d, dt) => {
            let (sp, parts, w) = sparse(r, kind, d, dt);
            (desc(Encoding::Sparse(sp)), parts, w)
        }
        Enc::Composite(rank, fdt, kind, d, sdt) => {
            let (mut parts, mut w) = low(r, rank, fdt);
            let (sp, sparts, s) = sparse(r, kind, d, sdt);
            parts.extend(sparts);
            for (a, b) in w.iter_mut().zip(&s) {
                *a += b;
            }
            let e = Encoding::Composite {
                rank,
                factor_dtype: fdt,
                sparse: sp,
            };
            (desc(e), parts, w)
        }
    }
}

/// Two `.cap` files of one tiny model: every linear (and the embedding when `tied`,
/// else the separate head) stored with quantized values ([`QUANT_ENCODINGS`]), and
/// the same model with each of those tensors dequantized and stored dense `f32`.
pub fn tiny_quantized_cap(seed: u64, tied: bool) -> (Vec<u8>, Vec<u8>) {
    let c = config(tied, false);
    let mut r = Lcg(seed);
    let new = || StreamWriter::new(Cursor::new(Vec::new()), WriterOptions::default()).unwrap();
    let (mut wq, mut wf) = (new(), new());
    let (h, qd, kvd, inter, vocab) = dims(&c);
    // Writes one tensor to both files: as encoded, and dense f32 from `w`.
    let mut both = |name: &str, d: &TensorDesc, parts: &[Vec<u8>], w: &[f32]| {
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        wq.add_tensor(name, d, &refs).unwrap();
        let fd = TensorDesc {
            encoding: Encoding::Dense { dtype: DType::F32 },
            ..*d
        };
        wf.add_tensor(name, &fd, &[&cap_format::to_bytes(w, DType::F32)])
            .unwrap();
    };
    let vector = |r: &mut Lcg, name: &str, n: usize| {
        let v: Vec<f32> = (0..n).map(|_| 1.0 + r.next()).collect();
        let d = TensorDesc {
            rows: 1,
            cols: n as u32,
            encoding: Encoding::Dense { dtype: DType::F32 },
        };
        (name.to_string(), d, v)
    };
    let embed_enc = if tied {
        Enc::Dense(q8(16))
    } else {
        Enc::Dense(DType::F16)
    };
    let (ed, ep, ew) = if tied {
        encode(&mut r, vocab, h, embed_enc)
    } else {
        let (d, p, w) = encode(&mut r, vocab, h, Enc::Dense(DType::F16));
        (d, p, w)
    };
    both("token_embd.weight", &ed, &ep, &ew);
    let mut k = 0usize;
    for l in 0..c.n_layers {
        let name = |s: &str| format!("blk.{l}.{s}");
        for (n, len) in [("attn_norm.weight", h), ("ffn_norm.weight", h)] {
            let (nm, d, v) = vector(&mut r, &name(n), len);
            both(&nm, &d, &[cap_format::to_bytes(&v, DType::F32)], &v);
        }
        for (s, rows, cols) in [
            ("attn_q.weight", qd, h),
            ("attn_k.weight", kvd, h),
            ("attn_v.weight", kvd, h),
            ("attn_output.weight", h, qd),
            ("ffn_gate.weight", inter, h),
            ("ffn_up.weight", inter, h),
            ("ffn_down.weight", h, inter),
        ] {
            let (d, parts, w) = encode(
                &mut r,
                rows,
                cols,
                QUANT_ENCODINGS[k % QUANT_ENCODINGS.len()],
            );
            k += 1;
            both(&name(s), &d, &parts, &w);
        }
    }
    let (nm, d, v) = vector(&mut r, "output_norm.weight", h);
    both(&nm, &d, &[cap_format::to_bytes(&v, DType::F32)], &v);
    if !tied {
        let (d, parts, w) = encode(
            &mut r,
            vocab,
            h,
            Enc::Sparse(SparseKind::Bitmask, 0.6, q4(32)),
        );
        both("output.weight", &d, &parts, &w);
    }
    let manifest = test_manifest(&c, vocab, h, inter, tied, false, "tiny-quantized");
    (
        wq.finish(manifest.clone()).unwrap().into_inner(),
        wf.finish(manifest).unwrap().into_inner(),
    )
}

/// Allocations (and reallocations) made through [`Counting`] so far.
pub static ALLOCS: AtomicUsize = AtomicUsize::new(0);

/// A global allocator that forwards to the system allocator and counts, for the
/// tests that decoding allocates nothing per token (each test binary declares it as
/// its `#[global_allocator]`).
pub struct Counting;

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

/// The manifest of a test file: the model record of `c` (with the dimensions the
/// builders use), no tokenizer or compression record, `source` as the source name.
fn test_manifest(
    c: &Config,
    vocab: usize,
    h: usize,
    inter: usize,
    tied: bool,
    qkv_bias: bool,
    source: &str,
) -> Manifest {
    Manifest {
        model: ModelConfig {
            architecture: c.arch.name().into(),
            vocab_size: vocab as u32,
            hidden_size: h as u32,
            intermediate_size: inter as u32,
            num_layers: c.n_layers as u32,
            num_heads: c.n_heads as u32,
            num_kv_heads: c.n_kv_heads as u32,
            head_dim: c.head_dim as u32,
            rope_theta: c.rope_theta,
            rope_scaling: RecRope::None,
            rms_norm_eps: c.rms_eps,
            tie_word_embeddings: tied,
            qkv_bias,
            max_position: c.max_position as u32,
        },
        tokenizer: None,
        compression: None,
        provenance: Provenance {
            source_file: source.into(),
            source_sha256: [0; 32],
            cap_version: "test".into(),
            created_unix: None,
        },
        tensors: vec![],
        extensions: vec![],
    }
}

/// `B·A` of stored factors (`B` rows × k, `A` k × cols, row-major) in f64, rounded
/// once to f32: the reference a low-rank layer is compared with.
fn factor_product(b: &[f32], a: &[f32], rows: usize, cols: usize, k: usize) -> Vec<f32> {
    let mut w = vec![0.0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let s: f64 = (0..k)
                .map(|p| b[i * k + p] as f64 * a[p * cols + j] as f64)
                .sum();
            w[i * cols + j] = s as f32;
        }
    }
    w
}

/// Logits of a fixed 20-token prompt (the batched path), then of 10 tokens decoded one
/// at a time (the matrix-vector path), on `threads` threads: what the model tests
/// compare between two ways of running the same weights.
pub fn prompt_and_decode_logits<L: Linear, E: Embedding>(
    model: &Model<L, E>,
    threads: usize,
) -> Vec<f32> {
    let c = &model.config;
    let tokens: Vec<u32> = (0..30u32)
        .map(|i| (i * 37 + 5) % c.vocab_size as u32)
        .collect();
    let (prompt, rest) = tokens.split_at(20);
    let runner = Runner::new(model, tokens.len(), threads);
    let mut cache = KvCache::new(c, tokens.len(), KvDtype::F32);
    let mut ws = Workspace::new();
    let mut out = runner
        .next_logits(prompt, &mut cache, &mut ws)
        .unwrap()
        .to_vec();
    for &t in rest {
        out.extend_from_slice(runner.next_logits(&[t], &mut cache, &mut ws).unwrap());
    }
    out
}
