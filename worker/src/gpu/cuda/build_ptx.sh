#!/usr/bin/env bash
# Compiles kernels.cu to worker/src/gpu/ptx/kernels.ptx with nvcc 13.0 (the toolkit
# deploy/gpu/build.sh unpacks into target/cuda-root; run that once first, or point
# TESSERA_CUDA_ROOT at a CUDA 13.0 root). The PTX is committed, so building tessera needs no
# toolkit for these kernels; its first line is a hash of the sources, which a unit test
# checks (run this script after changing any of them).
#
# compute_80: one PTX for A100/A800 and H100/H200 (the driver compiles it for the GPU it
# runs on when the module is first loaded); the kernels use sm_80 instructions only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../../.." && pwd)"
cuda_home="${TESSERA_CUDA_ROOT:-$repo/target/cuda-root}/home"
nvcc="$cuda_home/bin/nvcc"
[[ -x "$nvcc" ]] || { echo "build_ptx.sh: no nvcc at $nvcc (run deploy/gpu/build.sh once)" >&2; exit 1; }
version="$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
[[ "$version" == 13.0 ]] || { echo "build_ptx.sh: nvcc $version; driver 580 needs PTX from 13.0" >&2; exit 1; }

out="$here/../ptx/kernels.ptx"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
"$nvcc" -ptx -arch=compute_80 -O3 -std=c++17 -I"$here" -o "$tmp" "$here/kernels.cu"
# The same hash as worker/src/gpu/mod.rs's source_hash: FNV-1a 64 over each source's name
# and bytes, in this order.
hash="$(cd "$here" && python3 -c '
import sys
h = 0xcbf29ce484222325
for name in sys.argv[1:]:
    for b in name.encode() + open(name, "rb").read():
        h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
print(f"{h:016x}")' common.cuh flash_attn.cuh geglu.cuh group_norm.cuh kernels.cu)"
{ echo "// tessera-source-hash: $hash"; grep -v '^//' "$tmp" | sed '/^$/N;/^\n$/D'; } >"$out"
echo "build_ptx.sh: $out ($(wc -c <"$out") bytes, nvcc $version, compute_80)"
