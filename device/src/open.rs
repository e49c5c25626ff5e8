//! Opening a `.cap` file from disk (std): map it, check every checksum and sparse
//! structure, build its model and tokenizer, each error naming the file. The `cap-device`
//! binary and the host's `eval`/`compress` open files through here, so a file the
//! host accepts is one the board accepts, with the same messages.

use std::path::{Path, PathBuf};

use cap_format::manifest::Manifest;
use cap_format::{CapFile, FORMAT_MAJOR, FORMAT_MINOR, FormatError};

use crate::load::{self, CapModel, LoadError};
use crate::tokenizer::Tokenizer;

/// Why a `.cap` file could not be opened; every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file could not be opened or mapped.
    #[error("{}: cannot open", path.display())]
    Map {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The header, manifest or directory is unusable (including a newer major version).
    #[error("{}: not a usable .cap file (this build reads format {FORMAT_MAJOR}.{FORMAT_MINOR})", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// A section checksum or a sparse structure is wrong (the source says which: a
    /// structural fault is not a checksum failure, so the message names neither).
    #[error("{}: verification failed", path.display())]
    Verify {
        /// The file.
        path: PathBuf,
        /// The first failure.
        #[source]
        source: FormatError,
    },
    /// The file is sound but does not form a runnable model or tokenizer.
    #[error("{}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: LoadError,
    },
}

/// Maps the file at `path` read-only ([`load::map_file`]). Only a regular file: a
/// FIFO would block the open until a writer came, and a device has no size to map.
///
/// A mapped file must not shrink while it runs: reading a page past its new end raises
/// SIGBUS, which ends the process (the OS gives no error to return). Replace a `.cap`
/// file by renaming a new one over it (as `pack` and `compress` do), never by
/// truncating or rewriting it in place.
pub fn map(path: &Path) -> Result<memmap2::Mmap, OpenError> {
    let err = |source| OpenError::Map {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    load::map_file(path).map_err(err)
}

/// Parses `bytes` (the file at `path`) and verifies every checksum and sparse
/// structure: what a file must pass before its numbers are trusted.
pub fn parse_verified<'a>(path: &Path, bytes: &'a [u8]) -> Result<CapFile<'a>, OpenError> {
    let file = CapFile::parse(bytes).map_err(|source| OpenError::Parse {
        path: path.into(),
        source,
    })?;
    file.verify_all().map_err(|source| OpenError::Verify {
        path: path.into(),
        source,
    })?;
    Ok(file)
}

/// The model of a parsed file, borrowing its bytes ([`load::model`]).
pub fn model<'a>(path: &Path, file: &CapFile<'a>) -> Result<CapModel<'a>, OpenError> {
    load::model(file).map_err(|source| OpenError::Load {
        path: path.into(),
        source,
    })
}

/// The tokenizer a file's manifest carries ([`load::tokenizer`]).
pub fn tokenizer(path: &Path, manifest: &Manifest) -> Result<Tokenizer, OpenError> {
    load::tokenizer(manifest).map_err(|source| OpenError::Load {
        path: path.into(),
        source,
    })
}
