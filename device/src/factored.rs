//! A linear layer stored as low-rank factors plus a sparse part, `W = B·A + S`, run
//! without forming `W`: `y = (x·Aᵀ)·Bᵀ + x·Sᵀ`.
//!
//! This is the layer type of compressed models on the host (evaluating a `.cap` file,
//! and the masked models of the budget search). The sparse part is held as a dense
//! `rows × cols` array with zeros where nothing is kept: on a CPU a dense product is
//! the fastest way to apply a matrix that is more than a few percent full, and it
//! gives the same sums as a sparse kernel up to `f32` summation order. The board's
//! zero-copy runtime replaces it with the sparse kernels of `cap-kernels`.

use alloc::vec;
use alloc::vec::Vec;

use cap_kernels::gemm::{MatMut, MatRef, matmul};

use crate::model::{Linear, dense_forward, token_rows};

/// `W = B·A + S` with `A: rank × cols`, `B: rows × rank` and `S` dense-with-zeros.
#[derive(Clone, Debug, PartialEq)]
pub struct FactoredLinear {
    /// Output width.
    pub rows: usize,
    /// Input width.
    pub cols: usize,
    /// Rank of the low-rank part (0: none).
    pub rank: usize,
    /// Factor A, row-major `rank × cols`.
    pub a: Vec<f32>,
    /// Factor B, row-major `rows × rank`.
    pub b: Vec<f32>,
    /// The sparse part as a row-major `rows × cols` array, if there is one.
    pub s: Option<Vec<f32>>,
}

impl FactoredLinear {
    /// A plain dense layer (rank 0, `S = W`); `None` if the length does not match.
    pub fn dense(weight: Vec<f32>, rows: usize, cols: usize) -> Option<Self> {
        (rows.checked_mul(cols) == Some(weight.len())).then_some(FactoredLinear {
            rows,
            cols,
            rank: 0,
            a: Vec::new(),
            b: Vec::new(),
            s: Some(weight),
        })
    }

    /// Checks that every part has the length its shape says.
    pub fn is_consistent(&self) -> bool {
        self.a.len() == self.rank * self.cols
            && self.b.len() == self.rows * self.rank
            && self
                .s
                .as_ref()
                .is_none_or(|s| s.len() == self.rows * self.cols)
    }

    /// `B·A + S` as a dense row-major matrix (for tests and inspection only).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = self
            .s
            .clone()
            .unwrap_or_else(|| vec![0.0; self.rows * self.cols]);
        if self.rank > 0 {
            matmul(
                &mut MatMut::row_major(&mut w, self.rows, self.cols),
                MatRef::row_major(&self.b, self.rows, self.rank),
                MatRef::row_major(&self.a, self.rank, self.cols),
                1.0,
                1.0,
                1,
            );
        }
        w
    }
}

impl Linear for FactoredLinear {
    fn in_features(&self) -> usize {
        self.cols
    }
    fn out_features(&self) -> usize {
        self.rows
    }
    fn forward(&self, x: &[f32], y: &mut [f32], scratch: &mut Vec<f32>, threads: usize) {
        let t = token_rows(x, y, self.cols, self.rows);
        let mut beta = 0.0;
        if let Some(s) = &self.s {
            dense_forward(s, self.rows, self.cols, x, y, threads);
            beta = 1.0;
        }
        if self.rank > 0 {
            if scratch.len() < t * self.rank {
                scratch.resize(t * self.rank, 0.0);
            }
            let h = &mut scratch[..t * self.rank];
            matmul(
                &mut MatMut::row_major(h, t, self.rank),
                MatRef::row_major(x, t, self.cols),
                MatRef::row_major(&self.a, self.rank, self.cols).t(),
                1.0,
                0.0,
                threads,
            );
            matmul(
                &mut MatMut::row_major(y, t, self.rows),
                MatRef::row_major(h, t, self.rank),
                MatRef::row_major(&self.b, self.rows, self.rank).t(),
                1.0,
                beta,
                threads,
            );
        } else if beta == 0.0 {
            y.fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cap_kernels::gemm::matmul_ref;

    /// The factored product equals `x·(B·A + S)ᵀ` computed by the `f64`-accumulating
    /// reference on the densified weight, for every combination of parts. Tolerance:
    /// `f32` sums of ≤ 64 terms of size ≤ 0.25 differ by far less than 1e-5.
    #[test]
    fn factored_forward_matches_the_dense_reference() {
        let mut rng = crate::rng::SplitMix64::new(7);
        let (rows, cols, t) = (13, 29, 5);
        for (rank, sparse) in [(0, true), (3, false), (4, true), (0, false)] {
            let mut r = || rng.uniform_f32() - 0.5;
            let l = FactoredLinear {
                rows,
                cols,
                rank,
                a: (0..rank * cols).map(|_| r()).collect(),
                b: (0..rows * rank).map(|_| r()).collect(),
                s: sparse.then(|| {
                    (0..rows * cols)
                        .map(|i| if i % 3 == 0 { r() } else { 0.0 })
                        .collect()
                }),
            };
            assert!(l.is_consistent());
            let x: Vec<f32> = (0..t * cols).map(|_| r()).collect();
            let mut y = vec![f32::NAN; t * rows];
            l.forward(&x, &mut y, &mut Vec::new(), 2);
            let w = l.to_dense();
            let mut want = vec![0.0; t * rows];
            matmul_ref(
                &mut MatMut::row_major(&mut want, t, rows),
                MatRef::row_major(&x, t, cols),
                MatRef::row_major(&w, rows, cols).t(),
                1.0,
                0.0,
            );
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "rank {rank} sparse {sparse}: {a} vs {b}"
                );
            }
        }
    }
}
