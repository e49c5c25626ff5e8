//! The decomposition cache: one file per matrix, `DIR/<tensor-name>.rpca`, keyed by
//! checksums of the input weight and of the settings, written atomically.
//!
//! # File layout (all integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"CAPRPCA\0"` |
//! | 8 | 4 | file format version (`u32`, currently 1) |
//! | 12 | 4 | [`super::ALGORITHM_VERSION`] (`u32`) |
//! | 16 | 32 | SHA-256 of the input weight: its `f32` values, row-major, little-endian (before any activation scaling) |
//! | 48 | 32 | SHA-256 of the settings key ([`settings_key`]: shape, iterations, λ scale, tolerance, SVD method, mode with the scale vector's SHA-256) |
//! | 80 | 32 | SHA-256 of the payload |
//! | 112 | 8 | payload length in bytes (`u64`) |
//! | 120 | … | payload: [`Decomposition`] in postcard (varint integers, `f32` as 4 bytes) |
//!
//! A file is used only when the magic, both versions, both key checksums, the length and
//! the payload checksum all match; anything else (missing, truncated, other settings,
//! changed weight, other code version) counts as "not cached" and is recomputed. Files
//! are written to a temporary name in the same directory, synced, then renamed over
//! the final name, so an interrupted run leaves either the old file or the new one,
//! never a partial one. A file holds no timings, so equal inputs give identical bytes.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{ALGORITHM_VERSION, Decomposition, Mode, RpcaError, RpcaSettings, sha256_f32};

type Result<T, E = RpcaError> = std::result::Result<T, E>;

/// Magic bytes at the start of every cache file.
pub const MAGIC: [u8; 8] = *b"CAPRPCA\0";
/// Version of the layout above.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 120;
/// File name extension of cache files.
pub const EXTENSION: &str = "rpca";

/// What a cache file must match to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheKey {
    /// SHA-256 of the input weight's `f32` bytes.
    pub weight: [u8; 32],
    /// SHA-256 of [`settings_key`].
    pub settings: [u8; 32],
}

/// The canonical text of everything that determines a decomposition besides the
/// weight's values (floating-point settings by their exact bits).
pub fn settings_key(rows: usize, cols: usize, s: &RpcaSettings, mode: &Mode) -> String {
    let mode = match mode {
        Mode::Plain => "plain".to_string(),
        Mode::ActivationAware { scale_sha256 } => format!("activation-aware:{scale_sha256}"),
    };
    format!(
        "rows={rows};cols={cols};iters={};lambda_scale={:016x};tol={:016x};svd={:?};mode={mode}",
        s.max_iters,
        s.lambda_scale.to_bits(),
        s.tol.to_bits(),
        s.svd
    )
}

impl CacheKey {
    /// The key of a row-major `rows × cols` weight under `settings`, with an optional
    /// activation scale.
    pub fn new(
        weight: &[f32],
        rows: usize,
        cols: usize,
        settings: &RpcaSettings,
        scale: Option<&[f32]>,
    ) -> CacheKey {
        let key = settings_key(rows, cols, settings, &Mode::of(scale));
        CacheKey {
            weight: sha256_f32(weight),
            settings: Sha256::digest(key.as_bytes()).into(),
        }
    }
}

/// `DIR/<name>.rpca`; refuses names that would leave `dir` or be hidden.
pub fn cache_path(dir: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
        || name.contains("..")
    {
        return Err(RpcaError::CacheName(name.to_string()));
    }
    Ok(dir.join(format!("{name}.{EXTENSION}")))
}

/// Reads and checks a cache file: the payload bytes if the file exists, is intact and
/// matches `key`, `None` otherwise.
fn read_checked(path: &Path, key: &CacheKey) -> Option<Vec<u8>> {
    let mut f = File::open(path).ok()?;
    let mut h = [0u8; HEADER_LEN];
    f.read_exact(&mut h).ok()?;
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if h[0..8] != MAGIC
        || u32_at(8) != FORMAT_VERSION
        || u32_at(12) != ALGORITHM_VERSION
        || h[16..48] != key.weight
        || h[48..80] != key.settings
    {
        return None;
    }
    let len = u64::from_le_bytes(h[112..120].try_into().ok()?);
    // The file's own length bounds the allocation: a corrupt length cannot make us
    // allocate more than the file holds.
    let file_len = f.metadata().ok()?.len();
    if file_len.checked_sub(HEADER_LEN as u64) != Some(len) {
        return None;
    }
    let mut payload = vec![0u8; usize::try_from(len).ok()?];
    f.read_exact(&mut payload).ok()?;
    if Sha256::digest(&payload).as_slice() != &h[80..112] {
        return None;
    }
    Some(payload)
}

/// Whether `path` holds an intact decomposition for `key` (checks every checksum).
pub fn is_cached(path: &Path, key: &CacheKey) -> bool {
    read_checked(path, key).is_some()
}

/// The decomposition stored at `path` if it is intact and matches `key`.
pub fn read(path: &Path, key: &CacheKey) -> Option<Decomposition> {
    let payload = read_checked(path, key)?;
    let d: Decomposition = postcard::from_bytes(&payload).ok()?;
    // Guard against a payload that decodes but is inconsistent.
    let r = d.sigma.len();
    let ok = d.u.len() == d.rows * r
        && d.v.len() == d.cols * r
        && d.s.row_ptr.len() == d.rows + 1
        && d.s.col.len() == d.s.val.len()
        && d.s.row_ptr.last().copied() == Some(d.s.col.len() as u64);
    ok.then_some(d)
}

/// The error of an I/O step `what` on `path`.
fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> RpcaError + 'a {
    move |source| RpcaError::Io {
        path: path.to_owned(),
        what,
        source: Some(source),
    }
}

/// Writes `dec` to `path` for `key`, atomically (temporary file in the same directory,
/// fsync, rename).
pub fn write(path: &Path, key: &CacheKey, dec: &Decomposition) -> Result<()> {
    let payload = postcard::to_stdvec(dec).map_err(RpcaError::Encode)?;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&ALGORITHM_VERSION.to_le_bytes());
    header.extend_from_slice(&key.weight);
    header.extend_from_slice(&key.settings);
    header.extend_from_slice(&Sha256::digest(&payload));
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    debug_assert_eq!(header.len(), HEADER_LEN);
    let file_name = path.file_name().ok_or_else(|| RpcaError::Io {
        path: path.to_owned(),
        what: "not a file path",
        source: None,
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp.{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _cleanup = crate::tempfiles::register(&tmp);
    let result = (|| -> Result<()> {
        let mut f = File::create(&tmp).map_err(io(&tmp, "cannot create"))?;
        f.write_all(&header)
            .and_then(|_| f.write_all(&payload))
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp, "write error"))?;
        std::fs::rename(&tmp, path).map_err(io(path, "cannot rename into place"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The cached decomposition of tensor `name` under `dir` for this weight, settings and
/// optional activation scale; `None` when there is none or it does not match (then it
/// must be recomputed). This is what `compress` uses to pick up a finished run.
pub fn load_cached(
    dir: &Path,
    name: &str,
    weight: &[f32],
    rows: usize,
    cols: usize,
    settings: &RpcaSettings,
    scale: Option<&[f32]>,
) -> Option<Decomposition> {
    let path = cache_path(dir, name).ok()?;
    read(&path, &CacheKey::new(weight, rows, cols, settings, scale))
}
