#!/usr/bin/env bash
# Decode and prefill speed of cap-device on .cap files, 1 and 2 threads, in one run so
# the files are compared on the same machine state. For each file and thread count:
# a 128-token prompt (prefill tokens/s), then 64 greedy tokens (decode tokens/s), best
# of REPS runs; with the weight bytes each decoded token reads and the GB/s that makes.
#
#   scripts/bench-device.sh FILE.cap [FILE.cap ...]
#
# Environment: REPS (default 3), THREADS (default "1 2"), CAP_DEVICE (the binary;
# default: built here in release mode).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -ge 1 ] || { echo "usage: $0 FILE.cap [FILE.cap ...]" >&2; exit 2; }
REPS="${REPS:-3}"
THREADS="${THREADS:-1 2}"
if [ -z "${CAP_DEVICE:-}" ]; then
  cargo build --release -q -p cap-device
  CAP_DEVICE=target/release/cap-device
fi
# About 128 tokens of ordinary English for the prefill.
PROMPT=$(printf 'The small board in the workshop ran the model from flash memory, and every byte of the weights had been counted twice before it was written. %.0s' 1 2 3 4 5)

printf '%-28s %7s %12s %12s %14s %10s\n' file threads prefill_t/s decode_t/s bytes/token GB/s
for f in "$@"; do
  for t in $THREADS; do
    best_p=0; best_d=0; bpt=0
    for _ in $(seq "$REPS"); do
      j=$("$CAP_DEVICE" generate "$f" --prompt "$PROMPT" -n 64 --temp 0 --threads "$t" --ctx 512 --json)
      read -r p d b < <(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["prefill_tokens_per_s"], j["decode_tokens_per_s"], j["weight_bytes_per_token"])' "$j")
      best_p=$(python3 -c "print(max($best_p, $p))")
      best_d=$(python3 -c "print(max($best_d, $d))")
      bpt=$b
    done
    gbs=$(python3 -c "print(f'{$best_d * $bpt / 1e9:.2f}')")
    printf '%-28s %7s %12.1f %12.1f %14s %10s\n' "$(basename "$f")" "$t" "$best_p" "$best_d" "$bpt" "$gbs"
  done
done
