//! SHA-256 digests as provenance and cache keys use them: of a file, of a model source,
//! and their hex form. A leaf module, so that `pack`, `rpca` and `compress` share it
//! without importing each other.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why a digest could not be computed or parsed. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// A file could not be opened.
    #[error("{}: cannot open", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be read to its end.
    #[error("{}: read error", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A directory could not be listed.
    #[error("{}: cannot list", .path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A Hugging Face directory holds no weights.
    #[error("{}: no *.safetensors files", .path.display())]
    NoShards {
        /// The directory.
        path: PathBuf,
    },
    /// A digest given as text is not 64 hex digits.
    #[error("source sha256 must be 64 hex digits, got {0:?}")]
    BadHex(String),
}

/// SHA-256 of a file as 64 lower-case hex digits, read in a streaming way.
pub fn sha256_file(path: &Path) -> Result<String, DigestError> {
    let mut h = Sha256::new();
    hash_file_into(&mut h, path)?;
    Ok(to_hex(&h.finalize()))
}

fn hash_file_into(h: &mut Sha256, path: &Path) -> Result<(), DigestError> {
    let mut f = File::open(path).map_err(|source| DigestError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| DigestError::Read {
            path: path.to_owned(),
            source,
        })?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// The provenance digest of a model: [`sha256_file`] of a GGUF file; for a Hugging Face
/// directory, the SHA-256 of its `*.safetensors` files concatenated in name order (the
/// weights, which are what a `.cap` file is derived from).
pub fn source_sha256(path: &Path) -> Result<String, DigestError> {
    if !path.is_dir() {
        return sha256_file(path);
    }
    let mut shards: Vec<_> = std::fs::read_dir(path)
        .map_err(|source| DigestError::List {
            path: path.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(DigestError::NoShards {
            path: path.to_owned(),
        });
    }
    let mut h = Sha256::new();
    for p in &shards {
        hash_file_into(&mut h, p)?;
    }
    Ok(to_hex(&h.finalize()))
}

/// Lower-case hex of bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits (surrounding whitespace ignored) into a SHA-256 digest.
pub fn parse_sha256(hex: &str) -> Result<[u8; 32], DigestError> {
    let hex = hex.trim();
    let bad = || DigestError::BadHex(hex.to_string());
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_bad_input() {
        let d: [u8; 32] = core::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(parse_sha256(&format!(" {} ", to_hex(&d))).unwrap(), d);
        for bad in ["", "zz", &"g".repeat(64), &"é".repeat(32)] {
            let e = parse_sha256(bad).unwrap_err().to_string();
            assert!(e.starts_with("source sha256 must be 64 hex digits"), "{e}");
        }
    }
}
