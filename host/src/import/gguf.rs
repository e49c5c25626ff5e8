//! GGUF (v2/v3) reader: header, metadata, tensor directory and tensor bytes, over a
//! memory map. Layout per ggml's `docs/gguf.md`: magic `GGUF`, u32 version, u64 tensor
//! count, u64 metadata count, metadata key/values, tensor infos, padding to the
//! alignment (`general.alignment`, default 32), then the tensor data.
//!
//! Every count and offset read from the file is checked against the file's size before
//! it is used, so a truncated or corrupt file gives [`GgufError`], never a panic or a
//! huge allocation.

use std::fmt;
use std::path::{Path, PathBuf};

use super::dequant::{self, GgmlType};

/// The largest number of dimensions a GGUF tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting limit for array values: GGUF allows nested arrays, no real file nests deeply.
const MAX_ARRAY_DEPTH: usize = 4;

/// Why a GGUF file could not be read. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("{path} is not a GGUF file (it does not start with the bytes \"GGUF\")")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// A GGUF version other than 2 or 3.
    #[error("{path}: GGUF version {version} is not supported (cap reads versions 2 and 3)")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// The structure is inconsistent or ends early.
    #[error("{path}: truncated or corrupt GGUF file: {what} (at byte {offset})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
        /// Where in the file it was noticed.
        offset: u64,
    },
    /// A tensor cannot be used (missing, unsupported type, bad shape).
    #[error("{path}: tensor '{name}': {what}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// What was wrong.
        what: String,
    },
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// Any unsigned integer type (u8, u16, u32, u64).
    U(u64),
    /// Any signed integer type (i8, i16, i32, i64).
    I(i64),
    /// f32 or f64.
    F(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array (possibly of arrays).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U(v) => Some(v),
            MetaValue::I(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U(v) => i64::try_from(v).ok(),
            MetaValue::I(v) => Some(v),
            _ => None,
        }
    }
    /// The value as a float (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F(v) => Some(v),
            MetaValue::U(v) => Some(v as f64),
            MetaValue::I(v) => Some(v as f64),
            _ => None,
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U(v) => write!(f, "{v}"),
            MetaValue::I(v) => write!(f, "{v}"),
            MetaValue::F(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::Str(s) if s.len() > 60 => {
                write!(f, "{:?}…", &s[..s.floor_char_boundary(60)])
            }
            MetaValue::Str(s) => write!(f, "{s:?}"),
            MetaValue::Array(a) => write!(f, "[{} items]", a.len()),
        }
    }
}

/// Directory entry of one tensor.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` varies fastest (the row length).
    pub dims: Vec<u64>,
    /// The raw GGML type id.
    pub type_id: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// The element type, if cap supports it.
    pub fn ggml_type(&self) -> Option<GgmlType> {
        GgmlType::from_id(self.type_id)
    }
    /// Name of the element type (also for unsupported ones).
    pub fn type_name(&self) -> &'static str {
        match self.ggml_type() {
            Some(t) => t.name(),
            None => dequant::ggml_type_name(self.type_id),
        }
    }
    /// Shape in row-major (PyTorch) order: the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file: parsed metadata and tensor directory over a read-only memory map.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor directory in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of tensor data.
    pub alignment: u64,
    data_start: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian cursor over the mapped bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

type ParseResult<T> = Result<T, (String, u64)>;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> ParseResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err((
                format!("{what} needs {n} bytes but the file ends"),
                self.pos as u64,
            )),
        }
    }
    fn array<const N: usize>(&mut self, what: &str) -> ParseResult<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> ParseResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> ParseResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// A count of items each at least `min_item` bytes long, checked against the bytes
    /// left so a corrupt count cannot trigger a huge allocation.
    fn count(&mut self, min_item: usize, what: &str) -> ParseResult<usize> {
        let at = self.pos as u64;
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_item).map(|b| (n, b)))
            .filter(|&(_, b)| b <= self.remaining());
        match fits {
            Some((n, _)) => Ok(n),
            None => Err((format!("{what} is {n}, more than the file can hold"), at)),
        }
    }
    fn string(&mut self, what: &str) -> ParseResult<String> {
        let at = self.pos as u64;
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| (format!("{what} is not valid UTF-8"), at))
    }
    fn value(&mut self, ty: u32, depth: usize) -> ParseResult<MetaValue> {
        let at = self.pos as u64;
        Ok(match ty {
            0 => MetaValue::U(self.array::<1>("u8 value")?[0] as u64),
            1 => MetaValue::I(self.array::<1>("i8 value")?[0] as i8 as i64),
            2 => MetaValue::U(u16::from_le_bytes(self.array("u16 value")?) as u64),
            3 => MetaValue::I(i16::from_le_bytes(self.array("i16 value")?) as i64),
            4 => MetaValue::U(self.u32("u32 value")? as u64),
            5 => MetaValue::I(i32::from_le_bytes(self.array("i32 value")?) as i64),
            6 => MetaValue::F(f32::from_le_bytes(self.array("f32 value")?) as f64),
            7 => match self.array::<1>("bool value")?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err((format!("bool value {b} is neither 0 nor 1"), at)),
            },
            8 => MetaValue::Str(self.string("string value")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(("arrays nested too deeply".into(), at));
                }
                let elem_ty = self.u32("array element type")?;
                let n = self.count(min_value_size(elem_ty), "array length")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U(self.u64("u64 value")?),
            11 => MetaValue::I(i64::from_le_bytes(self.array("i64 value")?)),
            12 => MetaValue::F(f64::from_le_bytes(self.array("f64 value")?)),
            t => return Err((format!("unknown metadata value type {t}"), at)),
        })
    }
}

/// The fewest bytes a value of a GGUF type can occupy (for allocation checks).
fn min_value_size(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file (the tensor data stays mapped, not read).
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; cap never writes to model files, and a model file
        // changed underneath a running import is outside what cap can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.to_owned(), map)
    }

    fn parse(path: PathBuf, map: memmap2::Mmap) -> Result<GgufFile, GgufError> {
        let corrupt = |(what, offset): (String, u64)| GgufError::Corrupt {
            path: path.clone(),
            what,
            offset,
        };
        let mut c = Cursor { buf: &map, pos: 0 };
        if map.len() < 4 || &map[..4] != b"GGUF" {
            return Err(GgufError::BadMagic { path });
        }
        c.pos = 4;
        let version = c.u32("version").map_err(corrupt)?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path, version });
        }
        let n_tensors = c.count(24, "tensor count").map_err(corrupt)?;
        let n_kv = c.count(12, "metadata count").map_err(corrupt)?;
        let mut metadata = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string("metadata key").map_err(corrupt)?;
            let ty = c.u32("metadata value type").map_err(corrupt)?;
            let value = c.value(ty, 0).map_err(corrupt)?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let at = c.pos as u64;
            let name = c.string("tensor name").map_err(corrupt)?;
            let n_dims = c.u32("tensor dimension count").map_err(corrupt)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(corrupt((
                    format!("tensor '{name}' has {n_dims} dimensions"),
                    at,
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dimension").map_err(corrupt)?);
            }
            let type_id = c.u32("tensor type").map_err(corrupt)?;
            let offset = c.u64("tensor offset").map_err(corrupt)?;
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a % 8 == 0 && a <= 1 << 20 => a,
                _ => {
                    return Err(corrupt((
                        format!("general.alignment {v} is not a multiple of 8"),
                        0,
                    )));
                }
            },
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file = GgufFile {
            path,
            map,
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        };
        file.validate_tensors()?;
        Ok(file)
    }

    /// Checks names, shapes, alignment and bounds of every tensor with a known type.
    fn validate_tensors(&self) -> Result<(), GgufError> {
        let data_len = (self.map.len() as u64).saturating_sub(self.data_start);
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            let bad = |what: String| GgufError::Tensor {
                path: self.path.clone(),
                name: t.name.clone(),
                what,
            };
            if !names.insert(t.name.as_str()) {
                return Err(bad("appears twice in the tensor directory".into()));
            }
            let n = t
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("shape {:?} overflows", t.dims)))?;
            if t.offset % self.alignment != 0 {
                return Err(bad(format!(
                    "offset {} is not aligned to {}",
                    t.offset, self.alignment
                )));
            }
            let Some(ty) = t.ggml_type() else { continue };
            if t.dims[0] % ty.block_elems() as u64 != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {} block",
                    t.dims[0],
                    ty.name()
                )));
            }
            let bytes = usize::try_from(n).ok().and_then(|n| ty.bytes_for(n));
            let end = bytes.and_then(|b| t.offset.checked_add(b as u64));
            if end.is_none_or(|e| e > data_len) {
                return Err(bad(format!(
                    "data (offset {}, {} elements of {}) runs past the end of the file",
                    t.offset,
                    n,
                    ty.name()
                )));
            }
        }
        Ok(())
    }

    /// Hands the mapped file's resident pages back to the kernel.
    pub fn release_pages(&self) {
        super::release(&self.map);
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> u64 {
        self.map.len() as u64
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor's directory entry by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn tensor_error(&self, name: &str, what: String) -> GgufError {
        GgufError::Tensor {
            path: self.path.clone(),
            name: name.into(),
            what,
        }
    }

    /// The raw (possibly quantized) bytes of a tensor, borrowed from the map.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8], GgufError> {
        let ty = t.ggml_type().ok_or_else(|| {
            self.tensor_error(
                &t.name,
                format!(
                    "unsupported tensor type {} (id {})",
                    t.type_name(),
                    t.type_id
                ),
            )
        })?;
        // Bounds were proven in `validate_tensors`.
        let len = ty.bytes_for(t.n_elements() as usize).unwrap_or(0);
        let start = (self.data_start + t.offset) as usize;
        Ok(&self.map[start..start + len])
    }

    /// A tensor dequantized to `f32`, in row-major order with shape [`TensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self
            .tensor(name)
            .ok_or_else(|| self.tensor_error(name, "not found in the file".into()))?;
        let bytes = self.tensor_bytes(t)?;
        let ty = t.ggml_type().expect("checked by tensor_bytes");
        dequant::dequantize(ty, bytes, t.n_elements() as usize)
            .map_err(|e| self.tensor_error(name, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal GGUF v3 file: one u32 key, one string array, one F32 tensor.
    fn tiny_gguf() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&2u64.to_le_bytes()); // kv
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        s(&mut b, "llama.block_count");
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "bc");
        s(&mut b, "w");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // F32
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for v in 0..6 {
            b.extend_from_slice(&(v as f32).to_le_bytes());
        }
        b
    }

    /// Writes `bytes` to a fresh temporary file and opens it as GGUF.
    fn parse_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("cap-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{}.gguf", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&p, bytes).unwrap();
        let r = GgufFile::open(&p);
        let _ = std::fs::remove_file(&p);
        r
    }

    #[test]
    fn parses_a_hand_built_file() {
        let f = parse_bytes(&tiny_gguf()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.get("llama.block_count").and_then(|v| v.as_u64()), Some(7));
        let toks = f.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!(toks[1].as_str(), Some("bc"));
        let t = f.tensor("w").unwrap();
        assert_eq!(t.shape(), vec![2, 3]);
        assert_eq!(
            f.dequantize("w").unwrap(),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = tiny_gguf();
        for cut in 0..full.len() {
            let r = parse_bytes(&full[..cut]);
            assert!(r.is_err(), "truncated to {cut} bytes parsed");
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = tiny_gguf();
        b[0] = b'X';
        assert!(matches!(parse_bytes(&b), Err(GgufError::BadMagic { .. })));
        let mut b = tiny_gguf();
        b[4] = 1;
        assert!(matches!(
            parse_bytes(&b),
            Err(GgufError::Version { version: 1, .. })
        ));
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        let mut b = tiny_gguf();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = parse_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("metadata count"), "{e}");
    }
}
