#!/usr/bin/env bash
# Runs cap's CUDA kernels (kernels/src/cuda/*.cu, the exact source NVRTC compiles) on
# the CPU, emulating the CUDA execution model (scripts/cuda-emu/emu.cpp: a thread per
# GPU thread, warp shuffles and __syncthreads as barriers), on the cases of the GPU
# tests (awkward sizes, every encoding and value type, the ops, attention), and checks
# each result against cap's scalar CPU kernels. Exit 0 when every value agrees.
#
# What this proves without a GPU: the kernels' index arithmetic and byte decoding
# (bit order, groups, padding, row starts), warp and block reductions, and that no
# lane leaves a shuffle early. What it does not: anything about the GPU itself (memory
# model, alignment faults, launch limits, the driver, performance), nor gpu.rs's
# launch code. About 40 s on two busy cores once built. Needs g++ with C++20
# (std::barrier).
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo run --release -q -p cap-kernels --example cuda_emu_cases -- "$work/cases.bin"
cat kernels/src/cuda/common.cuh kernels/src/cuda/matvec.cu kernels/src/cuda/ops.cu \
  kernels/src/cuda/attention.cu > "$work/kernels.inc"
g++ -std=c++20 -O1 -ffp-contract=off -pthread -I "$work" scripts/cuda-emu/emu.cpp -o "$work/emu"
"$work/emu" "$work/cases.bin"
