//! Quantized values (format 1.1): every encoding with Q8 and Q4 values of several
//! group sizes, written with the writer and read back: the section length equals the
//! byte accounting and an independent closed form, every value decodes to the
//! reference quantizer's dequantization, group counts and padding are verified, and
//! the minor version is stamped and reported.
mod common;

use common::{Rng, crc32fast_hash, sample_manifest, split, write_mem};

use cap_format::*;

/// A random `rows×cols` matrix with about `density` of its entries non-zero (every
/// group of 4 keeping at most 2 when `two_four`), values in (-2, 2).
fn matrix(rng: &mut Rng, rows: u32, cols: u32, density: f64, two_four: bool) -> Vec<f32> {
    let n = rows as usize * cols as usize;
    let mut w: Vec<f32> = (0..n)
        .map(|_| {
            if rng.f64() < density {
                // Never exactly zero, so the kept count is what the pattern says.
                (rng.f64() * 4.0 - 2.0) as f32 + 1e-3
            } else {
                0.0
            }
        })
        .collect();
    if two_four {
        for g in w.chunks_mut(4) {
            let mut kept = 0;
            for v in g.iter_mut() {
                if *v != 0.0 {
                    kept += 1;
                    if kept > 2 {
                        *v = 0.0;
                    }
                }
            }
        }
    }
    w
}

/// Bytes of one run of `k` values of `dt`, by the closed form of SPEC.md §5.
fn run_bytes(dt: DType, k: u64) -> u64 {
    match dt {
        DType::Q8 { group } => k.div_ceil(u64::from(group)) * (2 + u64::from(group)),
        DType::Q4 { group } => k.div_ceil(u64::from(group)) * (4 + u64::from(group) / 2),
        _ => k * dt.size() as u64,
    }
}

fn pad(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Each row of `w` (`cols` wide) as the reference quantizer stores and decodes it.
fn dequantized_rows(w: &[f32], cols: usize, dt: DType) -> Vec<f32> {
    let mut out = Vec::new();
    for row in w.chunks(cols) {
        let b = to_bytes(row, dt);
        let mut d = vec![0.0; row.len()];
        dequantize(&b, dt, &mut d).unwrap();
        out.extend(d);
    }
    out
}

/// Sparse `w` with its kept values replaced by their per-row dequantization.
fn dequantized_sparse(w: &[f32], cols: usize, dt: DType) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for (r, row) in w.chunks(cols).enumerate() {
        let kept: Vec<f32> = row.iter().copied().filter(|&v| v != 0.0).collect();
        let mut d = vec![0.0; kept.len()];
        dequantize(&to_bytes(&kept, dt), dt, &mut d).unwrap();
        let mut it = d.into_iter();
        for (c, &v) in row.iter().enumerate() {
            if v != 0.0 {
                out[r * cols + c] = it.next().unwrap();
            }
        }
    }
    out
}

/// For the 2:4 encoding the stored values are each group's two slots, explicit zeros
/// included; the reference is the same quantization of those runs.
fn dequantized_two_four(w: &[f32], cols: usize, dt: DType) -> Vec<f32> {
    let (s, parts) = encode_sparse(
        SparseKind::TwoFour,
        (w.len() / cols) as u32,
        cols as u32,
        DType::F32,
        &to_bytes(w, DType::F32),
    )
    .unwrap();
    let rows = (w.len() / cols) as u32;
    let (q, qp) = quantize_sparse(rows, cols as u32, s, parts, dt).unwrap();
    let view = SparseView::TwoFour {
        values: Values {
            dtype: dt,
            bytes: &qp[0],
        },
        meta: &qp[1],
    };
    decode_sparse_f32(rows, cols as u32, q, &view).unwrap()
}

struct Case {
    name: String,
    desc: TensorDesc,
    parts: Vec<Vec<u8>>,
    /// Closed-form bytes of each part (unpadded).
    part_bytes: Vec<u64>,
    /// The matrix every decoder must give (`rows×cols`, or for low-rank `B·A`'s
    /// factors checked separately).
    expect: Vec<f32>,
}

fn sparse_case(
    w: &[f32],
    rows: u32,
    cols: u32,
    kind: SparseKind,
    dt: DType,
) -> (Sparse, Vec<Vec<u8>>, Vec<u64>, Vec<f32>) {
    let (s, parts) = encode_sparse(kind, rows, cols, DType::F32, &to_bytes(w, DType::F32)).unwrap();
    let (q, qp) = quantize_sparse(rows, cols, s, parts, dt).unwrap();
    let n = u64::from(rows) * u64::from(cols);
    let counts: Vec<u64> = w
        .chunks(cols as usize)
        .map(|r| r.iter().filter(|&&v| v != 0.0).count() as u64)
        .collect();
    let nnz: u64 = counts.iter().sum();
    let vals: u64 = counts.iter().map(|&k| run_bytes(dt, k)).sum();
    let (bytes, expect) = match kind {
        SparseKind::Bitmask => (
            vec![n.div_ceil(8), vals],
            dequantized_sparse(w, cols as usize, dt),
        ),
        SparseKind::BlockCsr => (
            vec![
                (u64::from(rows) * u64::from(cols).div_ceil(256) + 1) * 4,
                nnz,
                vals,
            ],
            dequantized_sparse(w, cols as usize, dt),
        ),
        SparseKind::TwoFour => (
            vec![
                u64::from(rows) * run_bytes(dt, u64::from(cols) / 2),
                n.div_ceil(8),
            ],
            dequantized_two_four(w, cols as usize, dt),
        ),
    };
    (q, qp, bytes, expect)
}

fn cases(rng: &mut Rng) -> Vec<Case> {
    let mut out = Vec::new();
    let shapes = [
        (1u32, 1u32),
        (1, 17),
        (3, 16),
        (5, 33),
        (7, 100),
        (4, 260),
        (2, 520),
    ];
    for (si, &(rows, cols)) in shapes.iter().enumerate() {
        for group in [16u16, 48, 64, 256] {
            for dt in [DType::Q8 { group }, DType::Q4 { group }] {
                let tag = format!("{rows}x{cols} {dt}");
                // Dense.
                let w = matrix(rng, rows, cols, 1.0, false);
                let mut b = Vec::new();
                extend_rows(&mut b, &w, cols as usize, dt);
                out.push(Case {
                    name: format!("dense {tag}"),
                    desc: TensorDesc {
                        rows,
                        cols,
                        encoding: Encoding::Dense { dtype: dt },
                    },
                    parts: vec![b],
                    part_bytes: vec![u64::from(rows) * run_bytes(dt, u64::from(cols))],
                    expect: dequantized_rows(&w, cols as usize, dt),
                });
                // Low-rank: both factors quantized, each row a run.
                let rank = 1 + (si as u32 * 7 + u32::from(group)) % rows.min(cols);
                let a = matrix(rng, rank, cols, 1.0, false);
                let bm = matrix(rng, rows, rank, 1.0, false);
                let (mut pa, mut pb) = (Vec::new(), Vec::new());
                extend_rows(&mut pa, &a, cols as usize, dt);
                extend_rows(&mut pb, &bm, rank as usize, dt);
                let mut expect = dequantized_rows(&a, cols as usize, dt);
                expect.extend(dequantized_rows(&bm, rank as usize, dt));
                out.push(Case {
                    name: format!("low-rank r={rank} {tag}"),
                    desc: TensorDesc {
                        rows,
                        cols,
                        encoding: Encoding::LowRank { rank, dtype: dt },
                    },
                    parts: vec![pa.clone(), pb.clone()],
                    part_bytes: vec![
                        u64::from(rank) * run_bytes(dt, u64::from(cols)),
                        u64::from(rows) * run_bytes(dt, u64::from(rank)),
                    ],
                    expect,
                });
                // Sparse, alone and under f16 or quantized factors.
                for density in [0.0, 0.07, 0.3, 0.5, 1.0] {
                    for kind in [
                        SparseKind::Bitmask,
                        SparseKind::BlockCsr,
                        SparseKind::TwoFour,
                    ] {
                        let two_four = kind == SparseKind::TwoFour;
                        if two_four && cols % 4 != 0 {
                            continue;
                        }
                        let w = matrix(rng, rows, cols, density, two_four);
                        let (s, parts, part_bytes, expect) = sparse_case(&w, rows, cols, kind, dt);
                        out.push(Case {
                            name: format!("{kind:?} d={density} {tag}"),
                            desc: TensorDesc {
                                rows,
                                cols,
                                encoding: Encoding::Sparse(s),
                            },
                            parts: parts.clone(),
                            part_bytes: part_bytes.clone(),
                            expect: expect.clone(),
                        });
                        // Composite: quantized factors (the same value type) or f16 ones.
                        let fd = if density > 0.2 { dt } else { DType::F16 };
                        let mut pa = Vec::new();
                        extend_rows(&mut pa, &a, cols as usize, fd);
                        let mut pb = Vec::new();
                        extend_rows(&mut pb, &bm, rank as usize, fd);
                        let mut cp = vec![pa, pb];
                        cp.extend(parts);
                        let mut cb = vec![
                            u64::from(rank) * run_bytes(fd, u64::from(cols)),
                            u64::from(rows) * run_bytes(fd, u64::from(rank)),
                        ];
                        cb.extend(part_bytes);
                        out.push(Case {
                            name: format!("composite {fd} + {kind:?} d={density} {tag}"),
                            desc: TensorDesc {
                                rows,
                                cols,
                                encoding: Encoding::Composite {
                                    rank,
                                    factor_dtype: fd,
                                    sparse: s,
                                },
                            },
                            parts: cp,
                            part_bytes: cb,
                            expect,
                        });
                    }
                }
            }
        }
    }
    out
}

/// Section length by the closed form: parts at 64-byte offsets, padded to `align`.
fn closed_form(part_bytes: &[u64], align: u64) -> u64 {
    let mut end = 0;
    for &b in part_bytes {
        end = pad(end, 64) + b;
    }
    pad(end, align)
}

#[test]
fn every_encoding_with_quantized_values_is_accounted_exactly_and_decodes() {
    let mut rng = Rng(2024);
    let cases = cases(&mut rng);
    assert!(cases.len() > 500, "{} cases", cases.len());
    for align in [64u32, 4096] {
        let tensors: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("t{i}"), c.desc, c.parts.clone()))
            .collect();
        let file = write_mem(&tensors, sample_manifest(false), align);
        let f = CapFile::parse(&file).unwrap();
        f.verify_all().unwrap();
        assert_eq!(
            f.header().minor,
            1,
            "a file with quantized values is a 1.1 file"
        );
        for (i, c) in cases.iter().enumerate() {
            let t = f.tensor(i).unwrap();
            let e = &f.manifest().tensors[i];
            let acc = encoded_bytes_aligned(&c.desc, align).unwrap();
            assert_eq!(e.len, acc, "{}: written vs accounted", c.name);
            assert_eq!(
                acc,
                closed_form(&c.part_bytes, u64::from(align)),
                "{}: accounting vs closed form",
                c.name
            );
            let lens: Vec<u64> = t.layout.parts().iter().map(|p| p.len).collect();
            assert_eq!(lens, c.part_bytes, "{}: part lengths", c.name);
            if align == 64 {
                assert_eq!(encoded_bytes(&c.desc).unwrap(), acc);
            }
            let (rows, cols) = (c.desc.rows as usize, c.desc.cols as usize);
            let got = match t.data().unwrap() {
                TensorData::Dense(v) => dequantize_rows(v.bytes, v.dtype, rows, cols).unwrap(),
                TensorData::LowRank { a, b } => {
                    let r = a.bytes.len() / a.dtype.run_bytes(cols as u64) as usize;
                    let mut g = dequantize_rows(a.bytes, a.dtype, r, cols).unwrap();
                    g.extend(dequantize_rows(b.bytes, b.dtype, rows, r).unwrap());
                    g
                }
                TensorData::Sparse(s) | TensorData::Composite { sparse: s, .. } => {
                    let (Encoding::Sparse(sp) | Encoding::Composite { sparse: sp, .. }) =
                        c.desc.encoding
                    else {
                        unreachable!()
                    };
                    decode_sparse_f32(c.desc.rows, c.desc.cols, sp, &s).unwrap()
                }
            };
            assert_eq!(got, c.expect, "{}: decoded values", c.name);
        }
    }
}

#[test]
fn smallest_sparse_encoding_counts_quantized_groups() {
    // Rows of 0, 1, 16, 17 and 40 kept values at group 16: 0+1+1+2+3 = 7 groups.
    let counts = [0u32, 1, 16, 17, 40];
    let dt = DType::Q4 { group: 16 };
    assert_eq!(row_groups(&counts, dt), 7);
    assert_eq!(row_groups(&counts, DType::F16), 0);
    let (e, b) = smallest_sparse_encoding(5, 64, &counts, dt, false).unwrap();
    let nnz = 74;
    // Bitmask: 40 mask bytes, then 7 blocks of 12 bytes at offset 64: 148 -> 192.
    assert_eq!(
        e,
        Encoding::Sparse(Sparse::QBitmask {
            nnz,
            groups: 7,
            dtype: dt
        })
    );
    assert_eq!(b, 192);
}

#[test]
fn impossible_quantized_encodings_are_rejected() {
    let bad = |encoding| {
        let r = encoded_bytes(&TensorDesc {
            rows: 4,
            cols: 64,
            encoding,
        });
        assert!(
            matches!(r, Err(FormatError::InvalidEncoding { .. })),
            "{encoding}: {r:?}"
        );
    };
    for group in [0u16, 8, 24, 272, 512] {
        bad(Encoding::Dense {
            dtype: DType::Q8 { group },
        });
        bad(Encoding::LowRank {
            rank: 2,
            dtype: DType::Q4 { group },
        });
    }
    let dtype = DType::Q8 { group: 16 };
    // Quantized values in the float sparse variants, float values in the Q variants.
    bad(Encoding::Sparse(Sparse::Bitmask { nnz: 10, dtype }));
    bad(Encoding::Sparse(Sparse::BlockCsr { nnz: 10, dtype }));
    bad(Encoding::Sparse(Sparse::QBitmask {
        nnz: 10,
        groups: 1,
        dtype: DType::F16,
    }));
    // Group counts no split of nnz over 4 rows gives: 10 values need 1..=4 groups.
    for groups in [0u64, 5, 11] {
        bad(Encoding::Sparse(Sparse::QBlockCsr {
            nnz: 10,
            groups,
            dtype,
        }));
    }
    bad(Encoding::Sparse(Sparse::QBitmask {
        nnz: 0,
        groups: 1,
        dtype,
    }));
    for groups in 1..=4 {
        encoded_bytes(&TensorDesc {
            rows: 4,
            cols: 64,
            encoding: Encoding::Sparse(Sparse::QBitmask {
                nnz: 10,
                groups,
                dtype,
            }),
        })
        .unwrap();
    }
}

/// A 2×32 bitmask tensor keeping 20 values in row 0 and 5 in row 1 at group 16.
fn q_bitmask_file(groups: u64, poke: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let dt = DType::Q8 { group: 16 };
    let mut w = vec![0.0f32; 64];
    for (c, v) in w.iter_mut().enumerate() {
        if c < 20 || (32..37).contains(&c) {
            *v = c as f32 + 1.0;
        }
    }
    let (s, parts) = encode_sparse(
        SparseKind::Bitmask,
        2,
        32,
        DType::F32,
        &to_bytes(&w, DType::F32),
    )
    .unwrap();
    let (_, mut qp) = quantize_sparse(2, 32, s, parts, dt).unwrap();
    poke(&mut qp[1]);
    let desc = TensorDesc {
        rows: 2,
        cols: 32,
        encoding: Encoding::Sparse(Sparse::QBitmask {
            nnz: 25,
            groups,
            dtype: dt,
        }),
    };
    write_mem(&[("w".into(), desc, qp)], sample_manifest(false), 64)
}

#[test]
fn verify_checks_group_counts_and_padding() {
    let good = q_bitmask_file(3, |_| {});
    CapFile::parse(&good).unwrap().verify_all().unwrap();
    // Row 0's second group holds 4 of 16 codes: poke its 5th code (padding).
    let padded = q_bitmask_file(3, |v| v[18 + 2 + 4] = 1);
    let e = CapFile::parse(&padded).unwrap().verify_all().unwrap_err();
    assert!(matches!(e, FormatError::BadQuantizedValues { .. }), "{e}");
    // A group count the layout allows (2..=3 for 25 values over 2 rows at group 16)
    // but the rows contradict: 2 blocks written, the rows need 3.
    let short = q_bitmask_file(2, |v| v.truncate(2 * 18));
    let e = CapFile::parse(&short).unwrap().verify_all().unwrap_err();
    assert!(matches!(e, FormatError::BadQuantizedValues { .. }), "{e}");
}

#[test]
fn float_only_files_stay_version_1_0() {
    let dtype = DType::F16;
    let desc = TensorDesc {
        rows: 2,
        cols: 8,
        encoding: Encoding::Dense { dtype },
    };
    let file = write_mem(
        &[("w".into(), desc, vec![to_bytes(&[1.0; 16], dtype)])],
        sample_manifest(false),
        64,
    );
    assert_eq!(CapFile::parse(&file).unwrap().header().minor, 0);
}

/// Replaces the manifest bytes (fixing lengths and checksums) and the minor version.
fn with_raw_manifest(file: &[u8], minor: u16, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let (mut h, data, _) = split(file);
    let mut m = file[h.manifest_offset as usize..].to_vec();
    f(&mut m);
    h.minor = minor;
    h.manifest_len = m.len() as u64;
    h.manifest_crc32 = crc32fast_hash(&m);
    let mut out = vec![0u8; h.data_offset as usize];
    out.extend_from_slice(&data);
    out.extend_from_slice(&m);
    out[..HEADER_LEN].copy_from_slice(&h.encode());
    out
}

#[test]
fn a_newer_minor_version_with_an_unknown_value_type_is_named() {
    let dtype = DType::Q8 { group: 16 };
    let desc = TensorDesc {
        rows: 1,
        cols: 16,
        encoding: Encoding::Dense { dtype },
    };
    let file = write_mem(
        &[("qw".into(), desc, vec![to_bytes(&[1.0; 16], dtype)])],
        sample_manifest(false),
        64,
    );
    // The entry is name "qw", rows 1, cols 16, then Dense (0), Q8 (3), group 16: make
    // the value type tag 9, a type this reader does not have.
    let unknown_type = |m: &mut Vec<u8>| {
        let at = m
            .windows(7)
            .position(|w| w == [2, b'q', b'w', 1, 16, 0, 3])
            .expect("tensor entry in the manifest");
        m[at + 6] = 9;
    };
    let newer = with_raw_manifest(&file, FORMAT_MINOR + 1, unknown_type);
    let e = CapFile::parse(&newer).unwrap_err();
    assert_eq!(
        e,
        FormatError::NewerMinorVersion {
            major: FORMAT_MAJOR,
            found_minor: FORMAT_MINOR + 1,
            supported_minor: FORMAT_MINOR
        }
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("file is format 1.{}", FORMAT_MINOR + 1))
            && msg.contains(&format!("knows up to 1.{FORMAT_MINOR}")),
        "{msg}"
    );
    // The same manifest in a file of a version this reader knows is plainly corrupt.
    let same = with_raw_manifest(&file, FORMAT_MINOR, unknown_type);
    assert_eq!(
        CapFile::parse(&same).unwrap_err(),
        FormatError::ManifestDecode
    );
    // A newer file whose group size this reader does not allow is named the same way.
    let big_group = with_raw_manifest(&file, FORMAT_MINOR + 1, |m| {
        let at = m
            .windows(7)
            .position(|w| w == [2, b'q', b'w', 1, 16, 0, 3])
            .unwrap();
        // Group 16 -> 1024 (varint 0x80 0x08): a longer manifest, same entry.
        m.splice(at + 7..at + 8, [0x80, 0x08]);
    });
    assert!(matches!(
        CapFile::parse(&big_group).unwrap_err(),
        FormatError::NewerMinorVersion { .. }
    ));
}

/// The markdown table of SPEC.md section "Quantized byte table", generated here: a
/// 576×1536 matrix dense and at 50% (bitmask, rows of 768 kept values, and 2:4).
fn quantized_byte_table() -> String {
    let (rows, cols) = (576u32, 1536u32);
    let bytes = |encoding| {
        encoded_bytes(&TensorDesc {
            rows,
            cols,
            encoding,
        })
        .unwrap()
    };
    let f16 = bytes(Encoding::Dense { dtype: DType::F16 });
    let mut t = String::from(
        "| values | bits/value | dense | bitmask 50% | 2:4 |\n|---|---:|---:|---:|---:|\n",
    );
    let counts = vec![cols / 2; rows as usize];
    for dtype in [
        DType::F16,
        DType::Q8 { group: 32 },
        DType::Q8 { group: 64 },
        DType::Q4 { group: 32 },
        DType::Q4 { group: 64 },
    ] {
        let dense = bytes(Encoding::Dense { dtype });
        let nnz = u64::from(rows * cols / 2);
        let bm = bytes(Encoding::Sparse(Sparse::with_values(
            true,
            nnz,
            row_groups(&counts, dtype),
            dtype,
        )));
        let tf = bytes(Encoding::Sparse(Sparse::TwoFour { dtype }));
        let bits = dtype.size() as f64 * 8.0 / dtype.group() as f64;
        let cell = |b: u64| format!("{b} ({:.3}x)", b as f64 / f16 as f64);
        t += &format!(
            "| {dtype} | {bits:.3} | {} | {} | {} |\n",
            cell(dense),
            cell(bm),
            cell(tf)
        );
    }
    t
}

#[test]
fn quantized_byte_table_576x1536_is_in_spec() {
    let t = quantized_byte_table();
    println!("{t}");
    let spec = include_str!("../SPEC.md");
    assert!(
        spec.contains(&t),
        "SPEC.md's quantized byte table is stale; replace it with:\n{t}"
    );
}
