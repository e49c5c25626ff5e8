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
#   CAP_LLAMACPP_DIR   cache/work dir               (default ~/.cache/cap/llamacpp)
#   CAP_MODEL          the Q4_1 GGUF                (default: scripts/fetch-model.sh's output)
#   CAP_PIP            pip command for the download (default ~/.cache/cap/venv/bin/pip, else python3 -m pip)
#   LLAMA_CPP_PYTHON_VERSION / LLAMA_CPP_PYTHON_SHA256   pin of the sdist (default 0.3.36,
#                      which vendors ggml-org/llama.cpp@0c1e57098); set the SHA to "" to skip the check
#   BENCH_THREADS      llama-bench -t list          (default 1,2)
#   BENCH_ARGS         extra llama-bench arguments  (default "-p 128 -n 64 -r 3")
#   BENCH_MAX_LOAD     idle threshold               (default 0.7)
#   BENCH_WAIT_S       max seconds to wait for idle per model, then run anyway with a warning (default 900)
#   JOBS               build parallelism            (default nproc)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${CAP_LLAMACPP_DIR:-$HOME/.cache/cap/llamacpp}"
VER="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
SHA="${LLAMA_CPP_PYTHON_SHA256-832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e}"
THREADS="${BENCH_THREADS:-1,2}"
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:--p 128 -n 64 -r 3}"
MAX_LOAD="${BENCH_MAX_LOAD:-0.7}"
WAIT_S="${BENCH_WAIT_S:-900}"
JOBS="${JOBS:-$(nproc)}"

log() { echo "[bench-llamacpp] $*" >&2; }

# Refuse to work inside the repository (the cache must stay out of git).
repo_root="$(cd "$SCRIPT_DIR/.." && pwd)"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
case "$CACHE/" in
  "$repo_root"/*) echo "error: CAP_LLAMACPP_DIR ($CACHE) is inside the repository" >&2; exit 1 ;;
esac

# --- model --------------------------------------------------------------------------------
MODEL="${CAP_MODEL:-}"
if [ -z "$MODEL" ]; then
  MODEL="$("$SCRIPT_DIR/fetch-model.sh")"   # idempotent; writes only to ~/.cache/cap/model
fi
[ -f "$MODEL" ] || { echo "error: model $MODEL not found" >&2; exit 1; }
NAME="$(basename "$MODEL" .Q4_1.gguf)"

# --- 1. source ------------------------------------------------------------------------------
SDIST="llama_cpp_python-$VER.tar.gz"
SRC="$CACHE/llama_cpp_python-$VER/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  if [ ! -f "$CACHE/$SDIST" ]; then
    if [ -n "${CAP_PIP:-}" ]; then read -r -a PIP <<< "$CAP_PIP"
    elif [ -x "$HOME/.cache/cap/venv/bin/pip" ]; then PIP=("$HOME/.cache/cap/venv/bin/pip")
    else PIP=(python3 -m pip); fi
    tmp="$(mktemp -d "$CACHE/.dl.XXXXXX")"
    log "downloading llama-cpp-python==$VER sdist from PyPI"
    # --no-build-isolation would need scikit-build-core locally; isolation only builds metadata.
    "${PIP[@]}" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$tmp" >&2
    mv "$tmp/$SDIST" "$CACHE/$SDIST"
    rm -rf "$tmp"
  fi
  if [ -n "$SHA" ]; then
    echo "$SHA  $CACHE/$SDIST" | sha256sum -c --status \
      || { echo "error: $SDIST does not have the expected sha256" >&2; exit 1; }
  fi
  tmp="$(mktemp -d "$CACHE/.x.XXXXXX")"
  tar -xzf "$CACHE/$SDIST" -C "$tmp"
  rm -rf "$CACHE/llama_cpp_python-$VER"
  mv "$tmp/llama_cpp_python-$VER" "$CACHE/"
  rm -rf "$tmp"
fi
# The vendored commit, as llama-cpp-python's changelog names it (the sdist has no .git).
COMMIT="$(sed -n "/^## \[$VER\]/,/^## \[/p" "$CACHE/llama_cpp_python-$VER/CHANGELOG.md" \
          | grep -o 'llama.cpp@[0-9a-f]*' | head -n1 | cut -d@ -f2 || true)"
COMMIT="${COMMIT:-unknown}"

# --- 2. build -------------------------------------------------------------------------------
# $CACHE/src points at the vendored tree of the pinned version; $CACHE/build is rebuilt from
# scratch when it was configured for another version (recorded in $BUILD/.cap-source).
ln -sfn "llama_cpp_python-$VER/vendor/llama.cpp" "$CACHE/src"
BUILD="$CACHE/build"
BIN="$BUILD/bin"
if [ -f "$BUILD/CMakeCache.txt" ] && [ "$(cat "$BUILD/.cap-source" 2>/dev/null)" != "$SRC" ]; then
  log "build dir was configured for another source tree; starting over"
  rm -rf "$BUILD"
fi
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  log "configuring llama.cpp $COMMIT (CPU only, native)"
  # LLAMA_CURL is deprecated in recent versions (kept for older ones); llama-cli is only built
  # together with the server there, so llama-simple / llama-completion are built instead.
  cmake -S "$CACHE/src" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_COMMIT="$COMMIT" >&2
  echo "$SRC" > "$BUILD/.cap-source"
fi
targets=()
for t in llama-bench llama-quantize llama-simple llama-completion; do
  [ -x "$BIN/$t" ] || targets+=("$t")
done
if [ "${#targets[@]}" -gt 0 ]; then
  log "building ${targets[*]} with -j$JOBS (several minutes on 2 cores)"
  cmake --build "$BUILD" --config Release -j "$JOBS" --target "${targets[@]}" >&2
fi

# --- 3. F16 / Q8_0 copies -------------------------------------------------------------------
for q in F16 Q8_0; do
  out="$CACHE/$NAME.$q.gguf"
  if [ ! -f "$out" ]; then
    log "requantizing $(basename "$MODEL") -> $(basename "$out")"
    "$BIN/llama-quantize" --allow-requantize "$MODEL" "$out.tmp" "$q" > "$CACHE/quantize-$q.log" 2>&1 \
      || { cat "$CACHE/quantize-$q.log" >&2; rm -f "$out.tmp"; exit 1; }
    mv "$out.tmp" "$out"
  fi
done

# --- 4. benchmark ---------------------------------------------------------------------------
load1() { cut -d' ' -f1 /proc/loadavg; }
wait_idle() {
  local waited=0
  while awk -v l="$(load1)" -v m="$MAX_LOAD" 'BEGIN { exit !(l >= m) }'; do
    if [ "$waited" -ge "$WAIT_S" ]; then
      log "WARNING: load still $(load1) after ${WAIT_S}s; measuring anyway"
      return 0
    fi
    log "waiting for idle: 1-min load $(load1) >= $MAX_LOAD"
    sleep 20; waited=$((waited + 20))
  done
}

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
