#!/usr/bin/env python3
"""The table of scripts/bench-pareto.sh.

    pareto_table.py SOURCE.gguf OUT.jsonl ROW.json ...

Reads the rows bench-pareto.sh measured (one JSON object per file), adds to llama.cpp's rows the
file bytes and the bits per weight of the block linears read from the GGUF header, writes all
rows to OUT.jsonl and prints a markdown table, rows by file bytes (largest first). Standard
library only.
"""
import json
import os
import re
import struct
import sys

# ggml type id -> (name, elements per block, bytes per block)
GGML = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}
LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def gguf_tensors(path):
    """[(name, n_elements, type id, offset)] and the data section's start, from the header."""
    with open(path, "rb") as f:
        def rd(fmt):
            n = struct.calcsize(fmt)
            return struct.unpack("<" + fmt, f.read(n))

        def rstr():
            (n,) = rd("Q")
            return f.read(n).decode("utf-8", "replace")

        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                  11: "q", 12: "d"}

        def rval(t):
            if t in scalar:
                return rd(scalar[t])[0]
            if t == 8:
                return rstr()
            if t == 9:
                (et,) = rd("I")
                (n,) = rd("Q")
                return [rval(et) for _ in range(n)]
            raise ValueError(f"{path}: unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        (version,) = rd("I")
        n_tensors, n_kv = rd("QQ")
        align = 32
        for _ in range(n_kv):
            k = rstr()
            (t,) = rd("I")
            v = rval(t)
            if k == "general.alignment":
                align = v
        out = []
        for _ in range(n_tensors):
            name = rstr()
            (nd,) = rd("I")
            dims = rd("Q" * nd)
            (ty,) = rd("I")
            (off,) = rd("Q")
            n = 1
            for d in dims:
                n *= d
            out.append((name, n, ty, off))
        start = -(-f.tell() // align) * align
    return out, start


def gguf_linear_stats(path):
    tensors, start = gguf_tensors(path)
    size = os.path.getsize(path)
    ends = sorted(o for _, _, _, o in tensors) + [size - start]
    lin_bytes = lin_params = 0
    types = {}
    for name, n, ty, off in tensors:
        if not LINEAR.match(name):
            continue
        if ty in GGML:
            tname, be, bb = GGML[ty]
            b = n // be * bb
        else:  # unknown type: up to the next tensor (alignment padding included)
            tname = f"type{ty}"
            b = next(e for e in ends if e > off) - off
        lin_bytes += b
        lin_params += n
        types[tname] = types.get(tname, 0) + 1
    other = {}
    for name, n, ty, off in tensors:
        if not LINEAR.match(name) and n > 100000:
            other[name] = GGML.get(ty, (f"type{ty}",))[0]
    return lin_bytes, lin_params, types, other


def fmt_int(n):
    return f"{n:,}"


def main():
    source, out_jsonl, *paths = sys.argv[1:]
    source_bytes = os.path.getsize(source)
    rows = []
    for p in paths:
        r = json.load(open(p))
        if r["side"] == "llama.cpp":
            r["file_bytes"] = os.path.getsize(r["file"])
            lb, lp, types, other = gguf_linear_stats(r["file"])
            r.update(linear_bytes=lb, linear_params=lp, linear_bpw=8 * lb / lp,
                     linear_types=types, other_big_tensors=other)
        elif "source" in r["format"]:
            r["file_bytes"] = source_bytes
        rows.append(r)
    with open(out_jsonl, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    def key(r):
        b = r.get("file_bytes") or r.get("budget") or 0
        return (-b, 0 if r["side"] == "llama.cpp" else 1)

    threads = sorted({t for r in rows for t in r.get("decode", {})}, key=int)
    head = ["format", "file bytes", "≤ source", "linears bits/weight", "linear types",
            "PPL ± stderr", "windows"] + [f"decode tok/s t={t}" for t in threads]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---", "---:", ":---:", "---:", "---", "---:", "---:"]
                          + ["---:"] * len(threads)) + "|")
    notes = []
    for r in sorted(rows, key=key):
        name = r["format"] if r["side"] == "cap" else f"llama.cpp {r['format']}"
        if r["side"] == "cap" and r.get("fits") is False:
            cells = [name, f"budget {fmt_int(r['budget'])}", "yes" if r["budget"] <= source_bytes else "no",
                     "", "", "does not fit", ""] + [""] * len(threads)
            notes.append(f"* {name}: does not fit (compress exited {r['exit']}: {r['message']})")
        else:
            b = r.get("file_bytes")
            types = dict(r.get("linear_types") or {})
            for enc, n in (r.get("linear_encodings") or {}).items():
                # cap's encodings carry per-tensor counts (nnz=..., groups=..., rank=...)
                enc = re.sub(r"\s*\b\w+=\d+", "", enc).strip()
                types[enc] = types.get(enc, 0) + n
            tcell = " ".join(f"{k}×{v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))
            bpw = f"{r['linear_bpw']:.3f}" if r.get("linear_bpw") else ""
            ppl = f"{r['ppl']:.4f} ± {r['ppl_stderr']:.4f}" if r.get("ppl_stderr") is not None else f"{r['ppl']:.4f}"
            dec = []
            for t in threads:
                d = r.get("decode", {}).get(t)
                dec.append(f"{d['mean']:.1f} ± {d['sd']:.1f}" if d else "")
            cells = [name, fmt_int(b) if b else "", "yes" if b and b <= source_bytes else "no",
                     bpw, tcell, ppl, str(r.get("windows", ""))] + dec
            if r.get("short_generations"):
                notes.append(f"* {name}: some generations stopped before 64 tokens: {r['short_generations']}")
        print("| " + " | ".join(cells) + " |")
    print()
    print(f"The source file is itself Q4_1 ({fmt_int(source_bytes)} bytes); every file above was made "
          "from its weights (llama.cpp's with `llama-quantize --allow-requantize`, cap's with "
          "`cap-host compress --model` on it). Above the source's bytes (\"≤ source\" = no) a "
          "format has room to hold those weights near-losslessly, so the contest is at and below "
          "Q4_1's bytes.")
    print("Bits/weight: bytes of the block linears (q, k, v, o, gate, up, down) × 8 / their dense "
          "parameter count; the tied embedding/head is not counted. Decode: mean ± sd of 3 runs "
          "(llama-bench tg64 after an empty prompt; cap-device generate -n 64 --temp 0 after a "
          "short prompt).")
    others = {}
    for r in rows:
        if r["side"] == "llama.cpp" and r.get("other_big_tensors"):
            key = ", ".join(f"{k} {v}" for k, v in r["other_big_tensors"].items())
            others.setdefault(key, []).append(r["format"])
    for key, fmts in others.items():
        notes.append(f"* llama.cpp {' '.join(fmts)}: other large tensors: {key}")
    for r in rows:
        loads = [f"before {what}: {r[k]}" for what, k in (("perplexity", "load_before_ppl"),
                 ("the speed runs", "load_before_bench")) if r.get(k)]
        if loads:
            notes.append(f"* {r['format']} ({r['side']}): measured {r.get('measured')}, "
                         f"1/5/15-minute load {'; '.join(loads)}")
    busy = [r["format"] for r in rows
            if float((r.get("load_before_bench") or "0").split()[0]) > (os.cpu_count() or 1)]
    if busy:
        notes.insert(0, f"* WARNING: the speed runs of {', '.join(busy)} started with the 1-minute "
                        f"load above the {os.cpu_count()} cores: their tok/s measure the contention, "
                        "not the format (rerun on an idle machine; llama.cpp rows: PARETO_FRESH=1)")
    if notes:
        print()
        print("\n".join(notes))


if __name__ == "__main__":
    main()
