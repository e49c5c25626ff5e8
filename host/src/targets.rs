//! Device profiles: one TOML file per edge board, in the workspace's `targets/` folder.
//!
//! A [`Profile`] says how much memory a board has, how much of it the OS and runtime keep,
//! its memory bandwidth, CPU, GPU (if any), Rust target triple and preferred storage dtype.
//! Every figure in the built-in files carries its source in a TOML comment.
//!
//! [`load_all`] reads the built-in profiles and, optionally, a user's folder of extra ones;
//! a user profile with the same name as a built-in one replaces it (with a warning).
//! Each file is validated on load (see [`Profile::validate`]); errors name the file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a profile could not be read or found. Messages are complete in one line (the
/// cause included) and name the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// A profile's figures are inconsistent (see [`Profile::validate`]).
    #[error("{0}")]
    Invalid(String),
    /// A profile file could not be read.
    #[error("reading target profile {}: {error}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A profile file is not valid TOML for a profile.
    #[error("parsing target profile {}: {error}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        error: toml::de::Error,
    },
    /// A profile's file name is not UTF-8.
    #[error("target profile {} has no UTF-8 file stem", .path.display())]
    Stem {
        /// The file.
        path: PathBuf,
    },
    /// A profile file failed validation.
    #[error("invalid target profile {}: {reason}", .path.display())]
    Profile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A folder of profiles could not be listed.
    #[error("reading targets folder {}: {error}", .path.display())]
    Folder {
        /// The folder.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// No profile has the name asked for.
    #[error("unknown target `{name}`; known targets: {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
}

type Result<T, E = TargetError> = std::result::Result<T, E>;

/// CPU instruction-set architecture of a board.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuArch {
    /// 64-bit Arm (`aarch64`).
    Aarch64,
    /// 64-bit x86 (`x86_64`).
    #[serde(rename = "x86_64")]
    X86_64,
}

impl CpuArch {
    /// The name used in TOML files and in Rust target triples.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuArch::Aarch64 => "aarch64",
            CpuArch::X86_64 => "x86_64",
        }
    }
}

impl fmt::Display for CpuArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Storage dtype a board prefers for weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision.
    F32,
}

impl Dtype {
    /// The name used in TOML files.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Dtype> for cap_format::DType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F16 => cap_format::DType::F16,
            Dtype::Bf16 => cap_format::DType::BF16,
            Dtype::F32 => cap_format::DType::F32,
        }
    }
}

/// A board's CUDA GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// CUDA compute capability as `"major.minor"`, e.g. `"8.7"` for Orin.
    pub cuda_compute_capability: String,
    /// Human-readable GPU name.
    pub name: String,
}

impl Gpu {
    /// The compute capability as `(major, minor)`, or `None` if it is not `"major.minor"`.
    pub fn compute_capability(&self) -> Option<(u32, u32)> {
        let (major, minor) = self.cuda_compute_capability.split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(major) || !digits(minor) {
            return None;
        }
        Some((major.parse().ok()?, minor.parse().ok()?))
    }
}

/// One device profile, as read from `targets/<name>.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Profile name; equals the file stem.
    pub name: String,
    /// One-line description of the board.
    pub description: String,
    /// Physical memory in bytes (shared by CPU and GPU on Jetson boards).
    pub total_memory_bytes: u64,
    /// Bytes kept by the OS and runtime (CUDA context, carveouts), not available to the model.
    pub reserved_bytes: u64,
    /// Memory bandwidth in GB/s (10^9 bytes per second).
    pub memory_bandwidth_gbps: f64,
    /// CPU architecture.
    pub cpu_arch: CpuArch,
    /// Number of CPU cores.
    pub cpu_cores: u32,
    /// CPU core model, e.g. `"Arm Cortex-A78AE"`.
    pub cpu_model: String,
    /// SIMD and arithmetic extensions (`neon`, `dotprod`, `fp16`, `avx2`, `avx512f`, ...).
    pub cpu_features: Vec<String>,
    /// The CUDA GPU, or `None` for a CPU-only board.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Gpu>,
    /// Rust target triple to build the device runtime for.
    pub rust_target: String,
    /// Preferred storage dtype for weights.
    pub preferred_dtype: Dtype,
}

impl Profile {
    /// Bytes left for the model and its runtime buffers: total minus reserved.
    pub fn usable_bytes(&self) -> u64 {
        self.total_memory_bytes.saturating_sub(self.reserved_bytes)
    }

    /// Whether `cpu_features` lists `feature`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.cpu_features.iter().any(|f| f == feature)
    }

    /// Checks the profile's figures for consistency; `stem` is the file stem it was read
    /// from, which must equal `name`. Errors say what is wrong (the caller adds the file).
    pub fn validate(&self, stem: &str) -> Result<()> {
        if self.name != stem {
            return Err(TargetError::Invalid(format!(
                "name `{}` does not match the file name `{stem}.toml`",
                self.name
            )));
        }
        if self.total_memory_bytes == 0 {
            return Err(TargetError::Invalid(
                "total_memory_bytes must be > 0".into(),
            ));
        }
        if self.reserved_bytes >= self.total_memory_bytes {
            return Err(TargetError::Invalid(format!(
                "reserved_bytes ({}) must be less than total_memory_bytes ({})",
                self.reserved_bytes, self.total_memory_bytes
            )));
        }
        if !(self.memory_bandwidth_gbps.is_finite() && self.memory_bandwidth_gbps > 0.0) {
            return Err(TargetError::Invalid(format!(
                "memory_bandwidth_gbps must be > 0 (got {})",
                self.memory_bandwidth_gbps
            )));
        }
        if self.cpu_cores == 0 {
            return Err(TargetError::Invalid("cpu_cores must be > 0".into()));
        }
        let arch = self.rust_target.split('-').next().unwrap_or_default();
        if arch != self.cpu_arch.as_str() {
            return Err(TargetError::Invalid(format!(
                "rust_target `{}` is not for cpu_arch `{}`",
                self.rust_target, self.cpu_arch
            )));
        }
        for (i, f) in self.cpu_features.iter().enumerate() {
            if f.is_empty() || f.chars().any(|c| c.is_whitespace() || c.is_uppercase()) {
                return Err(TargetError::Invalid(format!(
                    "cpu_features entry `{f}` must be a lowercase name without spaces"
                )));
            }
            if self.cpu_features[..i].contains(f) {
                return Err(TargetError::Invalid(format!(
                    "cpu_features lists `{f}` twice"
                )));
            }
        }
        if let Some(gpu) = self
            .gpu
            .as_ref()
            .filter(|g| g.compute_capability().is_none())
        {
            return Err(TargetError::Invalid(format!(
                "gpu.cuda_compute_capability `{}` is not of the form \"major.minor\" (e.g. \"8.7\")",
                gpu.cuda_compute_capability
            )));
        }
        Ok(())
    }

    /// Reads and validates one profile file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path).map_err(|error| TargetError::Read {
            path: path.to_owned(),
            error,
        })?;
        let profile: Profile = toml::from_str(&text).map_err(|error| TargetError::Parse {
            path: path.to_owned(),
            error,
        })?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| TargetError::Stem {
                path: path.to_owned(),
            })?;
        profile.validate(stem).map_err(|e| TargetError::Profile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(profile)
    }
}

/// The built-in profiles' folder: the workspace's `targets/`.
pub fn builtin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("targets")
}

/// Reads every `*.toml` profile in `dir`, sorted by file name.
fn load_dir(dir: &Path) -> Result<Vec<Profile>> {
    let folder = |error| TargetError::Folder {
        path: dir.to_owned(),
        error,
    };
    let entries = std::fs::read_dir(dir).map_err(folder)?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(folder)?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    paths.iter().map(|p| Profile::from_file(p)).collect()
}

/// All profiles, sorted by name: the built-in ones plus those in `extra_dir`. A profile in
/// `extra_dir` with the same name as a built-in one replaces it (logged as a warning).
pub fn load_all(extra_dir: Option<&Path>) -> Result<Vec<Profile>> {
    let mut by_name: BTreeMap<String, Profile> = BTreeMap::new();
    for p in load_dir(&builtin_dir())? {
        by_name.insert(p.name.clone(), p);
    }
    if let Some(dir) = extra_dir {
        for p in load_dir(dir)? {
            if by_name.contains_key(&p.name) {
                tracing::warn!(
                    "target profile `{}` in {} overrides the built-in one",
                    p.name,
                    dir.display()
                );
            }
            by_name.insert(p.name.clone(), p);
        }
    }
    Ok(by_name.into_values().collect())
}

/// The profile called `name` (built-in or in `extra_dir`); the error for an unknown name
/// lists the known ones.
pub fn find(name: &str, extra_dir: Option<&Path>) -> Result<Profile> {
    let all = load_all(extra_dir)?;
    if let Some(p) = all.iter().find(|p| p.name == name) {
        return Ok(p.clone());
    }
    let known: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
    Err(TargetError::Unknown {
        name: name.to_string(),
        known: known.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn builtin(name: &str) -> Profile {
        find(name, None).unwrap()
    }

    /// A valid profile text for `name`, with `extra` appended before the `[gpu]` table.
    fn profile_text(name: &str, total: u64, reserved: u64, extra: &str) -> String {
        format!(
            r#"name = "{name}"
description = "test board"
total_memory_bytes = {total}
reserved_bytes = {reserved}
memory_bandwidth_gbps = 10.0
cpu_arch = "aarch64"
cpu_cores = 4
cpu_model = "Arm Cortex-A53"
cpu_features = ["neon"]
rust_target = "aarch64-unknown-linux-gnu"
preferred_dtype = "f32"
{extra}"#
        )
    }

    fn err_of(dir: &Path) -> String {
        format!("{:#}", load_all(Some(dir)).unwrap_err())
    }

    #[test]
    fn every_builtin_profile_parses_and_validates() {
        let all = load_all(None).unwrap();
        let names: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
        for expected in [
            "host",
            "jetson-agx-orin-64gb",
            "jetson-orin-nano-4gb",
            "jetson-orin-nano-8gb",
            "jetson-orin-nx-16gb",
            "jetson-xavier-nx-8gb",
            "raspberry-pi-4-4gb",
            "raspberry-pi-5-8gb",
        ] {
            assert!(names.contains(&expected), "missing {expected}: {names:?}");
        }
        for p in &all {
            assert!(
                p.usable_bytes() > 0 && p.usable_bytes() < p.total_memory_bytes,
                "{}",
                p.name
            );
            assert_eq!(p.usable_bytes(), p.total_memory_bytes - p.reserved_bytes);
            // Jetsons have CUDA and say the memory is shared; the others have no CUDA GPU.
            if p.name.starts_with("jetson-") {
                assert!(p.gpu.is_some(), "{}", p.name);
                assert!(
                    p.description.contains("shared between CPU and GPU"),
                    "{}",
                    p.name
                );
            } else {
                assert!(p.gpu.is_none(), "{}", p.name);
            }
            // Round trip through TOML.
            let text = toml::to_string(p).unwrap();
            let back: Profile = toml::from_str(&text).unwrap();
            assert_eq!(&back, p);
        }
    }

    #[test]
    fn figures_match_the_issue() {
        let nano8 = builtin("jetson-orin-nano-8gb");
        assert_eq!(nano8.memory_bandwidth_gbps, 68.0);
        assert_eq!(nano8.gpu.as_ref().unwrap().cuda_compute_capability, "8.7");
        assert_eq!(
            nano8.gpu.as_ref().unwrap().compute_capability(),
            Some((8, 7))
        );
        assert_eq!(nano8.cpu_cores, 6);
        assert_eq!(nano8.total_memory_bytes, 8 * GIB);
        assert_eq!(nano8.cpu_arch, CpuArch::Aarch64);

        let agx = builtin("jetson-agx-orin-64gb");
        assert_eq!(agx.memory_bandwidth_gbps, 204.8);
        assert_eq!(agx.cpu_cores, 12);
        assert_eq!(agx.total_memory_bytes, 64 * GIB);

        let xavier = builtin("jetson-xavier-nx-8gb");
        assert_eq!(xavier.gpu.as_ref().unwrap().cuda_compute_capability, "7.2");

        let pi5 = builtin("raspberry-pi-5-8gb");
        assert!(pi5.has_feature("dotprod") && pi5.has_feature("fp16") && pi5.has_feature("neon"));
        assert_eq!(pi5.cpu_cores, 4);
        assert!(pi5.gpu.is_none());

        let pi4 = builtin("raspberry-pi-4-4gb");
        assert!(!pi4.has_feature("dotprod") && !pi4.has_feature("fp16"));

        let host = builtin("host");
        assert_eq!(host.cpu_arch, CpuArch::X86_64);
        assert_eq!(host.rust_target, "x86_64-unknown-linux-gnu");
        assert_eq!(
            cap_format::DType::from(host.preferred_dtype),
            cap_format::DType::F16
        );
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let err = format!("{:#}", find("no-such-board", None).unwrap_err());
        assert!(err.contains("unknown target `no-such-board`"), "{err}");
        for name in ["host", "jetson-orin-nano-8gb", "raspberry-pi-5-8gb"] {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn user_dir_overrides_and_adds() {
        let dir = tempfile::tempdir().unwrap();
        // Overrides the built-in host profile with a tiny one.
        std::fs::write(
            dir.path().join("host.toml"),
            profile_text("host", 2 * GIB, GIB, ""),
        )
        .unwrap();
        // Adds a new board with a GPU.
        let gpu = "[gpu]\ncuda_compute_capability = \"8.7\"\nname = \"test gpu\"\n";
        std::fs::write(
            dir.path().join("tiny-board.toml"),
            profile_text("tiny-board", 512 << 20, 128 << 20, gpu),
        )
        .unwrap();
        // Files without the .toml extension are ignored.
        std::fs::write(dir.path().join("README.md"), "not a profile").unwrap();

        let builtin_count = load_all(None).unwrap().len();
        let all = load_all(Some(dir.path())).unwrap();
        assert_eq!(all.len(), builtin_count + 1);

        let host = find("host", Some(dir.path())).unwrap();
        assert_eq!(host.total_memory_bytes, 2 * GIB);
        assert_eq!(host.usable_bytes(), GIB);

        let tiny = find("tiny-board", Some(dir.path())).unwrap();
        assert_eq!(tiny.usable_bytes(), 384 << 20);
        assert_eq!(tiny.gpu.unwrap().compute_capability(), Some((8, 7)));

        // Built-ins not overridden are still there.
        assert_eq!(
            find("jetson-orin-nano-8gb", Some(dir.path()))
                .unwrap()
                .cpu_cores,
            6
        );
        // Without the user dir, the built-in host is back.
        assert_ne!(find("host", None).unwrap().total_memory_bytes, 2 * GIB);
    }

    #[test]
    fn malformed_file_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("broken.toml"),
            "name = \"broken\"\ntotal_memory_bytes = [",
        )
        .unwrap();
        let err = err_of(dir.path());
        assert!(err.contains("broken.toml"), "{err}");
    }

    #[test]
    fn unknown_field_error_names_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let text = profile_text("extra-field", 2 * GIB, GIB, "npu_tops = 40\n");
        std::fs::write(dir.path().join("extra-field.toml"), text).unwrap();
        let err = err_of(dir.path());
        assert!(err.contains("extra-field.toml"), "{err}");
        assert!(err.contains("npu_tops"), "{err}");

        // Also inside the [gpu] table.
        let dir = tempfile::tempdir().unwrap();
        let gpu = "[gpu]\ncuda_compute_capability = \"8.7\"\nname = \"g\"\nvram = 1\n";
        std::fs::write(
            dir.path().join("gpu-extra.toml"),
            profile_text("gpu-extra", 2 * GIB, GIB, gpu),
        )
        .unwrap();
        let err = err_of(dir.path());
        assert!(
            err.contains("gpu-extra.toml") && err.contains("vram"),
            "{err}"
        );
    }

    #[test]
    fn reserved_above_total_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = profile_text("greedy-os", GIB, 2 * GIB, "");
        std::fs::write(dir.path().join("greedy-os.toml"), text).unwrap();
        let err = err_of(dir.path());
        assert!(err.contains("greedy-os.toml"), "{err}");
        assert!(err.contains("reserved_bytes"), "{err}");
    }

    #[test]
    fn other_validation_errors_name_the_file() {
        let cases: &[(&str, String, &str)] = &[
            (
                "mismatch",
                profile_text("other-name", 2 * GIB, GIB, ""),
                "does not match the file name",
            ),
            (
                "zero-bw",
                profile_text("zero-bw", 2 * GIB, GIB, "").replace("= 10.0", "= 0.0"),
                "memory_bandwidth_gbps",
            ),
            (
                "bad-dtype",
                profile_text("bad-dtype", 2 * GIB, GIB, "").replace("\"f32\"", "\"f8\""),
                "f8",
            ),
            (
                "bad-triple",
                profile_text("bad-triple", 2 * GIB, GIB, "")
                    .replace("aarch64-unknown", "x86_64-unknown"),
                "rust_target",
            ),
            (
                "bad-cc",
                profile_text(
                    "bad-cc",
                    2 * GIB,
                    GIB,
                    "[gpu]\ncuda_compute_capability = \"sm_87\"\nname = \"g\"\n",
                ),
                "major.minor",
            ),
        ];
        for (stem, text, needle) in cases {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(format!("{stem}.toml")), text).unwrap();
            let err = err_of(dir.path());
            assert!(err.contains(&format!("{stem}.toml")), "{err}");
            assert!(err.contains(needle), "{stem}: {err}");
        }
    }

    #[test]
    fn missing_user_dir_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = err_of(&missing);
        assert!(err.contains("nope"), "{err}");
    }
}
