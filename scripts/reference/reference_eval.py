"""Reference tokenization and perplexity for cap's forward pass, from PyTorch + transformers.

Model: SmolLM2-135M-Instruct (GGUF Q4_1), loaded by transformers' GGUF loader, which
dequantizes every tensor to float32. Text: WikiText-2 validation (wiki.valid.raw).

Writes into --out (default tests/reference/smollm2-135m-instruct-q4_1/):

* tokens.json: the whole file's content (bytes decoded as UTF-8, as-is) tokenized with
  the Hugging Face tokenizer, default add_special_tokens: count, sha256 of the ids as
  little-endian u32, first/last 512 ids, whether a BOS was prepended.
* tokens_wikitext_joined.json: the same for the "wikitext-joined" text: one row per line
  of the raw file (as the Hugging Face `wikitext` loader yields them: rows keep their
  "\n", whitespace-only rows become ""), joined with "\n\n" (SparseGPT/Wanda's
  `"\n\n".join(data['text'])`).
* eval_ctx<C>.json for every --ctx C: the "standard" protocol (SparseGPT/Wanda) on the
  raw-file tokenization: non-overlapping windows of C tokens (tail dropped), each run
  independently from position 0, every token but the window's first scored (C-1 per
  window), PPL = exp(mean NLL over all scored tokens). Log-softmax in float64 from the
  float32 logits. Per-window mean NLLs at full float64 precision.
  The file is rewritten after every window ("windows" < "windows_in_text" marks a
  partial reference); --resume continues such a file instead of starting over.
* last_logits_ctx<C>.f32: float32 logits of the last position of the first window,
  raw little-endian (vocab floats).

The tokenizer: transformers' GGUF tokenizer conversion ignores `tokenizer.ggml.pre`
("smollm") and gives a plain GPT-2 ByteLevel pre-tokenizer, whereas SmolLM2's original
tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) first isolate every \\p{N}
character. The original pre-tokenizer is restored here (on wiki.valid.raw the two differ
by 2 tokens, around Myanmar digits).

Deterministic: float32, eval mode, torch.no_grad, eager attention, fixed thread count.

usage: python scripts/reference/reference_eval.py [--out DIR] [--ctx 512 2048]
           [--max-windows K] [--threads 2] [--tokens-only] [--resume]
Run by hand (not in CI); the outputs are small and committed. The full run (ctx 512 and
2048) takes about an hour on 2 cores.
"""
import argparse, hashlib, json, os, platform, struct, sys, time

import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "../.."))
MODEL_DIR = os.path.expanduser("~/.cache/cap/model")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = os.path.normpath(os.path.join(ROOT, "data/wikitext-2-raw/wiki.valid.raw"))
OUT = os.path.join(ROOT, "tests/reference/smollm2-135m-instruct-q4_1")
ATTN = "eager"
PRE_TOKENIZER = "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)]"


def load_tokenizer(model_dir=MODEL_DIR, model_file=MODEL_FILE):
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    # See the module docstring: restore SmolLM2's original pre-tokenizer.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


def load_model(model_dir=MODEL_DIR, model_file=MODEL_FILE, attn=ATTN):
    return AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=torch.float32,
                                                attn_implementation=attn).eval()


def read_text(path=TEXT):
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def wikitext_joined(path=TEXT):
    # The Hugging Face `wikitext` loader: one row per line (text mode), the line kept with
    # its "\n"; whitespace-only lines become "". SparseGPT/Wanda join the rows with "\n\n".
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(line if line.strip() else "")
    return "\n\n".join(rows)


def token_summary(tok, ids, source):
    raw = struct.pack("<%dI" % len(ids), *ids)
    return {"source": source, "n_tokens": len(ids), "sha256_u32le": hashlib.sha256(raw).hexdigest(),
            "first": ids[:512], "last": ids[-512:],
            "add_bos": bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id,
            "bos_token_id": tok.bos_token_id, "pre_tokenizer": PRE_TOKENIZER,
            "tokenizer": f"transformers {transformers.__version__} AutoTokenizer from {MODEL_FILE}"}


def eval_standard(model, ids, ctx, max_windows=None, logits_path=None, done=(), on_window=None, log=sys.stderr):
    """Standard protocol from window len(done) on; returns (per-window mean NLLs, seconds).

    `done`: per-window means already computed (a resumed run); `on_window(means, secs)` is
    called after every window."""
    n = len(ids) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    means, t0 = list(done), time.time()
    for w in range(len(means), n):
        x = torch.tensor([ids[w * ctx:(w + 1) * ctx]], dtype=torch.long)
        with torch.no_grad():
            logits = model(x).logits[0]  # [ctx, vocab] float32
            if w == 0 and logits_path:
                logits[-1].float().numpy().astype("<f4").tofile(logits_path)
            lp = torch.log_softmax(logits[:-1].double(), dim=-1)
            nll = -lp.gather(1, x[0, 1:].unsqueeze(1)).squeeze(1)
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
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--ctx", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens-only", action="store_true", help="write the token files only")
    ap.add_argument("--resume", action="store_true",
                    help="continue a partial eval_ctx<C>.json (same settings) instead of starting over")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--model-dir", default=MODEL_DIR)
    ap.add_argument("--model-file", default=MODEL_FILE)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    os.makedirs(a.out, exist_ok=True)

    tok = load_tokenizer(a.model_dir, a.model_file)
    ids = tok(read_text(a.text))["input_ids"]
    s = token_summary(tok, ids, "wiki.valid.raw (whole file, as-is)")
    json.dump(s, open(os.path.join(a.out, "tokens.json"), "w"))
    j = tok(wikitext_joined(a.text))["input_ids"]
    sj = token_summary(tok, j, "wiki.valid.raw as HF wikitext rows (whitespace-only rows -> \"\", "
                               "rows keep their \\n) joined with \"\\n\\n\"")
    json.dump(sj, open(os.path.join(a.out, "tokens_wikitext_joined.json"), "w"))
    print(f"tokens: raw {len(ids)} (add_bos {s['add_bos']}), wikitext-joined {len(j)}", file=sys.stderr)
    if a.tokens_only:
        return

    if a.max_windows is not None and not a.resume and os.path.abspath(a.out) == os.path.abspath(OUT):
        print("warning: --max-windows without --resume overwrites the committed reference with a partial "
              "one; use --out /tmp/... for quick runs", file=sys.stderr)
    model = load_model(a.model_dir, a.model_file)
    for ctx in a.ctx:
        path = os.path.join(a.out, f"eval_ctx{ctx}.json")
        in_text = len(ids) // ctx
        meta = {"threads": a.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                "attn_implementation": ATTN, "log_softmax": "float64 from float32 logits"}
        done, secs_before = [], 0.0
        if a.resume and os.path.exists(path):
            old = json.load(open(path))
            assert old.get("windows_in_text") == in_text and all(old.get(k) == v for k, v in meta.items()), \
                f"{path} was made differently; not resuming from it"
            done, secs_before = old["window_nll_mean"], old["seconds"]
            print(f"ctx {ctx}: resuming after {len(done)} windows from {path}", file=sys.stderr)

        def write(means, secs):
            # After every window, so a long run that is stopped keeps what it did;
            # "windows" < "windows_in_text" marks a partial reference.
            n = len(means)
            mean = sum(means) / n  # every window scores ctx-1 tokens: mean of means = token mean
            secs = secs_before + secs
            out = {"ctx": ctx, "protocol": "standard", "windows": n, "windows_in_text": in_text,
                   "tokens_scored": n * (ctx - 1), "nll_mean": mean,
                   "ppl": float(torch.tensor(mean, dtype=torch.float64).exp()), "window_nll_mean": means,
                   "seconds": secs, "tokens_per_s": (n - len(done)) * ctx / max(secs - secs_before, 1e-9),
                   **meta, "dtype": "float32", "tokenization": "tokens.json (raw file, as-is)",
                   "model": a.model_file, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                   "script": "scripts/reference/reference_eval.py"}
            if done:
                out["resumed_after_windows"] = len(done)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(out, f, indent=1)
            os.replace(tmp, path)
            return out

        means, secs = eval_standard(model, ids, ctx, a.max_windows,
                                    os.path.join(a.out, f"last_logits_ctx{ctx}.f32"), done, write)
        if len(means) > len(done) or not os.path.exists(path):
            out = write(means, secs)
            print(f"ctx {ctx}: {out['windows']}/{in_text} windows, {out['tokens_scored']} tokens scored, "
                  f"nll {out['nll_mean']:.6f}, ppl {out['ppl']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
