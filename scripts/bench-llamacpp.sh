#!/usr/bin/env bash
# Reference numbers from llama.cpp, to compare cap's runtime with.
#
# What it does (each step is skipped when its output already exists, so a second run only
# re-runs the benchmark):
#   1. downloads the llama-cpp-python sdist from PyPI (pinned version, checked by sha256) and
#      unpacks it; the sdist vendors llama.cpp under vendor/llama.cpp;
#   2. builds llama.cpp CPU-only (Release, -march=native via GGML_NATIVE=ON): llama-bench,
#      llama-quantize, llama-simple, llama-completion;
#   3. makes F16 and Q8_0 GGUFs of cap's test model (SmolLM2-135M-Instruct Q4_1) with
#      `llama-quantize --allow-requantize`. NOTE: they are requantized from the Q4_1 file, so their
#      weights equal the Q4_1 dequantization (token_embd is Q8_0 in the source file), not the
#      original bf16 checkpoint; only the storage format (and so the bytes read) differs;
#   4. runs `llama-bench -p 128 -n 64 -r 3 -t 1,2` on Q4_1, Q8_0 and F16, each after waiting
#      for the machine to be idle (1-minute load average below BENCH_MAX_LOAD), and prints
#      prefill (pp) / decode (tg) tokens/s plus the weight bytes streamed per decoded token.
#
# Everything is written under $CAP_LLAMACPP_DIR (default ~/.cache/cap/llamacpp); nothing is
# written into the repository. Results: $CAP_LLAMACPP_DIR/results/<timestamp>.{jsonl,md,txt}.
#
# Environment knobs:
#   BENCH_THREADS      llama-bench -t list          (default 1,2)
#   BENCH_ARGS         extra llama-bench arguments  (default "-p 128 -n 64 -r 3")
#   and those of scripts/llamacpp-common.sh (sourced): CAP_LLAMACPP_DIR, CAP_MODEL, CAP_PIP,
#   CAP_CMAKE, LLAMA_CPP_PYTHON_VERSION / LLAMA_CPP_PYTHON_SHA256, BENCH_MAX_LOAD, BENCH_WAIT_S, JOBS.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=bench-llamacpp
# shellcheck source=scripts/llamacpp-common.sh
. "$SCRIPT_DIR/llamacpp-common.sh"
THREADS="${BENCH_THREADS:-1,2}"
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:--p 128 -n 64 -r 3}"

llamacpp_init                                                          # cache dir, model
llamacpp_source                                                        # 1. source
llamacpp_build llama-bench llama-quantize llama-simple llama-completion  # 2. build
for q in F16 Q8_0; do llamacpp_requantize "$q" > /dev/null; done        # 3. F16 / Q8_0 copies

# --- 4. benchmark ---------------------------------------------------------------------------
mkdir -p "$CACHE/results"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
jsonl="$CACHE/results/$stamp.jsonl"
md="$CACHE/results/$stamp.md"
loads="$CACHE/results/$stamp.loads.txt"
: > "$jsonl"; : > "$md"; : > "$loads"
log "llama.cpp $COMMIT (llama-cpp-python $VER); results in $CACHE/results/$stamp.*"
for m in "$MODEL" "$CACHE/$NAME.Q8_0.gguf" "$CACHE/$NAME.F16.gguf"; do
  wait_idle
  before="$(cut -d' ' -f1-3 /proc/loadavg)"
  log "llama-bench $(basename "$m") -t $THREADS ${BENCH_EXTRA[*]} (load before: $before)"
  "$BIN/llama-bench" -m "$m" -t "$THREADS" "${BENCH_EXTRA[@]}" -o jsonl -oe md \
    >> "$jsonl" 2>> "$md"
  after="$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "$(basename "$m") load-before: $before load-after: $after" >> "$loads"
done

# Summary: tokens/s, and for decode the weight bytes streamed per token. llama-bench's
# model_size is the sum of all tensor bytes; SmolLM2 ties the output head to token_embd, so the
# whole embedding matrix is read for the logits every token and all tensors count (the row
# gather of the input embedding and the small KV cache are ignored).
python3 - "$jsonl" "$loads" > "$CACHE/results/$stamp.txt" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'model':34} {'tensor bytes':>12} {'thr':>3} {'test':>6} {'tok/s':>9} {'±':>6} {'GB/s weights':>12}")
for r in rows:
    test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    bw = f"{r['model_size'] * r['avg_ts'] / 1e9:12.2f}" if r["n_gen"] else f"{'':12}"
    print(f"{os.path.basename(r['model_filename']):34} {r['model_size']:12d} {r['n_threads']:3d} "
          f"{test:>6} {r['avg_ts']:9.2f} {r['stddev_ts']:6.2f} {bw}")
print()
print(open(sys.argv[2]).read().rstrip())
if rows:
    print(f"llama.cpp build: {rows[0].get('build_commit')} ({rows[0].get('build_number')}), "
          f"cpu: {rows[0].get('cpu_info')}")
PY
cat "$md" >&2
cat "$CACHE/results/$stamp.txt"
