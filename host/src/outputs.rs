//! Output paths, checked before any work is done.
//!
//! `pack` and `compress` write through [`cap_format::CapWriter`], which refuses
//! anything but a regular file (or a symbolic link, written through to its target).
//! Checking the same rule up front turns "minutes of compression, then `/dev/full` is
//! not a regular file" into an immediate one-line error, and tidies the debris a killed
//! earlier run left beside the output.

use std::path::{Path, PathBuf};

use cap_format::{OutputError, output_target};

/// Checks that `path` can be an output (see [`cap_format::output_target`]) and removes
/// the stale temporary files of killed earlier runs beside it and beside its target
/// ([`crate::tempfiles::remove_stale`]). Returns where the bytes will go.
pub fn prepare(path: &Path) -> Result<PathBuf, OutputError> {
    let target = output_target(path)?;
    crate::tempfiles::remove_stale(path);
    if target != path {
        crate::tempfiles::remove_stale(&target);
    }
    Ok(target)
}
