//! [`Gpu`]: runs each CUDA kernel, with the same arguments and the same
//! accumulate-into-`y` contract as the CPU kernels (`cpu::Kernels`).
//!
//! A weight matrix is uploaded once as a [`Resident`] (every size and index array
//! checked on the host first, so inconsistent input gives [`CudaError::Shape`], never
//! a read outside a device buffer) and multiplied by [`Gpu::resident_rows`] (host
//! vectors) or [`Gpu::resident_rows_dev`] (vectors already on the GPU). The
//! host-slice methods (`dense_rows`, `bitmask_rows`, …) upload, launch once and
//! download: the tests' harness.
//!
//! Run on an H200 (scripts/gpu-check.sh): every test of `tests/cuda.rs` passes, and
//! compute-sanitizer's memcheck finds no error.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use super::{CudaError, GpuInfo, Ptx, compile, probe_ordinal};
use crate::cpu::{BitmaskRef, CsrRef, DType, SparseRef, TwoFourRef, Values, bitmask_row_starts};

/// Threads per block of the matrix-vector kernels: 4 warps, one row each.
const MATVEC_THREADS: u32 = 128;
/// Threads per block of the row-wise kernels (RMSNorm, softmax, attention).
const ROW_THREADS: u32 = 256;

/// A GPU with the kernels loaded.
pub struct Gpu {
    info: GpuInfo,
    ptx: Ptx,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    /// How many times each matrix-vector launch runs back to back: 1, except inside
    /// [`Gpu::time_matvec`].
    repeat: AtomicU32,
    /// Mean seconds per launch of the last repeated matrix-vector launch (f64 bits).
    last_seconds: AtomicU64,
}

/// A weight matrix on the GPU in its stored encoding and value type, uploaded once by
/// [`Gpu::upload_dense`], [`Gpu::upload_sparse`] and the like, which check every size
/// and index array first.
pub struct Resident {
    rows: usize,
    cols: usize,
    dtype: DType,
    data: ResidentData,
}

/// The device buffers of a [`Resident`], by encoding (the kernels' arguments).
enum ResidentData {
    Dense {
        w: CudaSlice<u8>,
    },
    Bitmask {
        mask: CudaSlice<u8>,
        mask_len: u64,
        row_start: CudaSlice<u32>,
        row_block: CudaSlice<u32>,
        vals: CudaSlice<u8>,
    },
    Csr {
        ptr: CudaSlice<u32>,
        idx: CudaSlice<u8>,
        row_block: CudaSlice<u32>,
        vals: CudaSlice<u8>,
    },
    TwoFour {
        vals: CudaSlice<u8>,
        meta: CudaSlice<u8>,
    },
}

impl Resident {
    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The value type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

fn driver(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    move |source| CudaError::Driver { what, source }
}

fn shape(msg: impl Into<String>) -> CudaError {
    CudaError::Shape(msg.into())
}

fn to_u32(v: usize, what: &str) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| shape(format!("{what} = {v} does not fit in 32 bits")))
}

/// The kernel-name suffix of a value type.
fn suffix(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::Q8 { .. } => "q8",
        DType::Q4 { .. } => "q4",
    }
}

/// Launch shape of a matrix-vector kernel over `n` rows.
fn matvec_cfg(n: u32) -> LaunchConfig {
    let rows_per_block = MATVEC_THREADS / 32;
    LaunchConfig {
        grid_dim: (n.div_ceil(rows_per_block), 1, 1),
        block_dim: (MATVEC_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per each of `blocks` rows.
fn rows_cfg(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Index of each row's first quantized block, `rows + 1` entries, from the rows'
/// kept-value counts (`scalar::q_first_block` for every row at once).
fn row_blocks(counts: impl Iterator<Item = usize>, group: usize) -> Result<Vec<u32>, CudaError> {
    let mut v = vec![0u32];
    let mut acc = 0usize;
    for c in counts {
        acc += c.div_ceil(group);
        v.push(to_u32(acc, "quantized block count")?);
    }
    Ok(v)
}

/// Checks that `bytes` holds `need` bytes of values.
fn check_len(what: &str, have: usize, need: u64) -> Result<(), CudaError> {
    if (have as u64) < need {
        return Err(shape(format!(
            "{what}: {have} bytes, the indices need {need}"
        )));
    }
    Ok(())
}

impl Gpu {
    /// The first usable GPU with the kernels compiled for it by NVRTC.
    pub fn new() -> Result<Gpu, CudaError> {
        Gpu::with_ordinal(0)
    }

    /// GPU `ordinal` with the kernels compiled for its architecture.
    pub fn with_ordinal(ordinal: usize) -> Result<Gpu, CudaError> {
        let info = probe_ordinal(ordinal)?;
        let ptx = compile(&info.arch())?;
        let ctx = CudaContext::new(ordinal).map_err(driver("creating a context"))?;
        let module = ctx
            .load_module(ptx.to_cudarc())
            .map_err(driver("loading the PTX module"))?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            info,
            ptx,
            stream,
            module,
            repeat: AtomicU32::new(1),
            last_seconds: AtomicU64::new(0),
        })
    }

    /// The GPU.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// The PTX loaded (with NVRTC's log).
    pub fn ptx(&self) -> &Ptx {
        &self.ptx
    }

    fn func(&self, name: &str) -> Result<CudaFunction, CudaError> {
        self.module
            .load_function(name)
            .map_err(driver("looking up a kernel"))
    }

    /// Launches a matrix-vector kernel: once, or [`Gpu::time_matvec`]'s `reps` times
    /// back to back, timing them with the inputs already on the GPU.
    ///
    /// # Safety
    /// The arguments on `b` match the kernel's parameters in order and type, and every
    /// index the kernel forms from them stays inside its buffers (each caller checks
    /// its own before calling).
    unsafe fn launch_matvec(
        &self,
        b: &mut LaunchArgs<'_>,
        n: u32,
        what: &'static str,
    ) -> Result<(), CudaError> {
        let reps = self.repeat.load(Ordering::Relaxed);
        if reps <= 1 {
            // SAFETY: the caller's contract.
            return unsafe { b.launch(matvec_cfg(n)) }
                .map(|_| ())
                .map_err(driver(what));
        }
        // Wait for the uploads first, so the clock sees the launches alone; the
        // launches queue on one stream and the final synchronize waits for the last.
        self.stream.synchronize().map_err(driver("uploading"))?;
        let t = Instant::now();
        for _ in 0..reps {
            // SAFETY: the caller's contract; repeating only accumulates into y again.
            unsafe { b.launch(matvec_cfg(n)) }.map_err(driver(what))?;
        }
        self.stream.synchronize().map_err(driver(what))?;
        let mean = t.elapsed().as_secs_f64() / f64::from(reps);
        self.last_seconds.store(mean.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// Runs `f`, a call of one matrix-vector method (`dense_rows`, `bitmask_rows`,
    /// `csr_rows`, `two_four_rows`), with its kernel launched `reps` times back to back
    /// on inputs uploaded once, and returns the mean seconds per launch: the kernel's
    /// own time as a decode step would see it with the weights resident. `y` then
    /// holds `reps` accumulations of `W·x`.
    pub fn time_matvec(
        &self,
        reps: u32,
        f: impl FnOnce(&Gpu) -> Result<(), CudaError>,
    ) -> Result<f64, CudaError> {
        self.repeat.store(reps.max(1), Ordering::Relaxed);
        self.last_seconds
            .store(f64::NAN.to_bits(), Ordering::Relaxed);
        let r = f(self);
        self.repeat.store(1, Ordering::Relaxed);
        r?;
        let s = f64::from_bits(self.last_seconds.load(Ordering::Relaxed));
        if s.is_nan() {
            return Err(shape("time_matvec: f launched no matrix-vector kernel"));
        }
        Ok(s)
    }

    /// A device copy of `data` (one default element when empty: the driver allocates
    /// nothing for zero bytes, and kernels never read an empty array).
    fn up<T: DeviceRepr + Copy + Default>(&self, data: &[T]) -> Result<CudaSlice<T>, CudaError> {
        let one = [T::default()];
        let src = if data.is_empty() { &one[..] } else { data };
        self.stream
            .clone_htod(src)
            .map_err(driver("copying to the GPU"))
    }

    /// Copies `d` back into `out` (`out.len()` elements).
    fn down(&self, d: &CudaSlice<f32>, out: &mut [f32]) -> Result<(), CudaError> {
        let v = self
            .stream
            .clone_dtoh(d)
            .map_err(driver("copying from the GPU"))?;
        // The copy into pageable memory has completed when it returns; synchronising
        // also reports a kernel that failed (a launch error surfaces here).
        self.stream
            .synchronize()
            .map_err(driver("running a kernel"))?;
        out.copy_from_slice(&v[..out.len()]);
        Ok(())
    }

    /// A device copy of `data` (see [`Gpu::up`]), for vectors the caller keeps on the
    /// GPU between launches ([`Gpu::resident_rows_dev`]).
    pub fn upload_f32(&self, data: &[f32]) -> Result<CudaSlice<f32>, CudaError> {
        self.up(data)
    }

    /// `n` zeros on the GPU (at least one element, as [`Gpu::up`]).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(driver("allocating on the GPU"))
    }

    /// Overwrites the start of `d` with `data`.
    pub fn write_f32(&self, data: &[f32], d: &mut CudaSlice<f32>) -> Result<(), CudaError> {
        if data.len() > d.len() {
            return Err(shape(format!(
                "{} values into a device buffer of {}",
                data.len(),
                d.len()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut view = d.slice_mut(..data.len());
        self.stream
            .memcpy_htod(data, &mut view)
            .map_err(driver("copying to the GPU"))
    }

    /// Zeros all of `d`.
    pub fn clear_f32(&self, d: &mut CudaSlice<f32>) -> Result<(), CudaError> {
        self.stream
            .memset_zeros(d)
            .map_err(driver("clearing a device buffer"))
    }

    /// Copies the first `out.len()` values of `d` into `out` (and reports any failed
    /// kernel queued before).
    pub fn read_f32(&self, d: &CudaSlice<f32>, out: &mut [f32]) -> Result<(), CudaError> {
        if out.len() > d.len() {
            return Err(shape(format!(
                "{} values out of a device buffer of {}",
                out.len(),
                d.len()
            )));
        }
        self.down(d, out)
    }

    /// Dense `rows × cols` `W` of any value type, uploaded once.
    pub fn upload_dense(
        &self,
        w: Values<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<Resident, CudaError> {
        let rb = w.dtype.run_bytes(cols as u64);
        check_len("dense values", w.bytes.len(), rows as u64 * rb)?;
        Ok(Resident {
            rows,
            cols,
            dtype: w.dtype,
            data: ResidentData::Dense {
                w: self.up(w.bytes)?,
            },
        })
    }

    /// Bitmask-encoded `W` (rows from `row_start`), uploaded once.
    pub fn upload_bitmask(&self, m: &BitmaskRef<'_>) -> Result<Resident, CudaError> {
        let cols = m.cols;
        let rows = m
            .row_start
            .len()
            .checked_sub(1)
            .ok_or_else(|| shape("row_start is empty"))?;
        // The kernel indexes values by row_start and the mask's bits: they must agree.
        if rows
            .checked_mul(cols)
            .is_none_or(|n| n.div_ceil(8) > m.mask.len())
            || bitmask_row_starts(m.mask, rows, cols) != m.row_start
        {
            return Err(shape("the mask and row_start disagree"));
        }
        let dt = m.values.dtype;
        let row_block = if dt.is_quantized() {
            let counts = m.row_start.windows(2).map(|w| (w[1] - w[0]) as usize);
            let rb = row_blocks(counts, dt.group())?;
            check_len(
                "bitmask values",
                m.values.bytes.len(),
                u64::from(rb[rows]) * dt.size() as u64,
            )?;
            rb
        } else {
            check_len(
                "bitmask values",
                m.values.bytes.len(),
                u64::from(m.row_start[rows]) * dt.size() as u64,
            )?;
            Vec::new()
        };
        Ok(Resident {
            rows,
            cols,
            dtype: dt,
            data: ResidentData::Bitmask {
                mask: self.up(m.mask)?,
                mask_len: m.mask.len() as u64,
                row_start: self.up(m.row_start)?,
                row_block: self.up(&row_block)?,
                vals: self.up(m.values.bytes)?,
            },
        })
    }

    /// Block-CSR `W` (rows from `block_ptr`), uploaded once.
    pub fn upload_csr(&self, m: &CsrRef<'_>) -> Result<Resident, CudaError> {
        let cols = m.cols;
        if cols == 0 {
            return Err(shape("a block-CSR matrix needs at least one column"));
        }
        let nb = cols.div_ceil(256);
        if !m.block_ptr.len().is_multiple_of(4) {
            return Err(shape("block_ptr is not whole u32s"));
        }
        let ptr: Vec<u32> = m
            .block_ptr
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let rows = (ptr.len().saturating_sub(1)) / nb;
        if ptr.len() != rows * nb + 1 {
            return Err(shape(format!(
                "block_ptr has {} entries, not rows·{nb} + 1",
                ptr.len()
            )));
        }
        if ptr.windows(2).any(|w| w[0] > w[1]) || ptr[rows * nb] as usize > m.col_idx.len() {
            return Err(shape("block_ptr decreases or points past col_idx"));
        }
        let dt = m.values.dtype;
        let row_block = if dt.is_quantized() {
            let counts = (0..rows).map(|r| (ptr[(r + 1) * nb] - ptr[r * nb]) as usize);
            let rb = row_blocks(counts, dt.group())?;
            check_len(
                "block-CSR values",
                m.values.bytes.len(),
                u64::from(rb[rows]) * dt.size() as u64,
            )?;
            rb
        } else {
            check_len(
                "block-CSR values",
                m.values.bytes.len(),
                u64::from(ptr[rows * nb]) * dt.size() as u64,
            )?;
            Vec::new()
        };
        Ok(Resident {
            rows,
            cols,
            dtype: dt,
            data: ResidentData::Csr {
                ptr: self.up(&ptr)?,
                idx: self.up(m.col_idx)?,
                row_block: self.up(&row_block)?,
                vals: self.up(m.values.bytes)?,
            },
        })
    }

    /// 2:4 `W` of `rows` rows, uploaded once.
    pub fn upload_two_four(&self, m: &TwoFourRef<'_>, rows: usize) -> Result<Resident, CudaError> {
        let cols = m.cols;
        if !cols.is_multiple_of(4) {
            return Err(shape(format!("2:4 needs cols % 4 == 0, got {cols}")));
        }
        let dt = m.values.dtype;
        check_len(
            "2:4 values",
            m.values.bytes.len(),
            rows as u64 * dt.run_bytes((cols / 2) as u64),
        )?;
        check_len(
            "2:4 meta",
            m.meta.len(),
            (rows * cols / 4).div_ceil(2) as u64,
        )?;
        Ok(Resident {
            rows,
            cols,
            dtype: dt,
            data: ResidentData::TwoFour {
                vals: self.up(m.values.bytes)?,
                meta: self.up(m.meta)?,
            },
        })
    }

    /// Any sparse part of `rows` rows, uploaded once.
    pub fn upload_sparse(&self, m: &SparseRef<'_>, rows: usize) -> Result<Resident, CudaError> {
        let r = match m {
            SparseRef::Bitmask(b) => self.upload_bitmask(b)?,
            SparseRef::Csr(c) => self.upload_csr(c)?,
            SparseRef::TwoFour(t) => self.upload_two_four(t, rows)?,
        };
        if r.rows != rows {
            return Err(shape(format!(
                "the sparse part has {} rows, the layer {rows}",
                r.rows
            )));
        }
        Ok(r)
    }

    /// `y[i] += W[r0 + i, :]·x` for `i < n` with `x` and `y` on the GPU (`x` holds at
    /// least `cols` values, `y` at least `n`), as the CPU kernels' `*_rows`. Queued on
    /// the GPU's stream; a failure of the kernel itself surfaces at the next read.
    pub fn resident_rows_dev(
        &self,
        m: &Resident,
        r0: usize,
        n: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if m.cols == 0 || n == 0 {
            return Ok(());
        }
        if r0 + n > m.rows {
            return Err(shape(format!("rows {r0}..{} of {}", r0 + n, m.rows)));
        }
        if x.len() < m.cols || y.len() < n {
            return Err(shape(format!(
                "x has {} values for {} columns, y {} for {n} rows",
                x.len(),
                m.cols,
                y.len()
            )));
        }
        let (cols32, r0_32, n32) = (
            to_u32(m.cols, "cols")?,
            to_u32(r0, "r0")?,
            to_u32(n, "rows")?,
        );
        let group = to_u32(m.dtype.group(), "group")?;
        let sfx = suffix(m.dtype);
        match &m.data {
            ResidentData::Dense { w } => {
                let f = self.func(&format!("cap_dense_rows_{sfx}"))?;
                let mut b = self.stream.launch_builder(&f);
                b.arg(w)
                    .arg(&cols32)
                    .arg(&group)
                    .arg(&r0_32)
                    .arg(&n32)
                    .arg(x)
                    .arg(y);
                // SAFETY: the arguments match cap_dense_rows_* in matvec.cu in order
                // and type (const u8*, u32 cols, u32 group, u32 r0, u32 n, const
                // float* x, float* y); rows r0..r0+n lie inside `w` (upload_dense
                // checked all `rows`), x has cols values and y n (checked above).
                unsafe { self.launch_matvec(&mut b, n32, "launching cap_dense_rows") }
            }
            ResidentData::Bitmask {
                mask,
                mask_len,
                row_start,
                row_block,
                vals,
            } => {
                let f = self.func(&format!("cap_bitmask_rows_{sfx}"))?;
                let mut b = self.stream.launch_builder(&f);
                b.arg(mask)
                    .arg(mask_len)
                    .arg(&cols32)
                    .arg(row_start)
                    .arg(row_block)
                    .arg(vals)
                    .arg(&group)
                    .arg(&r0_32)
                    .arg(&n32)
                    .arg(x)
                    .arg(y);
                // SAFETY: the arguments match cap_bitmask_rows_* in matvec.cu in order
                // and type (const u8* mask, u64 mask_len, u32 cols, const u32*
                // row_start, const u32* row_block, const u8* vals, u32 group, u32 r0,
                // u32 n, const float* x, float* y). upload_bitmask checked that
                // row_start equals the mask's own counts and that the values cover its
                // last entry (or every row's blocks), so no index leaves its buffer;
                // row_block is read only by the quantized kernels, which get the full
                // table.
                unsafe { self.launch_matvec(&mut b, n32, "launching cap_bitmask_rows") }
            }
            ResidentData::Csr {
                ptr,
                idx,
                row_block,
                vals,
            } => {
                let f = self.func(&format!("cap_csr_rows_{sfx}"))?;
                let mut b = self.stream.launch_builder(&f);
                b.arg(&cols32)
                    .arg(ptr)
                    .arg(idx)
                    .arg(row_block)
                    .arg(vals)
                    .arg(&group)
                    .arg(&r0_32)
                    .arg(&n32)
                    .arg(x)
                    .arg(y);
                // SAFETY: the arguments match cap_csr_rows_* in matvec.cu in order and
                // type (u32 cols, const u32* block_ptr, const u8* col_idx, const u32*
                // row_block, const u8* vals, u32 group, u32 r0, u32 n, const float* x,
                // float* y). upload_csr checked that the pointers are non-decreasing
                // and end inside col_idx and that the values cover them; the kernel
                // skips columns past cols.
                unsafe { self.launch_matvec(&mut b, n32, "launching cap_csr_rows") }
            }
            ResidentData::TwoFour { vals, meta } => {
                let f = self.func(&format!("cap_two_four_rows_{sfx}"))?;
                let mut b = self.stream.launch_builder(&f);
                b.arg(&cols32)
                    .arg(vals)
                    .arg(meta)
                    .arg(&group)
                    .arg(&r0_32)
                    .arg(&n32)
                    .arg(x)
                    .arg(y);
                // SAFETY: the arguments match cap_two_four_rows_* in matvec.cu in
                // order and type (u32 cols, const u8* vals, const u8* meta, u32 group,
                // u32 r0, u32 n, const float* x, float* y); upload_two_four checked
                // that values and meta cover every row, and a nibble's indices stay
                // inside its group of 4 columns.
                unsafe { self.launch_matvec(&mut b, n32, "launching cap_two_four_rows") }
            }
        }
    }

    /// `y[i] += W[r0 + i, :]·x` for `i < y.len()` with host vectors: uploads `x` and
    /// `y`, launches once, downloads `y`.
    pub fn resident_rows(
        &self,
        m: &Resident,
        r0: usize,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), CudaError> {
        if x.len() != m.cols {
            return Err(shape(format!(
                "x has {} values, W {} columns",
                x.len(),
                m.cols
            )));
        }
        if m.cols == 0 || y.is_empty() {
            return Ok(());
        }
        let dx = self.up(x)?;
        let mut dy = self.up(y)?;
        self.resident_rows_dev(m, r0, y.len(), &dx, &mut dy)?;
        self.down(&dy, y)
    }

    /// The host-slice methods' one path: checks `x` against `cols`, returns early for an
    /// empty product, else uploads the matrix by `upload` and runs it once.
    fn once(
        &self,
        cols: usize,
        r0: usize,
        x: &[f32],
        y: &mut [f32],
        upload: impl FnOnce(&Self) -> Result<Resident, CudaError>,
    ) -> Result<(), CudaError> {
        if x.len() != cols {
            return Err(shape(format!("x has {} values, W {cols} columns", x.len())));
        }
        if cols == 0 || y.is_empty() {
            return Ok(());
        }
        let m = upload(self)?;
        self.resident_rows(&m, r0, x, y)
    }

    /// Dense `W` (`cols` columns, any value type): `y[i] += W[r0 + i, :]·x`, as
    /// `cpu::Kernels::dense_rows`.
    pub fn dense_rows(
        &self,
        w: Values<'_>,
        cols: usize,
        r0: usize,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), CudaError> {
        let rows = r0 + y.len();
        self.once(cols, r0, x, y, |g| g.upload_dense(w, rows, cols))
    }

    /// Low-rank `W = B·A` (`A`: `rank × cols`, `B`: `rows × rank`, the format's
    /// FactorA and FactorB): `t = A·x` on the GPU, then `y[i] += B[r0 + i, :]·t`, two
    /// dense matrix-vector products as the CPU runs them.
    #[allow(clippy::too_many_arguments)]
    pub fn low_rank_rows(
        &self,
        a: Values<'_>,
        b: Values<'_>,
        rank: usize,
        cols: usize,
        r0: usize,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), CudaError> {
        let mut t = vec![0.0f32; rank];
        self.dense_rows(a, cols, 0, x, &mut t)?;
        self.dense_rows(b, rank, r0, &t, y)
    }

    /// Bitmask-encoded `W`, as `cpu::Kernels::bitmask_rows`.
    pub fn bitmask_rows(
        &self,
        m: &BitmaskRef<'_>,
        r0: usize,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), CudaError> {
        self.once(m.cols, r0, x, y, |g| g.upload_bitmask(m))
    }

    /// Block-CSR `W`, as `cpu::Kernels::csr_rows`.
    pub fn csr_rows(
        &self,
        m: &CsrRef<'_>,
        r0: usize,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), CudaError> {
        self.once(m.cols, r0, x, y, |g| g.upload_csr(m))
    }

    /// 2:4 `W`, as `cpu::Kernels::two_four_rows`.
    pub fn two_four_rows(
        &self,
        m: &TwoFourRef<'_>,
        r0: usize,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), CudaError> {
        let rows = r0 + y.len();
        self.once(m.cols, r0, x, y, |g| g.upload_two_four(m, rows))
    }

    /// RMSNorm of each `weight.len()`-wide row of `x`, as `ops::rms_norm`.
    pub fn rms_norm(
        &self,
        out: &mut [f32],
        x: &[f32],
        weight: &[f32],
        eps: f32,
    ) -> Result<(), CudaError> {
        let d = weight.len();
        if d == 0 || x.len() != out.len() || !x.len().is_multiple_of(d) {
            return Err(shape("rms_norm shape mismatch"));
        }
        let rows = to_u32(x.len() / d, "rows")?;
        if rows == 0 {
            return Ok(());
        }
        let d32 = to_u32(d, "d")?;
        let f = self.func("cap_rms_norm")?;
        let (dx, dw) = (self.up(x)?, self.up(weight)?);
        let mut dout = self.up(out)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&mut dout).arg(&dx).arg(&dw).arg(&d32).arg(&eps);
        // SAFETY: matches cap_rms_norm(float* out, const float* x, const float* w, u32
        // d, float eps); one block per row of d values, `rows·d` values in x and out.
        unsafe { b.launch(rows_cfg(rows, ROW_THREADS)) }
            .map_err(driver("launching cap_rms_norm"))?;
        self.down(&dout, out)
    }

    /// RoPE (rotate-half) of each `2·cos.len()`-wide head vector of `x`, as
    /// `ops::rope_rotate_half` applied to every head.
    pub fn rope_rotate_half(
        &self,
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
    ) -> Result<(), CudaError> {
        let half = cos.len();
        if half == 0 || sin.len() != half || !x.len().is_multiple_of(2 * half) {
            return Err(shape("rope shape mismatch"));
        }
        let heads = to_u32(x.len() / (2 * half), "heads")?;
        if heads == 0 {
            return Ok(());
        }
        let half32 = to_u32(half, "half")?;
        let f = self.func("cap_rope_rotate_half")?;
        let (dc, ds) = (self.up(cos)?, self.up(sin)?);
        let mut dx = self.up(x)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&mut dx).arg(&dc).arg(&ds).arg(&half32);
        // SAFETY: matches cap_rope_rotate_half(float* x, const float* cos, const float*
        // sin, u32 half); one block per head of 2·half values.
        unsafe { b.launch(rows_cfg(heads, 128)) }
            .map_err(driver("launching cap_rope_rotate_half"))?;
        self.down(&dx, x)
    }

    /// In-place softmax of each `n`-wide row of `x`, as `ops::softmax`.
    pub fn softmax(&self, x: &mut [f32], n: usize) -> Result<(), CudaError> {
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(shape("softmax shape mismatch"));
        }
        let rows = to_u32(x.len() / n, "rows")?;
        if rows == 0 {
            return Ok(());
        }
        let n32 = to_u32(n, "n")?;
        let f = self.func("cap_softmax")?;
        let mut dx = self.up(x)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&mut dx).arg(&n32);
        // SAFETY: matches cap_softmax(float* x, u32 n); one block per row of n values.
        unsafe { b.launch(rows_cfg(rows, ROW_THREADS)) }
            .map_err(driver("launching cap_softmax"))?;
        self.down(&dx, x)
    }

    /// `g = act(g)·u` by `kernel` (`cap_silu_mul` or `cap_gelu_tanh_mul`).
    fn gated(&self, kernel: &str, g: &mut [f32], u: &[f32]) -> Result<(), CudaError> {
        if g.len() != u.len() {
            return Err(shape("gate and up differ in length"));
        }
        if g.is_empty() {
            return Ok(());
        }
        let n = to_u32(g.len(), "n")?;
        let f = self.func(kernel)?;
        let du = self.up(u)?;
        let mut dg = self.up(g)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&mut dg).arg(&du).arg(&n);
        // SAFETY: matches cap_silu_mul / cap_gelu_tanh_mul(float* g, const float* u,
        // u32 n); threads past n return.
        unsafe { b.launch(LaunchConfig::for_num_elems(n)) }
            .map_err(driver("launching a gated activation"))?;
        self.down(&dg, g)
    }

    /// SiLU(g)·u into `g`, as `ops::silu_mul`.
    pub fn silu_mul(&self, g: &mut [f32], u: &[f32]) -> Result<(), CudaError> {
        self.gated("cap_silu_mul", g, u)
    }

    /// GELU-tanh(g)·u into `g`, as `ops::gelu_tanh_mul`.
    pub fn gelu_tanh_mul(&self, g: &mut [f32], u: &[f32]) -> Result<(), CudaError> {
        self.gated("cap_gelu_tanh_mul", g, u)
    }

    /// Decode attention of one token for one layer: `q` holds `n_heads` head vectors
    /// of `hd`; `k`, `v` the layer's `f32` cache, `[n_kv_heads][capacity][hd]`;
    /// positions `first..keys` are attended. Returns `n_heads·hd` values, as the CPU's
    /// `decode_cached` for every head.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (n_heads, n_kv_heads, hd): (usize, usize, usize),
        capacity: usize,
        (first, keys): (usize, usize),
        scale: f32,
    ) -> Result<Vec<f32>, CudaError> {
        let cache = n_kv_heads * capacity * hd;
        if n_heads == 0
            || n_kv_heads == 0
            || hd == 0
            || !n_heads.is_multiple_of(n_kv_heads)
            || q.len() != n_heads * hd
            || k.len() != cache
            || v.len() != cache
            || first >= keys
            || keys > capacity
        {
            return Err(shape("attention shape mismatch"));
        }
        let group = to_u32(n_heads / n_kv_heads, "group")?;
        let (hd32, cap32) = (to_u32(hd, "hd")?, to_u32(capacity, "capacity")?);
        let (first32, keys32) = (to_u32(first, "first")?, to_u32(keys, "keys")?);
        let f = self.func("cap_attention_decode")?;
        let (dq, dk, dv) = (self.up(q)?, self.up(k)?, self.up(v)?);
        let mut dout = self.up(&vec![0.0f32; n_heads * hd])?;
        let mut dscores = self.up(&vec![0.0f32; n_heads * capacity])?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&dq)
            .arg(&dk)
            .arg(&dv)
            .arg(&mut dout)
            .arg(&mut dscores)
            .arg(&group)
            .arg(&hd32)
            .arg(&cap32)
            .arg(&first32)
            .arg(&keys32)
            .arg(&scale);
        // SAFETY: matches cap_attention_decode(const float* q, const float* k, const
        // float* v, float* out, float* scores, u32 group, u32 hd, u32 capacity, u32
        // first, u32 keys, float scale); one block per query head; kv head h/group <
        // n_kv_heads, positions < keys <= capacity, scores has capacity per head.
        unsafe { b.launch(rows_cfg(to_u32(n_heads, "heads")?, ROW_THREADS)) }
            .map_err(driver("launching cap_attention_decode"))?;
        let mut out = vec![0.0f32; n_heads * hd];
        self.down(&dout, &mut out)?;
        Ok(out)
    }
}
