//! `cap_host::pack` and `cap_host::capinfo`: tiny fixtures packed to `.cap` and read
//! back exactly (f32) or within f16 rounding, the inspect report's accounting,
//! `verify_cap` catching a flipped byte, and the real SmolLM2-135M packed to f16
//! (skipped with `CAP_SKIP_MODEL_TESTS=1`).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use cap_device::model::{DenseLinear, Head, Model};
use cap_format::{CapFile, DType, TensorData};
use cap_host::capinfo::{inspect_cap, render, verify_cap};
use cap_host::import::Checkpoint;
use cap_host::pack::{pack, sha256_file};

const FIXTURES: [&str; 3] = ["llama-tied", "qwen2", "llama3-scaled"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny")
        .join(name)
}

type Want<'a> = (String, usize, usize, &'a [f32], bool);

fn lin(n: String, l: &DenseLinear) -> Want<'_> {
    (n, l.out_features, l.in_features, &l.weight[..], true)
}

fn vecn<'a>(i: usize, n: &str, x: &'a [f32]) -> Want<'a> {
    (format!("blk.{i}.{n}"), 1, x.len(), x, false)
}

/// `(name, rows, cols, values, is_matrix)` in the order `pack` writes them.
fn expected(m: &Model<DenseLinear>) -> Vec<Want<'_>> {
    let c = &m.config;
    let mut v = vec![(
        "token_embd.weight".to_string(),
        c.vocab_size,
        c.hidden_size,
        &m.embed[..],
        true,
    )];
    for (i, b) in m.blocks.iter().enumerate() {
        v.push(vecn(i, "attn_norm.weight", &b.attn_norm));
        v.push(lin(format!("blk.{i}.attn_q.weight"), &b.q));
        v.push(lin(format!("blk.{i}.attn_k.weight"), &b.k));
        v.push(lin(format!("blk.{i}.attn_v.weight"), &b.v));
        if let Some([q, k, vb]) = &b.qkv_bias {
            v.push(vecn(i, "attn_q.bias", q));
            v.push(vecn(i, "attn_k.bias", k));
            v.push(vecn(i, "attn_v.bias", vb));
        }
        v.push(lin(format!("blk.{i}.attn_output.weight"), &b.o));
        v.push(vecn(i, "ffn_norm.weight", &b.mlp_norm));
        v.push(lin(format!("blk.{i}.ffn_gate.weight"), &b.gate));
        v.push(lin(format!("blk.{i}.ffn_up.weight"), &b.up));
        v.push(lin(format!("blk.{i}.ffn_down.weight"), &b.down));
    }
    v.push((
        "output_norm.weight".into(),
        1,
        m.norm.len(),
        &m.norm[..],
        false,
    ));
    if let Head::Separate(h) = &m.head {
        v.push(lin("output.weight".into(), h));
    }
    v
}

fn pack_to(src: &Path, dir: &Path, dtype: DType) -> (PathBuf, Vec<u8>) {
    let ck = Checkpoint::open(src).expect("open fixture");
    let out = dir.join(format!("model-{dtype:?}.cap"));
    let sha = sha256_file(&src.join("model.safetensors")).expect("sha256");
    let rep = pack(&ck, &out, dtype, "model.safetensors", &sha).expect("pack");
    let bytes = std::fs::read(&out).expect("read packed file");
    assert_eq!(rep.file_bytes, bytes.len() as u64);
    (out, bytes)
}

#[test]
fn fixtures_round_trip_f32_exact_and_f16_rounded() {
    for name in FIXTURES {
        let src = fixture(name);
        let model = Checkpoint::open(&src).unwrap().load_model().unwrap();
        let want = expected(&model);
        let dir = tempfile::tempdir().unwrap();
        for dtype in [DType::F32, DType::F16] {
            let (_, bytes) = pack_to(&src, dir.path(), dtype);
            let f = CapFile::parse(&bytes).expect("parse");
            f.verify_all().expect("verify_all");
            let m = f.manifest();
            assert_eq!(m.model.architecture, model.config.arch.name(), "{name}");
            assert_eq!(m.model.num_layers as usize, model.config.n_layers);
            assert_eq!(m.model.qkv_bias, model.config.qkv_bias, "{name}");
            assert!(m.compression.is_none());
            assert_eq!(m.provenance.source_file, "model.safetensors");
            assert_eq!(m.provenance.cap_version, env!("CARGO_PKG_VERSION"));
            assert!(m.provenance.created_unix.is_some());
            let got: Vec<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
            let names: Vec<&str> = want.iter().map(|w| w.0.as_str()).collect();
            assert_eq!(got, names, "{name}: tensor names/order");
            for (tname, rows, cols, vals, is_matrix) in &want {
                let t = f.tensor_by_name(tname).unwrap();
                assert_eq!(
                    (t.rows as usize, t.cols as usize),
                    (*rows, *cols),
                    "{tname}"
                );
                let TensorData::Dense(v) = t.data().unwrap() else {
                    panic!("{tname}: not dense")
                };
                let stored = if *is_matrix { dtype } else { DType::F32 };
                assert_eq!(v.dtype, stored, "{name} {tname}");
                match stored {
                    DType::F32 => {
                        let s = v.as_f32().unwrap();
                        assert_eq!(s.len(), vals.len());
                        for (k, (a, b)) in s.iter().zip(vals.iter()).enumerate() {
                            assert_eq!(a.to_bits(), b.to_bits(), "{name} {tname}[{k}]");
                        }
                    }
                    _ => {
                        let s = v.as_u16().unwrap();
                        assert_eq!(s.len(), vals.len());
                        for (k, (a, b)) in s.iter().zip(vals.iter()).enumerate() {
                            let a = half::f16::from_bits(*a).to_f32();
                            let b = half::f16::from_f32(*b).to_f32();
                            assert_eq!(a.to_bits(), b.to_bits(), "{name} {tname}[{k}]");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn gguf_fixture_carries_its_tokenizer() {
    let src = fixture("llama-tied").join("llama-tied.gguf");
    let ck = Checkpoint::open(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.cap");
    let sha = sha256_file(&src).unwrap();
    let rep = pack(&ck, &out, DType::BF16, "llama-tied.gguf", &sha).unwrap();
    assert!(rep.tokenizer);
    let bytes = std::fs::read(&out).unwrap();
    let f = CapFile::parse(&bytes).unwrap();
    f.verify_all().unwrap();
    let tok = f.manifest().tokenizer.as_ref().expect("tokenizer");
    // Everything the device needs comes back: the rebuilt spec equals the imported one.
    let rebuilt = cap_device::tokenizer::TokenizerSpec::from_record(tok).unwrap();
    assert_eq!(&rebuilt, ck.tokenizer().unwrap().spec());
    let r = inspect_cap(&bytes).unwrap();
    assert_eq!(r.provenance.source_sha256, sha);
    assert!(
        r.tensors[0].encoding == "dense bf16",
        "{}",
        r.tensors[0].encoding
    );
}

#[test]
fn pack_errors_name_the_output_file() {
    let ck = Checkpoint::open(&fixture("llama-tied")).unwrap();
    let out = Path::new("/nonexistent-dir-for-cap-tests/x.cap");
    let e = pack(&ck, out, DType::F16, "x", &"0".repeat(64)).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent-dir-for-cap-tests/x.cap"));
    let e = pack(&ck, Path::new("/tmp/y.cap"), DType::F16, "x", "abc").unwrap_err();
    assert!(format!("{e:#}").contains("sha256"));
    let e = sha256_file(Path::new("/nonexistent-file-for-cap")).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent-file-for-cap"));
}

#[test]
fn inspect_reports_architecture_and_group_bytes() {
    for name in FIXTURES {
        let src = fixture(name);
        let cfg = Checkpoint::open(&src).unwrap().config().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (_, bytes) = pack_to(&src, dir.path(), DType::F16);
        let r = inspect_cap(&bytes).expect("inspect");
        assert_eq!(r.architecture, cfg.arch.name());
        assert_eq!(r.num_layers as usize, cfg.n_layers);
        assert_eq!(r.hidden_size as usize, cfg.hidden_size);
        let per_block = 9 + if cfg.qkv_bias { 3 } else { 0 };
        let head = if cfg.tie_embeddings { 0 } else { 1 };
        assert_eq!(
            r.tensors.len(),
            2 + head + per_block * cfg.n_layers,
            "{name}"
        );
        let sum_t: u64 = r.tensors.iter().map(|t| t.bytes).sum();
        let sum_g: u64 = r.groups.values().map(|g| g.bytes).sum();
        assert_eq!(sum_t, r.tensor_bytes);
        assert_eq!(sum_g, r.tensor_bytes);
        assert!(
            !r.groups.contains_key("other"),
            "{name}: unclassified tensors"
        );
        assert_eq!(r.groups.contains_key("head"), !cfg.tie_embeddings);
        let text = render(&r);
        assert!(text.contains(cfg.arch.name()));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"groups\""));
        let v = verify_cap(&bytes).expect("verify");
        assert_eq!(v.tensors, r.tensors.len());
    }
}

#[test]
fn verify_names_a_flipped_byte_in_a_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut bytes) = pack_to(&fixture("qwen2"), dir.path(), DType::F16);
    let f = CapFile::parse(&bytes).unwrap();
    let i = f.find("blk.1.attn_k.weight").unwrap();
    let at = f.header().data_offset + f.manifest().tensors[i].offset + 10;
    bytes[at as usize] ^= 0x01;
    let e = verify_cap(&bytes).unwrap_err();
    assert!(e.contains("blk.1.attn_k.weight"), "{e}");
    assert!(e.to_lowercase().contains("checksum"), "{e}");
    assert!(!e.contains('\n'));
    // Structure is intact, so inspect still works; verify is what catches it.
    assert!(inspect_cap(&bytes).is_ok());
    let e = verify_cap(&bytes[..100]).unwrap_err();
    assert!(!e.is_empty());
}

#[test]
fn real_model_f16_size() {
    let Some(src) = common::real_model() else {
        return;
    };
    let gguf_bytes = std::fs::metadata(&src).unwrap().len();
    let ck = Checkpoint::open(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2.cap");
    let sha = sha256_file(&src).unwrap();
    let rep = pack(
        &ck,
        &out,
        DType::F16,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        &sha,
    )
    .unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let v = verify_cap(&bytes).expect("verify");
    let r = inspect_cap(&bytes).unwrap();
    assert!(rep.tokenizer);
    let tok = CapFile::parse(&bytes)
        .unwrap()
        .manifest()
        .tokenizer
        .clone()
        .unwrap();
    let rebuilt = cap_device::tokenizer::TokenizerSpec::from_record(&tok).unwrap();
    assert_eq!(&rebuilt, ck.tokenizer().unwrap().spec());
    println!(
        "SmolLM2-135M f16 .cap: {} bytes ({} tensors, {} params, sections {} bytes, manifest {} bytes); GGUF Q4_1 {} bytes (ratio {:.3}); 2×params {} (ratio {:.4})",
        rep.file_bytes,
        rep.tensors,
        rep.params,
        rep.tensor_bytes,
        r.manifest_bytes,
        gguf_bytes,
        rep.file_bytes as f64 / gguf_bytes as f64,
        2 * rep.params,
        rep.file_bytes as f64 / (2 * rep.params) as f64
    );
    assert_eq!(v.tensors, rep.tensors);
    // Norms stay f32 and the manifest holds the tokenizer: within 2% of 2 bytes/param.
    assert!(rep.file_bytes >= 2 * rep.params);
    assert!((rep.file_bytes as f64) < 2.0 * rep.params as f64 * 1.02);
}
