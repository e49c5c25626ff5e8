//! Which tensors of a model go into a compressed `.cap` file and what the ones written
//! dense cost, read from cap-device's tensor table ([`cap_device::tensors`]), plus the
//! bound of the manifest the budget reserves room for.

use cap_device::model::{DenseLinear, Model};
use cap_device::tensors::{Role, TensorInfo, compressible, dense_tensors, named_linears};
use cap_format::manifest::{LayerCompression, Manifest, TensorEntry};
use cap_format::{
    DType, Encoding, MIN_ALIGNMENT, Sparse, TensorDesc, encode_manifest, encoded_bytes,
    encoded_bytes_aligned,
};

use super::error::{CompressError, Result};

/// The linears `compress` compresses (q, k, v, o, gate, up, down of each block) with
/// their file names, in file order.
pub fn block_linears(model: &Model<DenseLinear>) -> Result<Vec<(String, &DenseLinear)>> {
    let which = compressible(&model.config);
    let named = named_linears(model, &which)
        .map_err(|n| CompressError::Internal(format!("the model has no linear {n}")))?;
    Ok(named
        .into_iter()
        .map(|(t, l)| (t.name.clone(), l))
        .collect())
}

/// Bytes of the tensors written dense (everything but the block linears), each in the
/// dtype the table gives it for weights stored in `dtype`.
pub fn dense_tensor_bytes(model: &Model<DenseLinear>, dtype: DType) -> Result<u64> {
    let mut total = 0;
    for t in dense_tensors(&model.config) {
        total += encoded_bytes_aligned(&dense_desc(&t, dtype)?, MIN_ALIGNMENT)?;
    }
    Ok(total)
}

/// Bytes of the dense tensors one decoded token reads: every one in full (the tied
/// embedding is the output head), except the embedding when a separate head exists,
/// of which one row is gathered.
pub fn dense_read_bytes(model: &Model<DenseLinear>, dtype: DType) -> Result<u64> {
    let dense = dense_tensors(&model.config);
    let separate_head = dense.iter().any(|t| t.role == Role::Head);
    let mut total = 0;
    for t in &dense {
        total += if t.role == Role::Embed && separate_head {
            (t.cols * t.dense_dtype(dtype).size()) as u64
        } else {
            encoded_bytes(&dense_desc(t, dtype)?)?
        };
    }
    Ok(total)
}

/// The descriptor of dense tensor `t` for weights stored in `dtype`.
fn dense_desc(t: &TensorInfo, dtype: DType) -> Result<TensorDesc> {
    t.dense_desc(dtype)
        .ok_or_else(|| CompressError::Internal(format!("{} does not fit the format", t.name)))
}

/// An upper bound of the manifest's encoded size: `base` with a directory of
/// `tensor_names` and a layer table whose every number takes its longest encoding
/// (with quantized `values`, the quantized encodings' group sizes and counts too).
pub fn manifest_bound(
    base: &Manifest,
    tensor_names: &[String],
    linear_names: &[String],
    values: DType,
) -> Result<u64> {
    let mut m = base.clone();
    let widest = if values.is_quantized() {
        let q = DType::Q8 { group: u16::MAX };
        Encoding::Composite {
            rank: u32::MAX,
            factor_dtype: q,
            sparse: Sparse::QBlockCsr {
                nnz: u64::MAX,
                groups: u64::MAX,
                dtype: q,
            },
        }
    } else {
        Encoding::Composite {
            rank: u32::MAX,
            factor_dtype: DType::F32,
            sparse: Sparse::BlockCsr {
                nnz: u64::MAX,
                dtype: DType::F32,
            },
        }
    };
    m.tensors = tensor_names
        .iter()
        .map(|n| TensorEntry {
            name: n.clone(),
            rows: u32::MAX,
            cols: u32::MAX,
            encoding: widest,
            offset: u64::MAX,
            len: u64::MAX,
            crc32: u32::MAX,
            extensions: vec![],
        })
        .collect();
    if let Some(c) = &mut m.compression {
        c.layers = linear_names
            .iter()
            .map(|n| LayerCompression {
                tensor: n.clone(),
                rank: u32::MAX,
                nnz: u64::MAX,
            })
            .collect();
        if let Some(p) = &mut c.perplexity {
            p.ctx = u32::MAX;
            p.windows = u32::MAX;
        }
    }
    Ok(encode_manifest(&m)?.len() as u64)
}
