#!/usr/bin/env bash
# Compresses SmolLM2-135M-Instruct with every method at several paper ratios and
# measures each file on WikiText-2 validation (raw file as-is, standard protocol);
# calibration on the C4 sample. One JSON line per run in $OUT/results.jsonl, then a
# Markdown table on stdout.
#
#   bash scripts/bench-compress.sh [RATIOS] [EVAL_CTX] [EVAL_WINDOWS]
#   defaults: "0.5 0.6 0.7" 2048 8
#
# CAP_MODEL=PATH compresses another model (e.g. one `scripts/fetch-model.sh NAME`
# fetched); METHODS="wanda sparsegpt cap" limits the methods (default: all seven).
# CAP_BIN=PATH runs that cap-host binary instead of building target/release (so a long
# run is not disturbed by rebuilds of the checkout).
#
# The paper's variant reuses stage 1's cache (~/.cache/cap/rpca/...); its first run
# computes it. The whole table takes about an hour on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RATIOS=${1:-"0.5 0.6 0.7"}
CTX=${2:-2048}
WINDOWS=${3:-8}
MODEL=${CAP_MODEL:-$HOME/.cache/cap/model/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-/tmp/cap-bench-compress}
WIKI=data/wikitext-2-raw/wiki.valid.raw
C4=data/c4/c4_sample.json
mkdir -p "$OUT"
if [ -n "${CAP_BIN:-}" ]; then
  BIN=$CAP_BIN
else
  cargo build --release -q -p cap-host
  BIN=target/release/cap-host
fi
: > "$OUT/results.jsonl"
dense=$($BIN eval --model "$MODEL" --text "$WIKI" --ctx "$CTX" --max-windows "$WINDOWS" --json)
echo "{\"method\":\"dense\",\"ratio\":1,\"ppl\":$(echo "$dense" | python3 -c 'import json,sys;print(json.load(sys.stdin)["ppl"])'),\"file_bytes\":null,\"seconds\":null}" >> "$OUT/results.jsonl"
for r in $RATIOS; do
  if [ -n "${METHODS:-}" ]; then
    read -r -a methods <<< "$METHODS"
  else
    methods=("magnitude" "wanda" "svd" "sparsegpt" "cap" "cap --variant paper --allocation threshold" "cap --variant paper --allocation reinforce")
  fi
  for m in "${methods[@]}"; do
    name=$(echo "$m" | sed 's/ --variant paper --allocation /-paper-/')
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    $BIN compress --model "$MODEL" -o "$OUT/$name-$r.cap" --ratio "$r" --method $m \
      --calib "$C4" --eval-text "$WIKI" --eval-ctx "$CTX" --eval-windows "$WINDOWS" \
      --no-source-eval --json > "$OUT/$name-$r.json"
    end=$(date +%s.%N)
    python3 - "$OUT/$name-$r.json" "$name" "$r" "$start" "$end" >> "$OUT/results.jsonl" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
print(json.dumps({"method": sys.argv[2], "ratio": float(sys.argv[3]), "ppl": rep["eval"]["ppl"],
                  "file_bytes": rep["file_bytes"], "linear_bytes": rep["linear_bytes"],
                  "param_ratio": rep["param_ratio"], "seconds": float(sys.argv[5]) - float(sys.argv[4]),
                  "stages": rep["seconds"]}))
PY
    tail -1 "$OUT/results.jsonl"
  done
done
python3 - "$OUT/results.jsonl" "$CTX" "$WINDOWS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n| method | ratio | PPL (WikiText-2 valid, ctx {sys.argv[2]}, first {sys.argv[3]} windows) | file bytes | wall s |")
print("|---|---:|---:|---:|---:|")
for r in rows:
    fb = f"{r['file_bytes']:,}" if r["file_bytes"] else "—"
    s = f"{r['seconds']:.0f}" if r["seconds"] else "—"
    print(f"| {r['method']} | {r['ratio']} | {r['ppl']:.2f} | {fb} | {s} |")
PY
