//! What the SIMD tables (`x86` with its `avx512`, `neon`) share: the storage codes of
//! their const generic kernels, the window a sparse row's quantized run is decoded
//! into, and the instruction-set independent walks of the quantized kernels (a dense
//! row's blocks, a run's units, a sparse row's mask words or CSR blocks).
//!
//! A walk takes the instruction set's pieces (a block's parameters, a unit's decode, a
//! multiply-accumulate) as closures. Every walk is `#[inline(always)]`: called from a
//! `#[target_feature]` kernel it is compiled into that kernel with its features, and
//! the closures, which inherit the kernel's features, inline into the loops. Bounds are
//! established here as in the kernels: by checked slicing before any vector load.

use super::{
    BitmaskRef, CsrRef, DType, TwoFourRef, Values, bits_at, csr_blocks, low_bits, prefetch, scalar,
    u32_at,
};

/// Storage type codes of the SIMD kernels' const generic parameter: one kernel is
/// compiled per stored dtype, and `D` is resolved at compile time.
pub(crate) const F32: u8 = 0;
pub(crate) const F16: u8 = 1;
pub(crate) const BF16: u8 = 2;

/// Bytes per value of storage code `D`.
pub(crate) const fn size(d: u8) -> usize {
    if d == F32 { 4 } else { 2 }
}

/// Calls `$f::<D>(args)` with the storage code of `$dtype` (SIMD modules), or `$q`
/// for a quantized type.
///
/// Where a SIMD table has no quantized kernel for an entry, the call site passes the
/// scalar reference's entry as `$q` (see [`Kernels`] for which entries those are).
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($a:expr),* $(,)?), $q:expr) => {
        match $dtype {
            DType::F32 => $f::<F32>($($a),*),
            DType::F16 => $f::<F16>($($a),*),
            DType::BF16 => $f::<BF16>($($a),*),
            // Quantized values are addressed by run and block: see the call site's `$q`.
            DType::Q8 { .. } | DType::Q4 { .. } => $q,
        }
    };
}

/// Values a [`QWindow`] holds: enough for a few 64-column mask words per refill, small
/// enough (1 KiB) to live on the stack of every call.
const QWIN: usize = 256;

/// Floats readable past the requested values of a [`QWindow`] slice: the widest vector
/// load (16 lanes) may start at the last requested value.
pub(crate) const QSLACK: usize = 16;

/// One quantized run (a sparse row's kept values) dequantized to `f32` a window at a
/// time, so the SIMD sparse kernels can run their `f32` code on quantized values.
///
/// A run's value `j` lives in block `j / group`, but a sparse row consumes its values
/// in mask or index order, a variable number per 64 columns, so decoding on the fly
/// would mean a block lookup per value. Decoding 8-aligned stretches of the run into a
/// stack buffer with the ISA's vector decoder instead costs one store and one load per
/// value, and the `f32` kernels then see plain packed floats. The buffer is part of the
/// kernel's stack frame: nothing is allocated.
pub(crate) struct QWindow {
    /// Run index of `buf[0]`, a multiple of 8.
    base: usize,
    /// Run values `base..end` are decoded in `buf` (`end` a multiple of 8).
    end: usize,
    /// Values the run's blocks hold, decodable: its count rounded up to a multiple of 8
    /// (inside the last block, whose codes are padded to a full group, since a group is
    /// a multiple of 16).
    avail: usize,
    /// The decoded values, then slack for vector loads past the last one.
    buf: [f32; QWIN + QSLACK],
}

impl QWindow {
    /// An empty window.
    #[inline(always)]
    pub(crate) fn new() -> Self {
        QWindow {
            base: 0,
            end: 0,
            avail: 0,
            buf: [0.0; QWIN + QSLACK],
        }
    }

    /// Starts a run of `count` values (the buffer keeps earlier rows' values: callers
    /// mask every lane past the values they asked for).
    #[inline(always)]
    pub(crate) fn start(&mut self, count: usize) {
        self.base = 0;
        self.end = 0;
        self.avail = count.next_multiple_of(8);
    }

    /// The run's values from index `a` on, at least `n + QSLACK` floats: values
    /// `a..a + n` are the run's wherever they exist (`a + n ≤ count`); later entries are
    /// leftovers (finite or not) that the caller must mask bitwise. `fill(start, out)`
    /// decodes run values `start..start + out.len()` (`start` and `out.len()` multiples
    /// of 8, inside the run's blocks) into `out`. Requests must not move backwards in a
    /// run, and `n ≤ QWIN − 8`.
    #[inline(always)]
    pub(crate) fn at(
        &mut self,
        a: usize,
        n: usize,
        fill: impl FnOnce(usize, &mut [f32]),
    ) -> &[f32] {
        debug_assert!(n <= QWIN - 8);
        let hit = a >= self.base
            && a + n <= self.base + QWIN
            && (a + n <= self.end || self.end >= self.avail);
        if !hit {
            self.refill(a, fill);
        }
        // After a refill `a − base < 8`, so this leaves `QWIN + QSLACK − 7 ≥ n +
        // QSLACK` floats; a hit checked the same bound above.
        &self.buf[a - self.base..]
    }

    /// Moves the window to start at `a` rounded down to 8, keeping what is already
    /// decoded from there, and decodes as far as the buffer or the run allows.
    #[inline(never)]
    fn refill(&mut self, a: usize, fill: impl FnOnce(usize, &mut [f32])) {
        let nb = a - a % 8;
        if nb > self.base && nb < self.end {
            self.buf
                .copy_within(nb - self.base..self.end - self.base, 0);
        } else if nb != self.base {
            self.end = nb;
        }
        self.base = nb;
        self.end = self.end.max(nb);
        let stop = (nb + QWIN).min(self.avail);
        if self.end < stop {
            fill(self.end, &mut self.buf[self.end - nb..stop - nb]);
            self.end = stop;
        }
    }
}

/// `f32`s as their native bytes, for the kernels that read values as raw bytes.
#[inline(always)]
pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: `f32` has no padding and every byte is a valid `u8`; `u8` needs no
    // alignment; the length covers exactly the floats' bytes, and the borrow keeps them
    // alive and unmodified.
    unsafe { core::slice::from_raw_parts(v.as_ptr().cast(), core::mem::size_of_val(v)) }
}

/// The bytes of one sparse row's quantized run: `count` values, starting at block
/// `first` of `values`.
///
/// # Panics
/// When the run lies outside the values.
#[inline]
pub(crate) fn q_run_bytes(values: Values<'_>, first: usize, count: usize) -> &[u8] {
    let bs = values.dtype.size();
    let blocks = count.div_ceil(values.dtype.group());
    first
        .checked_add(blocks)
        .and_then(|end| {
            values
                .bytes
                .get(first.checked_mul(bs)?..end.checked_mul(bs)?)
        })
        .expect("quantized run past the end of the values")
}

/// Kept values of bitmask row `r` (from the row starts).
#[inline]
pub(crate) fn bitmask_count(m: &BitmaskRef<'_>, r: usize) -> usize {
    (m.row_start[r + 1])
        .checked_sub(m.row_start[r])
        .expect("bitmask row starts decrease") as usize
}

/// Kept values of block-CSR row `r`.
#[inline]
pub(crate) fn csr_count(m: &CsrRef<'_>, nb: usize, r: usize) -> usize {
    (u32_at(m.block_ptr, (r + 1) * nb) as usize)
        .checked_sub(u32_at(m.block_ptr, r * nb) as usize)
        .expect("block pointers decrease")
}

/// 8 column indices from `idx[k..]`, zeros past its end.
#[inline]
pub(crate) fn idx8(idx: &[u8], k: usize) -> u64 {
    match idx.get(k..k + 8) {
        Some(s) => u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]),
        None => {
            let mut b = [0u8; 8];
            let s = idx.get(k..).unwrap_or(&[]);
            b[..s.len()].copy_from_slice(s);
            u64::from_le_bytes(b)
        }
    }
}

/// Dense rows of storage `D`: `y[i] += dot(W[r0 + i, :], x)`, `dot(row, x)` being the
/// instruction set's product of one row's bytes with `x`.
///
/// # Panics
/// When `x.len() != cols` or the rows lie outside `w`.
#[inline(always)]
pub(crate) fn dense_rows<const D: u8>(
    w: &[u8],
    cols: usize,
    r0: usize,
    x: &[f32],
    y: &mut [f32],
    dot: impl Fn(&[u8], &[f32]) -> f32,
) {
    assert_eq!(x.len(), cols, "x.len() != cols");
    let ds = size(D);
    let block = scalar::dense_block(w, ds, cols, r0, y.len());
    if cols == 0 {
        return;
    }
    let rb = cols * ds;
    for (i, (yi, row)) in y.iter_mut().zip(block.chunks_exact(rb)).enumerate() {
        prefetch::ahead(block, i * rb, rb);
        *yi += dot(row, x);
    }
}

/// Calls `$f::<true>(args)` for Q4 values and `$f::<false>(args)` for Q8.
macro_rules! by_q4 {
    ($dtype:expr, $f:ident($($a:expr),* $(,)?)) => {
        if matches!($dtype, DType::Q4 { .. }) {
            $f::<true>($($a),*)
        } else {
            $f::<false>($($a),*)
        }
    };
}

/// Run values `start..start + out.len()` of the quantized run `run` (its first block at
/// `run[0]`) into `out`, a unit of `W` values at a time from a `W`-aligned position (`W`
/// divides the group, a multiple of 16, so a unit never crosses a block):
/// `params(blk)` reads a block's scale and minimum, `unit(blk, off, p)` decodes its
/// values `off..off + W`, `store(o, v)` writes a unit.
///
/// # Panics
/// When the values lie past the run's bytes.
#[inline(always)]
pub(crate) fn q_decode<P: Copy, V: Copy, const W: usize>(
    run: &[u8],
    dt: DType,
    start: usize,
    out: &mut [f32],
    params: impl Fn(&[u8]) -> P,
    unit: impl Fn(&[u8], usize, P) -> V,
    store: impl Fn(&mut [f32; W], V),
) {
    let (g, bs) = (dt.group(), dt.size());
    let end = start + out.len();
    let mut j = start - start % W;
    let (mut bi, mut off) = (j / g, j % g);
    while j < end {
        let blk = run
            .get(bi * bs..(bi + 1) * bs)
            .expect("quantized run past the end of the values");
        let p = params(blk);
        while off < g && j < end {
            let v = unit(blk, off, p);
            if j >= start && j + W <= end {
                store((&mut out[j - start..j - start + W]).try_into().unwrap(), v);
            } else {
                // The first and last units of a decode.
                let mut buf = [0f32; W];
                store(&mut buf, v);
                store_edge(out, start, j, &buf);
            }
            j += W;
            off += W;
        }
        bi += 1;
        off = 0;
    }
}

/// Stores the values of `unit` (run values `j..j + W`) that fall in `out` (run values
/// `start..start + out.len()`).
#[cold]
#[inline(never)]
fn store_edge<const W: usize>(out: &mut [f32], start: usize, j: usize, unit: &[f32; W]) {
    for (l, &b) in unit.iter().enumerate() {
        if let Some(o) = (j + l).checked_sub(start).and_then(|i| out.get_mut(i)) {
            *o = b;
        }
    }
}

/// Dense rows of quantized values: per block, two units of `W` values per step into two
/// accumulators, then the row's last values one unit at a time, whose zero activations
/// past the row meet the padding codes (even Q4's `s·0 + m` then adds nothing).
/// `params` and `unit` as in [`q_decode`]; `fma(acc, v, xs)` adds `v·xs` to `acc`, and
/// `hsum(a0, a1)` sums the two accumulators' lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn q_dense_rows<P: Copy, V: Copy, A: Copy, const W: usize>(
    w: Values<'_>,
    cols: usize,
    r0: usize,
    x: &[f32],
    y: &mut [f32],
    params: impl Fn(&[u8]) -> P,
    unit: impl Fn(&[u8], usize, P) -> V,
    zero: A,
    fma: impl Fn(A, V, &[f32; W]) -> A,
    hsum: impl Fn(A, A) -> f32,
) {
    assert_eq!(x.len(), cols, "x.len() != cols");
    if cols == 0 {
        return;
    }
    let dt = w.dtype;
    let (g, bs) = (dt.group(), dt.size());
    let (block, rb) = scalar::q_dense_block(w, cols, r0, y.len());
    for (i, (yi, row)) in y.iter_mut().zip(block.chunks_exact(rb)).enumerate() {
        prefetch::ahead(block, i * rb, rb);
        let (mut a0, mut a1) = (zero, zero);
        for (bi, blk) in row.chunks_exact(bs).enumerate() {
            let p = params(blk);
            let j0 = bi * g;
            let mut off = 0;
            while off + 2 * W <= g && j0 + off + 2 * W <= cols {
                let v0 = unit(blk, off, p);
                let v1 = unit(blk, off + W, p);
                let xs = &x[j0 + off..j0 + off + 2 * W];
                a0 = fma(a0, v0, xs[..W].try_into().unwrap());
                a1 = fma(a1, v1, xs[W..].try_into().unwrap());
                off += 2 * W;
            }
            while off < g && j0 + off < cols {
                let v = unit(blk, off, p);
                let mut xs = [0f32; W];
                let n = (cols - j0 - off).min(W);
                xs[..n].copy_from_slice(&x[j0 + off..j0 + off + n]);
                a0 = fma(a0, v, &xs);
                off += W;
            }
        }
        *yi += hsum(a0, a1);
    }
}

/// Columns (rounded up to whole groups) [`q4_split_rows`] takes: its rearranged
/// activations live on the stack (32 KiB). Wider rows take [`q_dense_rows`].
const Q4_SPLIT_MAX: usize = 8192;

/// The group of dense Q4 values `dt` over `cols` columns when [`q4_split_rows`] takes
/// them (groups a multiple of 32, rows within [`Q4_SPLIT_MAX`]).
#[inline(always)]
pub(crate) fn q4_split_group(dt: DType, cols: usize) -> Option<usize> {
    match dt {
        DType::Q4 { group } if group % 32 == 0 => {
            let g = usize::from(group);
            (cols.next_multiple_of(g) <= Q4_SPLIT_MAX).then_some(g)
        }
        _ => None,
    }
}

/// Dense Q4 rows in groups of `g` (a multiple of 32, see [`q4_split_group`]) with the
/// activations rearranged once per call to the codes' nibble order: in each 32 values,
/// `x` at the even positions (the low nibbles of 16 code bytes) then at the odd ones
/// (the high nibbles). `step(acc, p, codes, xc)` multiply-accumulates one 16-byte code
/// chunk (32 values, decoded with the block's parameters `p = params(blk)`) against
/// its 32 rearranged activations, with no interleaving shuffle; `hsum` sums the
/// accumulator. Padding past `cols` meets zero activations, as in [`q_dense_rows`].
///
/// # Panics
/// When `x.len() != cols` or the rows lie outside `w`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn q4_split_rows<P: Copy, A: Copy>(
    w: Values<'_>,
    g: usize,
    cols: usize,
    r0: usize,
    x: &[f32],
    y: &mut [f32],
    params: impl Fn(&[u8]) -> P,
    zero: A,
    step: impl Fn(A, P, &[u8; 16], &[f32; 32]) -> A,
    hsum: impl Fn(A) -> f32,
) {
    assert_eq!(x.len(), cols, "x.len() != cols");
    if cols == 0 {
        return;
    }
    let width = cols.next_multiple_of(g);
    assert!(
        width <= Q4_SPLIT_MAX,
        "row too wide for the rearranged Q4 kernel"
    );
    let mut xs = [0f32; Q4_SPLIT_MAX];
    for (c, &v) in x.iter().enumerate() {
        let (base, j) = (c - c % 32, c % 32);
        xs[base + (j % 2) * 16 + j / 2] = v;
    }
    let xs = &xs[..width];
    let (block, rb) = scalar::q_dense_block(w, cols, r0, y.len());
    let bs = 4 + g / 2;
    for (i, (yi, row)) in y.iter_mut().zip(block.chunks_exact(rb)).enumerate() {
        prefetch::ahead(block, i * rb, rb);
        let mut acc = zero;
        for (blk, xb) in row.chunks_exact(bs).zip(xs.chunks_exact(g)) {
            let p = params(blk);
            for (codes, xc) in blk[4..].chunks_exact(16).zip(xb.chunks_exact(32)) {
                acc = step(acc, p, codes.try_into().unwrap(), xc.try_into().unwrap());
            }
        }
        *yi += hsum(acc);
    }
}

/// Quantized bitmask rows: each row's run is decoded (`decode(run, dt, start, out)`,
/// as [`q_decode`]) into a [`QWindow`], and each 64-column mask word runs
/// `word(bits, v, xs, acc)` on the window's packed values `v` (the word's popcount
/// plus [`QSLACK`] of them, the slack never in a mask lane); `hsum` sums an
/// accumulator's lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn q_bitmask_rows<A: Copy>(
    m: &BitmaskRef<'_>,
    r0: usize,
    x: &[f32],
    y: &mut [f32],
    decode: impl Fn(&[u8], DType, usize, &mut [f32]),
    zero: A,
    word: impl Fn(u64, &[f32], &[f32; 64], A) -> A,
    hsum: impl Fn(A) -> f32,
) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    let dt = m.values.dtype;
    let mut blk = scalar::q_first_block(r0, dt.group(), |r| bitmask_count(m, r));
    let mut win = QWindow::new();
    // A row's last, partial word reads `x` from a zero-padded copy.
    let mut pad = [0f32; 64];
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let count = bitmask_count(m, r);
        let run = q_run_bytes(m.values, blk, count);
        prefetch::bitmask_row(m, r, blk * dt.size(), run.len());
        win.start(count);
        let mut k = 0;
        let mut acc = zero;
        let mut c = 0;
        while c < cols {
            let n = (cols - c).min(64);
            let bits = bits_at(m.mask, r * cols + c) & low_bits(n);
            if bits != 0 {
                let cnt = bits.count_ones() as usize;
                let v = &win.at(k, cnt, |s, o| decode(run, dt, s, o))[..cnt + QSLACK];
                let xs = match x[c..].first_chunk::<64>() {
                    Some(xs) => xs,
                    None => pad_x(&mut pad, &x[c..]),
                };
                acc = word(bits, v, xs, acc);
                k += cnt;
            }
            c += 64;
        }
        *yi += hsum(acc);
        blk += count.div_ceil(dt.group());
    }
}

/// Quantized 2:4 rows: each row's run (`cols / 2` values, a fixed length, so row `r`
/// starts at byte `r · run_bytes`) is decoded (`decode` as in [`q_bitmask_rows`]) into
/// a [`QWindow`], and each 64 columns run `word(bits, v, xs, acc)`: `bits` the 16 meta
/// nibbles, `v` their 32 values, `xs` the activations (the last, partial word's
/// values and activations zero-padded, so whatever its padding nibbles pick adds
/// nothing); `hsum` sums an accumulator's lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn q_two_four_rows<A: Copy>(
    m: &TwoFourRef<'_>,
    r0: usize,
    x: &[f32],
    y: &mut [f32],
    decode: impl Fn(&[u8], DType, usize, &mut [f32]),
    zero: A,
    word: impl Fn(u64, &[f32; 32], &[f32; 64], A) -> A,
    hsum: impl Fn(A) -> f32,
) {
    let cols = m.cols;
    assert!(cols.is_multiple_of(4), "2:4 needs cols % 4 == 0");
    assert_eq!(x.len(), cols, "x.len() != cols");
    let dt = m.values.dtype;
    let (per, groups) = (cols / 2, cols / 4);
    let rb = dt.run_bytes(per as u64) as usize;
    let mut win = QWindow::new();
    let mut pad = [0f32; 64];
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let first = r * groups;
        let run = m
            .values
            .bytes
            .get(r * rb..(r + 1) * rb)
            .expect("quantized 2:4 row past the end of the values");
        prefetch::ahead(m.meta, first / 2, groups.div_ceil(2));
        prefetch::ahead(m.values.bytes, r * rb, rb);
        win.start(per);
        let mut acc = zero;
        let mut c = 0;
        while c < cols {
            let n = (cols - c).min(64);
            let bits = bits_at(m.meta, 4 * (first + c / 4)) & low_bits(n);
            let v = win.at(c / 2, n / 2, |s, o| decode(run, dt, s, o));
            if n == 64 {
                let xs: &[f32; 64] = x[c..c + 64].try_into().unwrap();
                acc = word(bits, v[..32].try_into().unwrap(), xs, acc);
            } else {
                // Past the row's values the window holds leftovers: zero them.
                let mut w = [0f32; 32];
                w[..n / 2].copy_from_slice(&v[..n / 2]);
                acc = word(bits, &w, pad_x(&mut pad, &x[c..]), acc);
            }
            c += 64;
        }
        *yi += hsum(acc);
    }
}

/// `x` (under 64 floats) zero-padded to 64 in `pad` (out of line, so the copy does not
/// cost the main loop its registers).
#[cold]
#[inline(never)]
fn pad_x<'a>(pad: &'a mut [f32; 64], x: &[f32]) -> &'a [f32; 64] {
    pad.fill(0.0);
    pad[..x.len()].copy_from_slice(x);
    pad
}

/// Quantized block-CSR rows: each row's run is decoded (`decode` as in
/// [`q_bitmask_rows`]) into a [`QWindow`], and each 8 entries of a 256-column block
/// run `step(acc, ib, xb, v, live)`: `ib` the 8 column bytes (zeros past the indices),
/// `xb` the block's activations, `v` the window's values from the first entry (at
/// least 8 + [`QSLACK`]), of which the first `live` are the block's (the step masks
/// the others); `hsum` sums an accumulator's lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn q_csr_rows<A: Copy>(
    m: &CsrRef<'_>,
    r0: usize,
    x: &[f32],
    y: &mut [f32],
    decode: impl Fn(&[u8], DType, usize, &mut [f32]),
    zero: A,
    step: impl Fn(A, u64, &[f32], &[f32], usize) -> A,
    hsum: impl Fn(A) -> f32,
) {
    let cols = m.cols;
    assert_eq!(x.len(), cols, "x.len() != cols");
    let dt = m.values.dtype;
    let nb = csr_blocks(cols);
    let idx = m.col_idx;
    let mut blk = scalar::q_first_block(r0, dt.group(), |r| csr_count(m, nb, r));
    let mut win = QWindow::new();
    for (i, yi) in y.iter_mut().enumerate() {
        let r = r0 + i;
        let count = csr_count(m, nb, r);
        let run = q_run_bytes(m.values, blk, count);
        win.start(count);
        let first = u32_at(m.block_ptr, r * nb) as usize;
        prefetch::csr_row(m, r, first, count, blk * dt.size(), run.len());
        let mut acc = zero;
        for (b, xb) in x.chunks(256).enumerate() {
            let lo = u32_at(m.block_ptr, r * nb + b) as usize;
            let hi = u32_at(m.block_ptr, r * nb + b + 1) as usize;
            assert!(
                first <= lo && lo <= hi && hi <= idx.len(),
                "block pointers out of range"
            );
            let mut k = lo;
            while k < hi {
                let v = win.at(k - first, 8, |s, o| decode(run, dt, s, o));
                acc = step(acc, idx8(idx, k), xb, v, (hi - k).min(8));
                k += 8;
            }
        }
        *yi += hsum(acc);
        blk += count.div_ceil(dt.group());
    }
}
