#!/usr/bin/env python3
"""Reference fixtures for cap-host's GGML dequantization (host/src/import/dequant.rs).

For each GGML type cap reads, writes to host/tests/fixtures/dequant/:
  <NAME>.bin  raw tensor bytes as stored in a GGUF file
  <NAME>.f32  the expected values, little-endian f32, computed by the `gguf` Python
              package's independent numpy implementation (gguf.quants.dequantize)

Quantized tensors are 4 blocks (4 super-blocks of 256 for K-quants) of random bytes, so
every quant bit pattern appears; the f16 scale/min fields are then overwritten with
finite random f16 values of modest size (|x| in [2^-16, 4), some of them f16 subnormals)
so no inf/NaN reaches the output. Q6_K's int8 sub-block scales stay random bytes. The
float types are a few edge cases (signed zeros, subnormals, largest finite) followed by
random bit patterns with the all-ones exponent excluded (so all finite).

Usage: /root/.cache/cap/venv/bin/python scripts/reference/make_dequant_fixtures.py
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

SEED = 20250601
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "host" / "tests" / "fixtures" / "dequant"

# Byte offsets (within one block) of the f16 scale / min fields, per ggml-common.h.
F16_FIELDS: dict[T, list[int]] = {
    T.Q4_0: [0],  # d
    T.Q4_1: [0, 2],  # d, m
    T.Q5_0: [0],  # d
    T.Q5_1: [0, 2],  # d, m
    T.Q8_0: [0],  # d
    T.Q4_K: [0, 2],  # d, dmin
    T.Q5_K: [0, 2],  # d, dmin
    T.Q6_K: [208],  # d (after ql[128], qh[64], scales[16])
}

FLOAT_ELEMS = 256  # elements for the F32/F16/BF16 fixtures
N_BLOCKS = 4


def modest_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    mag = np.exp2(rng.uniform(-16.0, 2.0, size=n))
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    v = (sign * mag).astype(np.float16)
    assert np.all(np.isfinite(v))
    return v


def finite_bits(rng: np.random.Generator, n: int, dtype, exp_mask: int) -> np.ndarray:
    """Random bit patterns of an unsigned `dtype`, re-drawn where the exponent is all ones."""
    bits = rng.integers(0, np.iinfo(dtype).max, size=n, dtype=dtype, endpoint=True)
    while True:
        bad = (bits & exp_mask) == exp_mask
        if not bad.any():
            return bits
        redraw = rng.integers(0, np.iinfo(dtype).max, size=int(bad.sum()), dtype=dtype, endpoint=True)
        bits[bad] = redraw


# Edge cases placed first in the float fixtures: +0, -0, smallest and largest subnormal,
# largest finite, its negation, 1.0 (bit patterns).
FLOAT_EDGES = {
    T.F32: [0x0000_0000, 0x8000_0000, 0x0000_0001, 0x007F_FFFF,
            0x7F7F_FFFF, 0xFF7F_FFFF, 0x3F80_0000],
    T.F16: [0x0000, 0x8000, 0x0001, 0x03FF, 0x7BFF, 0xFBFF, 0x3C00],
    T.BF16: [0x0000, 0x8000, 0x0001, 0x007F, 0x7F7F, 0xFF7F, 0x3F80],
}


def raw_for(qtype: T, rng: np.random.Generator) -> np.ndarray:
    if qtype in FLOAT_EDGES:
        dtype, exp_mask = {
            T.F32: (np.uint32, 0x7F80_0000),
            T.F16: (np.uint16, 0x7C00),
            T.BF16: (np.uint16, 0x7F80),
        }[qtype]
        bits = finite_bits(rng, FLOAT_ELEMS, dtype, exp_mask)
        edges = FLOAT_EDGES[qtype]
        bits[: len(edges)] = edges
        return bits.view(np.uint8)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(N_BLOCKS, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        blocks[:, off : off + 2] = modest_f16(rng, N_BLOCKS).view(np.uint8).reshape(N_BLOCKS, 2)
    return blocks.reshape(-1)


def main() -> None:
    rng = np.random.default_rng(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    types = [T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.BF16]
    for qtype in types:
        raw = raw_for(qtype, rng)
        # gguf-py dequantizes row-wise; one row holding the whole tensor.
        expected = np.asarray(dequantize(raw.reshape(1, -1), qtype), dtype=np.float32).reshape(-1)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        assert expected.size == raw.size // type_size * block_size, qtype
        assert np.all(np.isfinite(expected)), qtype
        (OUT / f"{qtype.name}.bin").write_bytes(raw.tobytes())
        (OUT / f"{qtype.name}.f32").write_bytes(expected.astype("<f4").tobytes())
        print(f"{qtype.name:5} {raw.size:5} bytes -> {expected.size:5} values")

    version = importlib.metadata.version("gguf")
    (OUT / "README.md").write_text(
        f"""# GGML dequantization fixtures

Reference data for `host/tests/dequant.rs`, one pair of files per GGML type cap reads
(`F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K`):

- `<TYPE>.bin`: raw tensor bytes, exactly as a GGUF file stores them;
- `<TYPE>.f32`: the expected dequantized values, little-endian `f32`.

Made by `scripts/reference/make_dequant_fixtures.py` with the `gguf` Python package
{version} (numpy {np.__version__}), seed {SEED}. The expected values come from
`gguf.quants.dequantize`, an implementation independent of cap's.

- Quantized types: {N_BLOCKS} blocks ({N_BLOCKS} super-blocks of 256 elements for the
  K-quants) of random bytes, so every quant bit pattern is exercised, with the `f16`
  scale/min fields (`d`, `m`/`dmin`) overwritten by finite random `f16` values,
  |x| in [2^-16, 4) (some are `f16` subnormals). Q6_K's `int8` sub-block scales stay random.
- `F32`, `F16`, `BF16`: {FLOAT_ELEMS} values: first the edge cases +0, -0, smallest and
  largest subnormal, largest finite, its negation and 1.0, then random bit patterns with
  the all-ones exponent excluded (so finite, including subnormals).

Regenerate with:

    /root/.cache/cap/venv/bin/python scripts/reference/make_dequant_fixtures.py
"""
    )


if __name__ == "__main__":
    main()
