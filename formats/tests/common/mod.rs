//! Shared test helpers: a seeded RNG, random tensors with valid sparse structure,
//! a full sample manifest, in-memory writing, and corrupt-file crafting.
#![allow(dead_code)]

use std::io::Cursor;

use cap_format::encoding::CSR_BLOCK_COLS;
use cap_format::*;

/// SplitMix64: small, seeded, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    pub fn dtype(&mut self) -> DType {
        [DType::F32, DType::F16, DType::BF16][self.below(3) as usize]
    }
}

/// Which family of encoding to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dense,
    LowRank,
    Bitmask,
    BlockCsr,
    TwoFour,
    CompositeBitmask,
    CompositeCsr,
    CompositeTwoFour,
}

pub const KINDS: [Kind; 8] = [
    Kind::Dense,
    Kind::LowRank,
    Kind::Bitmask,
    Kind::BlockCsr,
    Kind::TwoFour,
    Kind::CompositeBitmask,
    Kind::CompositeCsr,
    Kind::CompositeTwoFour,
];

/// Builds valid sparse parts for a random pattern of the given density.
fn sparse_parts(
    rng: &mut Rng,
    rows: u32,
    cols: u32,
    kind: Kind,
    density: f64,
    dtype: DType,
) -> (Sparse, Vec<Vec<u8>>) {
    let (r, c) = (rows as usize, cols as usize);
    let ds = dtype.size();
    match kind {
        Kind::TwoFour | Kind::CompositeTwoFour => {
            let groups = r * c / 4;
            let mut meta = vec![0u8; groups.div_ceil(2)];
            for g in 0..groups {
                let a = rng.below(3) as u8;
                let b = a + 1 + rng.below(3 - a as u64) as u8;
                meta[g / 2] |= (a | (b << 2)) << (4 * (g % 2));
            }
            (
                Sparse::TwoFour { dtype },
                vec![rng.bytes(r * c / 2 * ds), meta],
            )
        }
        _ => {
            let keep: Vec<bool> = (0..r * c).map(|_| rng.f64() < density).collect();
            let nnz = keep.iter().filter(|&&k| k).count();
            let values = rng.bytes(nnz * ds);
            if matches!(kind, Kind::Bitmask | Kind::CompositeBitmask) {
                let mut mask = vec![0u8; (r * c).div_ceil(8)];
                for (i, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
                    mask[i / 8] |= 1 << (i % 8);
                }
                (
                    Sparse::Bitmask {
                        nnz: nnz as u64,
                        dtype,
                    },
                    vec![mask, values],
                )
            } else {
                let nb = c.div_ceil(CSR_BLOCK_COLS as usize);
                let mut ptr = vec![0u32];
                let mut idx = Vec::new();
                for row in 0..r {
                    for b in 0..nb {
                        let lo = b * 256;
                        for col in lo..(lo + 256).min(c) {
                            if keep[row * c + col] {
                                idx.push((col - lo) as u8);
                            }
                        }
                        ptr.push(idx.len() as u32);
                    }
                }
                let ptr_bytes = ptr.iter().flat_map(|p| p.to_le_bytes()).collect();
                (
                    Sparse::BlockCsr {
                        nnz: nnz as u64,
                        dtype,
                    },
                    vec![ptr_bytes, idx, values],
                )
            }
        }
    }
}

/// A random tensor of the given kind: its description and its parts in layout order.
pub fn gen_tensor(
    rng: &mut Rng,
    rows: u32,
    cols: u32,
    kind: Kind,
    density: f64,
) -> (TensorDesc, Vec<Vec<u8>>) {
    let dtype = rng.dtype();
    let rank = rng.range(1, u64::from(rows.min(cols).min(24))) as u32;
    let (r, c) = (rows as usize, cols as usize);
    let (encoding, parts) = match kind {
        Kind::Dense => (
            Encoding::Dense { dtype },
            vec![rng.bytes(r * c * dtype.size())],
        ),
        Kind::LowRank => (
            Encoding::LowRank { rank, dtype },
            vec![
                rng.bytes(rank as usize * c * dtype.size()),
                rng.bytes(r * rank as usize * dtype.size()),
            ],
        ),
        Kind::Bitmask | Kind::BlockCsr | Kind::TwoFour => {
            let (s, p) = sparse_parts(rng, rows, cols, kind, density, dtype);
            (Encoding::Sparse(s), p)
        }
        _ => {
            let fd = rng.dtype();
            let (s, sp) = sparse_parts(rng, rows, cols, kind, density, dtype);
            let mut p = vec![
                rng.bytes(rank as usize * c * fd.size()),
                rng.bytes(r * rank as usize * fd.size()),
            ];
            p.extend(sp);
            (
                Encoding::Composite {
                    rank,
                    factor_dtype: fd,
                    sparse: s,
                },
                p,
            )
        }
    };
    (
        TensorDesc {
            rows,
            cols,
            encoding,
        },
        parts,
    )
}

/// A manifest with every field filled (tensor directory empty).
pub fn sample_manifest(with_tokenizer: bool) -> Manifest {
    Manifest {
        model: ModelConfig {
            architecture: "llama".into(),
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rope_theta: 100000.0,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192,
            },
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            qkv_bias: false,
            max_position: 8192,
        },
        tokenizer: with_tokenizer.then(|| Tokenizer {
            kind: TokenizerKind::ByteLevelBpe,
            pre_tokenizer: "smollm".into(),
            tokens: vec!["<|endoftext|>".into(), "a".into(), "b".into(), "ab".into()],
            scores: vec![0.0, -1.0, -2.0, -3.0],
            special_ids: vec![0],
            merges: vec![("a".into(), "b".into())],
            ignore_merges: false,
            bos_id: Some(0),
            eos_id: Some(0),
            unk_id: None,
            add_bos: false,
            space_prefix: SpacePrefix::Never,
            byte_fallback: false,
        }),
        compression: with_tokenizer.then(|| Compression {
            method: "cap".into(),
            budget: Budget {
                kind: BudgetKind::FractionOfDense,
                value: 0.5,
            },
            target_profile: "jetson-orin-nano-8gb".into(),
            layers: vec![LayerCompression {
                tensor: "blk.0.attn_q".into(),
                rank: 8,
                nnz: 1000,
            }],
            perplexity: Some(PerplexityRecord {
                value: 20.5,
                protocol: PerplexityProtocol::LlamaCpp,
                text_name: "wikitext-2 valid".into(),
                ctx: 512,
                windows: 4,
            }),
            self_test_text: "The quick brown fox.".into(),
        }),
        provenance: Provenance {
            source_file: "model.safetensors".into(),
            source_sha256: [7; 32],
            cap_version: "0.1.0".into(),
            created_unix: None,
        },
        tensors: vec![],
        extensions: vec![],
    }
}

/// A named tensor with its parts in layout order.
pub type NamedTensor = (String, TensorDesc, Vec<Vec<u8>>);

/// Writes tensors + manifest into memory.
pub fn write_mem(tensors: &[NamedTensor], manifest: Manifest, alignment: u32) -> Vec<u8> {
    let mut w = StreamWriter::new(Cursor::new(Vec::new()), WriterOptions { alignment }).unwrap();
    for (name, desc, parts) in tensors {
        let p: Vec<&[u8]> = parts.iter().map(|v| v.as_slice()).collect();
        w.add_tensor(name, desc, &p).unwrap();
    }
    w.finish(manifest).unwrap().into_inner()
}

/// Copies `bytes` into 8-aligned memory (so typed views succeed) and runs `f`.
pub fn aligned<R>(bytes: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
    buf[..bytes.len()].copy_from_slice(bytes);
    f(&buf[..bytes.len()])
}

/// A small valid file: three tensors (dense, low-rank, composite bitmask).
pub fn small_file(alignment: u32, with_tokenizer: bool) -> Vec<u8> {
    let mut rng = Rng(42);
    let t = vec![
        ("norm".to_string(), Kind::Dense, 1, 8),
        ("q".to_string(), Kind::LowRank, 8, 8),
        ("k".to_string(), Kind::CompositeBitmask, 8, 8),
    ];
    let tensors: Vec<_> = t
        .into_iter()
        .map(|(n, k, r, c)| {
            let (d, p) = gen_tensor(&mut rng, r, c, k, 0.3);
            (n, d, p)
        })
        .collect();
    write_mem(&tensors, sample_manifest(with_tokenizer), alignment)
}

/// Splits a valid file into header, data region and manifest.
pub fn split(file: &[u8]) -> (Header, Vec<u8>, Manifest) {
    let h = Header::decode(file).unwrap();
    let data = file[h.data_offset as usize..h.manifest_offset as usize].to_vec();
    let m = decode_manifest(&file[h.manifest_offset as usize..]).unwrap();
    (h, data, m)
}

/// Reassembles a file from parts, fixing lengths, offsets and both checksums, so a
/// test can change exactly one thing and reach the check it aims at.
pub fn assemble(mut h: Header, data: &[u8], m: &Manifest) -> Vec<u8> {
    let mb = encode_manifest(m).unwrap();
    let mut out = vec![0u8; h.data_offset as usize];
    out.extend_from_slice(data);
    h.data_len = data.len() as u64;
    h.manifest_offset = out.len() as u64;
    h.manifest_len = mb.len() as u64;
    h.manifest_crc32 = crc32fast_hash(&mb);
    out.extend_from_slice(&mb);
    out[..HEADER_LEN].copy_from_slice(&h.encode());
    out
}

/// Rewrites only the header (recomputing its CRC).
pub fn with_header(file: &[u8], f: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut h = Header::decode(file).unwrap();
    f(&mut h);
    let mut out = file.to_vec();
    out[..HEADER_LEN].copy_from_slice(&h.encode());
    out
}

/// Rewrites only the manifest (recomputing header lengths and CRCs).
pub fn with_manifest(file: &[u8], f: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let (h, data, mut m) = split(file);
    f(&mut m);
    assemble(h, &data, &m)
}

/// Bitwise reference CRC-32 (IEEE, reflected 0xEDB88320), independent of crc32fast,
/// so the tests also cross-check the checksum the library computes.
pub fn crc32fast_hash(b: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &x in b {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}
