//! The low-rank part of cap's method: the best rank-`r` approximation of what the
//! sparse part leaves, in activation-scaled coordinates.

use faer::{MatRef, Par};

use crate::rpca::svd::{randomized_svd, thin_svd};

/// Rank-`r` truncated SVD of the row-major `rows × cols` matrix `a`: `(U: rows×k,
/// σ: k, V: cols×k)`, row-major, `k = min(r, rows, cols)`; `None` if the SVD fails.
/// Small ranks use a randomized SVD (seeded, so results are reproducible).
pub fn truncated(
    a: &[f32],
    rows: usize,
    cols: usize,
    r: usize,
) -> Option<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let k = r.min(rows).min(cols);
    if k == 0 {
        return None;
    }
    let m = MatRef::from_row_major_slice(a, rows, cols);
    let svd = if 4 * k < rows.min(cols) {
        randomized_svd(m, k, 0x10_4a_2c, Par::Seq)?
    } else {
        thin_svd(m, Par::Seq)?
    };
    let k = k.min(svd.s.len());
    let u = (0..rows * k).map(|x| svd.u[(x / k, x % k)]).collect();
    let v = (0..cols * k).map(|x| svd.v[(x / k, x % k)]).collect();
    Some((u, svd.s[..k].to_vec(), v))
}
