//! The body of the fuzz target (`formats/fuzz`), kept in the library so ordinary
//! tests and the mutation loop exercise exactly the same code.

use crate::reader::{SparseView, TensorData};
use crate::{CapFile, Encoding, FormatError};

/// Parses `data` as a `.cap` file and, if it parses, touches everything a runtime
/// would: checksums, every typed view and every accessor. Must never panic; returns
/// the first error, which the fuzz target ignores.
pub fn fuzz_one(data: &[u8]) -> Result<(), FormatError> {
    let f = CapFile::parse(data)?;
    let verified = f.verify_all();
    for i in 0..f.len() {
        let t = f.tensor(i)?;
        let _ = f.find(&f.manifest().tensors[i].name);
        let _ = t.verify();
        let sparse = match t.data()? {
            TensorData::Dense(v) => {
                let _ = (v.as_f32(), v.as_u16(), v.len());
                None
            }
            TensorData::LowRank { a, b } => {
                let _ = (a.as_f32(), b.as_u16());
                None
            }
            TensorData::Sparse(s) => Some(s),
            TensorData::Composite { a, b, sparse } => {
                let _ = (a.as_u16(), b.as_f32());
                Some(sparse)
            }
        };
        if let (Some(view), Encoding::Sparse(s) | Encoding::Composite { sparse: s, .. }) =
            (sparse, t.encoding)
        {
            let _ = crate::sparse::decode_sparse(t.rows, t.cols, s, &view);
        }
        match sparse {
            Some(SparseView::BlockCsr(c)) => {
                let _ = (
                    c.block_ptr_u32(),
                    c.block_ptr_at(usize::MAX),
                    c.values.as_u16(),
                );
            }
            Some(SparseView::Bitmask { values, .. }) | Some(SparseView::TwoFour { values, .. }) => {
                let _ = values.as_f32();
            }
            None => {}
        }
    }
    verified
}
