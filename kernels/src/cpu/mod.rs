//! CPU kernels for every weight encoding of the `.cap` format, one module per
//! instruction set with the same kernel names in each (`scalar`, `x86`, `neon`).
//!
//! A [`Kernels`] table of plain function pointers is chosen once at run time
//! ([`kernels`]); [`scalar`] is the reference that defines every result, and the SIMD
//! tables are tested against it. The kernels read the loaded file's bytes in place:
//! values are raw little-endian [`Values`] with no alignment guarantee, so every SIMD
//! load is unaligned. Every sum accumulates in `f32`.
//!
//! Inputs are assumed structurally valid (the loader runs `cap_format`'s verification
//! first), but no input can cause undefined behaviour: each kernel establishes the
//! bounds of what it reads with checked slicing before any vector load, so inconsistent
//! index data gives a panic or a wrong sum, never an out-of-bounds read.

use alloc::vec::Vec;

pub use cap_format::{DType, Values};

mod decode;
mod scalar;

pub use decode::SparseRef;

pub use scalar::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// Storage type codes of the SIMD kernels' const generic parameter: one kernel is
/// compiled per stored dtype, and `D` is resolved at compile time.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
const F32: u8 = 0;
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
const F16: u8 = 1;
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
const BF16: u8 = 2;

/// Bytes per value of storage code `D`.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
const fn size(d: u8) -> usize {
    if d == F32 { 4 } else { 2 }
}

/// Calls `$f::<D>(args)` with the storage code of `$dtype` (SIMD modules), or `$q`
/// for a quantized type.
///
/// Where a SIMD table has no quantized kernel for an entry, the call site passes the
/// scalar reference's entry as `$q` (see [`Kernels`] for which entries those are).
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
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

#[cfg(target_arch = "x86_64")]
mod x86;

// The soft-float aarch64 targets have no vector registers.
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod neon;

/// Which instruction set a kernel table uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, the reference.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL) on top of AVX2's features; its entries without a
    /// 16-lane kernel are AVX2's.
    Avx512,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Isa {
    /// Short lower-case name for reports (and `CAP_FORCE_ISA`): `"scalar"`, `"avx2"`,
    /// `"avx512"` or `"neon"`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }
}

/// A bitmask-encoded sparse matrix (one bit per position of the whole `rows×cols`
/// matrix, row-major, least significant bit first; the non-zeros packed row-major).
#[derive(Clone, Copy, Debug)]
pub struct BitmaskRef<'a> {
    /// Columns; row `r`'s bits start at bit `r·cols`, which need not be byte aligned.
    pub cols: usize,
    /// The mask bits.
    pub mask: &'a [u8],
    /// `row_start[r]` = index in `values` of row `r`'s first value (`rows + 1`
    /// entries, computed once by the loader with [`bitmask_row_starts`]).
    pub row_start: &'a [u32],
    /// The non-zeros.
    pub values: Values<'a>,
}

/// A block-CSR sparse matrix: column indices are one byte within 256-column blocks.
#[derive(Clone, Copy, Debug)]
pub struct CsrRef<'a> {
    /// Columns; `nb = ceil(cols/256)` blocks per row.
    pub cols: usize,
    /// `rows·nb + 1` little-endian `u32`, raw bytes: the values of row `r`, block `b`
    /// are `ptr[r·nb+b]..ptr[r·nb+b+1]`.
    pub block_ptr: &'a [u8],
    /// One byte per non-zero: column − 256·b.
    pub col_idx: &'a [u8],
    /// The non-zeros.
    pub values: Values<'a>,
}

/// A 2:4 structured-sparse matrix: two values kept in every group of four columns.
#[derive(Clone, Copy, Debug)]
pub struct TwoFourRef<'a> {
    /// Columns, a multiple of 4.
    pub cols: usize,
    /// `rows·cols/2` values, two per group, row-major.
    pub values: Values<'a>,
    /// One nibble per group, row-major, low nibble first: bits 0-1 = first index,
    /// bits 2-3 = second index.
    pub meta: &'a [u8],
}

/// One instruction set's kernels. Every `*_rows` kernel accumulates into `y`:
/// (every dtype, the quantized Q8 and Q4 included: their values are found by row, as
/// `cap_format` lays them out; the AVX2, AVX-512 and NEON tables have their own
/// quantized dense, bitmask and block-CSR rows and `to_f32` (AVX-512's block-CSR is
/// AVX2's), and run the scalar
/// reference for the transposed dense rows, 2:4 and `from_f32`)
/// for `i` in `0..y.len()`, `y[i] += Σ_c W[r0+i, c]·x[c]` with `x.len() == cols`, so
/// callers can split rows across threads and add a low-rank and a sparse part.
///
/// Activations are assumed finite. The scalar sparse kernels skip pruned positions;
/// the AVX2 bitmask kernel on 16-bit values multiplies them by an exact zero, which
/// gives the same sum for finite `x` (and NaN where an activation is infinite or NaN,
/// where the forward pass has failed anyway). Masking `x` as well costs a fifth of
/// that kernel's time, the difference between beating dense f16 decoding and not.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    /// The instruction set.
    pub isa: Isa,
    /// Dense row-major `W` (`cols` columns): `y[i] += W[r0+i, :]·x`.
    pub dense_rows: fn(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]),
    /// Transposed: for `c` in `0..cols`, `y[c] += Σ_i x[i]·W[r0+i, c]` (`x.len()` rows,
    /// `y.len() == cols`). Used for attention's p·V over an f32 or f16 value cache.
    pub dense_t_rows: fn(w: Values<'_>, cols: usize, r0: usize, x: &[f32], y: &mut [f32]),
    /// Bitmask-encoded `W`.
    pub bitmask_rows: fn(m: &BitmaskRef<'_>, r0: usize, x: &[f32], y: &mut [f32]),
    /// Block-CSR `W`.
    pub csr_rows: fn(m: &CsrRef<'_>, r0: usize, x: &[f32], y: &mut [f32]),
    /// 2:4 `W`.
    pub two_four_rows: fn(m: &TwoFourRef<'_>, r0: usize, x: &[f32], y: &mut [f32]),
    /// `out[j]` = value `start + j` as `f32` (exact for every dtype; an f16 NaN comes
    /// back quiet with its payload, as the hardware converters do). For a quantized
    /// dtype `v` must be **one run** (a row's blocks, starting at its first block) and
    /// the value is its dequantization (`cap_format::dequantize`); [`rows_to_f32`]
    /// decodes rows of a dense matrix of any dtype.
    pub to_f32: fn(v: Values<'_>, start: usize, out: &mut [f32]),
    /// `f32` → storage conversion (a KV cache): writes `out.len()/dtype.size()` values
    /// (for a quantized dtype: blocks, `x` being one run) of `x` as raw little-endian
    /// bytes into `out`. f16 and bf16 round to nearest,
    /// ties to even (as `half::f16::from_f32` and `half::bf16::from_f32`), overflow to
    /// ±inf, NaN stays NaN; f32 is copied.
    pub from_f32: fn(x: &[f32], dtype: DType, out: &mut [u8]),
}

/// The scalar reference table (always available).
pub fn scalar() -> Kernels {
    scalar::KERNELS
}

/// Every table this CPU can run, scalar first (for tests and `cap-device info`).
pub fn available() -> Vec<Kernels> {
    let mut v = alloc::vec![scalar::KERNELS];
    #[cfg(target_arch = "x86_64")]
    v.extend(x86::tables());
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    v.push(neon::KERNELS);
    v
}

/// The table to use: the best available, or scalar when the environment variable
/// `CAP_FORCE_SCALAR=1` (so one binary can check its fast paths on the board), or the
/// available table named by `CAP_FORCE_ISA` (an [`Isa::name`], e.g. `avx2` on an
/// AVX-512 machine; a name this CPU cannot run is ignored, and the table in use is
/// what reports print). Detected once.
#[cfg(feature = "std")]
pub fn kernels() -> &'static Kernels {
    static K: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        if crate::force_scalar() {
            return scalar::KERNELS;
        }
        let mut all = available();
        if let Some(k) = crate::force_isa().and_then(|n| all.iter().find(|k| k.isa.name() == n)) {
            return *k;
        }
        // The last of `available` is the fastest.
        all.pop().unwrap_or(scalar::KERNELS)
    })
}

/// The table to use: without `std` there is neither run-time detection nor an
/// environment, so this is the best table the compile-time target features allow.
#[cfg(not(feature = "std"))]
pub fn kernels() -> &'static Kernels {
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        static K: Kernels = neon::KERNELS;
        &K
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c",
        target_feature = "popcnt",
        target_feature = "avx512f",
        target_feature = "avx512bw",
        target_feature = "avx512vl"
    ))]
    {
        static K: Kernels = x86::AVX512;
        &K
    }
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c",
        target_feature = "popcnt",
        not(all(
            target_feature = "avx512f",
            target_feature = "avx512bw",
            target_feature = "avx512vl"
        ))
    ))]
    {
        static K: Kernels = x86::KERNELS;
        &K
    }
    #[cfg(not(any(
        all(target_arch = "aarch64", target_feature = "neon"),
        all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c",
            target_feature = "popcnt"
        )
    )))]
    {
        static K: Kernels = scalar::KERNELS;
        &K
    }
}

/// CPU features detected that matter here, for reports, e.g. `["avx2", "fma",
/// "f16c"]` or `["neon", "fp16", "dotprod"]`.
pub fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::features()
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        neon::features()
    }
    #[cfg(not(any(
        target_arch = "x86_64",
        all(target_arch = "aarch64", target_feature = "neon")
    )))]
    {
        Vec::new()
    }
}

/// Decodes rows `r0..r0 + out.len()/cols` of a dense row-major matrix of `cols`
/// columns stored in any dtype into `out` by `k.to_f32`: one call for a float type,
/// one per row (one run each) for a quantized one.
///
/// # Panics
/// When the rows lie outside `w`.
pub fn rows_to_f32(k: &Kernels, w: Values<'_>, cols: usize, r0: usize, out: &mut [f32]) {
    if !w.dtype.is_quantized() {
        (k.to_f32)(w, r0 * cols, out);
        return;
    }
    if cols == 0 {
        return;
    }
    let rb = w.dtype.run_bytes(cols as u64) as usize;
    for (i, row) in out.chunks_exact_mut(cols).enumerate() {
        let start = (r0 + i) * rb;
        let bytes = w
            .bytes
            .get(start..start + rb)
            .expect("rows out of range of the dense matrix");
        (k.to_f32)(
            Values {
                dtype: w.dtype,
                bytes,
            },
            0,
            row,
        );
    }
}

/// Row starts of a bitmask-encoded `rows×cols` matrix: entry `r` is the number of set
/// bits before bit `r·cols` (the index of row `r`'s first value), `rows + 1` entries.
/// Bits past the end of `mask` count as zero.
///
/// # Panics
/// When a count exceeds `u32::MAX` (the format caps `nnz` far below) or `rows·cols`
/// overflows.
pub fn bitmask_row_starts(mask: &[u8], rows: usize, cols: usize) -> Vec<u32> {
    rows.checked_mul(cols).expect("rows·cols overflows");
    let mut out = Vec::with_capacity(rows + 1);
    let mut count = 0u64;
    out.push(0);
    for r in 0..rows {
        count += popcount_bits(mask, r * cols, cols);
        out.push(u32::try_from(count).expect("more than u32::MAX mask bits set"));
    }
    out
}

/// Set bits among `len` mask bits starting at bit `start`.
fn popcount_bits(mask: &[u8], start: usize, len: usize) -> u64 {
    let mut n = 0u64;
    let mut pos = start;
    let end = start + len;
    while pos < end {
        let take = (end - pos).min(64);
        n += u64::from((bits_at(mask, pos) & low_bits(take)).count_ones());
        pos += take;
    }
    n
}

/// A mask of the lowest `n` bits, `n` in `0..=64`.
#[inline(always)]
pub(crate) fn low_bits(n: usize) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// The 64 mask bits starting at bit `bit` (bit `j` of the result is mask bit
/// `bit + j`, least significant bit first); bits past the end of `mask` read as zero.
/// Reading a whole word at an arbitrary bit offset is what lets rows start anywhere
/// inside a byte.
#[inline(always)]
pub(crate) fn bits_at(mask: &[u8], bit: usize) -> u64 {
    let byte = bit / 8;
    let sh = (bit % 8) as u32;
    match mask.get(byte..byte + 9) {
        Some(s) => {
            let lo = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
            // The ninth byte supplies the top `sh` bits; shifting in two steps keeps the
            // shift amount below 64 when `sh` is 0.
            (lo >> sh) | ((u64::from(s[8]) << 1) << (63 - sh))
        }
        None => bits_at_end(mask, bit),
    }
}

/// [`bits_at`] within the last 9 bytes of the mask (out of line: rare, and its copy
/// would cost the kernels' loops their registers).
#[cold]
#[inline(never)]
fn bits_at_end(mask: &[u8], bit: usize) -> u64 {
    let mut buf = [0u8; 9];
    let avail = mask.get(bit / 8..).unwrap_or(&[]);
    let n = avail.len().min(9);
    buf[..n].copy_from_slice(&avail[..n]);
    bits_at(&buf, bit % 8)
}

/// Values a [`QWindow`] holds: enough for a few 64-column mask words per refill, small
/// enough (1 KiB) to live on the stack of every call.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
const QWIN: usize = 256;

/// Floats readable past the requested values of a [`QWindow`] slice: the widest vector
/// load (16 lanes) may start at the last requested value.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
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
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
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

#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
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
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
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
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
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
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[inline]
pub(crate) fn bitmask_count(m: &BitmaskRef<'_>, r: usize) -> usize {
    (m.row_start[r + 1])
        .checked_sub(m.row_start[r])
        .expect("bitmask row starts decrease") as usize
}

/// Kept values of block-CSR row `r`.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[inline]
pub(crate) fn csr_count(m: &CsrRef<'_>, nb: usize, r: usize) -> usize {
    (u32_at(m.block_ptr, (r + 1) * nb) as usize)
        .checked_sub(u32_at(m.block_ptr, r * nb) as usize)
        .expect("block pointers decrease")
}

/// 8 column indices from `idx[k..]`, zeros past its end.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
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

/// Little-endian `u32` number `i` of raw bytes `b` (block-CSR pointers).
#[inline(always)]
pub(crate) fn u32_at(b: &[u8], i: usize) -> u32 {
    let s = &b[4 * i..4 * i + 4];
    u32::from_le_bytes([s[0], s[1], s[2], s[3]])
}

/// Number of 256-column blocks of a block-CSR row.
#[inline(always)]
pub(crate) fn csr_blocks(cols: usize) -> usize {
    cols.div_ceil(cap_format::encoding::CSR_BLOCK_COLS as usize)
}
