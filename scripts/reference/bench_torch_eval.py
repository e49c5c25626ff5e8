"""PyTorch (transformers, float32) eval throughput on the same text, protocol and
thread count as `cap-host eval`: forward pass, log-softmax and NLL of each window.
Prints one JSON line. Used by scripts/bench-eval.sh.

usage: python bench_torch_eval.py [--ctx 512] [--threads 2] [--max-windows 8]
"""
import argparse, json, os, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = os.path.expanduser("~/.cache/cap/model")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = os.path.join(os.path.dirname(__file__), "../../../shared/data/wikitext-2-raw/wiki.valid.raw")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--attn", default="sdpa", help="transformers attention implementation")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE, dtype=torch.float32,
                                                 attn_implementation=a.attn).eval()
    ids = tok(open(TEXT, encoding="utf-8").read())["input_ids"]
    n = min(len(ids) // a.ctx, a.max_windows)

    def window(w):
        x = torch.tensor([ids[w * a.ctx:(w + 1) * a.ctx]])
        with torch.inference_mode():
            logits = model(x).logits[0, :-1]
            return torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()

    window(0)  # warm-up, not timed
    t0 = time.perf_counter()
    for w in range(n):
        window(w)
    secs = time.perf_counter() - t0
    print(json.dumps({"engine": "pytorch", "torch": torch.__version__, "attn": a.attn, "ctx": a.ctx,
                      "threads": a.threads, "windows": n, "tokens": n * a.ctx, "seconds": secs,
                      "tokens_per_s": n * a.ctx / secs}))


if __name__ == "__main__":
    main()
