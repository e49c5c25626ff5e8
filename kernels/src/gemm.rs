//! Matrix multiplication: `C = A · B` over strided views.
//!
//! With the `std` feature the work goes to the `gemm` crate (cache-blocked micro-kernels
//! for AVX2/AVX-512/NEON, chosen at run time); without it, a blocked scalar loop.
//! [`matmul_ref`] is the reference both are tested against.

/// A read-only strided view of a row-major-or-not `f32` matrix.
///
/// Element `(i, j)` lives at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// Backing storage; must cover every element of the view.
    pub data: &'a [f32],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between consecutive rows, in elements.
    pub row_stride: usize,
    /// Distance between consecutive columns, in elements.
    pub col_stride: usize,
}

/// A mutable strided view of an `f32` matrix (see [`MatRef`]).
#[derive(Debug)]
pub struct MatMut<'a> {
    /// Backing storage; must cover every element of the view.
    pub data: &'a mut [f32],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between consecutive rows, in elements.
    pub row_stride: usize,
    /// Distance between consecutive columns, in elements.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed view (no data moves).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Element `(i, j)`.
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// Whether `data` holds every element the view's shape and strides reach.
    fn covers(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|a| {
                (self.cols - 1)
                    .checked_mul(self.col_stride)
                    .and_then(|b| a.checked_add(b))
            })
            .is_some_and(|last| last < self.data.len())
    }
}

impl<'a> MatMut<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The same elements, read-only (for the checks [`MatRef`] has).
    fn view(&self) -> MatRef<'_> {
        MatRef {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

/// Scalar reference: `C = alpha·A·B + beta·C`, accumulating each dot product in `f64`
/// so it can serve as ground truth for the `f32` fast paths.
pub fn matmul_ref(c: &mut MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, alpha: f32, beta: f32) {
    check_shapes(c, &a, &b);
    for i in 0..c.rows {
        for j in 0..c.cols {
            let mut acc = 0.0f64;
            for p in 0..a.cols {
                acc += a.at(i, p) as f64 * b.at(p, j) as f64;
            }
            let dst = &mut c.data[i * c.row_stride + j * c.col_stride];
            let old = if beta == 0.0 { 0.0 } else { beta * *dst };
            *dst = alpha * acc as f32 + old;
        }
    }
}

fn check_shapes(c: &MatMut<'_>, a: &MatRef<'_>, b: &MatRef<'_>) {
    assert!(
        a.rows == c.rows && b.cols == c.cols && a.cols == b.rows,
        "matmul shape mismatch"
    );
    assert!(
        a.covers() && b.covers() && c.view().covers(),
        "matmul view out of bounds"
    );
}

/// `C = alpha·A·B + beta·C` with `f32` accumulation; `threads` bounds the parallelism
/// (1 = run on the calling thread). With `beta == 0` the old contents of C are ignored
/// (they may be garbage, even NaN).
///
/// Panics if the shapes disagree or a view does not fit its buffer: callers build views
/// from their own tensors, so a mismatch is a bug, not bad input.
pub fn matmul(
    c: &mut MatMut<'_>,
    a: MatRef<'_>,
    b: MatRef<'_>,
    alpha: f32,
    beta: f32,
    threads: usize,
) {
    check_shapes(c, &a, &b);
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    #[cfg(feature = "std")]
    {
        use gemm::{Parallelism, gemm};
        let par = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // SAFETY: `check_shapes` proved that every element addressed through the strides
        // lies inside the borrowed slices, and `c` is borrowed mutably so it cannot alias
        // `a` or `b`.
        unsafe {
            gemm(
                c.rows,
                c.cols,
                a.cols,
                c.data.as_mut_ptr(),
                c.col_stride as isize,
                c.row_stride as isize,
                beta != 0.0,
                a.data.as_ptr(),
                a.col_stride as isize,
                a.row_stride as isize,
                b.data.as_ptr(),
                b.col_stride as isize,
                b.row_stride as isize,
                beta,
                alpha,
                false,
                false,
                false,
                par,
            );
        }
    }
    #[cfg(not(feature = "std"))]
    {
        let _ = threads;
        matmul_scalar(c, a, b, alpha, beta);
    }
}

/// Portable `f32` loop used where the `gemm` crate is not available (no_std builds).
#[cfg_attr(feature = "std", allow(dead_code))]
fn matmul_scalar(c: &mut MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, alpha: f32, beta: f32) {
    for i in 0..c.rows {
        for j in 0..c.cols {
            let mut acc = 0.0f32;
            for p in 0..a.cols {
                acc += a.at(i, p) * b.at(p, j);
            }
            let dst = &mut c.data[i * c.row_stride + j * c.col_stride];
            let old = if beta == 0.0 { 0.0 } else { beta * *dst };
            *dst = alpha * acc + old;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// f32 accumulation over k terms of size ~0.25 each: the error bound grows like
    /// k·ε·Σ|a||b|; 1e-5·k relative to the magnitude is a loose, safe bound here.
    fn check(m: usize, n: usize, k: usize, transpose_b: bool, beta: f32) {
        let mut s = 42 + (m * 131 + n * 17 + k) as u64;
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let b: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
        let bv = if transpose_b {
            MatRef::row_major(&b, n, k).t()
        } else {
            MatRef::row_major(&b, k, n)
        };
        let av = MatRef::row_major(&a, m, k);
        let mut want = c0.clone();
        matmul_ref(&mut MatMut::row_major(&mut want, m, n), av, bv, 0.5, beta);
        for threads in [1, 2] {
            let mut got = c0.clone();
            matmul(
                &mut MatMut::row_major(&mut got, m, n),
                av,
                bv,
                0.5,
                beta,
                threads,
            );
            let tol = 1e-6 * (k as f32 + 1.0);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= tol, "m={m} n={n} k={k} got {g} want {w}");
            }
        }
        let mut got = c0.clone();
        matmul_scalar(&mut MatMut::row_major(&mut got, m, n), av, bv, 0.5, beta);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * (k as f32 + 1.0));
        }
    }

    #[test]
    fn matches_reference_on_awkward_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (0, 3, 2),
            (3, 0, 2),
            (1, 7, 0),
            (5, 17, 33),
            (64, 63, 65),
            (129, 31, 200),
        ] {
            for tb in [false, true] {
                for beta in [0.0, 1.0] {
                    check(m, n, k, tb, beta);
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn rejects_views_that_overrun() {
        let a = [0.0f32; 5];
        let b = [0.0f32; 6];
        let mut c = [0.0f32; 4];
        let av = MatRef {
            data: &a,
            rows: 2,
            cols: 3,
            row_stride: 3,
            col_stride: 1,
        };
        matmul(
            &mut MatMut::row_major(&mut c, 2, 2),
            av,
            MatRef::row_major(&b, 3, 2),
            1.0,
            0.0,
            1,
        );
    }
}
