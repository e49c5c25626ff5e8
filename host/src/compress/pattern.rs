//! N:M structured sparsity (`--pattern 2:4`, `4:8`): in every `M` consecutive columns of
//! a row at most `N` weights are kept. Every pruning method takes the pattern as a
//! constraint on its mask (SparseGPT and Wanda's N:M modes; ADMM projects onto it), and
//! the sparsity of every linear is then `1 − N/M`, so no allocation runs.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// An N:M pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Pattern {
    /// Kept per group (`N`, at least 1).
    pub n: usize,
    /// Columns per group (`M`, above `N`, a power of two up to 64).
    pub m: usize,
}

impl FromStr for Pattern {
    type Err = String;

    /// `"N:M"` with `1 ≤ N < M`, `M` a power of two up to 64.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "--pattern {s:?}: expected N:M with 1 <= N < M, M a power of two up to 64, e.g. 2:4 or 4:8"
            )
        };
        let (a, b) = s.split_once(':').ok_or_else(bad)?;
        let (n, m) = (
            a.trim().parse::<usize>().map_err(|_| bad())?,
            b.trim().parse::<usize>().map_err(|_| bad())?,
        );
        // M divides SparseGPT's 128-column blocks, so no group straddles two.
        if n == 0 || n >= m || m > 64 || 128 % m != 0 {
            return Err(bad());
        }
        Ok(Pattern { n, m })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.n, self.m)
    }
}

impl Pattern {
    /// Entries kept in a group of `len` columns: `N` in a whole group, `⌊N·len/M⌋` in
    /// a row's last, shorter one (so a row never keeps more than `N/M` of its columns
    /// and the paper's ratio `N/M` always holds the whole pattern).
    pub fn kept_in_group(&self, len: usize) -> usize {
        if len >= self.m {
            self.n
        } else {
            self.n * len / self.m
        }
    }

    /// Entries kept in a row of `cols` columns.
    pub fn kept_in_row(&self, cols: usize) -> usize {
        (0..cols)
            .step_by(self.m)
            .map(|c| self.kept_in_group((cols - c).min(self.m)))
            .sum()
    }

    /// The sparsity of a `cols`-column layer under the pattern.
    pub fn sparsity(&self, cols: usize) -> f64 {
        1.0 - self.kept_in_row(cols) as f64 / cols.max(1) as f64
    }

    /// Marks in `mask` (one row's group of columns `c0..c0 + score.len()`, relative)
    /// the [`Pattern::kept_in_group`] entries with the largest `score` (ties: the
    /// lower column), clearing the rest.
    pub fn keep_in_group(&self, score: &[f64], mask: &mut [bool]) {
        let keep = self.kept_in_group(score.len());
        let mut idx: Vec<usize> = (0..score.len()).collect();
        idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        mask.fill(false);
        for &j in &idx[..keep] {
            mask[j] = true;
        }
    }

    /// The keep mask of a row-major `rows × cols` matrix: in each row's every group,
    /// the entries with the largest `score(r, c)` ([`Pattern::keep_in_group`]).
    pub fn mask(&self, rows: usize, cols: usize, score: impl Fn(usize, usize) -> f64) -> Vec<bool> {
        let mut mask = vec![false; rows * cols];
        let mut s = Vec::with_capacity(self.m);
        for r in 0..rows {
            for c0 in (0..cols).step_by(self.m) {
                let c1 = (c0 + self.m).min(cols);
                s.clear();
                s.extend((c0..c1).map(|c| score(r, c)));
                self.keep_in_group(&s, &mut mask[r * cols + c0..r * cols + c1]);
            }
        }
        mask
    }

    /// Whether `mask` (row-major `rows × cols`) keeps at most `N` of every `M`.
    pub fn holds(&self, mask: &[bool], rows: usize, cols: usize) -> bool {
        (0..rows).all(|r| {
            (0..cols).step_by(self.m).all(|c0| {
                let c1 = (c0 + self.m).min(cols);
                mask[r * cols + c0..r * cols + c1]
                    .iter()
                    .filter(|&&k| k)
                    .count()
                    <= self.kept_in_group(c1 - c0)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_with_one_line() {
        assert_eq!("2:4".parse::<Pattern>(), Ok(Pattern { n: 2, m: 4 }));
        assert_eq!("4:8".parse::<Pattern>(), Ok(Pattern { n: 4, m: 8 }));
        for bad in ["4:4", "0:4", "2", "2:x", "5:4", "1:65", "2:6", ""] {
            let e = bad.parse::<Pattern>().unwrap_err();
            assert!(e.contains("N:M") && !e.contains('\n'), "{bad}: {e}");
        }
    }

    /// The mask keeps exactly the top N of every group (checked against sorting each
    /// group's scores), and a shorter last group keeps ⌊N·len/M⌋.
    #[test]
    fn masks_keep_the_top_n_of_every_group() {
        let p = Pattern { n: 2, m: 4 };
        let (rows, cols) = (3, 10);
        let score = |r: usize, c: usize| ((r * 31 + c * 17) % 11) as f64;
        let mask = p.mask(rows, cols, score);
        assert!(p.holds(&mask, rows, cols));
        for r in 0..rows {
            for c0 in (0..cols).step_by(4) {
                let c1 = (c0 + 4).min(cols);
                let kept: Vec<usize> = (c0..c1).filter(|&c| mask[r * cols + c]).collect();
                assert_eq!(kept.len(), if c1 - c0 == 4 { 2 } else { 1 });
                let min_kept = kept
                    .iter()
                    .map(|&c| score(r, c))
                    .fold(f64::INFINITY, f64::min);
                for c in c0..c1 {
                    if !mask[r * cols + c] {
                        assert!(score(r, c) <= min_kept, "r{r} c{c}");
                    }
                }
            }
        }
        assert_eq!(p.kept_in_row(10), 5);
        assert_eq!(Pattern { n: 4, m: 8 }.kept_in_row(576), 288);
        assert!((p.sparsity(576) - 0.5).abs() < 1e-12);
    }
}
