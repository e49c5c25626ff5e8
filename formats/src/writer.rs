//! The streaming, deterministic, atomic writer (feature `std`).
//!
//! [`StreamWriter`] writes to any `Write + Seek`: a zeroed header placeholder, then
//! each tensor section as it is added (only the current tensor is in memory), then
//! the manifest, then it seeks back and writes the real header. The output depends
//! only on the inputs (no clocks). [`CapWriter`] wraps it for a path: it writes to
//! `NAME.tmp-<pid>` in the same directory, fsyncs, and renames; a writer dropped or
//! failed before [`CapWriter::finish`] removes its temporary file, so no `.cap` file
//! is ever left half-written.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::string::String;
use std::vec::Vec;

use crate::encoding::TensorLayout;
use crate::header::{FORMAT_MAJOR, FORMAT_MINOR, HEADER_LEN, Header, MAGIC, valid_alignment};
use crate::manifest::{Manifest, TensorEntry, encode_manifest};
use crate::output::{OutputError, output_target, temporary_path};
use crate::{FormatError, MAX_MANIFEST_LEN, MAX_NAME_LEN, MAX_TENSORS, MIN_ALIGNMENT, TensorDesc};

/// Errors while writing.
#[derive(Debug)]
pub enum WriteError {
    /// An I/O error.
    Io(io::Error),
    /// The input would not make a valid file (bad shape or encoding, limits).
    Format(FormatError),
    /// A tensor name is already used.
    DuplicateName(String),
    /// The parts passed for a tensor do not match its layout.
    PartMismatch {
        /// Tensor name.
        name: String,
        /// Which part (index in layout order), or the part count if the count is wrong.
        part: usize,
        /// Length the layout needs (or part count).
        expected: u64,
        /// Length given (or part count).
        found: u64,
    },
    /// The manifest passed to `finish` already has tensor entries.
    ManifestHasTensors,
    /// The output path cannot be written (a directory, device, FIFO, link loop).
    Output(OutputError),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Io(e) => write!(f, "I/O error: {e}"),
            WriteError::Output(e) => write!(f, "{e}"),
            WriteError::Format(e) => write!(f, "{e}"),
            WriteError::DuplicateName(n) => write!(f, "duplicate tensor name {n:?}"),
            WriteError::PartMismatch {
                name,
                part,
                expected,
                found,
            } => write!(
                f,
                "tensor {name:?}: part {part} is {found} bytes (or parts), layout needs {expected}"
            ),
            WriteError::ManifestHasTensors => {
                write!(
                    f,
                    "the manifest's tensor directory must be empty; the writer fills it"
                )
            }
        }
    }
}

// No `source()`: each variant's message already includes its cause, and reporting both
// printed the OS error twice ("…: Permission denied: Permission denied") in callers
// that print the whole chain.
impl std::error::Error for WriteError {}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        WriteError::Io(e)
    }
}

impl From<FormatError> for WriteError {
    fn from(e: FormatError) -> Self {
        WriteError::Format(e)
    }
}

/// Writer options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterOptions {
    /// Alignment of the data region and each tensor section: a power of two in
    /// `MIN_ALIGNMENT..=MAX_ALIGNMENT`. 64 by default; 4096 for page-mapped loading.
    pub alignment: u32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            alignment: MIN_ALIGNMENT,
        }
    }
}

const ZEROS: [u8; 4096] = [0; 4096];

/// Streaming writer over any `Write + Seek` (see the module docs).
#[derive(Debug)]
pub struct StreamWriter<W: Write + Seek> {
    out: W,
    alignment: u32,
    data_offset: u64,
    pos: u64,
    entries: Vec<TensorEntry>,
    names: BTreeSet<String>,
    /// Set when a write failed part-way: the output is inconsistent and every later
    /// call fails.
    poisoned: bool,
}

fn write_zeros<W: Write>(out: &mut W, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

impl<W: Write + Seek> StreamWriter<W> {
    /// Starts a file: writes a zeroed header and padding up to the data region.
    /// `out` should be positioned at its start.
    pub fn new(mut out: W, opts: WriterOptions) -> Result<Self, WriteError> {
        if !valid_alignment(opts.alignment) {
            return Err(FormatError::BadAlignment {
                alignment: opts.alignment,
            }
            .into());
        }
        let data_offset = (HEADER_LEN as u64).next_multiple_of(u64::from(opts.alignment));
        write_zeros(&mut out, data_offset)?;
        Ok(StreamWriter {
            out,
            alignment: opts.alignment,
            data_offset,
            pos: data_offset,
            entries: Vec::new(),
            names: BTreeSet::new(),
            poisoned: false,
        })
    }

    /// Writes one tensor section. `parts` are the raw little-endian bytes of each
    /// part in layout order (see [`TensorLayout::parts`]); each must have exactly the
    /// layout's length. The writer adds the zero padding and computes the CRC.
    pub fn add_tensor(
        &mut self,
        name: &str,
        desc: &TensorDesc,
        parts: &[&[u8]],
    ) -> Result<(), WriteError> {
        if self.poisoned {
            return Err(poisoned());
        }
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(FormatError::BadName {
                index: self.entries.len(),
            }
            .into());
        }
        if self.entries.len() >= MAX_TENSORS as usize {
            return Err(FormatError::TooManyTensors {
                count: self.entries.len() as u64 + 1,
            }
            .into());
        }
        if self.names.contains(name) {
            return Err(WriteError::DuplicateName(name.into()));
        }
        let layout = TensorLayout::compute(desc, self.alignment)?;
        let lp = layout.parts();
        if lp.len() != parts.len() {
            return Err(WriteError::PartMismatch {
                name: name.into(),
                part: parts.len(),
                expected: lp.len() as u64,
                found: parts.len() as u64,
            });
        }
        for (i, (p, b)) in lp.iter().zip(parts).enumerate() {
            if p.len != b.len() as u64 {
                return Err(WriteError::PartMismatch {
                    name: name.into(),
                    part: i,
                    expected: p.len,
                    found: b.len() as u64,
                });
            }
        }
        // Validation is done; from here an I/O error leaves a partial section.
        self.poisoned = true;
        let mut crc = crc32fast::Hasher::new();
        let mut at = 0u64;
        for (p, b) in lp.iter().zip(parts) {
            let pad = p.offset - at;
            write_zeros(&mut self.out, pad)?;
            hash_zeros(&mut crc, pad);
            self.out.write_all(b)?;
            crc.update(b);
            at = p.offset + p.len;
        }
        let pad = layout.total - at;
        write_zeros(&mut self.out, pad)?;
        hash_zeros(&mut crc, pad);
        self.entries.push(TensorEntry {
            name: name.into(),
            rows: desc.rows,
            cols: desc.cols,
            encoding: desc.encoding,
            offset: self.pos - self.data_offset,
            len: layout.total,
            crc32: crc.finalize(),
            extensions: Vec::new(),
        });
        self.names.insert(name.into());
        self.pos += layout.total;
        self.poisoned = false;
        Ok(())
    }

    /// Writes the manifest (whose `tensors` must be empty: the writer fills the
    /// directory) and the real header, and returns the output.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<W, WriteError> {
        if self.poisoned {
            return Err(poisoned());
        }
        if !manifest.tensors.is_empty() {
            return Err(WriteError::ManifestHasTensors);
        }
        let count = self.entries.len() as u32;
        manifest.tensors = std::mem::take(&mut self.entries);
        let m = encode_manifest(&manifest)?;
        if m.len() as u64 > MAX_MANIFEST_LEN {
            return Err(FormatError::ManifestTooLarge {
                len: m.len() as u64,
            }
            .into());
        }
        self.out.write_all(&m)?;
        // The oldest minor version that holds every tensor: files without quantized
        // values stay 1.0 files, byte for byte, readable by 1.0 readers.
        let minor = manifest
            .tensors
            .iter()
            .map(|t| t.encoding.min_minor())
            .max()
            .unwrap_or(0);
        debug_assert!(minor <= FORMAT_MINOR);
        let h = Header {
            magic: MAGIC,
            major: FORMAT_MAJOR,
            minor,
            flags: 0,
            alignment: self.alignment,
            tensor_count: count,
            data_offset: self.data_offset,
            data_len: self.pos - self.data_offset,
            manifest_offset: self.pos,
            manifest_len: m.len() as u64,
            manifest_crc32: crc32fast::hash(&m),
            header_crc32: 0,
        };
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&h.encode())?;
        self.out.seek(SeekFrom::End(0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn poisoned() -> WriteError {
    io::Error::other("an earlier write failed; the output is incomplete").into()
}

fn hash_zeros(crc: &mut crc32fast::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        crc.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Atomic file writer: a [`StreamWriter`] on `NAME.tmp-<pid>`, renamed to `NAME` by
/// [`CapWriter::finish`]. Dropping it unfinished removes the temporary file.
///
/// Only regular files are written: a symbolic link is written through (the temporary
/// file goes beside the link's final target and is renamed onto it; the link stays),
/// and a directory, device, FIFO or socket is refused (see [`output_target`]).
#[derive(Debug)]
pub struct CapWriter {
    inner: Option<StreamWriter<BufWriter<File>>>,
    tmp: PathBuf,
    /// The path as the caller named it (returned by `finish`).
    path: PathBuf,
    /// Where the bytes go: `path`, or the final target of a symbolic link.
    target: PathBuf,
}

impl CapWriter {
    /// Creates the temporary sibling of `path`'s target (see [`output_target`]) and
    /// starts writing. [`CapWriter::finish`] returns `path` as given.
    pub fn create(path: impl AsRef<Path>, opts: WriterOptions) -> Result<Self, WriteError> {
        let path = path.as_ref().to_path_buf();
        let target = output_target(&path).map_err(WriteError::Output)?;
        let tmp = temporary_path(&target)?;
        let file = File::create(&tmp)?;
        let mut w = CapWriter {
            inner: None,
            tmp,
            path,
            target,
        };
        // On error `w` drops here and removes the temporary file.
        w.inner = Some(StreamWriter::new(BufWriter::new(file), opts)?);
        Ok(w)
    }

    /// The temporary path being written.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// See [`StreamWriter::add_tensor`].
    pub fn add_tensor(
        &mut self,
        name: &str,
        desc: &TensorDesc,
        parts: &[&[u8]],
    ) -> Result<(), WriteError> {
        match self.inner.as_mut() {
            Some(w) => w.add_tensor(name, desc, parts),
            None => Err(io::Error::other("writer already finished").into()),
        }
    }

    /// Writes the manifest and header, fsyncs, renames onto the final path and
    /// fsyncs the directory. On error the temporary file is removed.
    pub fn finish(mut self, manifest: Manifest) -> Result<PathBuf, WriteError> {
        let w = self
            .inner
            .take()
            .ok_or_else(|| io::Error::other("writer already finished"))?;
        let buf = w.finish(manifest)?;
        let file = buf.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.tmp, &self.target)?;
        if let Some(dir) = self.target.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            // Persist the rename; some platforms cannot open directories, which is fine.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(self.path.clone())
    }
}

impl Drop for CapWriter {
    fn drop(&mut self) {
        // Unfinished (dropped, or an error inside `finish`): the temporary file must
        // not survive. After a successful rename it no longer exists.
        self.inner = None;
        let _ = std::fs::remove_file(&self.tmp);
    }
}
