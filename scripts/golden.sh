#!/usr/bin/env bash
# Writes a fixed set of .cap files with `pack` and `compress` (every method, ratio and
# byte budgets, tiny fixtures and SmolLM2 with short settings) under SOURCE_DATE_EPOCH
# and prints "sha256  name" for each: run it before and after a refactor of the
# writing path and diff the two lists (the files must be byte-identical).
#   usage: scripts/golden.sh OUTDIR [BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/golden.sh OUTDIR [BIN]}
BIN=${2:-target/release/cap-host}
export SOURCE_DATE_EPOCH=1700000000
mkdir -p "$OUT"
CACHE="$OUT/rpca-cache"
CALIB=data/c4/c4_sample.json
EVAL=data/wikitext-2-raw/wiki.valid.raw
T=tests/fixtures/tiny
for m in llama-tied/llama-tied.gguf llama3-scaled/llama3-scaled.gguf mistral qwen2 llama-tied-bf16-sharded; do
  n=$(echo "$m" | cut -d/ -f1)
  for dt in f16 f32 bf16; do
    "$BIN" pack --model "$T/$m" -o "$OUT/pack-$n-$dt.cap" --dtype "$dt" >/dev/null
  done
done
small=(--calib "$CALIB" --eval-text "$EVAL" --calib-samples 4 --calib-len 24 --eval-ctx 32 --eval-windows 2 --steps 3 --step-samples 2 --threads 2 --cache-dir "$CACHE")
for m in llama3-scaled/llama3-scaled.gguf qwen2; do
  n=$(echo "$m" | cut -d/ -f1)
  for meth in cap magnitude wanda svd sparsegpt admm; do
    for lim in "--ratio 0.5" "--ratio 0.3" "--budget 60000"; do
      tag=$(echo "$lim" | tr -d ' -')
      "$BIN" compress --model "$T/$m" -o "$OUT/c-$n-$meth-$tag.cap" --method "$meth" $lim "${small[@]}" >/dev/null 2>&1 \
        || echo "FAILED  c-$n-$meth-$tag" >> "$OUT/failed.txt"
    done
  done
  for alloc in reinforce threshold; do
    "$BIN" compress --model "$T/$m" -o "$OUT/c-$n-paper-$alloc.cap" --variant paper --allocation "$alloc" --ratio 0.5 "${small[@]}" >/dev/null 2>&1 \
      || echo "FAILED  c-$n-paper-$alloc" >> "$OUT/failed.txt"
  done
  "$BIN" compress --model "$T/$m" -o "$OUT/c-$n-cap-lr.cap" --lowrank-share 0.2 --ratio 0.5 "${small[@]}" >/dev/null 2>&1 \
    || echo "FAILED  c-$n-cap-lr" >> "$OUT/failed.txt"
  "$BIN" compress --model "$T/$m" -o "$OUT/c-$n-cap-bf16.cap" --dtype bf16 --ratio 0.5 "${small[@]}" >/dev/null 2>&1 \
    || echo "FAILED  c-$n-cap-bf16" >> "$OUT/failed.txt"
done
if [ -z "${GOLDEN_SKIP_SMOLLM2:-}" ]; then
  MODEL=$(bash scripts/fetch-model.sh)
  "$BIN" pack --model "$MODEL" -o "$OUT/pack-smollm2-f16.cap" >/dev/null
  mid=(--calib "$CALIB" --eval-text "$EVAL" --calib-samples 4 --calib-len 128 --eval-ctx 128 --eval-windows 1 --threads 2 --no-source-eval)
  for meth in wanda sparsegpt cap; do
    "$BIN" compress --model "$MODEL" -o "$OUT/c-smollm2-$meth.cap" --method "$meth" --ratio 0.5 "${mid[@]}" >/dev/null 2>&1 \
      || echo "FAILED  c-smollm2-$meth" >> "$OUT/failed.txt"
  done
  "$BIN" compress --model "$MODEL" -o "$OUT/c-smollm2-lr.cap" --lowrank-share 0.1 --ratio 0.6 "${mid[@]}" >/dev/null 2>&1 \
      || echo "FAILED  c-smollm2-lr" >> "$OUT/failed.txt"
fi
(cd "$OUT" && sha256sum ./*.cap | sed 's#\./##' | sort -k2; cat failed.txt 2>/dev/null || true)
