"""PyTorch (transformers, float32, CPU) eval throughput on the same model, text,
tokenization, protocol and thread count as `cap-host eval`.

Model and tokenizer as in reference_eval.py (SmolLM2-135M-Instruct GGUF Q4_1 dequantized
to float32; SmolLM2's original pre-tokenizer). "Standard" protocol: the first
--max-windows non-overlapping windows of --ctx tokens of wiki.valid.raw, each run from
position 0; per window the timed work is the forward pass (logits for every position),
log-softmax and the NLL of tokens 1..ctx-1 (cross_entropy, float32). One window is run
first as a warm-up and not timed. tokens = windows * ctx (tokens through the model).

Prints one JSON line on stdout (progress and library noise go to stderr):
  {"engine":"pytorch","ctx","threads","windows","tokens","seconds","tokens_per_s",...}
Used by scripts/bench-eval.sh.

usage: python scripts/reference/bench_torch_eval.py [--ctx 512] [--threads 2] [--max-windows 8] [--attn sdpa]
"""
import argparse, json, os, sys, time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_eval import MODEL_FILE, load_model, load_tokenizer, read_text  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--attn", default="sdpa", help="transformers attention implementation (sdpa, eager)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = load_tokenizer()
    model = load_model(attn=a.attn)
    ids = tok(read_text())["input_ids"]
    n = min(len(ids) // a.ctx, a.max_windows)

    def window(w):
        x = torch.tensor([ids[w * a.ctx:(w + 1) * a.ctx]])
        with torch.inference_mode():
            logits = model(x).logits[0, :-1]
            return torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()  # log-softmax + NLL

    window(0)  # warm-up, not timed
    t0 = time.perf_counter()
    for w in range(n):
        nll = window(w)
        print(f"window {w + 1}/{n} nll {nll:.4f} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    secs = time.perf_counter() - t0
    print(json.dumps({"engine": "pytorch", "ctx": a.ctx, "threads": a.threads, "windows": n,
                      "tokens": n * a.ctx, "seconds": round(secs, 3), "tokens_per_s": round(n * a.ctx / secs, 2),
                      "attn": a.attn, "dtype": "float32", "model": MODEL_FILE,
                      "torch": torch.__version__, "transformers": transformers.__version__}), flush=True)


if __name__ == "__main__":
    main()
