//! Architecture specifics of import. The tensor table itself (roles, GGUF and Hugging
//! Face names, shapes) is [`cap_device::tensors`], shared with every other stage;
//! per-architecture code lives here only where the math differs (q/k row order).

use cap_device::config::Arch;

/// The tensor table lives in cap-device, where the board's loader reads it too.
pub use cap_device::tensors::{Group, Naming, Role, TensorSpec, classify, tensor_name};

/// Whether llama.cpp's converter interleaved the q/k rows of this architecture for its
/// RoPE kernel (it does for LLaMA-style models, not for NeoX-style ones like Qwen2).
pub fn gguf_permutes_qk(arch: Arch) -> bool {
    matches!(arch, Arch::Llama | Arch::Mistral)
}

/// Undoes llama.cpp's q/k permutation of a row-major `rows × cols` weight (or a bias,
/// `cols == 1`) with `n_heads` heads: GGUF row `h·d + 2i + j` holds Hugging Face row
/// `h·d + j·d/2 + i`, for head width `d` (convert_hf_to_gguf's `permute`).
pub fn unpermute_qk(w: &[f32], rows: usize, cols: usize, n_heads: usize) -> Vec<f32> {
    let d = rows / n_heads;
    let half = d / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        // convert_hf_to_gguf: w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(...)
        let (n_heads, d, cols) = (3, 8, 2);
        let rows = n_heads * d;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..n_heads {
            for two in 0..2 {
                for i in 0..d / 2 {
                    // After swapaxes the index order is (h, i, two).
                    let src = h * d + two * (d / 2) + i;
                    let dst = h * d + i * 2 + two;
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_qk(&gguf, rows, cols, n_heads), hf);
    }
}
