# Shared by scripts/bench-llamacpp.sh and scripts/bench-pareto.sh (sourced, not run): the
# cache directory, the test model, llama.cpp's source (vendored in PyPI's llama-cpp-python
# sdist), its CPU-only build, and waiting for an idle machine. Nothing is written into the
# repository; everything goes under $CACHE (default ~/.cache/cap/llamacpp).
#
# The sourcing script sets LOG_TAG and calls, in order:
#   llamacpp_init              CACHE, MODEL, NAME, VER, SHA, JOBS, MAX_LOAD, WAIT_S
#   llamacpp_source            SRC, COMMIT (downloads and unpacks the sdist once)
#   llamacpp_build TARGET...   BUILD, BIN (configures once, builds the missing targets)
#   llamacpp_requantize TYPE   prints the path of $CACHE/$NAME.TYPE.gguf (made once)
#   wait_idle                  returns when the 1-minute load is below MAX_LOAD (or after WAIT_S)
#
# Environment knobs:
#   CAP_LLAMACPP_DIR   cache/work dir               (default ~/.cache/cap/llamacpp)
#   CAP_MODEL          the Q4_1 GGUF                (default: scripts/fetch-model.sh's output)
#   CAP_PIP            pip command for the download (default ~/.cache/cap/venv/bin/pip, else python3 -m pip)
#   CAP_CMAKE          cmake command                (default: cmake on PATH, else PyPI's cmake
#                      installed once into $CACHE/tools)
#   LLAMA_CPP_PYTHON_VERSION / LLAMA_CPP_PYTHON_SHA256   pin of the sdist (default 0.3.36,
#                      which vendors ggml-org/llama.cpp@0c1e57098); set the SHA to "" to skip the check
#   BENCH_MAX_LOAD     idle threshold               (default 0.7)
#   BENCH_WAIT_S       max seconds to wait for idle per measurement, then run anyway with a
#                      warning (default 900)
#   JOBS               build parallelism            (default nproc)

LOG_TAG="${LOG_TAG:-llamacpp}"
log() { echo "[$LOG_TAG] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

_LLAMACPP_COMMON_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

llamacpp_init() {
  CACHE="${CAP_LLAMACPP_DIR:-$HOME/.cache/cap/llamacpp}"
  VER="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
  SHA="${LLAMA_CPP_PYTHON_SHA256-832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e}"
  MAX_LOAD="${BENCH_MAX_LOAD:-0.7}"
  WAIT_S="${BENCH_WAIT_S:-900}"
  JOBS="${JOBS:-$(nproc)}"
  # Refuse to work inside the repository (the cache must stay out of git).
  local repo_root
  repo_root="$(cd "$_LLAMACPP_COMMON_DIR/.." && pwd)"
  mkdir -p "$CACHE"
  CACHE="$(cd "$CACHE" && pwd)"
  case "$CACHE/" in
    "$repo_root"/*) die "CAP_LLAMACPP_DIR ($CACHE) is inside the repository" ;;
  esac
  MODEL="${CAP_MODEL:-}"
  if [ -z "$MODEL" ]; then
    MODEL="$("$_LLAMACPP_COMMON_DIR/fetch-model.sh")"   # idempotent; writes only to ~/.cache/cap/model
  fi
  [ -f "$MODEL" ] || die "model $MODEL not found"
  NAME="$(basename "$MODEL" .Q4_1.gguf)"
}

llamacpp_source() {
  local sdist="llama_cpp_python-$VER.tar.gz" tmp
  SRC="$CACHE/llama_cpp_python-$VER/vendor/llama.cpp"
  if [ ! -f "$SRC/CMakeLists.txt" ]; then
    if [ ! -f "$CACHE/$sdist" ]; then
      local -a pip
      if [ -n "${CAP_PIP:-}" ]; then read -r -a pip <<< "$CAP_PIP"
      elif [ -x "$HOME/.cache/cap/venv/bin/pip" ]; then pip=("$HOME/.cache/cap/venv/bin/pip")
      else pip=(python3 -m pip); fi
      tmp="$(mktemp -d "$CACHE/.dl.XXXXXX")"
      log "downloading llama-cpp-python==$VER sdist from PyPI"
      # pip prepares the sdist's metadata in an isolated env; only llama-cpp-python itself is
      # forced to source (`--no-binary :all:` would also build cmake and ninja from source).
      "${pip[@]}" download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VER" -d "$tmp" >&2 \
        || { rm -rf "$tmp"; die "pip could not download llama-cpp-python==$VER"; }
      mv "$tmp/$sdist" "$CACHE/$sdist"
      rm -rf "$tmp"
    fi
    if [ -n "$SHA" ]; then
      echo "$SHA  $CACHE/$sdist" | sha256sum -c --status \
        || die "$sdist does not have the expected sha256"
    fi
    tmp="$(mktemp -d "$CACHE/.x.XXXXXX")"
    tar -xzf "$CACHE/$sdist" -C "$tmp"
    rm -rf "$CACHE/llama_cpp_python-$VER"
    mv "$tmp/llama_cpp_python-$VER" "$CACHE/"
    rm -rf "$tmp"
  fi
  # The vendored commit, as llama-cpp-python's changelog names it (the sdist has no .git).
  COMMIT="$(sed -n "/^## \[$VER\]/,/^## \[/p" "$CACHE/llama_cpp_python-$VER/CHANGELOG.md" \
            | grep -o 'llama.cpp@[0-9a-f]*' | head -n1 | cut -d@ -f2 || true)"
  COMMIT="${COMMIT:-unknown}"
}

_llamacpp_cmake() {
  if [ -n "${CAP_CMAKE:-}" ]; then CMAKE="$CAP_CMAKE"
  elif command -v cmake > /dev/null; then CMAKE=cmake
  else
    CMAKE="$CACHE/tools/bin/cmake"
    if [ ! -x "$CMAKE" ]; then
      log "no cmake on PATH: installing PyPI's cmake into $CACHE/tools"
      python3 -m venv "$CACHE/tools" >&2 || die "python3 -m venv failed (needed for PyPI's cmake)"
      "$CACHE/tools/bin/pip" install --quiet cmake >&2 || die "pip could not install cmake"
    fi
  fi
}

# $CACHE/src points at the vendored tree of the pinned version; $CACHE/build is rebuilt from
# scratch when it was configured for another version or other flags (recorded in
# $BUILD/.cap-source).
#
# -march=native, but with AMX compiled out: ggml's AMX matmul (used when the compiler targets
# AMX) runs `ldtilecfg`, which dies with SIGILL on VMs whose CPU advertises AMX without the kernel
# enabling its register state (seen on a Firecracker VM of a Xeon with AMX). GCC applies -U after
# the -march=native predefines, so this holds whatever the flag order.
LLAMACPP_NO_AMX="-U__AMX_TILE__ -U__AMX_INT8__ -U__AMX_BF16__"
llamacpp_build() {
  ln -sfn "llama_cpp_python-$VER/vendor/llama.cpp" "$CACHE/src"
  BUILD="$CACHE/build"
  BIN="$BUILD/bin"
  local config="$SRC native no-amx"
  if [ -f "$BUILD/CMakeCache.txt" ] && [ "$(cat "$BUILD/.cap-source" 2>/dev/null)" != "$config" ]; then
    log "build dir was configured for another source tree or flags; starting over"
    rm -rf "$BUILD"
  fi
  local -a targets=()
  local t
  for t in "$@"; do
    [ -x "$BIN/$t" ] || targets+=("$t")
  done
  [ "${#targets[@]}" -gt 0 ] || return 0
  _llamacpp_cmake
  if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    log "configuring llama.cpp $COMMIT (CPU only, native, no AMX)"
    # LLAMA_CURL is deprecated in recent versions (kept for older ones); llama-cli is only built
    # together with the server there, so llama-simple / llama-completion are built instead.
    "$CMAKE" -S "$CACHE/src" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DCMAKE_C_FLAGS="$LLAMACPP_NO_AMX" -DCMAKE_CXX_FLAGS="$LLAMACPP_NO_AMX" \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_COMMIT="$COMMIT" >&2
    echo "$config" > "$BUILD/.cap-source"
  fi
  log "building ${targets[*]} with -j$JOBS (several minutes on 2 cores)"
  "$CMAKE" --build "$BUILD" --config Release -j "$JOBS" --target "${targets[@]}" >&2
}

# Prints the path of $CACHE/$NAME.$1.gguf, requantized from $MODEL once. The weights are the
# Q4_1 file's dequantization (token_embd is Q8_0 in the source file), not the original bf16
# checkpoint: every file starts from the same weights.
llamacpp_requantize() {
  local q="$1" out="$CACHE/$NAME.$1.gguf"
  if [ ! -f "$out" ]; then
    log "requantizing $(basename "$MODEL") -> $(basename "$out")"
    "$BIN/llama-quantize" --allow-requantize "$MODEL" "$out.tmp" "$q" > "$CACHE/quantize-$q.log" 2>&1 \
      || { cat "$CACHE/quantize-$q.log" >&2; rm -f "$out.tmp"; die "llama-quantize $q failed"; }
    mv "$out.tmp" "$out"
  fi
  echo "$out"
}

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
