#!/usr/bin/env bash
# Data-free calibration against text calibration: compresses SmolLM2 with cap's default
# method at each ratio calibrated three ways (data-free; the C4 sample; WikiText-2
# validation) and measures each file on held-out text it was not calibrated on
# (WikiText-2 validation for data-free and C4; the C4 sample for data-free and
# WikiText-2), standard protocol, ctx 2048, the first WINDOWS windows. Prints one JSON
# line per measurement into $OUT/results.jsonl and a table at the end.
#   usage: scripts/bench-calib.sh [RATIOS] [WINDOWS]
set -euo pipefail
cd "$(dirname "$0")/.."
RATIOS=${1:-"0.5 0.6"}
WINDOWS=${2:-8}
MODEL=${CAP_MODEL:-$(bash scripts/fetch-model.sh)}
OUT=${OUT:-/tmp/cap-bench-calib}
BIN=${BIN:-target/release/cap-host}
WIKI=data/wikitext-2-raw/wiki.valid.raw
C4=data/c4/c4_sample.json
mkdir -p "$OUT"
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p cap-host
# The C4 documents as plain text (joined by blank lines, as --calib reads them).
python3 -c 'import json,sys; print("\n\n".join(json.loads(l)["text"] for l in open(sys.argv[1]) if l.strip()), end="")' "$C4" > "$OUT/c4.txt"
: > "$OUT/results.jsonl"
ev() { # file text-name text-path calib ratio
  "$BIN" eval --model "$1" --text "$3" --ctx 2048 --max-windows "$WINDOWS" --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"file":sys.argv[1],"eval":sys.argv[2],"calib":sys.argv[3],"ratio":sys.argv[4],"ppl":r["ppl"],"windows":r["windows"],"tokens":r["tokens_scored"]}))' "$1" "$2" "$4" "$5" \
    | tee -a "$OUT/results.jsonl"
}
ev "$MODEL" wikitext2 "$WIKI" none 1.0
ev "$MODEL" c4 "$OUT/c4.txt" none 1.0
for r in $RATIOS; do
  for cal in datafree c4 wikitext2; do
    f="$OUT/smollm2-$cal-$r.cap"
    case $cal in
      datafree) args=() ;;
      c4) args=(--calib "$C4") ;;
      wikitext2) args=(--calib "$WIKI") ;;
    esac
    start=$(date +%s)
    "$BIN" compress --model "$MODEL" -o "$f" --ratio "$r" "${args[@]}" --no-source-eval --json > "$OUT/compress-$cal-$r.json"
    echo "{\"compress\":\"$cal\",\"ratio\":$r,\"seconds\":$(( $(date +%s) - start ))}" | tee -a "$OUT/results.jsonl"
    [ "$cal" = wikitext2 ] || ev "$f" wikitext2 "$WIKI" "$cal" "$r"
    [ "$cal" = c4 ] || ev "$f" c4 "$OUT/c4.txt" "$cal" "$r"
  done
done
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"ppl"' in l]
print("| ratio | calibration | PPL WikiText-2 | PPL C4 |")
print("|---|---|---:|---:|")
keys = sorted({(r["ratio"], r["calib"]) for r in rows})
for k in keys:
    cell = {r["eval"]: r["ppl"] for r in rows if (r["ratio"], r["calib"]) == k}
    f = lambda e: f'{cell[e]:.3f}' if e in cell else "(calibrated on it)"
    print(f"| {k[0]} | {k[1]} | {f('wikitext2')} | {f('c4')} |")
PY
