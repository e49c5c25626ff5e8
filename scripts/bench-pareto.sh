#!/usr/bin/env bash
# A Pareto table of file bytes vs perplexity vs decode tokens/s: llama.cpp's k-quants against
# cap files written to the same byte budgets, on the same machine, model and text, by the same
# perplexity rule (llama.cpp's: ctx 512, second half of each window scored).
#
#   scripts/bench-pareto.sh
#
# What it does (every step is skipped when its result is already in the cache, so a rerun
# measures only what is missing; see PARETO_FRESH):
#   1. builds llama.cpp CPU-only outside the repository (scripts/llamacpp-common.sh, shared with
#      scripts/bench-llamacpp.sh): llama-quantize, llama-perplexity, llama-bench;
#   2. makes Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M and Q2_K GGUFs of the test model with
#      `llama-quantize --allow-requantize` from its Q4_1 file (kept as a row of its own), so
#      every file starts from the same weights;
#   3. llama.cpp rows: `llama-perplexity -c 512 -f TEXT --chunks K` and
#      `llama-bench -p 0 -n 64 -r 3 -t 1,2` (decode tokens/s, mean ± sd of 3), each after
#      waiting for an idle machine;
#   4. cap rows: for each llama.cpp file's bytes B, `cap-host compress --model Q4_1.gguf
#      --budget B $CAP_ARGS -o cap-B.cap` (a budget compress cannot meet exits non-zero and is
#      recorded as "does not fit", with compress's message), then `cap-host eval --protocol
#      llama-cpp --ctx 512 --max-windows K` on the written file and `cap-device generate -n 64
#      --temp 0` with 1 and 2 threads (one untimed warm-up, then mean ± sd of 3 decode
#      tokens/s); plus `cap-host eval` of the source Q4_1 GGUF itself, which checks that both
#      sides score the same windows the same way (no speed: cap-device runs .cap files only);
#   5. prints a markdown table (rows by file bytes) and writes it with one JSON line per row
#      to $CACHE/pareto/results/<timestamp>.{md,jsonl}.
#
# The source file is itself Q4_1: above its bytes every format here is a near-lossless copy of
# the same weights, so the contest is at and below the Q4_1 file's bytes (the table says so).
#
# Rerunning the cap half against newer binaries (llama.cpp rows come from the cache):
#   CAP_HOST=/path/cap-host CAP_DEVICE=/path/cap-device scripts/bench-pareto.sh
# cap rows are cached by (sha256 of both binaries, CAP_ARGS, budget, K, text), so new
# binaries or arguments are measured again and unchanged ones are not.
#
# Environment knobs:
#   CAP_HOST / CAP_DEVICE   binaries (default: `cargo build --release` of this checkout, into
#                           $CARGO_TARGET_DIR or ./target)
#   CAP_ARGS           extra `cap-host compress` arguments (default "--values auto --no-source-eval";
#                      the README's Q3_K_M/Q2_K rows add --embed-values q4)
#   PARETO_FORMATS     llama.cpp types             (default "Q8_0 Q6_K Q5_K_M Q4_K_M Q3_K_M Q2_K";
#                      the source Q4_1 is always a row)
#   PARETO_CAP_FORMATS whose bytes cap is compressed to (default: PARETO_FORMATS and Q4_1)
#   PARETO_SIDES       "llama cap" (default), "llama" or "cap"
#   PARETO_CHUNKS      windows of 512 tokens scored on both sides (default 32; 0 = the whole text)
#   PARETO_TEXT        the text (default data/wikitext-2-raw/wiki.valid.raw)
#   PARETO_PPL_THREADS threads for the perplexity runs (default nproc)
#   PARETO_FRESH       1: measure llama.cpp rows again too, and cap rows even when cached
#   PARETO_COMPRESS_ONLY  1: only write the cap files (cached for a later run), measure nothing
#   PARETO_SPEED       0: perplexity only, no decode runs (rows without speeds are measured
#                      again by a later run with the default 1)
#   BENCH_THREADS      decode thread counts        (default 1,2)
#   and those of scripts/llamacpp-common.sh: CAP_LLAMACPP_DIR (the cache, default
#   ~/.cache/cap/llamacpp), CAP_MODEL, CAP_PIP, CAP_CMAKE, LLAMA_CPP_PYTHON_VERSION/_SHA256,
#   BENCH_MAX_LOAD, BENCH_WAIT_S, JOBS.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG=bench-pareto
# shellcheck source=scripts/llamacpp-common.sh
. "$SCRIPT_DIR/llamacpp-common.sh"

FORMATS="${PARETO_FORMATS:-Q8_0 Q6_K Q5_K_M Q4_K_M Q3_K_M Q2_K}"
CAP_FORMATS="${PARETO_CAP_FORMATS:-$FORMATS Q4_1}"
SIDES="${PARETO_SIDES:-llama cap}"
CHUNKS="${PARETO_CHUNKS:-32}"
TEXT="${PARETO_TEXT:-$REPO/data/wikitext-2-raw/wiki.valid.raw}"
PPL_THREADS="${PARETO_PPL_THREADS:-$(nproc)}"
FRESH="${PARETO_FRESH:-0}"
COMPRESS_ONLY="${PARETO_COMPRESS_ONLY:-0}"
SPEED="${PARETO_SPEED:-1}"
THREADS="${BENCH_THREADS:-1,2}"
CAP_ARGS="${CAP_ARGS---values auto --no-source-eval}"
read -r -a CAP_EXTRA <<< "$CAP_ARGS"
CTX=512
GEN=64
REPS=3
# A short prompt, so decode runs near an empty context as llama-bench's tg64 does.
PROMPT="The small board in the workshop ran the model from flash memory, and"

case "$CHUNKS" in ''|*[!0-9]*) die "PARETO_CHUNKS must be a whole number (0 = the whole text)" ;; esac
[ -f "$TEXT" ] || die "text $TEXT not found (PARETO_TEXT)"
TEXT="$(cd "$(dirname "$TEXT")" && pwd)/$(basename "$TEXT")"
TEXT_SHA="$(sha256sum < "$TEXT" | cut -c1-64)"   # cache keys use the text's hash, not its path
for s in $SIDES; do
  case "$s" in llama|cap) ;; *) die "PARETO_SIDES: unknown side '$s' (llama, cap)" ;; esac
done
has_side() { case " $SIDES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

llamacpp_init
llamacpp_source
P="$CACHE/pareto"
mkdir -p "$P/rows" "$P/logs" "$P/results"

# --- the GGUFs (needed by both sides: cap's budgets are their sizes) -------------------------
need=()
has_side llama && need=(llama-perplexity llama-bench)
for q in $FORMATS; do
  if [ "$q" != Q4_1 ] && [ ! -f "$CACHE/$NAME.$q.gguf" ]; then need+=(llama-quantize); break; fi
done
# BIN is set even when nothing needs building (a cap-only rerun with every GGUF made).
llamacpp_build "${need[@]}"
declare -A GGUF
GGUF[Q4_1]="$MODEL"
for q in $FORMATS; do
  [ "$q" = Q4_1 ] && continue
  GGUF[$q]="$(llamacpp_requantize "$q")"
done
fsize() { stat -L -c %s "$1"; }

# One JSON object per measured row, under $P/rows; rows.py merges them into the table.
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# --- llama.cpp rows ---------------------------------------------------------------------------
llama_row() {
  local q="$1" f="${GGUF[$1]}" row="$P/rows/llama-$1.json"
  if [ -f "$row" ] && [ "$FRESH" != 1 ] \
     && python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(r["chunks_asked"]!=int(sys.argv[2]) or r.get("text_sha256")!=sys.argv[3] or r["commit"]!=sys.argv[4] or (sys.argv[5]=="1" and not r["decode"]))' \
          "$row" "$CHUNKS" "$TEXT_SHA" "$COMMIT" "$SPEED" 2>/dev/null; then
    log "llama.cpp $q: cached ($row)"
    return 0
  fi
  local -a chunk_arg=()
  [ "$CHUNKS" -gt 0 ] && chunk_arg=(--chunks "$CHUNKS")
  local pl="$P/logs/llama-ppl-$q.log" bl="$P/logs/llama-bench-$q.jsonl" t0 t1 lb_ppl lb_bench
  wait_idle; lb_ppl="$(loadavg)"; t0=$SECONDS
  log "llama-perplexity $q: -c $CTX ${chunk_arg[*]} -t $PPL_THREADS (load $lb_ppl)"
  "$BIN/llama-perplexity" -m "$f" -f "$TEXT" -c "$CTX" "${chunk_arg[@]}" -t "$PPL_THREADS" > "$pl" 2>&1 \
    || { tail -n 20 "$pl" >&2; die "llama-perplexity failed on $f (log: $pl)"; }
  t1=$((SECONDS - t0))
  lb_bench=""
  : > "$bl"
  if [ "$SPEED" = 1 ]; then
    wait_idle; lb_bench="$(loadavg)"
    log "llama-bench $q: -p 0 -n $GEN -r $REPS -t $THREADS (load $lb_bench)"
    "$BIN/llama-bench" -m "$f" -p 0 -n "$GEN" -r "$REPS" -t "$THREADS" -o jsonl > "$bl" 2> "$bl.err" \
      || { tail -n 20 "$bl.err" >&2; die "llama-bench failed on $f"; }
  fi
  python3 - "$q" "$f" "$pl" "$bl" "$CHUNKS" "$TEXT" "$TEXT_SHA" "$COMMIT" "$t1" "$lb_ppl" "$lb_bench" "$(now)" \
      > "$row.tmp" <<'PY'
import json, re, sys
q, f, pl, bl, chunks, text, text_sha, commit, secs, lb_ppl, lb_bench, when = sys.argv[1:]
log = open(pl, errors="replace").read()
m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
if not m:
    sys.exit(f"no 'Final estimate' in {pl}")
n = re.search(r"calculating perplexity over (\d+) chunks", log)
tok = re.search(r"tokenization took .*?\n", log)
bench = [json.loads(l) for l in open(bl) if l.strip()]
tg = {r["n_threads"]: r for r in bench if r["n_gen"]}
print(json.dumps({
    "side": "llama.cpp", "format": q, "file": f, "commit": commit,
    "ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)),
    "windows": int(n.group(1)) if n else None, "chunks_asked": int(chunks), "text": text,
    "text_sha256": text_sha,
    "ppl_seconds": int(secs),
    "decode": {str(t): {"mean": r["avg_ts"], "sd": r["stddev_ts"]} for t, r in sorted(tg.items())},
    "load_before_ppl": lb_ppl, "load_before_bench": lb_bench, "measured": when,
}))
PY
  mv "$row.tmp" "$row"
}

# --- cap rows ---------------------------------------------------------------------------------
cap_binaries() {
  if [ -z "${CAP_HOST:-}" ] || [ -z "${CAP_DEVICE:-}" ]; then
    local target="${CARGO_TARGET_DIR:-$REPO/target}"
    log "building cap-host and cap-device (release) into $target"
    (cd "$REPO" && CARGO_TARGET_DIR="$target" cargo build --release -q -p cap-host -p cap-device) >&2 \
      || die "cargo build failed (or give CAP_HOST and CAP_DEVICE)"
    CAP_HOST="${CAP_HOST:-$target/release/cap-host}"
    CAP_DEVICE="${CAP_DEVICE:-$target/release/cap-device}"
  fi
  [ -x "$CAP_HOST" ] || die "CAP_HOST $CAP_HOST is not an executable"
  [ -x "$CAP_DEVICE" ] || die "CAP_DEVICE $CAP_DEVICE is not an executable"
  CAP_BIN_KEY="$(cat "$CAP_HOST" "$CAP_DEVICE" | sha256sum | cut -c1-16)"
}

# Row key: what the measurement depends on besides the machine state.
cap_key() { printf '%s|%s|%s|%s|%s|%s|%s' "$CAP_BIN_KEY" "$CAP_ARGS" "$1" "$CHUNKS" "$TEXT_SHA" "$MODEL" "$SPEED" | sha256sum | cut -c1-16; }
cached() {  # cached ROW KEY
  [ "$FRESH" != 1 ] && [ -f "$1" ] \
    && python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1])).get("key")!=sys.argv[2])' "$1" "$2" 2>/dev/null
}

cap_eval() {  # cap_eval MODEL LOG -> JSON on stdout (and in LOG's .json, window NLLs included)
  local -a win=()
  [ "$CHUNKS" -gt 0 ] && win=(--max-windows "$CHUNKS")
  "$CAP_HOST" eval --model "$1" --text "$TEXT" --protocol llama-cpp --ctx "$CTX" "${win[@]}" \
    --threads "$PPL_THREADS" --json 2> "$2" | tee "${2%.log}.json"
}

# cap-host eval of the source GGUF: the same weights as llama.cpp's Q4_1 row, so the two
# perplexities should agree (a check of the shared rule, window for window).
cap_source_row() {
  local row="$P/rows/cap-source-Q4_1.json" key t0 j
  key="$(cap_key source)"
  if cached "$row" "$key"; then log "cap eval of the source: cached"; return 0; fi
  wait_idle; t0=$SECONDS
  log "cap-host eval of the source Q4_1 GGUF"
  j="$(cap_eval "$MODEL" "$P/logs/cap-eval-source.log")" \
    || { tail -n 5 "$P/logs/cap-eval-source.log" >&2; die "cap-host eval failed on $MODEL"; }
  python3 - "$j" "$key" "$MODEL" "$((SECONDS - t0))" "$(now)" "$CAP_HOST" > "$row.tmp" <<'PY'
import json, sys
j, key, f, secs, when, host = sys.argv[1:]
e = json.loads(j)
print(json.dumps({"side": "cap", "format": "source Q4_1 (cap-host eval of the GGUF)", "file": f,
                  "key": key, "binary": host, "ppl": e["ppl"], "ppl_stderr": e.get("ppl_stderr"),
                  "windows": e.get("windows"), "text_tokens": e.get("text_tokens"),
                  "ppl_seconds": int(secs), "decode": {}, "measured": when}))
PY
  mv "$row.tmp" "$row"
}

cap_row() {
  local q="$1" budget row key out clog t0 tc te j msg rc
  budget="$(fsize "${GGUF[$q]}")"
  row="$P/rows/cap-$budget.json"
  key="$(cap_key "$budget")"
  if cached "$row" "$key"; then log "cap at $q's bytes ($budget): cached"; return 0; fi
  out="$P/cap-$budget.cap"
  clog="$P/logs/cap-compress-$budget.log"
  # The written file (or compress's refusal) is cached by its own key, so COMPRESS_ONLY can
  # write the files while something else runs and a later run measures them.
  local ckey
  ckey="$(printf '%s|%s|%s|%s' "$(sha256sum < "$CAP_HOST" | cut -c1-16)" "$CAP_ARGS" "$budget" "$MODEL" | sha256sum | cut -c1-16)"
  if [ "$FRESH" != 1 ] && [ "$(cat "$out.key" 2>/dev/null)" = "$ckey" ]; then
    log "cap-host compress --budget $budget: cached ($(head -n1 "$out.status"))"
    rc="$(head -n1 "$out.status")"; tc="$(sed -n 2p "$out.status")"
  else
    rm -f "$out.key"
    log "cap-host compress --budget $budget ($q's bytes) ${CAP_EXTRA[*]}"
    t0=$SECONDS
    rc=0
    rm -f "$out"   # compress writes atomically: after a refusal there is no file
    "$CAP_HOST" compress --model "$MODEL" --budget "$budget" "${CAP_EXTRA[@]}" -o "$out" \
      > "$clog" 2>&1 || rc=$?
    tc=$((SECONDS - t0))
    printf '%s\n%s\n' "$rc" "$tc" > "$out.status"
    echo "$ckey" > "$out.key"
  fi
  [ "$COMPRESS_ONLY" = 1 ] && return 0
  if [ "$rc" -ne 0 ]; then
    msg="$(grep -v '^\s*$' "$clog" | tail -n 1)"
    log "compress at $budget exited $rc: $msg"
    python3 - "$q" "$budget" "$key" "$rc" "$msg" "$tc" "$(now)" "$CAP_ARGS" "$CAP_HOST" > "$row.tmp" <<'PY'
import json, sys
q, b, key, rc, msg, secs, when, args, host = sys.argv[1:]
print(json.dumps({"side": "cap", "format": f"cap @ {q} bytes", "budget_of": q, "budget": int(b),
                  "key": key, "fits": False, "exit": int(rc), "message": msg, "cap_args": args,
                  "binary": host, "compress_seconds": int(secs), "measured": when}))
PY
    mv "$row.tmp" "$row"
    return 0
  fi
  wait_idle; t0=$SECONDS
  log "cap-host eval --protocol llama-cpp on $(basename "$out")"
  j="$(cap_eval "$out" "$P/logs/cap-eval-$budget.log")" \
    || { tail -n 5 "$P/logs/cap-eval-$budget.log" >&2; die "cap-host eval failed on $out"; }
  te=$((SECONDS - t0))
  "$CAP_HOST" inspect "$out" --json > "$P/logs/cap-inspect-$budget.json" \
    || die "cap-host inspect failed on $out"
  local gl="$P/logs/cap-generate-$budget.jsonl" t lb
  : > "$gl"
  lb=""
  [ "$SPEED" = 1 ] && { wait_idle; lb="$(loadavg)"; }
  for t in ${THREADS//,/ }; do
    [ "$SPEED" = 1 ] || break
    log "cap-device generate -n $GEN --threads $t on $(basename "$out") (1 warm-up + $REPS)"
    for i in $(seq 0 "$REPS"); do
      "$CAP_DEVICE" generate "$out" --prompt "$PROMPT" -n "$GEN" --temp 0 --threads "$t" \
        --ctx "$CTX" --json > "$gl.one" || die "cap-device generate failed on $out"
      if [ "$i" -gt 0 ]; then cat "$gl.one" >> "$gl"; fi
    done
  done
  rm -f "$gl.one"
  python3 - "$q" "$budget" "$key" "$out" "$j" "$P/logs/cap-inspect-$budget.json" "$gl" "$tc" "$te" \
      "$lb" "$(now)" "$CAP_ARGS" "$CAP_HOST" > "$row.tmp" <<'PY'
import json, statistics, sys
q, b, key, f, j, insp, gl, tc, te, lb, when, args, host = sys.argv[1:]
e = json.loads(j)
r = json.load(open(insp))
lin = [t for t in r["tensors"] if t.get("group") in ("attention", "mlp") and t["rows"] > 1 and t["cols"] > 1]
lin_bytes = sum(t["bytes"] for t in lin)
lin_params = sum(t["rows"] * t["cols"] for t in lin)
encs = {}
for t in lin:
    encs[t["encoding"]] = encs.get(t["encoding"], 0) + 1
gens = [json.loads(l) for l in open(gl) if l.strip()]
dec = {}
for g in gens:
    dec.setdefault(str(g["threads"]), []).append(g)
short = [g["generated_tokens"] for g in gens if g["generated_tokens"] < 64]
print(json.dumps({
    "side": "cap", "format": f"cap @ {q} bytes", "budget_of": q, "budget": int(b), "key": key,
    "fits": True, "file": f, "file_bytes": r["file_bytes"], "cap_args": args, "binary": host,
    "linear_bytes": lin_bytes, "linear_params": lin_params,
    "linear_bpw": 8 * lin_bytes / lin_params if lin_params else None, "linear_encodings": encs,
    "ppl": e["ppl"], "ppl_stderr": e.get("ppl_stderr"), "windows": e.get("windows"),
    "text_tokens": e.get("text_tokens"),
    "decode": {t: {"mean": statistics.mean(x["decode_tokens_per_s"] for x in v),
                   "sd": statistics.stdev(x["decode_tokens_per_s"] for x in v) if len(v) > 1 else 0.0,
                   "decoded_tokens": [x["decoded_tokens"] for x in v]}
               for t, v in sorted(dec.items())},
    "short_generations": short, "kernels": gens[0].get("kernels") if gens else None,
    "compress_seconds": int(tc), "ppl_seconds": int(te), "load_before_bench": lb, "measured": when,
}))
PY
  mv "$row.tmp" "$row"
}

# --- run --------------------------------------------------------------------------------------
if has_side llama; then
  llama_row Q4_1
  for q in $FORMATS; do [ "$q" = Q4_1 ] || llama_row "$q"; done
fi
if has_side cap; then
  cap_binaries
  [ "$COMPRESS_ONLY" = 1 ] || cap_source_row
  for q in $CAP_FORMATS; do
    [ -n "${GGUF[$q]:-}" ] || die "PARETO_CAP_FORMATS: $q is not among PARETO_FORMATS (or Q4_1)"
    cap_row "$q"
  done
fi

# --- table ------------------------------------------------------------------------------------
[ "$COMPRESS_ONLY" = 1 ] && { log "cap files written (PARETO_COMPRESS_ONLY=1); nothing measured"; exit 0; }
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
files=()
for q in Q4_1 $FORMATS; do
  [ -f "$P/rows/llama-$q.json" ] && files+=("$P/rows/llama-$q.json")
done
if has_side cap; then
  files+=("$P/rows/cap-source-Q4_1.json")
  for q in $CAP_FORMATS; do
    f="$P/rows/cap-$(fsize "${GGUF[$q]}").json"
    [ -f "$f" ] && files+=("$f")
  done
else
  for f in "$P"/rows/cap-*.json; do [ -f "$f" ] && files+=("$f"); done
fi
[ "${#files[@]}" -gt 0 ] || die "no rows measured"
python3 "$SCRIPT_DIR/pareto_table.py" "$MODEL" "$P/results/$stamp.jsonl" "${files[@]}" \
  > "$P/results/$stamp.md"
cat "$P/results/$stamp.md"
log "results: $P/results/$stamp.md and .jsonl"
