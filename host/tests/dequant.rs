//! GGML dequantization (`cap_host::import::dequant`) against reference values computed by
//! the `gguf` Python package (see `host/tests/fixtures/dequant/README.md`).
//!
//! Expected equality is bit-exact for every type: ggml's `dequantize_row_*`, gguf-py's
//! numpy code and cap all convert the `f16` scales exactly and then do the same `f32`
//! operations in the same order (`(d * sc) * q - (dmin * m)` and the like; the integer
//! quants are exact in `f32`), each rounded once, with no fused multiply-add.

use std::path::PathBuf;

use cap_host::import::dequant::{
    DequantError, GgmlType, dequantize, dequantize_into, ggml_type_name,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dequant")
        .join(name)
}

fn load(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let raw = std::fs::read(fixture(&format!("{}.bin", ty.name()))).expect("fixture .bin");
    let exp = std::fs::read(fixture(&format!("{}.f32", ty.name()))).expect("fixture .f32");
    assert_eq!(exp.len() % 4, 0);
    let exp = exp
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (raw, exp)
}

#[test]
fn matches_gguf_py_bit_exactly() {
    for ty in GgmlType::ALL {
        let (raw, expected) = load(ty);
        let n = expected.len();
        assert_eq!(ty.bytes_for(n), Some(raw.len()), "{ty}: fixture size");
        let got = dequantize(ty, &raw, n).unwrap_or_else(|e| panic!("{ty}: {e}"));
        assert_eq!(got.len(), n);
        let mismatches: Vec<String> = got
            .iter()
            .zip(&expected)
            .enumerate()
            .filter(|(_, (g, e))| g.to_bits() != e.to_bits())
            .take(5)
            .map(|(i, (g, e))| {
                format!(
                    "[{i}] got {g:e} ({:#010x}), want {e:e} ({:#010x})",
                    g.to_bits(),
                    e.to_bits()
                )
            })
            .collect();
        assert!(mismatches.is_empty(), "{ty}: {}", mismatches.join("; "));
        // The fixtures are meant to exercise real values, not all zeros.
        assert!(
            expected.iter().filter(|v| **v != 0.0).count() > n / 2,
            "{ty}: degenerate fixture"
        );
    }
}

#[test]
fn dequantize_into_matches_dequantize() {
    for ty in GgmlType::ALL {
        let (raw, expected) = load(ty);
        let mut out = vec![f32::NAN; expected.len()];
        dequantize_into(ty, &raw, &mut out).unwrap();
        assert!(
            out.iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{ty}"
        );
    }
}

#[test]
fn large_tensor_matches_fixture_repeated() {
    // Big enough for the parallel path: the fixture's blocks repeated many times.
    for ty in GgmlType::ALL {
        let (raw, expected) = load(ty);
        let reps = (1 << 18) / expected.len() + 3;
        let raw: Vec<u8> = raw.iter().copied().cycle().take(raw.len() * reps).collect();
        let got = dequantize(ty, &raw, expected.len() * reps).unwrap();
        for (i, chunk) in got.chunks_exact(expected.len()).enumerate() {
            assert!(
                chunk
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ty} rep {i}"
            );
        }
    }
}

#[test]
fn wrong_byte_length_is_an_error() {
    for ty in GgmlType::ALL {
        let (raw, expected) = load(ty);
        let n = expected.len();
        for len in [
            0,
            1,
            raw.len() - 1,
            raw.len() + 1,
            raw.len() + ty.block_bytes(),
        ] {
            let data = vec![0u8; len];
            match dequantize(ty, &data, n) {
                Err(DequantError::WrongByteLength {
                    expected: e,
                    actual,
                    ..
                }) => {
                    assert_eq!((e, actual), (raw.len(), len), "{ty}");
                }
                other => panic!("{ty} with {len} bytes: {other:?}"),
            }
            let mut out = vec![0.0; n];
            assert!(
                dequantize_into(ty, &data, &mut out).is_err(),
                "{ty} with {len} bytes"
            );
        }
        let msg = dequantize(ty, &raw[1..], n).unwrap_err().to_string();
        assert!(
            msg.contains(ty.name()) && msg.contains(&raw.len().to_string()),
            "{msg}"
        );
    }
}

#[test]
fn partial_block_is_an_error() {
    for ty in GgmlType::ALL {
        let be = ty.block_elems();
        if be == 1 {
            continue;
        }
        for n in [1, be - 1, be + 1, 3 * be + be / 2] {
            assert_eq!(ty.bytes_for(n), None, "{ty} n={n}");
            let err = dequantize(ty, &vec![0u8; ty.block_bytes() * 4], n).unwrap_err();
            assert!(
                matches!(err, DequantError::NotBlockMultiple { .. }),
                "{ty} n={n}: {err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(ty.name()) && msg.contains(&be.to_string()),
                "{msg}"
            );
            let mut out = vec![0.0; n];
            assert!(dequantize_into(ty, &[], &mut out).is_err());
        }
    }
}

#[test]
fn overflowing_sizes_are_errors() {
    for ty in GgmlType::ALL {
        let n = usize::MAX / ty.block_elems() * ty.block_elems();
        if ty.block_bytes() > ty.block_elems() {
            // More than a byte per element: the byte count overflows.
            assert_eq!(ty.bytes_for(n), None, "{ty}");
            let err = dequantize(ty, &[], n).unwrap_err();
            assert!(
                matches!(err, DequantError::TooLarge { .. }),
                "{ty}: {err:?}"
            );
        } else {
            // Fits, but the (empty) data is checked before any allocation of n floats.
            assert!(ty.bytes_for(n).is_some(), "{ty}");
            let err = dequantize(ty, &[], n).unwrap_err();
            assert!(
                matches!(err, DequantError::WrongByteLength { .. }),
                "{ty}: {err:?}"
            );
        }
    }
}

#[test]
fn block_sizes_match_ggml() {
    // (type, elements per block, bytes per block) from ggml's type_traits / GGML_QUANT_SIZES.
    let table = [
        (GgmlType::F32, 1, 4),
        (GgmlType::F16, 1, 2),
        (GgmlType::BF16, 1, 2),
        (GgmlType::Q4_0, 32, 18),
        (GgmlType::Q4_1, 32, 20),
        (GgmlType::Q5_0, 32, 22),
        (GgmlType::Q5_1, 32, 24),
        (GgmlType::Q8_0, 32, 34),
        (GgmlType::Q4K, 256, 144),
        (GgmlType::Q5K, 256, 176),
        (GgmlType::Q6K, 256, 210),
    ];
    assert_eq!(table.len(), GgmlType::ALL.len());
    for (ty, be, bb) in table {
        assert_eq!((ty.block_elems(), ty.block_bytes()), (be, bb), "{ty}");
        assert_eq!(ty.bytes_for(0), Some(0));
        assert_eq!(ty.bytes_for(be), Some(bb));
        assert_eq!(ty.bytes_for(4096 * be), Some(4096 * bb));
    }
    assert_eq!(
        GgmlType::Q4K.bytes_for(576 * 1536),
        Some(576 * 1536 / 256 * 144)
    );
}

#[test]
fn ids_and_names() {
    let table = [
        (0, GgmlType::F32, "F32"),
        (1, GgmlType::F16, "F16"),
        (2, GgmlType::Q4_0, "Q4_0"),
        (3, GgmlType::Q4_1, "Q4_1"),
        (6, GgmlType::Q5_0, "Q5_0"),
        (7, GgmlType::Q5_1, "Q5_1"),
        (8, GgmlType::Q8_0, "Q8_0"),
        (12, GgmlType::Q4K, "Q4_K"),
        (13, GgmlType::Q5K, "Q5_K"),
        (14, GgmlType::Q6K, "Q6_K"),
        (30, GgmlType::BF16, "BF16"),
    ];
    for (id, ty, name) in table {
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert_eq!(ty.id(), id);
        assert_eq!(ty.name(), name);
        assert_eq!(ggml_type_name(id), name);
    }
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
    }
    let supported = table.iter().map(|t| t.0).collect::<Vec<_>>();
    for id in (0..64).chain([u32::MAX]) {
        assert_eq!(
            GgmlType::from_id(id).is_some(),
            supported.contains(&id),
            "id {id}"
        );
    }
    for (id, name) in [
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (23, "IQ4_XS"),
        (29, "IQ1_M"),
        (39, "MXFP4"),
    ] {
        assert_eq!(GgmlType::from_id(id), None);
        assert_eq!(ggml_type_name(id), name);
    }
    assert_eq!(ggml_type_name(1000), "unknown");
}
