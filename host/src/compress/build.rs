//! A [`FactoredLinear`] from a candidate decomposition and the items kept of it.

use cap_device::factored::FactoredLinear;

use super::select::Selection;
use crate::rpca::Decomposition;

/// `B·A + S` of the kept items: `√σ_i` folded into both factors (`A`'s row `c` is
/// `√σ_i·v_iᵀ`, `B`'s column `c` is `√σ_i·u_i` for the `c`-th kept `i`), the kept
/// entries of `S` in place, the rest zero. `S` is left out when nothing of it is kept.
pub fn factored(d: &Decomposition, sel: &Selection) -> FactoredLinear {
    let (m, n, r) = (d.rows, d.cols, d.sigma.len());
    let kept: Vec<usize> = (0..r).filter(|&i| sel.sigma[i]).collect();
    let k = kept.len();
    let mut a = vec![0.0f32; k * n];
    let mut b = vec![0.0f32; m * k];
    for (c, &i) in kept.iter().enumerate() {
        let s = d.sigma[i].max(0.0).sqrt();
        for j in 0..n {
            a[c * n + j] = s * d.v[j * r + i];
        }
        for row in 0..m {
            b[row * k + c] = s * d.u[row * r + i];
        }
    }
    let s = sel.entries.iter().any(|&x| x).then(|| {
        let mut s = vec![0.0f32; m * n];
        for row in 0..m {
            for e in d.s.row_ptr[row] as usize..d.s.row_ptr[row + 1] as usize {
                if sel.entries[e] {
                    s[row * n + d.s.col[e] as usize] = d.s.val[e];
                }
            }
        }
        s
    });
    FactoredLinear {
        rows: m,
        cols: n,
        rank: k,
        a,
        b,
        s,
    }
}
