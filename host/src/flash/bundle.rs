//! `cap-host bundle`: everything a board needs to run one `.cap` file, in one folder.
//!
//! A bundle holds [`DEVICE_FILE`] (the `cap-device` binary for the profile's
//! `rust_target`), [`MODEL_FILE`] (the `.cap` file), [`RUN_FILE`] (a small launcher)
//! and [`MANIFEST_FILE`] (what is in it: every file's sha256 and size, the profile, the
//! self-test figure stored in the `.cap` file, the memory it needs). The manifest holds
//! no time stamp, so the same inputs make the same bundle and the same
//! [`LoadedBundle::sha256`], which `flash` uses as the version's name on the board.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cap_device::forward::{KvCache, KvDtype, scratch_bytes};
use serde::{Deserialize, Serialize};

use super::{FlashError, Result};
use crate::compress::budget::RUNTIME_OVERHEAD_BYTES;
use crate::digest::sha256_file;
use crate::targets::Profile;

/// The board binary's name inside a bundle.
pub const DEVICE_FILE: &str = "cap-device";
/// The model's name inside a bundle (what `run.sh` runs).
pub const MODEL_FILE: &str = "model.cap";
/// The launcher's name inside a bundle.
pub const RUN_FILE: &str = "run.sh";
/// The manifest's name inside a bundle.
pub const MANIFEST_FILE: &str = "bundle.json";

/// The launcher: the self-test by default (what `flash` runs after installing), any
/// other `cap-device` command when given arguments. It changes into its own folder
/// so that it works from anywhere, including through the `current` link.
pub const RUN_SH: &str = r#"#!/bin/sh
# cap bundle launcher: with no arguments, the board's self-test (recomputes the
# perplexity stored in model.cap; exit 0 when it matches); otherwise cap-device with
# the arguments given, e.g. ./run.sh generate model.cap --prompt "Hello".
cd "$(dirname "$0")" || exit 2
if [ "$#" -eq 0 ]; then
  exec ./cap-device selftest model.cap
fi
exec ./cap-device "$@"
"#;

/// Version of the bundle layout in [`MANIFEST_FILE`].
pub const BUNDLE_FORMAT: u32 = 1;

/// One file of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    /// Name inside the bundle folder.
    pub name: String,
    /// SHA-256, 64 lower-case hex digits.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The self-test figure the `.cap` file carries (what the board must reproduce).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfTestFigure {
    /// The host-measured perplexity.
    pub ppl: f64,
    /// Window length in tokens.
    pub ctx: u32,
    /// Windows scored.
    pub windows: u32,
    /// Name of the text it was measured on.
    pub text_name: String,
}

/// How the `.cap` file fits the profile's usable memory, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFit {
    /// The context the KV cache and scratch are counted for.
    pub ctx: u64,
    /// The profile's usable memory (total − reserved).
    pub usable_bytes: u64,
    /// The `.cap` file (mapped whole).
    pub file_bytes: u64,
    /// The f32 KV cache for `ctx` positions.
    pub kv_cache_bytes: u64,
    /// Activations and scratch of the forward pass.
    pub scratch_bytes: u64,
    /// The runtime itself (program, tokenizer, thread stacks).
    pub runtime_bytes: u64,
    /// The sum of the four above.
    pub need_bytes: u64,
}

impl MemoryFit {
    /// Usable bytes left over (negative: bytes missing).
    pub fn spare_bytes(&self) -> i128 {
        i128::from(self.usable_bytes) - i128::from(self.need_bytes)
    }

    /// `needs N bytes (file … + KV cache … at ctx … + scratch … + runtime …)`: the
    /// terms, as the bundle's refusal and its report both print them.
    pub fn needs(&self) -> String {
        format!(
            "needs {} bytes (file {} + KV cache {} at ctx {} + scratch {} + runtime {})",
            self.need_bytes,
            self.file_bytes,
            self.kv_cache_bytes,
            self.ctx,
            self.scratch_bytes,
            self.runtime_bytes
        )
    }
}

/// The manifest of a bundle ([`MANIFEST_FILE`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleManifest {
    /// [`BUNDLE_FORMAT`].
    pub format: u32,
    /// Target profile name.
    pub profile: String,
    /// Rust target triple of the `cap-device` binary.
    pub rust_target: String,
    /// Version of cap that made the bundle.
    pub cap_version: String,
    /// Version of cap that wrote the `.cap` file (its provenance record).
    pub model_cap_version: String,
    /// The `.cap` file's name before it became [`MODEL_FILE`].
    pub model_source: String,
    /// The stored self-test figure.
    pub self_test: SelfTestFigure,
    /// The memory check against the profile.
    pub memory: MemoryFit,
    /// Every file but the manifest, in copy order.
    pub files: Vec<BundleFile>,
}

/// The CPU architecture (`x86_64`, `aarch64`) of a Rust target triple: its first
/// component, which is also what `uname -m` prints on Linux for these two.
pub fn triple_arch(triple: &str) -> &str {
    triple.split('-').next().unwrap_or(triple)
}

/// The CPU architecture an ELF executable is built for, from its header (`e_machine`),
/// or an error when the file is not a 64-bit little-endian ELF file. Checking this
/// catches an x86 binary bundled for an Arm board before it reaches the board.
pub fn elf_arch(path: &Path) -> Result<&'static str> {
    let mut head = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| FlashError::io(path, "cannot read the cap-device binary", e))?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Err(FlashError::Invalid(format!(
            "{}: not a 64-bit little-endian ELF executable (a cap-device binary for Linux)",
            path.display()
        )));
    }
    match u16::from_le_bytes([head[18], head[19]]) {
        62 => Ok("x86_64"),
        183 => Ok("aarch64"),
        m => Err(FlashError::Invalid(format!(
            "{}: ELF machine {m} is neither x86_64 nor aarch64",
            path.display()
        ))),
    }
}

/// What a `.cap` file says about itself that a bundle records: the memory it needs on
/// `profile` for a `ctx`-token context (capped at the model's positions), the stored
/// self-test figure, and the cap version that wrote it. The file is verified whole
/// (every checksum) first: a corrupt file is refused here, not on the board.
pub fn examine(
    cap: &Path,
    profile: &Profile,
    ctx: usize,
) -> Result<(MemoryFit, SelfTestFigure, String)> {
    let invalid = |e: &dyn std::fmt::Display| FlashError::Invalid(e.to_string());
    let map = crate::capmodel::map(cap).map_err(|e| invalid(&e))?;
    let file = crate::capmodel::parse_verified(cap, &map).map_err(|e| invalid(&e))?;
    let model = crate::capmodel::model(cap, &file).map_err(|e| invalid(&e))?;
    let m = file.manifest();
    let figure = m
        .compression
        .as_ref()
        .and_then(|c| c.perplexity.as_ref())
        .map(|p| SelfTestFigure {
            ppl: p.value,
            ctx: p.ctx,
            windows: p.windows,
            text_name: p.text_name.clone(),
        })
        .ok_or_else(|| {
            FlashError::Invalid(format!(
                "{}: no stored self-test figure (a file from `pack`?); a bundle runs the board's self-test, so it needs a file written by `compress`",
                cap.display()
            ))
        })?;
    let config = &model.config;
    let ctx = ctx.min(config.max_position.max(1));
    let kv = KvCache::bytes_for(config, ctx, KvDtype::F32);
    let scratch = scratch_bytes(
        config,
        ctx,
        ctx,
        KvDtype::F32,
        cap_device::caplinear::scratch_bound(config),
    );
    let file_bytes = map.len() as u64;
    let need = [file_bytes, kv, scratch, RUNTIME_OVERHEAD_BYTES]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b));
    let fit = MemoryFit {
        ctx: ctx as u64,
        usable_bytes: profile.usable_bytes(),
        file_bytes,
        kv_cache_bytes: kv,
        scratch_bytes: scratch,
        runtime_bytes: RUNTIME_OVERHEAD_BYTES,
        need_bytes: need,
    };
    Ok((fit, figure, m.provenance.cap_version.clone()))
}

/// The workspace this `cap-host` was built from: `cap-device` is built from it.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The executable `name` would run: `name` itself when it has a `/`, else the first
/// match on `PATH`.
fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The linker `.cargo/config.toml` of `workspace` names for `triple`, if any
/// (`CARGO_TARGET_<TRIPLE>_LINKER` overrides it, as for cargo).
pub fn configured_linker(workspace: &Path, triple: &str) -> Option<String> {
    let var = format!(
        "CARGO_TARGET_{}_LINKER",
        triple.to_ascii_uppercase().replace(['-', '.'], "_")
    );
    if let Ok(l) = std::env::var(&var) {
        return Some(l);
    }
    let text = std::fs::read_to_string(workspace.join(".cargo/config.toml")).ok()?;
    let v: toml::Table = toml::from_str(&text).ok()?;
    v.get("target")?
        .get(triple)?
        .get("linker")?
        .as_str()
        .map(String::from)
}

/// Checks that `cargo`, the rustup target and (when cross-building) the linker named in
/// `.cargo/config.toml` are there, naming the first missing piece in one line.
pub fn check_toolchain(workspace: &Path, triple: &str) -> Result<PathBuf> {
    let hint = "or pass --device-bin with a prebuilt cap-device";
    if !workspace.join("Cargo.toml").is_file() {
        return Err(FlashError::Missing(format!(
            "the cap workspace this cap-host was built from ({}) is gone, so cap-device cannot be built; pass --device-bin with a prebuilt cap-device",
            workspace.display()
        )));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let Some(cargo) = find_program(&cargo) else {
        return Err(FlashError::Missing(format!(
            "cargo is not installed (needed to build cap-device for {triple}); install Rust from https://rustup.rs, {hint}"
        )));
    };
    let native = triple_arch(triple) == std::env::consts::ARCH && triple.contains("linux");
    // rustup lists the standard libraries it has; without rustup (a distribution's
    // Rust) cargo's own error has to do.
    if find_program("rustup").is_some()
        && let Ok(out) = Command::new("rustup")
            .args(["target", "list", "--installed"])
            .current_dir(workspace)
            .output()
        && out.status.success()
        && !String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == triple)
    {
        return Err(FlashError::Missing(format!(
            "the Rust target {triple} is not installed: rustup target add {triple}, {hint}"
        )));
    }
    if !native {
        let Some(linker) = configured_linker(workspace, triple) else {
            return Err(FlashError::Missing(format!(
                "no linker for {triple} is named in {}/.cargo/config.toml; add [target.{triple}] linker = \"...\", {hint}",
                workspace.display()
            )));
        };
        if find_program(&linker).is_none() {
            return Err(FlashError::Missing(format!(
                "the cross linker {linker} (named in .cargo/config.toml for {triple}) is not installed (Debian: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross), {hint}"
            )));
        }
    }
    Ok(cargo)
}

/// How `bundle` builds `cap-device` when no prebuilt one is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builder {
    /// cargo with the linker `.cargo/config.toml` names (Debian's cross gcc).
    Cargo,
    /// `cross` (cross-rs: the toolchain in a Docker or Podman container, `Cross.toml`).
    Cross,
}

/// Checks that `cross` and a container engine it can use (Docker or Podman, answering)
/// are there, naming the missing piece in one line; returns `cross`'s path.
pub fn check_cross(workspace: &Path) -> Result<PathBuf> {
    let hint = "or build without --cross (cargo and a cross linker), or pass --device-bin";
    if !workspace.join("Cargo.toml").is_file() {
        return Err(FlashError::Missing(format!(
            "the cap workspace this cap-host was built from ({}) is gone, so cap-device cannot be built; pass --device-bin with a prebuilt cap-device",
            workspace.display()
        )));
    }
    let Some(cross) = find_program("cross") else {
        return Err(FlashError::Missing(format!(
            "--cross: cross is not installed (cargo install cross --git https://github.com/cross-rs/cross), {hint}"
        )));
    };
    // cross picks Docker, else Podman (CROSS_CONTAINER_ENGINE overrides); `info` fails
    // when the engine is installed but its daemon is not running or not ours to use.
    let engine = std::env::var("CROSS_CONTAINER_ENGINE")
        .ok()
        .filter(|e| !e.is_empty())
        .or_else(|| {
            ["docker", "podman"]
                .into_iter()
                .find(|e| find_program(e).is_some())
                .map(String::from)
        });
    let Some(engine) = engine else {
        return Err(FlashError::Missing(format!(
            "--cross: neither docker nor podman is installed (cross runs the build in a container), {hint}"
        )));
    };
    let answers = Command::new(&engine)
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !answers {
        return Err(FlashError::Missing(format!(
            "--cross: `{engine} info` fails (is its daemon running, and may this user use it?), {hint}"
        )));
    }
    Ok(cross)
}

/// Builds `cap-device` for `triple` (release) in the workspace this `cap-host` came
/// from, with `builder`, and returns the binary's path. The builder's own progress and
/// errors go to stderr.
pub fn build_device(triple: &str, builder: Builder) -> Result<PathBuf> {
    let ws = workspace_dir();
    let cargo = match builder {
        Builder::Cargo => check_toolchain(&ws, triple)?,
        Builder::Cross => check_cross(&ws)?,
    };
    let mut child = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "cap-device",
            "--bin",
            "cap-device",
            "--target",
            triple,
            // Artifacts as JSON on stdout: the binary's path, wherever the target
            // folder is (CARGO_TARGET_DIR, a config); diagnostics still on stderr.
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(&ws)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| FlashError::io(&cargo, "cannot run cargo", e))?;
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)
            .map_err(|e| FlashError::io(&cargo, "reading cargo's output", e))?;
    }
    let status = child
        .wait()
        .map_err(|e| FlashError::io(&cargo, "waiting for cargo", e))?;
    if !status.success() {
        return Err(FlashError::Build(format!(
            "building cap-device for {triple} failed ({status}); cargo's messages are above"
        )));
    }
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "cap-device")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        // cross reports the path inside its container (`/target/…`); the same file
        // is in the workspace's target folder, which cross mounts there.
        .map(|p| match (builder, p.strip_prefix("/target")) {
            (Builder::Cross, Ok(rel)) => ws.join("target").join(rel),
            _ => p,
        })
        .ok_or_else(|| {
            FlashError::Build(format!(
                "cargo built cap-device for {triple} but reported no executable"
            ))
        })
}

/// What `bundle` is asked to do.
#[derive(Clone, Debug)]
pub struct BundleOptions {
    /// The `.cap` file.
    pub cap: PathBuf,
    /// The target profile.
    pub profile: Profile,
    /// The output folder.
    pub out: PathBuf,
    /// A prebuilt `cap-device`; `None` builds one with `builder`.
    pub device_bin: Option<PathBuf>,
    /// How to build `cap-device` when `device_bin` is `None`.
    pub builder: Builder,
    /// The context the memory check counts the KV cache for.
    pub ctx: usize,
}

/// A bundle read back from its folder, every file checked against the manifest.
#[derive(Clone, Debug)]
pub struct LoadedBundle {
    /// The folder.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: BundleManifest,
    /// SHA-256 of [`MANIFEST_FILE`]: names the whole bundle (it lists every other
    /// file's digest).
    pub sha256: String,
    /// Bytes of [`MANIFEST_FILE`].
    pub manifest_bytes: u64,
}

impl LoadedBundle {
    /// Every file to copy, the manifest last, as `(name, sha256, bytes)`.
    pub fn files(&self) -> Vec<BundleFile> {
        let mut v = self.manifest.files.clone();
        v.push(BundleFile {
            name: MANIFEST_FILE.into(),
            sha256: self.sha256.clone(),
            bytes: self.manifest_bytes,
        });
        v
    }

    /// Total bytes of every file.
    pub fn total_bytes(&self) -> u64 {
        self.files().iter().map(|f| f.bytes).sum()
    }
}

/// Reads the bundle in `dir` and checks every file's size and sha256 against its
/// manifest, so a bundle damaged on the host is never sent to a board.
pub fn load(dir: &Path) -> Result<LoadedBundle> {
    let mpath = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&mpath).map_err(|e| FlashError::io(&mpath, "not a bundle", e))?;
    let manifest: BundleManifest = serde_json::from_slice(&text).map_err(|e| {
        FlashError::Invalid(format!("{}: not a bundle manifest: {e}", mpath.display()))
    })?;
    if manifest.format != BUNDLE_FORMAT {
        return Err(FlashError::Invalid(format!(
            "{}: bundle format {} (this cap reads {BUNDLE_FORMAT})",
            mpath.display(),
            manifest.format
        )));
    }
    for f in &manifest.files {
        // Names come from a file a user may have edited: only plain names.
        if f.name.is_empty()
            || f.name.contains('/')
            || f.name.starts_with('.')
            || !f.name.bytes().all(|b| b.is_ascii_graphic())
            || f.name.contains('\'')
        {
            return Err(FlashError::Invalid(format!(
                "{}: bad file name {:?} in the manifest",
                mpath.display(),
                f.name
            )));
        }
        let p = dir.join(&f.name);
        let len = std::fs::metadata(&p)
            .map_err(|e| FlashError::io(&p, "missing from the bundle", e))?
            .len();
        if len != f.bytes {
            return Err(FlashError::Invalid(format!(
                "{}: {len} bytes, the manifest says {}; the bundle is damaged, make it again",
                p.display(),
                f.bytes
            )));
        }
        if sha256_file(&p)? != f.sha256 {
            return Err(FlashError::Invalid(format!(
                "{}: sha256 differs from the manifest's; the bundle is damaged, make it again",
                p.display()
            )));
        }
    }
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut h, &text);
    Ok(LoadedBundle {
        dir: dir.to_path_buf(),
        manifest,
        sha256: crate::digest::to_hex(&sha2::Digest::finalize(h)),
        manifest_bytes: text.len() as u64,
    })
}

/// The temporary folder a bundle for `out` is assembled in (beside it, so the final
/// rename stays on one file system; the PID lets a later run remove it when a SIGKILL
/// left it behind, see [`crate::tempfiles::remove_stale`]).
fn temporary_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| FlashError::Invalid(format!("{}: not a folder name", out.display())))?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".tmp-{}", std::process::id()));
    Ok(out.with_file_name(tmp))
}

/// Writes a bundle for `opts` into `opts.out`, atomically: it is assembled in a
/// temporary folder beside it and renamed into place, so `out` is either the old
/// bundle or the complete new one. An existing `out` must be a bundle (or empty).
/// Refuses a `.cap` file that does not fit the profile's usable memory.
pub fn write(opts: &BundleOptions) -> Result<(LoadedBundle, MemoryFit)> {
    let out = &opts.out;
    if let Ok(m) = std::fs::symlink_metadata(out) {
        let is_bundle_or_empty = m.is_dir()
            && (out.join(MANIFEST_FILE).is_file()
                || std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none()));
        if !is_bundle_or_empty {
            return Err(FlashError::Invalid(format!(
                "{}: exists and is not a bundle folder (or an empty one); choose another -o",
                out.display()
            )));
        }
    }
    let p = &opts.profile;
    let (fit, figure, model_cap_version) = examine(&opts.cap, p, opts.ctx)?;
    if fit.spare_bytes() < 0 {
        return Err(FlashError::DoesNotFit(format!(
            "{} does not fit {}: it {}, {} usable; {} bytes short",
            opts.cap.display(),
            p.name,
            fit.needs(),
            fit.usable_bytes,
            -fit.spare_bytes()
        )));
    }
    let want_arch = triple_arch(&p.rust_target);
    let device = match &opts.device_bin {
        Some(d) => d.clone(),
        None => build_device(&p.rust_target, opts.builder)?,
    };
    let arch = elf_arch(&device)?;
    if arch != want_arch {
        return Err(FlashError::Invalid(format!(
            "{} is built for {arch}, but target {} needs {} ({want_arch})",
            device.display(),
            p.name,
            p.rust_target
        )));
    }

    crate::tempfiles::remove_stale(out);
    let tmp = temporary_dir(out)?;
    let _reg = crate::tempfiles::register(&tmp);
    let result = assemble(&tmp, &device, opts, &fit, figure, model_cap_version)
        .and_then(|()| replace_dir(&tmp, out));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    Ok((load(out)?, fit))
}

/// Fills `tmp` with the bundle's files and its manifest.
fn assemble(
    tmp: &Path,
    device: &Path,
    opts: &BundleOptions,
    fit: &MemoryFit,
    self_test: SelfTestFigure,
    model_cap_version: String,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp).map_err(|e| FlashError::io(tmp, "cannot create", e))?;
    // `from: None` records a file already written in `tmp`.
    let copy = |from: Option<&Path>, name: &str, mode: u32| -> Result<BundleFile> {
        let to = tmp.join(name);
        if let Some(from) = from {
            std::fs::copy(from, &to).map_err(|e| FlashError::io(from, "cannot copy", e))?;
        }
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
            .map_err(|e| FlashError::io(&to, "cannot set permissions", e))?;
        let bytes = std::fs::metadata(&to)
            .map_err(|e| FlashError::io(&to, "cannot read", e))?
            .len();
        Ok(BundleFile {
            name: name.into(),
            sha256: sha256_file(&to)?,
            bytes,
        })
    };
    let run = tmp.join(RUN_FILE);
    std::fs::write(&run, RUN_SH).map_err(|e| FlashError::io(&run, "cannot write", e))?;
    // Copy order on the board: the model first (the largest, where resuming matters),
    // the launcher and manifest last.
    let files = vec![
        copy(Some(&opts.cap), MODEL_FILE, 0o644)?,
        copy(Some(device), DEVICE_FILE, 0o755)?,
        copy(None, RUN_FILE, 0o755)?,
    ];
    let manifest = BundleManifest {
        format: BUNDLE_FORMAT,
        profile: opts.profile.name.clone(),
        rust_target: opts.profile.rust_target.clone(),
        cap_version: env!("CARGO_PKG_VERSION").into(),
        model_cap_version,
        model_source: opts
            .cap
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        self_test,
        memory: fit.clone(),
        files,
    };
    let mpath = tmp.join(MANIFEST_FILE);
    let mut text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| FlashError::Invalid(format!("encoding the manifest: {e}")))?;
    text.push('\n');
    std::fs::write(&mpath, text).map_err(|e| FlashError::io(&mpath, "cannot write", e))
}

/// Puts the folder `tmp` where `out` is: a plain rename when `out` does not exist;
/// otherwise the old bundle is renamed aside first and removed after, so `out` is
/// missing only between two renames.
fn replace_dir(tmp: &Path, out: &Path) -> Result<()> {
    if std::fs::symlink_metadata(out).is_ok() {
        let mut old = out.as_os_str().to_os_string();
        old.push(format!(".old-{}", std::process::id()));
        let old = PathBuf::from(old);
        let _reg = crate::tempfiles::register(&old);
        std::fs::rename(out, &old).map_err(|e| FlashError::io(out, "cannot replace", e))?;
        std::fs::rename(tmp, out).map_err(|e| FlashError::io(out, "cannot write", e))?;
        let _ = std::fs::remove_dir_all(&old);
        return Ok(());
    }
    std::fs::rename(tmp, out).map_err(|e| FlashError::io(out, "cannot write", e))
}
