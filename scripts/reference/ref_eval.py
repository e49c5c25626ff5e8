"""Reference perplexity numbers for cap's forward pass, from PyTorch + transformers.

Loads SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32 by transformers' GGUF
loader), tokenizes the whole content of wiki.valid.raw with the Hugging Face tokenizer
(default add_special_tokens), and evaluates the "standard" protocol (SparseGPT/Wanda):
non-overlapping windows of ctx tokens, tail dropped, each window run from position 0,
every token but the window's first scored. Log-softmax is taken in float64 from the
float32 logits. Also saves the float32 logits of the last position of the first window.

usage: python ref_eval.py --out DIR [--ctx 512 2048] [--max-windows K] [--threads 2]
Run by hand (not in CI); the outputs are small and committed.
"""
import argparse, hashlib, json, os, struct, sys, time

import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = os.path.expanduser("~/.cache/cap/model")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = os.path.join(os.path.dirname(__file__), "../../../shared/data/wikitext-2-raw/wiki.valid.raw")


def token_summary(ids, source):
    raw = struct.pack("<%dI" % len(ids), *ids)
    return {"source": source, "n_tokens": len(ids), "sha256_u32le": hashlib.sha256(raw).hexdigest(),
            "first": ids[:512], "last": ids[-512:]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    # transformers' GGUF tokenizer conversion drops SmolLM2's digit splitting: the
    # original tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) isolate every
    # \p{N} before the byte-level regex. Restore the original pre-tokenizer.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    text = open(TEXT, encoding="utf-8").read()
    ids = tok(text)["input_ids"]
    summary = token_summary(ids, "wiki.valid.raw (whole file, as-is)")
    summary["add_bos"] = bool(ids and ids[0] == tok.bos_token_id)
    summary["pre_tokenizer"] = "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)]"
    json.dump(summary, open(os.path.join(a.out, "tokens.json"), "w"))
    print("tokens", len(ids), file=sys.stderr)
    for ctx in a.ctx:
        in_text = len(ids) // ctx
        n = min(in_text, a.max_windows) if a.max_windows else in_text
        means, t0 = [], time.time()
        for w in range(n):
            x = torch.tensor([ids[w * ctx:(w + 1) * ctx]])
            with torch.no_grad():
                logits = model(x).logits[0]
            if w == 0:
                logits[-1].float().numpy().astype("<f4").tofile(os.path.join(a.out, f"last_logits_ctx{ctx}.f32"))
            lp = torch.log_softmax(logits[:-1].double(), dim=-1)
            nll = -lp.gather(1, x[0, 1:].unsqueeze(1)).squeeze(1)
            means.append(nll.mean().item())
            print(f"ctx {ctx} window {w + 1}/{n} nll {means[-1]:.6f} ({time.time() - t0:.0f}s)", file=sys.stderr)
            # Written after every window so a long run that is stopped keeps what it did;
            # "windows" < "windows_in_text" marks a partial reference.
            secs = time.time() - t0
            mean = sum(means) / len(means)
            json.dump({"ctx": ctx, "protocol": "standard", "windows": len(means), "windows_in_text": in_text,
                       "tokens_scored": len(means) * (ctx - 1), "nll_mean": mean,
                       "ppl": float(torch.tensor(mean).double().exp()), "window_nll_mean": means,
                       "seconds": secs, "tokens_per_s": len(means) * ctx / secs,
                       "threads": a.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                       "attn_implementation": "eager", "log_softmax": "float64 from float32 logits"},
                      open(os.path.join(a.out, f"eval_ctx{ctx}.json"), "w"), indent=1)

if __name__ == "__main__":
    main()
