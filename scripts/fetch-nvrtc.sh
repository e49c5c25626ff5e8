#!/usr/bin/env bash
# Installs NVIDIA's NVRTC (the CUDA C → PTX compiler library, no GPU or driver needed)
# from the PyPI wheel nvidia-cuda-nvrtc-cu12 into a venv outside the repository, and
# prints the folder holding libnvrtc.so.12 (for LD_LIBRARY_PATH). Idempotent: a second
# run only checks that the library is there. Used by .ci/run for the CUDA compile test
# (`cargo test -p cap-kernels --features cuda`).
#
#   export LD_LIBRARY_PATH="$(bash scripts/fetch-nvrtc.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
#
# Needs python3 with venv (Debian: python3-venv). CAP_NVRTC_VENV overrides the venv
# (default: ~/.cache/cap/nvrtc-venv). The version is pinned to CUDA 12.9, the version
# cudarc is built against (feature cuda-12090); CUDA 13's NVRTC no longer targets sm_72
# (Jetson Xavier).
set -euo pipefail

VERSION="12.9.86"
VENV="${CAP_NVRTC_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cap/nvrtc-venv}"

libdir() {
  # The wheel puts its libraries in site-packages/nvidia/cuda_nvrtc/lib.
  find "$VENV" -path '*/nvidia/cuda_nvrtc/lib/libnvrtc.so.12' -print -quit 2>/dev/null | xargs -r dirname || true
}

dir="$(libdir)"
stamp="$VENV/.cap-nvrtc-$VERSION"
if [ -z "$dir" ] || [ ! -f "$stamp" ]; then
  # Everything the installer says goes to stderr: stdout is the folder only.
  python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    "nvidia-cuda-nvrtc-cu12==$VERSION" >&2
  touch "$stamp"
  dir="$(libdir)"
fi
if [ -z "$dir" ]; then
  echo "fetch-nvrtc: libnvrtc.so.12 not found under $VENV after installing nvidia-cuda-nvrtc-cu12==$VERSION" >&2
  exit 1
fi
# cudarc asks the loader for libnvrtc.so before libnvrtc.so.12; the link makes this
# folder answer first, so a machine that also has CUDA 13 (whose NVRTC refuses sm_72)
# still gets CUDA 12's.
[ -e "$dir/libnvrtc.so" ] || ln -s libnvrtc.so.12 "$dir/libnvrtc.so"
echo "$dir"
