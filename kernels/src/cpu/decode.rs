//! Sparse rows as dense `f32`, for the tiled GEMM path: a layer's stored rows are
//! decoded a tile at a time and multiplied with a whole chunk of tokens. The decoder
//! reads the same bytes as the matrix-vector kernels, with the same helpers.

use super::{
    BitmaskRef, CsrRef, Kernels, TwoFourRef, Values, bits_at, csr_blocks, low_bits, u32_at,
};
use cap_format::encoding::CSR_BLOCK_COLS;

/// A sparse matrix in any of the format's sparse encodings, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum SparseRef<'a> {
    /// Bitmask + packed values.
    Bitmask(BitmaskRef<'a>),
    /// Block-CSR.
    Csr(CsrRef<'a>),
    /// 2:4.
    TwoFour(TwoFourRef<'a>),
}

impl SparseRef<'_> {
    /// Columns of the matrix.
    pub fn cols(&self) -> usize {
        match self {
            SparseRef::Bitmask(m) => m.cols,
            SparseRef::Csr(m) => m.cols,
            SparseRef::TwoFour(m) => m.cols,
        }
    }

    /// `y[i] += Σ_c W[r0 + i, c]·x[c]` by `k`'s kernel for this encoding.
    pub fn mul_rows(&self, k: &Kernels, r0: usize, x: &[f32], y: &mut [f32]) {
        match self {
            SparseRef::Bitmask(m) => (k.bitmask_rows)(m, r0, x, y),
            SparseRef::Csr(m) => (k.csr_rows)(m, r0, x, y),
            SparseRef::TwoFour(m) => (k.two_four_rows)(m, r0, x, y),
        }
    }

    /// Writes rows `r0..r0 + tile.len()/cols` as dense row-major `f32`, zeros where
    /// nothing is stored. `buf` (at least `cols` floats) holds one row's values as
    /// converted by `k.to_f32`.
    ///
    /// # Panics
    /// When `buf` is shorter than a row's stored values, or the index data points
    /// outside the matrix or its values (structurally invalid input: the loader verifies
    /// it first).
    pub fn decode_rows(&self, k: &Kernels, r0: usize, tile: &mut [f32], buf: &mut [f32]) {
        let cols = self.cols();
        tile.fill(0.0);
        let values = match self {
            SparseRef::Bitmask(m) => m.values,
            SparseRef::Csr(m) => m.values,
            SparseRef::TwoFour(m) => m.values,
        };
        // Quantized values are read by row: `q_block` is the current row's first block
        // (found once per call, then advanced row by row).
        let dt = values.dtype;
        let (g, bs) = (dt.group(), dt.size());
        let nb = csr_blocks(cols);
        let count = |r: usize| match self {
            SparseRef::Bitmask(m) => (m.row_start[r + 1] - m.row_start[r]) as usize,
            SparseRef::Csr(m) => {
                u32_at(m.block_ptr, (r + 1) * nb) as usize - u32_at(m.block_ptr, r * nb) as usize
            }
            SparseRef::TwoFour(m) => m.cols / 2,
        };
        let mut q_block = if dt.is_quantized() {
            super::scalar::q_first_block(r0, g, count)
        } else {
            0
        };
        // `vals` = the row's stored values, from value index `lo` (float types) or from
        // block `q_block` (quantized: `lo` is then only the index base of the row).
        let row_values = |vals: &mut [f32], lo: usize, q_block: usize| {
            if dt.is_quantized() {
                let run = Values {
                    dtype: dt,
                    bytes: values
                        .bytes
                        .get(q_block * bs..)
                        .expect("quantized row past the end of the values"),
                };
                (k.to_f32)(run, 0, vals);
            } else {
                (k.to_f32)(values, lo, vals);
            }
        };
        for (i, out) in tile.chunks_exact_mut(cols).enumerate() {
            let r = r0 + i;
            match self {
                SparseRef::Bitmask(m) => {
                    let (lo, hi) = (m.row_start[r] as usize, m.row_start[r + 1] as usize);
                    let vals = &mut buf[..hi - lo];
                    row_values(vals, lo, q_block);
                    // Walk the set bits a word at a time (half of them are set at 50%).
                    let mut next = vals.iter().copied();
                    let bit0 = r * cols;
                    for c0 in (0..cols).step_by(64) {
                        let mut bits = bits_at(m.mask, bit0 + c0) & low_bits(cols - c0);
                        while bits != 0 {
                            let c = c0 + bits.trailing_zeros() as usize;
                            out[c] = next.next().unwrap_or(0.0);
                            bits &= bits - 1;
                        }
                    }
                }
                SparseRef::Csr(m) => {
                    let ptr = |j: usize| u32_at(m.block_ptr, j) as usize;
                    let (lo, hi) = (ptr(r * nb), ptr(r * nb + nb));
                    let vals = &mut buf[..hi - lo];
                    row_values(vals, lo, q_block);
                    for b in 0..nb {
                        for j in ptr(r * nb + b)..ptr(r * nb + b + 1) {
                            let c = b * CSR_BLOCK_COLS as usize + m.col_idx[j] as usize;
                            out[c] = vals[j - lo];
                        }
                    }
                }
                SparseRef::TwoFour(m) => {
                    let vals = &mut buf[..cols / 2];
                    row_values(vals, r * cols / 2, q_block);
                    for g in 0..cols / 4 {
                        let gi = r * cols / 4 + g;
                        let nib = m.meta[gi / 2] >> (4 * (gi % 2)) & 0xF;
                        out[4 * g + (nib & 3) as usize] = vals[2 * g];
                        out[4 * g + (nib >> 2) as usize] = vals[2 * g + 1];
                    }
                }
            }
            if dt.is_quantized() {
                q_block += count(r).div_ceil(g);
            }
        }
    }
}
