#!/usr/bin/env python3
"""Independent NumPy reference of cap's one-shot baselines on one real layer.

SmolLM2-135M-Instruct (Q4_1) `blk.0.attn_v.weight` (192x576, no q/k row permutation),
dequantized with gguf-py, compressed to the paper's ratio 0.5 (55,296 of 110,592
parameters) three ways, written from the papers' descriptions, not from cap's code:

  magnitude  keep the 55,296 largest |W_ij| of the matrix
  wanda      keep the 288 largest |W_ij| * ||X_j|| of every row (Sun et al. 2023), with
             X the inputs of the layer: RMSNorm(embedding[tokens]) * attn_norm, for the
             first 512 token ids of tests/reference/.../tokens.json in 4 windows of 128
             (block 0's v input depends on nothing else, so it is exact here)
  svd        keep the largest singular values the ratio allows: each costs 192 + 576, so
             floor(55,296 / 768) = 72
  sparsegpt  the reference code's algorithm (sparsegpt.py, fasterprune: blocks of 128
             columns, dampening 1% of the mean diagonal, upper Cholesky of H^-1, OBS
             updates), in float64, with H = X^T X for the same X cast to float32 (as cap
             receives it), and one documented change shared with cap: exactly
             ceil(0.5 * numel) entries pruned per block, ties to the lower index (the
             reference prunes every score <= the one at rank 0.5 * numel)

Ties (Q4_1 weights repeat values) go to the lower row-major index, as in cap
(a stable sort on the negated score). Scores are float32 like cap's (|w| * rms with both
float32), so the kept sets must agree exactly; the RMS is reported to compare with cap's
within float rounding.

Writes tests/reference/smollm2-135m-instruct-q4_1/baselines_blk0_attn_v.json.
Usage: ~/.cache/cap/venv/bin/python scripts/reference/baselines_reference.py [--model PATH]
"""
import argparse
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF = os.path.join(ROOT, "tests", "reference", "smollm2-135m-instruct-q4_1")


def tensor(reader, name):
    import gguf

    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)


def mask_hex(mask):
    # Row-major bits, LSB first within each byte (cap-format's bitmask order).
    return np.packbits(mask.reshape(-1).astype(np.uint8), bitorder="little").tobytes().hex()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model",
        default=os.path.expanduser("~/.cache/cap/model/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    args = ap.parse_args()
    import gguf

    r = gguf.GGUFReader(args.model)
    eps = float(r.fields["llama.attention.layer_norm_rms_epsilon"].parts[-1][0])
    emb = tensor(r, "token_embd.weight")
    norm = tensor(r, "blk.0.attn_norm.weight").reshape(-1)
    w = tensor(r, "blk.0.attn_v.weight")
    rows, cols = w.shape
    ids = json.load(open(os.path.join(REF, "tokens.json")))["first"][:512]
    windows = [ids[i : i + 128] for i in range(0, 512, 128)]

    x = emb[np.array(ids)].astype(np.float64)
    xn = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * norm.astype(np.float64)
    rms = np.sqrt((xn * xn).mean(axis=0)).astype(np.float32)

    total = rows * cols
    k = total // 2
    absw = np.abs(w).reshape(-1)
    order = np.argsort(-absw, kind="stable")
    mag = np.zeros(total, dtype=bool)
    mag[order[:k]] = True

    per_row = cols // 2
    score = np.abs(w) * rms[None, :]  # float32 * float32 -> float32, as in cap
    wanda = np.zeros((rows, cols), dtype=bool)
    for i in range(rows):
        o = np.argsort(-score[i], kind="stable")
        wanda[i, o[:per_row]] = True

    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    rank = k // (rows + cols)
    wr = (u[:, :rank] * s[:rank]) @ vt[:rank]
    rel = float(np.linalg.norm(w - wr) / np.linalg.norm(w))

    # SparseGPT.
    H = (xn.T @ xn).astype(np.float32).astype(np.float64)
    Wd = w.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    Wd[:, dead] = 0
    H[np.diag_indices(cols)] += 0.01 * np.mean(np.diag(H))
    Hinv = np.linalg.inv(H)
    U = np.linalg.cholesky(Hinv).T  # upper: Hinv = U^T U
    keep = np.ones((rows, cols), dtype=bool)
    for i1 in range(0, cols, 128):
        i2 = min(i1 + 128, cols)
        cnt = i2 - i1
        W1 = Wd[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        tmp = W1 ** 2 / (np.diag(U1).reshape(1, -1) ** 2)
        k_pr = int(np.ceil(0.5 * tmp.size))
        flat = tmp.reshape(-1)
        o = np.lexsort((np.arange(flat.size), flat))  # by score, ties by index
        m1 = np.ones(flat.size, dtype=bool)
        m1[o[:k_pr]] = False
        m1 = m1.reshape(rows, cnt)
        for i in range(cnt):
            wcol = W1[:, i]
            d = U1[i, i]
            q = np.where(m1[:, i], wcol, 0.0)
            Q1[:, i] = q
            e = (wcol - q) / d
            W1[:, i:] -= np.outer(e, U1[i, i:])
            E1[:, i] = e
        Wd[:, i1:i2] = Q1
        Wd[:, i2:] -= E1 @ U[i1:i2, i2:]
        keep[:, i1:i2] = m1
    keep[:, dead] = False
    Wp = np.where(keep, Wd, 0.0)
    x64 = xn
    out_err = float(np.linalg.norm((Wp - w) @ x64.T) / np.linalg.norm(w.astype(np.float64) @ x64.T))
    kept_vals = Wp[keep]

    out = {
        "model": os.path.basename(args.model),
        "tensor": "blk.0.attn_v.weight",
        "shape": [rows, cols],
        "ratio": 0.5,
        "windows": windows,
        "rms": [float(v) for v in rms],
        "magnitude_kept": int(mag.sum()),
        "magnitude_mask_hex": mask_hex(mag),
        "wanda_kept_per_row": per_row,
        "wanda_mask_hex": mask_hex(wanda),
        "svd_rank": rank,
        "svd_sigma": [float(v) for v in s[:rank]],
        "svd_rel_error": rel,
        "sparsegpt_mask_hex": mask_hex(keep),
        "sparsegpt_first_values": [float(v) for v in kept_vals[:256]],
        "sparsegpt_value_sum_sq": float((kept_vals ** 2).sum()),
        "sparsegpt_output_rel_error": out_err,
        "magnitude_output_rel_error": float(np.linalg.norm((np.where(mag.reshape(rows, cols), w, 0) - w).astype(np.float64) @ x64.T) / np.linalg.norm(w.astype(np.float64) @ x64.T)),
        "numpy": np.__version__,
        "gguf": getattr(gguf, "__version__", "unknown"),
    }
    path = os.path.join(REF, "baselines_blk0_attn_v.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {path}: magnitude {mag.sum()}, wanda {wanda.sum()}, svd rank {rank}, rel err {rel:.6f}, "
          f"sparsegpt kept {keep.sum()} output error {out_err:.5f} (magnitude {out['magnitude_output_rel_error']:.5f})")


if __name__ == "__main__":
    main()
