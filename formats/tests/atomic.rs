//! The path writer: atomic rename, cleanup on drop and on failure, same bytes as
//! the in-memory writer.
mod common;

use std::path::PathBuf;

use cap_format::*;
use common::*;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cap-format-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tensor() -> (TensorDesc, Vec<Vec<u8>>) {
    gen_tensor(&mut Rng(1), 16, 32, Kind::CompositeCsr, 0.2)
}

fn entries(d: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn finished_writer_renames_and_matches_stream_writer() {
    let d = temp_dir("ok");
    let path = d.join("model.cap");
    let (desc, parts) = tensor();
    let p: Vec<&[u8]> = parts.iter().map(|v| v.as_slice()).collect();
    let mut w = CapWriter::create(&path, WriterOptions::default()).unwrap();
    assert!(w.tmp_path().exists());
    assert!(!path.exists(), "nothing at the final path while writing");
    w.add_tensor("w", &desc, &p).unwrap();
    assert_eq!(w.finish(sample_manifest(true)).unwrap(), path);
    assert_eq!(entries(&d), vec!["model.cap".to_string()]);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        bytes,
        write_mem(&[("w".into(), desc, parts)], sample_manifest(true), 64)
    );
    let f = CapFile::parse(&bytes).unwrap();
    f.verify_all().unwrap();
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn dropped_writer_leaves_nothing() {
    let d = temp_dir("drop");
    let path = d.join("model.cap");
    let (desc, parts) = tensor();
    let p: Vec<&[u8]> = parts.iter().map(|v| v.as_slice()).collect();
    {
        let mut w = CapWriter::create(&path, WriterOptions { alignment: 4096 }).unwrap();
        w.add_tensor("w", &desc, &p).unwrap();
        // Interrupted: dropped without finish.
    }
    assert!(entries(&d).is_empty(), "{:?}", entries(&d));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn failed_finish_leaves_nothing_and_keeps_an_old_file() {
    let d = temp_dir("fail");
    let path = d.join("model.cap");
    std::fs::write(&path, b"old contents").unwrap();
    let (desc, parts) = tensor();
    let p: Vec<&[u8]> = parts.iter().map(|v| v.as_slice()).collect();
    let mut w = CapWriter::create(&path, WriterOptions::default()).unwrap();
    w.add_tensor("w", &desc, &p).unwrap();
    let mut m = sample_manifest(false);
    m.tensors.push(TensorEntry {
        name: "bogus".into(),
        rows: 1,
        cols: 1,
        encoding: Encoding::Dense { dtype: DType::F32 },
        offset: 0,
        len: 64,
        crc32: 0,
        extensions: vec![],
    });
    assert!(matches!(w.finish(m), Err(WriteError::ManifestHasTensors)));
    assert_eq!(entries(&d), vec!["model.cap".to_string()]);
    assert_eq!(std::fs::read(&path).unwrap(), b"old contents");
    // Bad options fail at create and leave nothing either.
    assert!(CapWriter::create(d.join("x.cap"), WriterOptions { alignment: 3 }).is_err());
    assert_eq!(entries(&d), vec!["model.cap".to_string()]);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A sink that fails after `left` bytes.
struct Failing {
    left: usize,
    inner: std::io::Cursor<Vec<u8>>,
}

impl std::io::Write for Failing {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.len() > self.left {
            return Err(std::io::Error::other("disk full"));
        }
        self.left -= b.len();
        self.inner.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Seek for Failing {
    fn seek(&mut self, p: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(p)
    }
}

#[test]
fn io_error_mid_tensor_poisons_the_writer() {
    let (desc, parts) = tensor();
    let p: Vec<&[u8]> = parts.iter().map(|v| v.as_slice()).collect();
    let sink = Failing {
        left: 200,
        inner: std::io::Cursor::new(Vec::new()),
    };
    let mut w = StreamWriter::new(sink, WriterOptions::default()).unwrap();
    assert!(matches!(
        w.add_tensor("w", &desc, &p),
        Err(WriteError::Io(_))
    ));
    let small = TensorDesc {
        rows: 1,
        cols: 1,
        encoding: Encoding::Dense { dtype: DType::F32 },
    };
    assert!(matches!(
        w.add_tensor("x", &small, &[&[0; 4]]),
        Err(WriteError::Io(_))
    ));
    assert!(matches!(
        w.finish(sample_manifest(false)),
        Err(WriteError::Io(_))
    ));
}
