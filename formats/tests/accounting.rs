//! Byte accounting: the size table in SPEC.md and the smallest-encoding choice.
mod common;

use cap_format::*;

const ROWS: u32 = 576;
const COLS: u32 = 1536;

fn sparse_bytes(s: Sparse) -> u64 {
    encoded_bytes(&TensorDesc {
        rows: ROWS,
        cols: COLS,
        encoding: Encoding::Sparse(s),
    })
    .unwrap()
}

/// The markdown table of SPEC.md section "Byte table", generated here.
fn byte_table() -> String {
    let dt = DType::F16;
    let dense = encoded_bytes(&TensorDesc {
        rows: ROWS,
        cols: COLS,
        encoding: Encoding::Dense { dtype: dt },
    })
    .unwrap();
    let n = u64::from(ROWS) * u64::from(COLS);
    let mut t = String::from(
        "| density | nnz | dense f16 | bitmask | block-CSR (u8 idx) | 2:4 |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for pct in [10u64, 25, 50] {
        let nnz = n * pct / 100;
        let cell = |b: u64| format!("{b} ({:.3}x)", b as f64 / dense as f64);
        let two_four = if pct == 50 {
            cell(sparse_bytes(Sparse::TwoFour { dtype: dt }))
        } else {
            "n/a (needs 50%)".into()
        };
        t += &format!(
            "| {pct}% | {nnz} | {dense} | {} | {} | {two_four} |\n",
            cell(sparse_bytes(Sparse::Bitmask { nnz, dtype: dt })),
            cell(sparse_bytes(Sparse::BlockCsr { nnz, dtype: dt })),
        );
    }
    t
}

#[test]
fn byte_table_576x1536_f16_is_in_spec() {
    let t = byte_table();
    println!("{t}");
    let spec = include_str!("../SPEC.md");
    assert!(
        spec.contains(&t),
        "SPEC.md's byte table is stale; replace it with:\n{t}"
    );
}

#[test]
fn hand_checked_sizes() {
    // 576x1536 f16 dense: 1,769,472 bytes, already a multiple of 64.
    let n = 576u64 * 1536;
    assert_eq!(
        encoded_bytes(&TensorDesc {
            rows: 576,
            cols: 1536,
            encoding: Encoding::Dense { dtype: DType::F16 }
        })
        .unwrap(),
        n * 2
    );
    // Bitmask at 50%: n/8 mask + n/2 * 2 values, both multiples of 64.
    assert_eq!(
        sparse_bytes(Sparse::Bitmask {
            nnz: n / 2,
            dtype: DType::F16
        }),
        n / 8 + n
    );
    // Block-CSR: (576*6+1)*4 = 13828 -> 13888 padded, + nnz + 2 nnz.
    let nnz = n / 10; // 88473
    let ptr = ((576 * 6 + 1) * 4u64).next_multiple_of(64);
    let idx = nnz.next_multiple_of(64);
    assert_eq!(
        sparse_bytes(Sparse::BlockCsr {
            nnz,
            dtype: DType::F16
        }),
        (ptr + idx + 2 * nnz).next_multiple_of(64)
    );
    // Low-rank rank 8 f16 on 3x5 is refused (rank > min), rank 3 is 3*5*2 + 3*3*2 padded.
    let lr = |rank| {
        encoded_bytes(&TensorDesc {
            rows: 3,
            cols: 5,
            encoding: Encoding::LowRank {
                rank,
                dtype: DType::F16,
            },
        })
    };
    assert!(lr(8).is_err());
    assert_eq!(lr(3).unwrap(), 64 + 64);
    // 4096 alignment pads the section end only.
    let d = TensorDesc {
        rows: 1,
        cols: 8,
        encoding: Encoding::Dense { dtype: DType::F32 },
    };
    assert_eq!(encoded_bytes_aligned(&d, 4096).unwrap(), 4096);
    assert_eq!(encoded_bytes(&d).unwrap(), 64);
}

#[test]
fn smallest_sparse_encoding_choices() {
    let rows = ROWS as usize;
    let per_row = |k: u32| vec![k; rows];
    // 50% as 2:4: 2:4 ties bitmask and wins the tie.
    let (e, b) = smallest_sparse_encoding(ROWS, COLS, &per_row(768), DType::F16, true).unwrap();
    assert_eq!(e, Encoding::Sparse(Sparse::TwoFour { dtype: DType::F16 }));
    assert_eq!(b, sparse_bytes(Sparse::TwoFour { dtype: DType::F16 }));
    // 50% unstructured: bitmask.
    let (e, _) = smallest_sparse_encoding(ROWS, COLS, &per_row(768), DType::F16, false).unwrap();
    assert!(matches!(e, Encoding::Sparse(Sparse::Bitmask { .. })));
    // 2:4 claimed but a row has 800 > cols/2 non-zeros: 2:4 is not considered.
    let mut rows_nnz = per_row(700);
    rows_nnz[3] = 800;
    let (e, _) = smallest_sparse_encoding(ROWS, COLS, &rows_nnz, DType::F16, true).unwrap();
    assert!(!matches!(e, Encoding::Sparse(Sparse::TwoFour { .. })));
    // 1% density: block-CSR beats a 1-bit-per-position mask.
    let (e, b) = smallest_sparse_encoding(ROWS, COLS, &per_row(15), DType::F16, false).unwrap();
    assert!(
        matches!(e, Encoding::Sparse(Sparse::BlockCsr { nnz: 8640, .. })),
        "{e:?}"
    );
    assert!(
        b < sparse_bytes(Sparse::Bitmask {
            nnz: 8640,
            dtype: DType::F16
        })
    );
    // Bad input is an error, not a panic.
    assert!(smallest_sparse_encoding(ROWS, COLS, &per_row(1), DType::F16, false).is_ok());
    assert!(smallest_sparse_encoding(ROWS, COLS, &[1, 2], DType::F16, false).is_err());
    assert!(smallest_sparse_encoding(2, 4, &[5, 0], DType::F16, false).is_err());
}
