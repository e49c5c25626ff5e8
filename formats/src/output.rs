//! Where an output path really writes (feature `std`).
//!
//! The atomic writer replaces its output by renaming a temporary file onto it. A rename
//! replaces whatever has the name: a device node, a FIFO, or a symbolic link, which
//! would silently turn `-o /dev/full` into a regular file and a link into a copy. So
//! every output goes through [`output_target`] first: symbolic links are followed to
//! the file they name (the write goes *through* the link, atomically, onto its target,
//! and the link stays), and anything that is not a regular file (or not there yet) is
//! refused before a byte is written.

use std::io;
use std::path::{Path, PathBuf};

/// How many links [`output_target`] follows before giving up (Linux's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// Why a path cannot be an output.
#[derive(Debug)]
pub enum OutputError {
    /// The path (or the end of its symbolic links) exists and is not a regular file.
    NotRegular {
        /// What it is instead ("a directory", "a character device", ...).
        kind: &'static str,
        /// The path that has that type (the link's target for a symbolic link).
        target: PathBuf,
    },
    /// More than [`MAX_LINKS`] symbolic links in a row (or a loop).
    TooManyLinks {
        /// The output path as given.
        path: PathBuf,
    },
    /// The path could not be examined.
    Io {
        /// The path being examined.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl std::fmt::Display for OutputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutputError::NotRegular { kind, target } => write!(
                f,
                "{}: {kind}, not a regular file (outputs must be regular files)",
                target.display()
            ),
            OutputError::TooManyLinks { path } => write!(
                f,
                "{}: more than {MAX_LINKS} symbolic links in a row (a loop?)",
                path.display()
            ),
            OutputError::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for OutputError {}

/// What a non-regular file is, in words.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// The path an output named `path` is written to: `path` itself when it is a regular
/// file or does not exist yet, the final target when it is a symbolic link (a dangling
/// link's target is created). Directories, devices, FIFOs and sockets are refused.
pub fn output_target(path: &Path) -> Result<PathBuf, OutputError> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(p),
            Err(source) => return Err(OutputError::Io { path: p, source }),
        };
        let ft = meta.file_type();
        if ft.is_file() {
            return Ok(p);
        }
        if !ft.is_symlink() {
            return Err(OutputError::NotRegular {
                kind: kind_of(ft),
                target: p,
            });
        }
        let link = match std::fs::read_link(&p) {
            Ok(l) => l,
            Err(source) => return Err(OutputError::Io { path: p, source }),
        };
        // A relative link is relative to the directory holding the link.
        p = match p.parent() {
            Some(dir) if link.is_relative() => dir.join(link),
            _ => link,
        };
    }
    Err(OutputError::TooManyLinks {
        path: path.to_path_buf(),
    })
}

/// The temporary file the atomic writer fills for the output `target` (a path returned
/// by [`output_target`]): `NAME.tmp-<pid>` beside it, so the final rename stays on one
/// file system. Callers that must remove it on a signal register this name.
pub fn temporary_path(target: &Path) -> io::Result<PathBuf> {
    let file_name = target.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "output path has no file name")
    })?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(std::format!(".tmp-{}", std::process::id()));
    Ok(target.with_file_name(tmp_name))
}
