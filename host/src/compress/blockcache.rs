//! The per-block results of a streamed `compress` (`--stream`): each block's seven
//! linears, encoded as the file stores them, in a file of their own
//! (`block-00007.bin`) under a folder for the run. A run computes only the blocks the
//! folder lacks, so an interrupted run resumes, shards (`--shard I/N`) on several
//! machines fill one folder, and a last run assembles the `.cap` without recomputing.
//!
//! The folder belongs to one run's settings: its `KEY` file holds a digest of the
//! source, the calibration tokens and every option that changes a block's result, and
//! every block file repeats it, so a block of another model or other settings is
//! refused, never mixed in. A block file is written under a temporary name and renamed,
//! and its data carry a SHA-256 that is checked when read: a half-written or damaged
//! file is reported, not used.
//!
//! Layout of a block file: `CAPBLK01`, the metadata length (u64 LE), the metadata
//! (postcard), then the linears' parts back to back.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use cap_format::{Encoding, TensorDesc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{CompressError, Result};
use super::run::LayerRow;
use super::write::EncodedLinear;

const MAGIC: &[u8; 8] = b"CAPBLK01";

/// One linear of a cached block, without its bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LinearMeta {
    row: LayerRow,
    rows: u32,
    cols: u32,
    encoding: Encoding,
    part_lens: Vec<u64>,
}

/// What a block file says about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BlockMeta {
    key: String,
    block: u32,
    linears: Vec<LinearMeta>,
    data_sha256: [u8; 32],
}

/// The folder of one run's blocks.
pub struct BlockCache {
    dir: PathBuf,
    key: String,
}

fn io_err(path: &Path, what: &str) -> impl Fn(std::io::Error) -> CompressError {
    let msg = format!("{}: {what}", path.display());
    move |e| CompressError::Invalid(format!("{msg}: {e}"))
}

impl BlockCache {
    /// Opens (creating it if needed) the folder `dir` for the run with digest `key`;
    /// a folder that holds another run's blocks is refused.
    pub fn open(dir: &Path, key: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "cannot create the block cache"))?;
        let key_path = dir.join("KEY");
        match std::fs::read_to_string(&key_path) {
            Ok(k) if k.trim() == key => {}
            Ok(k) => {
                return Err(CompressError::Invalid(format!(
                    "{}: the block cache holds blocks of another model or other settings (key {}, this run's {}): give another --block-cache, or delete it",
                    dir.display(),
                    short(k.trim()),
                    short(key)
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                atomic_write(&key_path, format!("{key}\n").as_bytes())?;
            }
            Err(e) => return Err(io_err(&key_path, "cannot read")(e)),
        }
        Ok(BlockCache {
            dir: dir.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, block: usize) -> PathBuf {
        self.dir.join(format!("block-{block:05}.bin"))
    }

    /// Deletes the block files and the folder (after the file they made is written);
    /// a failure leaves them, and says so.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(
                "{}: could not remove the block cache: {e}",
                self.dir.display()
            );
        }
    }

    /// Whether block `block` is in the folder (its file exists; it is checked when read).
    pub fn has(&self, block: usize) -> bool {
        self.path(block).is_file()
    }

    /// Stores block `block`'s encoded linears (block order).
    pub fn put(&self, block: usize, linears: &[EncodedLinear]) -> Result<()> {
        let mut data_len = 0u64;
        let mut h = Sha256::new();
        let metas: Vec<LinearMeta> = linears
            .iter()
            .map(|e| {
                for p in &e.parts {
                    h.update(p);
                    data_len += p.len() as u64;
                }
                LinearMeta {
                    row: e.row.clone(),
                    rows: e.desc.rows,
                    cols: e.desc.cols,
                    encoding: e.desc.encoding,
                    part_lens: e.parts.iter().map(|p| p.len() as u64).collect(),
                }
            })
            .collect();
        let meta = BlockMeta {
            key: self.key.clone(),
            block: block as u32,
            linears: metas,
            data_sha256: h.finalize().into(),
        };
        let m = postcard::to_allocvec(&meta)
            .map_err(|e| CompressError::Internal(format!("block metadata: {e}")))?;
        let path = self.path(block);
        let tmp = tmp_path(&path);
        let _reg = crate::tempfiles::register(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            f.write_all(MAGIC)?;
            f.write_all(&(m.len() as u64).to_le_bytes())?;
            f.write_all(&m)?;
            for e in linears {
                for p in &e.parts {
                    f.write_all(p)?;
                }
            }
            f.into_inner().map_err(|e| e.into_error())?.sync_all()
        };
        write().map_err(io_err(&tmp, "cannot write"))?;
        debug_assert!(data_len > 0 || linears.is_empty());
        std::fs::rename(&tmp, &path).map_err(io_err(&path, "cannot rename into place"))
    }

    fn read_meta(&self, block: usize, f: &mut impl Read) -> Result<BlockMeta> {
        let path = self.path(block);
        let bad = |what: &str| {
            CompressError::Invalid(format!(
                "{}: damaged block file ({what}): delete it to compute the block again",
                path.display()
            ))
        };
        let mut head = [0u8; 16];
        f.read_exact(&mut head).map_err(|_| bad("too short"))?;
        if &head[..8] != MAGIC {
            return Err(bad("not a cap block file"));
        }
        let len = u64::from_le_bytes(head[8..].try_into().unwrap_or_default());
        if len > 64 << 20 {
            return Err(bad("metadata too large"));
        }
        let mut m = vec![0u8; len as usize];
        f.read_exact(&mut m)
            .map_err(|_| bad("truncated metadata"))?;
        let meta: BlockMeta = postcard::from_bytes(&m).map_err(|_| bad("unreadable metadata"))?;
        if meta.key != self.key {
            return Err(CompressError::Invalid(format!(
                "{}: a block of another model or other settings (key {}, this run's {}): delete it",
                path.display(),
                short(&meta.key),
                short(&self.key)
            )));
        }
        if meta.block as usize != block {
            return Err(bad("it holds another block"));
        }
        Ok(meta)
    }

    /// The report rows of block `block`'s linears, without reading their data.
    pub fn rows(&self, block: usize) -> Result<Vec<LayerRow>> {
        let path = self.path(block);
        let mut f = std::fs::File::open(&path).map_err(io_err(&path, "cannot open"))?;
        Ok(self
            .read_meta(block, &mut f)?
            .linears
            .into_iter()
            .map(|l| l.row)
            .collect())
    }

    /// Block `block`'s encoded linears (block order), their data checked.
    pub fn get(&self, block: usize) -> Result<Vec<EncodedLinear>> {
        let path = self.path(block);
        let mut f = std::io::BufReader::new(
            std::fs::File::open(&path).map_err(io_err(&path, "cannot open"))?,
        );
        let meta = self.read_meta(block, &mut f)?;
        let mut h = Sha256::new();
        let mut out = Vec::with_capacity(meta.linears.len());
        for l in meta.linears {
            let mut parts = Vec::with_capacity(l.part_lens.len());
            for &n in &l.part_lens {
                let mut p = vec![0u8; n as usize];
                f.read_exact(&mut p).map_err(|_| {
                    CompressError::Invalid(format!(
                        "{}: damaged block file (truncated data): delete it to compute the block again",
                        path.display()
                    ))
                })?;
                h.update(&p);
                parts.push(p);
            }
            out.push(EncodedLinear {
                row: l.row,
                desc: TensorDesc {
                    rows: l.rows,
                    cols: l.cols,
                    encoding: l.encoding,
                },
                parts,
            });
        }
        let sum: [u8; 32] = h.finalize().into();
        let mut rest = [0u8; 1];
        if sum != meta.data_sha256 || f.read(&mut rest).map_err(io_err(&path, "cannot read"))? != 0
        {
            return Err(CompressError::Invalid(format!(
                "{}: damaged block file (checksum mismatch): delete it to compute the block again",
                path.display()
            )));
        }
        Ok(out)
    }
}

/// The first 12 hex digits of a key, for messages.
fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(p)
}

fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp, "cannot write"))?;
    std::fs::rename(&tmp, path).map_err(io_err(path, "cannot rename into place"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cap_format::DType;

    fn linear(name: &str, fill: u8) -> EncodedLinear {
        EncodedLinear {
            row: LayerRow {
                name: name.into(),
                shape: [2, 4],
                rank: [0, 0],
                nnz: [8, 8],
                encoding: "dense".into(),
                values: "f32".into(),
                bytes: 32,
                cost: 32,
            },
            desc: TensorDesc {
                rows: 2,
                cols: 4,
                encoding: Encoding::Dense { dtype: DType::F32 },
            },
            parts: vec![vec![fill; 32]],
        }
    }

    #[test]
    fn blocks_round_trip_and_damage_or_another_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let c = BlockCache::open(d.path(), "aaaa").unwrap();
        assert!(!c.has(3));
        c.put(3, &[linear("x", 1), linear("y", 2)]).unwrap();
        assert!(c.has(3));
        let got = c.get(3).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].parts, vec![vec![2u8; 32]]);
        assert_eq!(got[0].row.name, "x");
        assert_eq!(c.rows(3).unwrap()[1].name, "y");
        // Another run's settings: the folder is refused as a whole.
        let e = BlockCache::open(d.path(), "bbbb")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("another model or other settings"), "{e}");
        // One byte of data changed: the checksum catches it.
        let p = d.path().join("block-00003.bin");
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let e = c.get(3).err().unwrap().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        // Truncated: reported as damaged.
        std::fs::write(&p, &bytes[..n - 5]).unwrap();
        let e = c.get(3).err().unwrap().to_string();
        assert!(e.contains("damaged block file"), "{e}");
        // A block file of another key copied in.
        let d2 = tempfile::tempdir().unwrap();
        let c2 = BlockCache::open(d2.path(), "cccc").unwrap();
        c2.put(3, &[linear("x", 1)]).unwrap();
        std::fs::copy(d2.path().join("block-00003.bin"), &p).unwrap();
        let e = c.get(3).err().unwrap().to_string();
        assert!(e.contains("another model or other settings"), "{e}");
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    }
}
