#!/usr/bin/env bash
# Eval throughput of cap against PyTorch (transformers) on the same machine, model,
# text, protocol, window length and thread count, in one run. Prints both JSON lines
# and the ratio. Needs the reference venv (see scripts/reference/README.md).
#   usage: scripts/bench-eval.sh [CTX] [THREADS] [WINDOWS]
set -euo pipefail
cd "$(dirname "$0")/.."
CTX="${1:-512}"; THREADS="${2:-2}"; WINDOWS="${3:-8}"
PY="${CAP_REF_PYTHON:-$HOME/.cache/cap/venv/bin/python}"
MODEL="$(bash scripts/fetch-model.sh)"
TEXT="data/wikitext-2-raw/wiki.valid.raw"

cargo build --release -q -p cap-host
cap=$(./target/release/cap-host eval --model "$MODEL" --text "$TEXT" --ctx "$CTX" \
  --max-windows "$WINDOWS" --threads "$THREADS" --json)
torch=$("$PY" scripts/reference/bench_torch_eval.py --ctx "$CTX" --threads "$THREADS" --max-windows "$WINDOWS")
echo "cap:     $cap" | cut -c1-400
echo "pytorch: $torch"
python3 - "$cap" "$torch" <<'PY'
import json, sys
cap, torch = json.loads(sys.argv[1]), json.loads(sys.argv[2].strip().splitlines()[-1])
print(f"ctx {cap['ctx']} threads {cap['threads']}: cap {cap['tokens_per_s']:.1f} tok/s, "
      f"pytorch {torch['tokens_per_s']:.1f} tok/s, ratio cap/pytorch = {cap['tokens_per_s']/torch['tokens_per_s']:.2f}")
PY
