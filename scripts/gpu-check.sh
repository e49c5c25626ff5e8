#!/usr/bin/env bash
# The CUDA checks that need a GPU, as one prepared run: every GPU test of
# kernels/tests/cuda.rs (each kernel against the scalar CPU kernel on awkward sizes)
# and of device/tests/gpu_model.rs (whole models, every encoding, float and Q8/Q4
# values, with their linears on the GPU against the CPU's logits), the kernel tests
# under compute-sanitizer's memcheck where it is installed, the matrix-vector
# benchmark with weights resident (examples/cuda_bench.rs: µs and GB/s per shape,
# encoding and value type, each result checked against the CPU first), `cap-device
# selftest --device cuda` on small compressed files (50% float, 50% Q4, 2:4, Gemma-3)
# against the perplexity the host stored in them, and `cap-device info` reporting the
# GPU. Writes one JSON summary.
#
#   bash scripts/gpu-check.sh                 # build and run here (needs cargo and a GPU)
#   bash scripts/gpu-check.sh prepare DIR     # build here, put everything a GPU machine
#                                             # needs into DIR (no cargo needed there)
#   bash scripts/gpu-check.sh run DIR [OUT]   # on the GPU machine: run what DIR holds,
#                                             # write OUT/gpu-check.json and the logs
#
# `prepare` packs the test binary, the benchmark, cap-device (all built with `cuda`),
# NVRTC 12.9 from scripts/fetch-nvrtc.sh (xz-packed, about 30 MB: cudarc dlopens
# libnvrtc.so.12, and a GPU machine with only CUDA 13's NVRTC would not serve sm_72)
# and a tiny `.cap` for `info`. Nothing here needs a CUDA toolkit at build time.
set -euo pipefail
cd "$(dirname "$0")/.."

# The path of test binary TEST of PACKAGE, built (release, feature cuda) and not run.
test_binary() {
  cargo test --release -p "$1" --features cuda --test "$2" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$2"
}

prepare() {
  local dir=$1
  mkdir -p "$dir"
  local test_bin model_bin
  test_bin=$(test_binary cap-kernels cuda)
  model_bin=$(test_binary cap-device gpu_model)
  cargo build --release -q -p cap-kernels --features cuda --example cuda_bench
  cargo build --release -q -p cap-device --features cuda --bin cap-device
  cargo build --release -q -p cap-host --bin cap-host
  cp "$test_bin" "$dir/cuda-tests"
  cp "$model_bin" "$dir/gpu-model-tests"
  cp target/release/examples/cuda_bench "$dir/cuda_bench"
  cp target/release/cap-device "$dir/cap-device"
  # cap-host makes the decode benchmark's model there (a random checkpoint, compressed
  # and packed on that machine: too large to carry).
  cp target/release/cap-host "$dir/cap-host"
  strip "$dir/cuda-tests" "$dir/gpu-model-tests" "$dir/cuda_bench" "$dir/cap-device" "$dir/cap-host"
  target/release/cap-host pack --model tests/fixtures/tiny/llama-tied -o "$dir/tiny.cap" >/dev/null
  # Small compressed files with a stored figure for `selftest --device cuda` (the test
  # models are too large to carry to a machine that cannot download).
  local h=target/release/cap-host c4=data/c4/c4_sample.json
  local common=(--calib "$c4" --eval-ctx 64 --eval-windows 4 --no-source-eval)
  local llama=tests/fixtures/tiny/llama-tied/llama-tied.gguf
  $h compress --model $llama -o "$dir/st-50.cap" --ratio 0.5 "${common[@]}" >/dev/null 2>&1
  $h compress --model $llama -o "$dir/st-50q4.cap" --ratio 0.5 --values q4 "${common[@]}" >/dev/null 2>&1
  $h compress --model $llama -o "$dir/st-24.cap" --pattern 2:4 "${common[@]}" >/dev/null 2>&1
  $h compress --model tests/fixtures/tiny/gemma3/gemma3.gguf -o "$dir/st-gemma50.cap" --ratio 0.5 \
    "${common[@]}" >/dev/null 2>&1
  local lib
  lib=$(bash scripts/fetch-nvrtc.sh)
  if [ ! -f "$dir/nvrtc.tar.xz" ]; then
    tar -C "$lib" -cf - libnvrtc.so.12 libnvrtc-builtins.so.12.9 | xz -6 -T0 >"$dir/nvrtc.tar.xz"
  fi
  du -sh "$dir"
}

run() {
  local dir=$1 out=${2:-$1}
  mkdir -p "$out"
  local lib=/tmp/cap-nvrtc
  mkdir -p "$lib"
  if [ -f "$dir/nvrtc.tar.xz" ]; then
    tar -C "$lib" -xJf "$dir/nvrtc.tar.xz"
    # cudarc asks the loader for libnvrtc.so before libnvrtc.so.12: without this link a
    # machine with CUDA 13 answers with its own NVRTC, which refuses sm_72 (seen on the
    # H200 machine, first run).
    ln -sf libnvrtc.so.12 "$lib/libnvrtc.so"
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
    >"$out/info.txt" 2>&1 || true
  local t0 rc_tests rc_bench rc_info rc_san=skipped
  t0=$(date +%s)
  # The GPU tests must run, not skip, and NVRTC must be there.
  set +e
  CAP_REQUIRE_GPU=1 CAP_REQUIRE_NVRTC=1 "$dir/cuda-tests" --test-threads=1 >"$out/tests.log" 2>&1
  rc_tests=$?
  CAP_REQUIRE_GPU=1 "$dir/gpu-model-tests" --test-threads=1 --nocapture >>"$out/tests.log" 2>&1
  rc_tests=$((rc_tests | $?))
  : >"$out/selftest.jsonl"
  local rc_st=0
  for f in "$dir"/st-*.cap; do
    "$dir/cap-device" selftest "$f" --device cuda --json >>"$out/selftest.jsonl" 2>&1
    rc_st=$((rc_st | $?))
  done
  # Greedy generation, CPU then GPU: the same tokens (their logits agree to ~1e-5).
  : >"$out/generate.jsonl"
  for d in cpu cuda; do
    "$dir/cap-device" generate "$dir/st-50q4.cap" --prompt "The capital of France is" -n 48 \
      --temp 0 --device $d --json >>"$out/generate.jsonl" 2>&1
    rc_st=$((rc_st | $?))
  done
  # Decode speed, CPU (all cores) against GPU, on a random LLaMA of CAP_DECODE_PARAMS
  # (default 200m) packed dense f16 and pruned to 50% (magnitude; bitmask, f16).
  if [ -x "$dir/cap-host" ]; then
    local m=/tmp/cap-decode-model p=${CAP_DECODE_PARAMS:-200m}
    rm -rf "$m" "$m".*.cap
    "$dir/cap-host" random-model --params "$p" -o "$m" >/dev/null 2>&1 &&
      "$dir/cap-host" pack --model "$m" -o "$m.f16.cap" --dtype f16 >/dev/null 2>&1 &&
      timeout 200 "$dir/cap-host" compress --model "$m" -o "$m.50.cap" --ratio 0.5 --method magnitude \
        --eval-ctx 64 --eval-windows 1 --no-source-eval >/dev/null 2>&1
    for f in "$m.f16.cap" "$m.50.cap"; do
      for d in cpu cuda; do
        [ -f "$f" ] && timeout 120 "$dir/cap-device" generate "$f" --prompt "The capital of France is" \
          -n 64 --temp 0 --device $d --json >>"$out/decode.jsonl" 2>&1
      done
    done
  fi
  "$dir/cuda_bench" "${CAP_BENCH_REPS:-200}" >"$out/bench.jsonl" 2>>"$out/tests.log"
  rc_bench=$?
  "$dir/cap-device" info "$dir/tiny.cap" >>"$out/info.txt" 2>&1
  rc_info=$?
  if command -v compute-sanitizer >/dev/null; then
    # memcheck: any out-of-bounds or misaligned access in a kernel is an error.
    timeout "${CAP_SANITIZER_TIMEOUT:-240}" compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$dir/cuda-tests" --test-threads=1 gpu_ >"$out/memcheck.log" 2>&1
    rc_san=$?
    timeout "${CAP_SANITIZER_TIMEOUT:-240}" compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$dir/gpu-model-tests" --test-threads=1 >>"$out/memcheck.log" 2>&1
    rc_san=$((rc_san | $?))
  fi
  set -e
  python3 - "$out" "$rc_tests" "$rc_bench" "$rc_info" "$rc_san" "$(($(date +%s) - t0))" "$rc_st" <<'EOF'
import json, re, sys
out, rc_tests, rc_bench, rc_info, rc_san, secs, rc_st = sys.argv[1:]
read = lambda f: open(f"{out}/{f}", errors="replace").read()
tests = read("tests.log")
m = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", tests)
st = []
for l in read("selftest.jsonl").splitlines():
    try:
        r = json.loads(l)
        st.append({k: r.get(k) for k in ("file", "ppl", "stored_ppl", "relative_difference", "pass", "decode_check_max_nll_diff", "decode_check_pass", "gpu")})
    except ValueError:
        st.append({"error": l})
gen = []
for l in read("generate.jsonl").splitlines():
    try:
        gen.append(json.loads(l))
    except ValueError:
        gen.append({"error": l})
dec = []
try:
    for l in read("decode.jsonl").splitlines():
        try:
            g = json.loads(l)
            dec.append({k: g.get(k) for k in ("file", "device", "file_bytes", "weight_bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s", "threads")})
        except ValueError:
            dec.append({"error": l})
except OSError:
    pass
summary = {
    "gpu": read("info.txt").splitlines()[0].strip(),
    "decode": dec,
    "generate": {
        "same_tokens": len(gen) == 2 and gen[0].get("tokens") is not None and gen[0].get("tokens") == gen[1].get("tokens"),
        "runs": [{k: g.get(k) for k in ("device", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "error")} for g in gen],
    },
    "selftest_cuda": {"rc": int(rc_st), "files": st},
    "tests": {"rc": int(rc_tests), "results": m,
              "skipped": tests.count("SKIPPED"),
              "failures": re.findall(r"^---- (\S+) stdout ----", tests, re.M)},
    "bench": {"rc": int(rc_bench),
              "cases": [json.loads(l) for l in read("bench.jsonl").splitlines() if l.startswith("{")]},
    "info_gpu_line": [l for l in read("info.txt").splitlines() if l.startswith("gpu:")],
    "info_rc": int(rc_info),
    "memcheck": rc_san if rc_san == "skipped" else {"rc": int(rc_san)},
    "seconds": int(secs),
}
json.dump(summary, open(f"{out}/gpu-check.json", "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=1))
for c in summary["bench"]["cases"]:
    print(f'{c["rows"]:>6}x{c["cols"]:<5} {c["encoding"]:<10} {c["dtype"]:<8} {c["us"]:>9.2f} us {c["gb_per_s"]:>8.1f} GB/s')
# Greedy tokens that differ between the CPU and the GPU fail the check.
sys.exit(0 if summary["generate"]["same_tokens"] else 1)
EOF
  [ "$rc_tests" = 0 ] && [ "$rc_bench" = 0 ] && [ "$rc_st" = 0 ]
}

case "${1:-all}" in
  prepare) prepare "${2:?usage: gpu-check.sh prepare DIR}" ;;
  run) run "${2:?usage: gpu-check.sh run DIR [OUT]}" "${3:-}" ;;
  all)
    d=$(mktemp -d)
    prepare "$d"
    run "$d" "${OUT:-$d}"
    ;;
  *)
    echo "usage: gpu-check.sh [prepare DIR | run DIR [OUT]]" >&2
    exit 2
    ;;
esac
