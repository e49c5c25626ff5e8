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

// What the SIMD tables share (with the macros they use, so declared before them).
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[macro_use]
mod simd;

#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "neon")
))]
mod prefetch;

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
/// quantized dense, bitmask, block-CSR and 2:4 rows and `to_f32` (AVX-512's
/// block-CSR and 2:4 are AVX2's), and run the scalar reference for quantized
/// transposed dense rows, which only the `f16` KV cache's attention uses, and
/// `from_f32`)
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
    let (block, rb) = scalar::q_dense_block(w, cols, r0, out.len() / cols);
    for (row, bytes) in out.chunks_exact_mut(cols).zip(block.chunks_exact(rb)) {
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
