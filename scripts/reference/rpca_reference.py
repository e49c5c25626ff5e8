#!/usr/bin/env python3
"""Independent NumPy reference of cap's RPCA (inexact ALM, Lin, Chen & Ma 2010).

Same algorithm and defaults as host/src/rpca/ialm.rs, written from the paper's
algorithm 5 and the reference MATLAB code, in float64 (the Rust solver works in f32;
the comparison tolerances in host/tests/rpca.rs account for that):

    lambda = lambda_scale / sqrt(max(m, n))
    Y0 = W / max(||W||_2, ||W||_inf / lambda); mu0 = 1.25 / ||W||_2; mu_max = 1e7 mu0
    repeat: S = shrink(W - L + Y/mu, lambda/mu)
            U s V^T = svd(W - S + Y/mu); L = U max(s - 1/mu, 0) V^T
            Z = W - L - S; Y += mu Z; mu = min(1.5 mu, mu_max)
            stop when ||Z||_F / ||W||_F < tol or after max_iters

Writes host/tests/fixtures/rpca/:
  random_64x48.f32, lowrank_96x80.f32   inputs (row-major f32 little-endian)
  reference.json                        per matrix and iteration count: rank, nnz,
                                        residual, energies, singular values of L

The real weight (blk.0.attn_k.weight of SmolLM2-135M-Instruct Q4_1) is not stored: the
Rust test reads it through cap's importer. Here it is dequantized with gguf-py and its
rows un-permuted the way cap's importer undoes llama.cpp's q/k interleaving (RPCA's
statistics do not depend on the row order anyway).

Usage: ~/.cache/cap/venv/bin/python scripts/reference/rpca_reference.py [--model PATH]
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "host", "tests", "fixtures", "rpca")
ITERS = [3, 10]
TOL = 1e-6  # cap's DEFAULT_TOL


def ialm(W, max_iters, lambda_scale=1.0, tol=TOL):
    W = W.astype(np.float64)
    m, n = W.shape
    lam = lambda_scale / np.sqrt(max(m, n))
    norm2 = np.linalg.norm(W, 2)
    norm_inf = np.abs(W).max() / lam
    Y = W / max(norm2, norm_inf)
    mu = 1.25 / norm2
    mu_max = mu * 1e7
    w_fro = np.linalg.norm(W, "fro")
    L = np.zeros_like(W)
    S = np.zeros_like(W)
    it = 0
    sig = np.zeros(0)
    res = 0.0
    for it in range(1, max_iters + 1):
        T = W - L + Y / mu
        S = np.sign(T) * np.maximum(np.abs(T) - lam / mu, 0.0)
        U, s, Vt = np.linalg.svd(W - S + Y / mu, full_matrices=False)
        r = int((s > 1.0 / mu).sum())
        sig = s[:r] - 1.0 / mu
        L = (U[:, :r] * sig) @ Vt[:r]
        Z = W - L - S
        Y = Y + mu * Z
        res = np.linalg.norm(Z, "fro") / w_fro
        mu = min(mu * 1.5, mu_max)
        if res < tol:
            break
    w2 = w_fro**2
    return {
        "iterations": it,
        "rank": int(len(sig)),
        "nnz": int(np.count_nonzero(S)),
        "residual": float(res),
        "energy_l": float((sig**2).sum() / w2),
        "energy_s": float((S**2).sum() / w2),
        "lambda": float(lam),
        "sigma": [float(x) for x in sig],
    }


def unpermute_qk(w, n_heads):
    """Inverse of llama.cpp's convert_hf_to_gguf permute (as cap's importer does)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def real_weight(model):
    import gguf

    r = gguf.GGUFReader(model)
    kv_heads = int(r.fields["llama.attention.head_count_kv"].parts[-1][0])
    t = next(t for t in r.tensors if t.name == "blk.0.attn_k.weight")
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape([int(x) for x in reversed(t.shape)])
    return unpermute_qk(w, kv_heads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model",
        default=os.path.expanduser("~/.cache/cap/model/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20240601)
    mats = {}
    mats["random_64x48"] = (0.02 * rng.standard_normal((64, 48))).astype(np.float32)
    m, n, r = 96, 80, 4
    L0 = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    S0 = np.where(rng.random((m, n)) < 0.05, np.where(rng.random((m, n)) < 0.5, 8.0, -8.0), 0.0)
    mats["lowrank_96x80"] = (L0 + S0).astype(np.float32)
    for name, w in mats.items():
        w.astype("<f4").tofile(os.path.join(OUT, name + ".f32"))
    if os.path.exists(a.model):
        mats["blk.0.attn_k.weight"] = real_weight(a.model)
    else:
        print(f"{a.model} missing: no real-weight reference", file=sys.stderr)
    out = {
        "algorithm": "inexact ALM RPCA, float64 NumPy, scripts/reference/rpca_reference.py",
        "numpy": np.__version__,
        "lambda_scale": 1.0,
        "tol": TOL,
        "matrices": {},
    }
    for name, w in mats.items():
        rows = {}
        for it in ITERS:
            res = ialm(w, it)
            print(name, it, {k: v for k, v in res.items() if k != "sigma"}, file=sys.stderr)
            rows[str(it)] = res
        out["matrices"][name] = {"rows": w.shape[0], "cols": w.shape[1], "by_iters": rows}
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
