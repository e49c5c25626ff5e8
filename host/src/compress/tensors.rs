//! Which tensors of a model go into a compressed `.cap` file, under which names, and
//! what the ones written dense cost. The one place `compress` knows this (the budget
//! stage and REINFORCE read it); a per-architecture tensor table is to replace it.

use cap_device::model::{DenseLinear, Head, Model};
use cap_format::manifest::{LayerCompression, Manifest, TensorEntry};
use cap_format::{
    DType, Encoding, MIN_ALIGNMENT, Sparse, TensorDesc, encode_manifest, encoded_bytes_aligned,
};

use super::error::Result;
use crate::import::arch::{Naming, Role, tensor_name};
use crate::rpca::model::linear_matrices;

/// Block linears with their names, in file order (q, k, v, o, gate, up, down of each
/// block): the linears `compress` compresses.
pub fn block_linears(model: &Model<DenseLinear>) -> Vec<(String, &DenseLinear)> {
    let n = model.blocks.len() * 7;
    linear_matrices(model).into_iter().take(n).collect()
}

/// The file name of block `block`'s linear `role` (a role of
/// [`cap_device::model::Block::linears`]), `None` for an unknown role.
pub fn block_linear_name(block: usize, role: &str) -> Option<String> {
    let role = match role {
        "q" => Role::Q,
        "k" => Role::K,
        "v" => Role::V,
        "o" => Role::O,
        "gate" => Role::Gate,
        "up" => Role::Up,
        "down" => Role::Down,
        _ => return None,
    };
    Some(tensor_name(Naming::Gguf, role, block))
}

/// Every tensor name `write_model` writes, in order.
pub fn all_tensor_names(model: &Model<DenseLinear>) -> Vec<String> {
    let name = |r, l| tensor_name(Naming::Gguf, r, l);
    let mut v = vec![name(Role::Embed, 0)];
    for (i, b) in model.blocks.iter().enumerate() {
        v.push(name(Role::AttnNorm, i));
        v.extend([Role::Q, Role::K, Role::V].map(|r| name(r, i)));
        if b.qkv_bias.is_some() {
            v.extend([Role::QBias, Role::KBias, Role::VBias].map(|r| name(r, i)));
        }
        v.push(name(Role::O, i));
        v.push(name(Role::MlpNorm, i));
        v.extend([Role::Gate, Role::Up, Role::Down].map(|r| name(r, i)));
    }
    v.push(name(Role::FinalNorm, 0));
    if let Head::Separate(_) = &model.head {
        v.push(name(Role::Head, 0));
    }
    v
}

fn dense_desc(rows: usize, cols: usize, dtype: DType) -> TensorDesc {
    TensorDesc {
        rows: rows as u32,
        cols: cols as u32,
        encoding: Encoding::Dense { dtype },
    }
}

/// Bytes of the tensors `write_model` writes dense (everything but the block linears).
pub fn dense_tensor_bytes(model: &Model<DenseLinear>, dtype: DType) -> Result<u64> {
    let c = &model.config;
    let a = |d: TensorDesc| encoded_bytes_aligned(&d, MIN_ALIGNMENT);
    let mut total = a(dense_desc(c.vocab_size, c.hidden_size, dtype))?;
    total += a(dense_desc(1, c.hidden_size, DType::F32))?; // final norm
    for b in &model.blocks {
        total += 2 * a(dense_desc(1, c.hidden_size, DType::F32))?;
        if let Some(bias) = &b.qkv_bias {
            for v in bias {
                total += a(dense_desc(1, v.len(), DType::F32))?;
            }
        }
    }
    if let Head::Separate(h) = &model.head {
        total += a(dense_desc(h.out_features, h.in_features, dtype))?;
    }
    Ok(total)
}

/// An upper bound of the manifest's encoded size: `base` with a directory of
/// `tensor_names` and a layer table whose every number takes its longest encoding.
pub fn manifest_bound(
    base: &Manifest,
    tensor_names: &[String],
    linear_names: &[String],
) -> Result<u64> {
    let mut m = base.clone();
    let widest = Encoding::Composite {
        rank: u32::MAX,
        factor_dtype: DType::F32,
        sparse: Sparse::BlockCsr {
            nnz: u64::MAX,
            dtype: DType::F32,
        },
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
