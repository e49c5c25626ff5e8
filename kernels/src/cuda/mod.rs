//! CUDA kernels for the board (feature `cuda`): the CUDA C source of a matrix-vector
//! product for every `.cap` encoding and value type, RMSNorm, RoPE, softmax, SiLU·mul,
//! GELU-tanh·mul and single-token attention over an `f32` KV cache; their compilation to
//! PTX through NVRTC ([`compile`]); a safe probe for a usable GPU ([`probe`]); and
//! [`Gpu`], which runs each kernel on host slices (what the GPU tests compare against
//! the scalar CPU kernels).
//!
//! Nothing here needs CUDA at build time: `libnvrtc` and `libcuda` are loaded when
//! first used (cudarc's `dynamic-loading`), and both are checked for before any call
//! into them, because cudarc panics when a library it calls into is missing.
//!
//! **Status:** every kernel compiles through NVRTC for sm_72, sm_87 and sm_90 without
//! register spills (tested without a GPU). No kernel has yet run on a GPU.

use std::ffi::{CStr, CString, c_char};

use cudarc::driver::{result as drv, sys as drv_sys};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

mod gpu;

pub use gpu::{Gpu, Resident};

/// Helpers every kernel file uses (f16/bf16 decoding, dequantization, reductions).
pub const COMMON_CUH: &str = include_str!("common.cuh");
/// Matrix-vector products for every encoding and value type.
pub const MATVEC_CU: &str = include_str!("matvec.cu");
/// RMSNorm, RoPE, softmax, SiLU·mul, GELU-tanh·mul.
pub const OPS_CU: &str = include_str!("ops.cu");
/// Single-token attention over an `f32` KV cache.
pub const ATTENTION_CU: &str = include_str!("attention.cu");

/// Suffixes of the value types in kernel names, in `cap_format::DType` order.
pub const DTYPE_SUFFIXES: [&str; 5] = ["f32", "f16", "bf16", "q8", "q4"];

/// The encodings with a matrix-vector kernel, as kernel name prefixes
/// (`cap_<encoding>_rows_<dtype>`). Low-rank and composite tensors run two or three
/// of these (`Gpu::low_rank_rows`).
pub const MATVEC_ENCODINGS: [&str; 4] = ["dense", "bitmask", "csr", "two_four"];

/// The kernels that are not matrix-vector products.
pub const OP_KERNELS: [&str; 6] = [
    "cap_rms_norm",
    "cap_rope_rotate_half",
    "cap_softmax",
    "cap_silu_mul",
    "cap_gelu_tanh_mul",
    "cap_attention_decode",
];

/// Every kernel entry point in [`source`], for tests and for loading.
pub fn kernel_names() -> Vec<String> {
    let mut v = Vec::new();
    for e in MATVEC_ENCODINGS {
        for d in DTYPE_SUFFIXES {
            v.push(format!("cap_{e}_rows_{d}"));
        }
    }
    v.extend(OP_KERNELS.iter().map(|s| s.to_string()));
    v
}

/// The whole kernel program: [`COMMON_CUH`] followed by every `.cu` file (NVRTC has
/// no file system here, so the files are joined rather than `#include`d).
pub fn source() -> String {
    [COMMON_CUH, MATVEC_CU, OPS_CU, ATTENTION_CU].join("\n")
}

/// Oldest GPU the kernels are built for: compute capability 7.2 (Jetson AGX Xavier).
pub const MIN_COMPUTE_CAPABILITY: (u32, u32) = (7, 2);

/// Options every compilation uses besides the architecture: ptxas runs (a real
/// `sm_XX` target) and fails the compile when a kernel spills registers to local
/// memory.
pub const NVRTC_OPTIONS: [&str; 3] = [
    "--std=c++17",
    "--ptxas-options=--warn-on-spills",
    "--ptxas-options=--warning-as-error",
];

/// What can go wrong compiling or running the CUDA kernels.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// `libnvrtc` could not be loaded (not installed, or not on the loader's path).
    #[error(
        "NVRTC is not available: no libnvrtc could be loaded (install CUDA 12's NVRTC, e.g. `bash scripts/fetch-nvrtc.sh`, and put its folder on LD_LIBRARY_PATH)"
    )]
    NvrtcMissing,
    /// The architecture is not `sm_XX` of a GPU the kernels support.
    #[error("bad CUDA architecture {arch:?}: {reason}")]
    BadArch {
        /// What was asked for.
        arch: String,
        /// Why it is refused.
        reason: String,
    },
    /// NVRTC (or ptxas through it) rejected the program; `log` is NVRTC's log.
    #[error("NVRTC could not compile the kernels for {arch} ({code}):\n{log}")]
    Compile {
        /// The architecture compiled for.
        arch: String,
        /// NVRTC's result code.
        code: String,
        /// NVRTC's program log (compiler and ptxas messages).
        log: String,
    },
    /// Another NVRTC call failed.
    #[error("NVRTC call {call} failed: {code}")]
    Nvrtc {
        /// The call.
        call: &'static str,
        /// NVRTC's result code.
        code: String,
    },
    /// No usable GPU.
    #[error("{0}")]
    Unavailable(#[from] Unavailable),
    /// A CUDA driver call failed.
    #[error("CUDA driver call failed ({what}): {source}")]
    Driver {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        source: drv::DriverError,
    },
    /// Arguments inconsistent with each other (lengths, shapes, index data pointing
    /// outside the arrays); checked before anything is launched.
    #[error("bad kernel arguments: {0}")]
    Shape(String),
}

/// PTX text for one architecture, and NVRTC's log of making it.
#[derive(Clone, Debug)]
pub struct Ptx {
    /// The architecture compiled for, e.g. `sm_87`.
    pub arch: String,
    /// The PTX module (text).
    pub text: String,
    /// NVRTC's program log (empty when there was nothing to say).
    pub log: String,
}

impl Ptx {
    /// The PTX as cudarc's type, to load into a context.
    pub fn to_cudarc(&self) -> cudarc::nvrtc::Ptx {
        cudarc::nvrtc::Ptx::from_src(self.text.clone())
    }
}

/// Whether a `libnvrtc` can be loaded. cudarc panics on the first NVRTC call when it
/// cannot, so every entry point here checks this first.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names (libloading); no NVRTC
    // function is called.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NvrtcMissing);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for
    // writes of one c_int.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Nvrtc {
            call: "nvrtcVersion",
            code: format!("{:?}", e.0),
        })?;
    Ok((major, minor))
}

/// Parses `sm_XX` / `sm_XXY` into a compute capability, refusing anything older than
/// [`MIN_COMPUTE_CAPABILITY`].
pub fn parse_arch(arch: &str) -> Result<(u32, u32), CudaError> {
    let bad = |reason: &str| CudaError::BadArch {
        arch: arch.to_string(),
        reason: reason.to_string(),
    };
    let digits = arch
        .strip_prefix("sm_")
        .ok_or_else(|| bad("expected sm_XX, e.g. sm_87 (a real GPU architecture)"))?;
    if !(2..=3).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("expected sm_ followed by 2 or 3 digits, e.g. sm_87"));
    }
    let n: u32 = digits.parse().map_err(|_| bad("not a number"))?;
    let cc = (n / 10, n % 10);
    if cc < MIN_COMPUTE_CAPABILITY {
        return Err(bad(
            "cap's CUDA kernels need compute capability 7.2 or newer",
        ));
    }
    Ok(cc)
}

/// Compiles every kernel ([`source`]) for `arch` (`sm_XX`, e.g. `sm_87` for Jetson
/// Orin) with [`NVRTC_OPTIONS`]: a compile error or a register spill is an error
/// carrying NVRTC's log. A missing libnvrtc is [`CudaError::NvrtcMissing`].
pub fn compile(arch: &str) -> Result<Ptx, CudaError> {
    compile_source(&source(), arch)
}

/// [`compile`] for any CUDA C source (one program, `extern "C"` entry points).
pub fn compile_source(src: &str, arch: &str) -> Result<Ptx, CudaError> {
    parse_arch(arch)?;
    if !nvrtc_available() {
        return Err(CudaError::NvrtcMissing);
    }
    let src =
        CString::new(src).map_err(|_| CudaError::Shape("source contains a NUL byte".into()))?;
    let name = c"cap_kernels.cu";
    let code = |e: nvrtc::NvrtcError| format!("{:?}", e.0);
    let prog = nvrtc::create_program(&src, Some(name)).map_err(|e| CudaError::Nvrtc {
        call: "nvrtcCreateProgram",
        code: code(e),
    })?;
    // Destroys the program however this function returns.
    struct Program(nvrtc_sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: created by create_program above and destroyed only here. A
            // failure to free is ignored (nothing to recover; it would only leak).
            let _ = unsafe { nvrtc::destroy_program(self.0) };
        }
    }
    let prog = Program(prog);
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    // SAFETY: `prog.0` is a live program (created above, destroyed on drop); the
    // options are NUL-free strings (ours and `arch`, which parse_arch limited to
    // `sm_` and digits).
    let compiled = unsafe { nvrtc::compile_program(prog.0, &options) };
    // SAFETY: as above.
    let log = unsafe { nvrtc::get_program_log(prog.0) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    if let Err(e) = compiled {
        let mut log = log;
        // Seen on a CUDA 13 machine: the loader found its libnvrtc.so before CUDA 12's
        // libnvrtc.so.12, and CUDA 13's NVRTC refuses sm_72 with only "invalid value
        // for --gpu-architecture". Say which NVRTC answered and what to do.
        if log.contains("--gpu-architecture")
            && let Ok((major, minor)) = nvrtc_version()
        {
            log.push_str(&format!(
                "\n(the NVRTC loaded is {major}.{minor}; {arch} needs one that targets it: CUDA 13's NVRTC dropped sm_72, so put CUDA 12's libnvrtc.so.12 first on LD_LIBRARY_PATH, e.g. the folder `bash scripts/fetch-nvrtc.sh` prints, which holds a libnvrtc.so link to it)"
            ));
        }
        return Err(CudaError::Compile {
            arch: arch.to_string(),
            code: code(e),
            log,
        });
    }
    // SAFETY: as above; the program compiled.
    let raw = unsafe { nvrtc::get_ptx(prog.0) }.map_err(|e| CudaError::Nvrtc {
        call: "nvrtcGetPTX",
        code: code(e),
    })?;
    Ok(Ptx {
        arch: arch.to_string(),
        text: c_chars_to_string(&raw),
        log,
    })
}

/// A NUL-terminated `c_char` buffer from NVRTC as a `String` (lossy UTF-8; the part
/// before the first NUL, or all of it when there is none).
fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// A GPU the kernels can run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device ordinal (0: the first GPU).
    pub ordinal: usize,
    /// The device's name, e.g. `Orin (nvgpu)`.
    pub name: String,
    /// Compute capability (major, minor), at least [`MIN_COMPUTE_CAPABILITY`].
    pub compute_capability: (u32, u32),
    /// Device memory in bytes (on Jetson: the memory shared with the CPU).
    pub total_memory: u64,
    /// Whether the GPU shares memory with the CPU (Jetson: `CU_DEVICE_ATTRIBUTE_INTEGRATED`).
    pub integrated: bool,
    /// The driver's CUDA version, e.g. 12060 for 12.6.
    pub driver_version: i32,
}

impl GpuInfo {
    /// The architecture to compile for, `sm_XY`.
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "GPU {}: {} (compute capability {major}.{minor}, {:.1} GiB{}, CUDA driver {}.{})",
            self.ordinal,
            self.name,
            self.total_memory as f64 / (1u64 << 30) as f64,
            if self.integrated {
                " shared with the CPU"
            } else {
                ""
            },
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10
        )
    }
}

/// Why no GPU is usable: one line for a human.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no usable CUDA GPU: {reason}")]
pub struct Unavailable {
    /// The reason, one line (e.g. "libcuda could not be loaded (no NVIDIA driver)").
    pub reason: String,
}

impl Unavailable {
    fn new(reason: impl Into<String>) -> Self {
        Unavailable {
            reason: reason.into(),
        }
    }
}

/// The first GPU ([`probe_ordinal`] 0).
pub fn probe() -> Result<GpuInfo, Unavailable> {
    probe_ordinal(0)
}

/// Looks for GPU `ordinal` without ever panicking: first whether `libcuda` can be
/// loaded at all (cudarc's driver calls panic without it), then the driver's
/// initialisation, the device count, the name, the compute capability (older than 7.2
/// is refused) and the memory.
pub fn probe_ordinal(ordinal: usize) -> Result<GpuInfo, Unavailable> {
    // SAFETY: only tries to dlopen the candidate library names; no driver call.
    if !unsafe { drv_sys::is_culib_present() } {
        return Err(Unavailable::new(
            "libcuda could not be loaded (no NVIDIA driver on this machine)",
        ));
    }
    drv::init()
        .map_err(|e| Unavailable::new(format!("the CUDA driver did not initialise ({e})")))?;
    let count = drv::device::get_count()
        .map_err(|e| Unavailable::new(format!("the CUDA driver could not count GPUs ({e})")))?;
    let count = usize::try_from(count).unwrap_or(0);
    if count == 0 {
        return Err(Unavailable::new("the CUDA driver sees no GPU"));
    }
    if ordinal >= count {
        return Err(Unavailable::new(format!(
            "GPU {ordinal} asked for, but the CUDA driver sees {count}"
        )));
    }
    let fail = |what: &str, e: drv::DriverError| Unavailable::new(format!("{what} ({e})"));
    let dev = drv::device::get(ordinal as i32).map_err(|e| fail("cuDeviceGet failed", e))?;
    let name = drv::device::get_name(dev).map_err(|e| fail("cuDeviceGetName failed", e))?;
    let attr = |a: drv_sys::CUdevice_attribute| {
        // SAFETY: `dev` came from cuDeviceGet after a successful cuInit.
        unsafe { drv::device::get_attribute(dev, a) }
            .map_err(|e| fail("cuDeviceGetAttribute failed", e))
    };
    use drv_sys::CUdevice_attribute::*;
    let major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let integrated = attr(CU_DEVICE_ATTRIBUTE_INTEGRATED)? != 0;
    let cc = (
        u32::try_from(major).unwrap_or(0),
        u32::try_from(minor).unwrap_or(0),
    );
    if cc < MIN_COMPUTE_CAPABILITY {
        return Err(Unavailable::new(format!(
            "{name} has compute capability {major}.{minor}; cap's CUDA kernels need 7.2 or newer (Jetson Xavier, Turing, ...)"
        )));
    }
    // SAFETY: as above.
    let total =
        unsafe { drv::device::total_mem(dev) }.map_err(|e| fail("cuDeviceTotalMem failed", e))?;
    let mut driver_version = 0;
    // SAFETY: the library is loaded and initialised; the pointer is valid for one c_int.
    unsafe { drv_sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(|e| fail("cuDriverGetVersion failed", e))?;
    Ok(GpuInfo {
        ordinal,
        name,
        compute_capability: cc,
        total_memory: total as u64,
        integrated,
        driver_version,
    })
}

/// One line for reports (`cap-device info`): the GPU found, or why none is usable.
pub fn describe() -> String {
    match probe() {
        Ok(g) => g.to_string(),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(parse_arch("sm_87").ok(), Some((8, 7)));
        assert_eq!(parse_arch("sm_72").ok(), Some((7, 2)));
        assert_eq!(parse_arch("sm_100").ok(), Some((10, 0)));
        for bad in [
            "sm_70",
            "sm_61",
            "compute_87",
            "sm_8",
            "sm_87a",
            "",
            "sm_1000",
        ] {
            assert!(
                matches!(parse_arch(bad), Err(CudaError::BadArch { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_kernel_name_is_in_the_source() {
        let src = source();
        for n in kernel_names() {
            let short = n.rsplit_once('_').map_or(n.as_str(), |(a, _)| a);
            assert!(src.contains(short), "{n}");
        }
    }
}
