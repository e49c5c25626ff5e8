//! What one linear offers to keep: the one type every method produces
//! ([`super::strategy::Strategy::candidates`]) and the writer consumes
//! ([`super::write::encode_linear`]).
//!
//! A candidate holds up to three parts of `W ≈ L + S`: low-rank factors (`L = U·Σ·Vᵀ`,
//! whose items are the singular directions), a sparse matrix (CSR; items are its stored
//! entries) or the dense matrix itself (items are all `rows·cols` entries, row-major),
//! never both of the last two. A layer kept dense stays dense all the way to the file.

use std::ops::Range;

use cap_device::factored::FactoredLinear;

use cap_format::DType;

use super::budget::CostModel;
use super::quantize::Quantized;
use super::select::Selection;
pub use crate::rpca::Csr;
use crate::rpca::Decomposition;

/// Low-rank factors `U·diag(σ)·Vᵀ`.
#[derive(Clone, Debug, PartialEq)]
pub struct Factors {
    /// `U`, row-major `rows × r`.
    pub u: Vec<f32>,
    /// `σ`, `r` values, non-increasing.
    pub sigma: Vec<f32>,
    /// `V`, row-major `cols × r`.
    pub v: Vec<f32>,
    /// The stored factors' codes when the method quantized them itself (GPTQ, see
    /// [`super::qvalues::quantize_factors`]): `A = √σ·Vᵀ` (`r × cols`) and
    /// `B = U·√σ` (`rows × r`) as [`Candidate::kept_factors`] lays them out, valid
    /// while every direction is kept. `None`: the writer rounds the factors to nearest.
    pub codes: Option<Box<(Quantized, Quantized)>>,
}

impl Factors {
    /// The factors a file stores for directions `kept` of a `rows × cols` part:
    /// `A = √σ·Vᵀ` (`k × cols`, applied first) and `B = U·√σ` (`rows × k`), `k =
    /// kept.len()`.
    pub fn stored(&self, rows: usize, cols: usize, kept: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let (r, k) = (self.sigma.len(), kept.len());
        let mut a = vec![0.0f32; k * cols];
        let mut b = vec![0.0f32; rows * k];
        for (c, &i) in kept.iter().enumerate() {
            let s = self.sigma[i].max(0.0).sqrt();
            for j in 0..cols {
                a[c * cols + j] = s * self.v[j * r + i];
            }
            for row in 0..rows {
                b[row * k + c] = s * self.u[row * r + i];
            }
        }
        (a, b)
    }
}

/// What one `rows × cols` linear offers to keep.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// The low-rank part, if any.
    pub low_rank: Option<Factors>,
    /// The sparse part as CSR, if any (never together with `dense`).
    pub sparse: Option<Csr>,
    /// The dense matrix, row-major, if the entries are all offered (never together
    /// with `sparse`).
    pub dense: Option<Vec<f32>>,
    /// The entries' quantized codes, when the method quantized them itself (GPTQ right
    /// after pruning, [`super::qvalues::quantize_kept`]): every entry, rows in order,
    /// each row's entries in column order, and the entry values are what these codes
    /// decode to. The writer stores them as they are when every entry is kept in a
    /// sparse encoding (or a dense one, for a dense candidate); otherwise the kept
    /// values are rounded to nearest. Its `values` are empty (they are the entries).
    pub quantized: Option<Box<Quantized>>,
    /// The value type this linear is stored in when its method chose one for it (cap's
    /// allocation choosing bits per layer); `None`: the run's `--values`.
    pub values: Option<DType>,
}

impl Candidate {
    /// `W` itself, every entry an item.
    pub fn dense(w: Vec<f32>, rows: usize, cols: usize) -> Self {
        Candidate {
            rows,
            cols,
            low_rank: None,
            sparse: None,
            dense: Some(w),
            quantized: None,
            values: None,
        }
    }

    /// A sparse matrix, its stored entries the items.
    pub fn sparse(s: Csr, rows: usize, cols: usize) -> Self {
        Candidate {
            rows,
            cols,
            low_rank: None,
            sparse: Some(s),
            dense: None,
            quantized: None,
            values: None,
        }
    }

    /// Low-rank factors only.
    pub fn low_rank(f: Factors, rows: usize, cols: usize) -> Self {
        Candidate {
            rows,
            cols,
            low_rank: Some(f),
            sparse: None,
            dense: None,
            quantized: None,
            values: None,
        }
    }

    /// Stage 1's `L + S` (the paper's variant); empty parts are left out.
    pub fn from_decomposition(d: Decomposition) -> Self {
        Candidate {
            rows: d.rows,
            cols: d.cols,
            low_rank: (!d.sigma.is_empty()).then_some(Factors {
                u: d.u,
                sigma: d.sigma,
                v: d.v,
                codes: None,
            }),
            sparse: (!d.s.val.is_empty()).then_some(d.s),
            dense: None,
            quantized: None,
            values: None,
        }
    }

    /// The singular values offered (empty without a low-rank part).
    pub fn sigma(&self) -> &[f32] {
        self.low_rank.as_ref().map_or(&[], |f| f.sigma.as_slice())
    }

    /// Singular directions offered.
    pub fn rank(&self) -> usize {
        self.sigma().len()
    }

    /// How this linear's kept items are priced and written: `run`'s accounting, in
    /// this linear's own value type when its method chose one.
    pub fn cost_model(&self, run: &CostModel) -> CostModel {
        CostModel {
            dtype: self.values.unwrap_or(run.dtype),
            ..*run
        }
    }

    /// The values of the entries offered, in item order (CSR order, or row-major).
    pub fn entry_values(&self) -> &[f32] {
        match (&self.sparse, &self.dense) {
            (Some(s), _) => &s.val,
            (None, Some(w)) => w,
            (None, None) => &[],
        }
    }

    /// Entries offered.
    pub fn entries(&self) -> usize {
        self.entry_values().len()
    }

    /// The items of row `r` among the entries.
    pub fn row_entries(&self, r: usize) -> Range<usize> {
        match (&self.sparse, &self.dense) {
            (Some(s), _) => s.row_ptr[r] as usize..s.row_ptr[r + 1] as usize,
            (None, Some(_)) => r * self.cols..(r + 1) * self.cols,
            (None, None) => 0..0,
        }
    }

    /// Column of entry `e`.
    pub fn entry_col(&self, e: usize) -> usize {
        match &self.sparse {
            Some(s) => s.col[e] as usize,
            None => e % self.cols.max(1),
        }
    }

    /// The kept factors `(A, B, k)`: `√σ_i` folded into both (`A`'s row `c` is
    /// `√σ_i·v_iᵀ`, `B`'s column `c` is `√σ_i·u_i` for the `c`-th kept `i`).
    pub fn kept_factors(&self, sel: &Selection) -> (Vec<f32>, Vec<f32>, usize) {
        let (m, n) = (self.rows, self.cols);
        let Some(f) = &self.low_rank else {
            return (vec![], vec![], 0);
        };
        let kept: Vec<usize> = (0..f.sigma.len()).filter(|&i| sel.sigma[i]).collect();
        let (a, b) = f.stored(m, n, &kept);
        (a, b, kept.len())
    }

    /// The kept entries as a dense matrix (the rest zero), or `None` when none is kept.
    fn kept_entries_dense(&self, sel: &Selection) -> Option<Vec<f32>> {
        if !sel.entries.iter().any(|&x| x) {
            return None;
        }
        let n = self.cols;
        let mut s = vec![0.0f32; self.rows * n];
        match (&self.sparse, &self.dense) {
            (Some(csr), _) => {
                for row in 0..self.rows {
                    for e in csr.row_ptr[row] as usize..csr.row_ptr[row + 1] as usize {
                        if sel.entries[e] {
                            s[row * n + csr.col[e] as usize] = csr.val[e];
                        }
                    }
                }
            }
            (None, Some(w)) => {
                for ((o, &x), &k) in s.iter_mut().zip(w).zip(&sel.entries) {
                    if k {
                        *o = x;
                    }
                }
            }
            (None, None) => {}
        }
        Some(s)
    }

    /// `B·A + S` of the kept items as a layer the forward pass runs (`S` left out when
    /// nothing of it is kept).
    pub fn factored(&self, sel: &Selection) -> FactoredLinear {
        let (a, b, rank) = self.kept_factors(sel);
        FactoredLinear {
            rows: self.rows,
            cols: self.cols,
            rank,
            a,
            b,
            s: self.kept_entries_dense(sel),
        }
    }

    /// The matrix the kept items compute, row-major. A dense candidate kept whole is
    /// its own matrix (no copy through other forms).
    pub fn kept_dense(&self, sel: &Selection) -> std::borrow::Cow<'_, [f32]> {
        if let Some(w) = &self.dense
            && sel.rank() == 0
            && sel.entries.iter().all(|&k| k)
        {
            return std::borrow::Cow::Borrowed(w);
        }
        std::borrow::Cow::Owned(self.factored(sel).to_dense())
    }

    /// Kept entries per row.
    pub fn kept_row_counts(&self, sel: &Selection) -> Vec<u32> {
        (0..self.rows)
            .map(|r| self.row_entries(r).filter(|&e| sel.entries[e]).count() as u32)
            .collect()
    }

    /// The kept entries as CSR: `(row_ptr, col, values)`, rows in order, columns
    /// increasing.
    pub fn kept_csr(&self, sel: &Selection) -> (Vec<u64>, Vec<u32>, Vec<f32>) {
        let mut row_ptr = Vec::with_capacity(self.rows + 1);
        row_ptr.push(0u64);
        let (mut col, mut val) = (Vec::new(), Vec::new());
        let values = self.entry_values();
        for r in 0..self.rows {
            for e in self.row_entries(r) {
                if sel.entries[e] {
                    col.push(self.entry_col(e) as u32);
                    val.push(values[e]);
                }
            }
            row_ptr.push(col.len() as u64);
        }
        (row_ptr, col, val)
    }
}
