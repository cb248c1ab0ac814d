#!/usr/bin/env bash
# Builds the CUDA `tessera` binary for Hopper GPUs (H100/H200, compute capability 9.0) on a
# machine that has neither a GPU nor a CUDA toolkit.
#
#   deploy/gpu/build.sh            -> target/gpu/tessera (stripped) + target/gpu/libcudart.so.13,
#       and all of target/gpu/ in one bundle, target/gpu.tar.xz (what bench/gpu/profile.sh runs)
#   deploy/gpu/build.sh --with-tests   also the model parity tests, target/gpu/tests/parity_*,
#       to check the model code on the GPU: TESSERA_TEST_DEVICE=cuda:0
#       TESSERA_PARITY_FIXTURES=tests/parity/fixtures target/gpu/tests/parity_unet
#
# How: nvcc 13.0 and its companions come from PyPI wheels unpacked into a local CUDA root
# (target/cuda-root); candle's kernels are compiled to PTX for sm_90 with it. The driver and
# math libraries the binary links against dynamically (libcuda, cuBLAS, cuBLASLt, cuRAND,
# NVRTC) are not needed here: the link uses stub libraries generated from the CUDA bindings'
# own symbol lists, with the real sonames, so the binary finds the real ones on the GPU machine.
#
# What the GPU machine needs:
#   - NVIDIA driver >= 580 (CUDA 13.0): provides libcuda.so.1. The PTX is built by nvcc 13.0,
#     which older drivers refuse.
#   - On LD_LIBRARY_PATH: libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13
#     (CUDA 13 runtime packages, or the nvidia-* Python packages a PyTorch install brings:
#     .../site-packages/nvidia/cu13/lib), and libcudart.so.13 (shipped next to the binary;
#     the binary's rpath is $ORIGIN, so it is found there).
#
# Environment: TESSERA_CUDA_ROOT (where the toolkit is unpacked), CUDA_COMPUTE_CAP (default 90),
# TESSERA_BUILD_THREADS (default: all cores), TESSERA_CUDNN=1 (convolutions through cuDNN 9;
# the GPU machine then also needs libcudnn.so.9 on LD_LIBRARY_PATH; output in target/gpu-cudnn).
#
# The binary is linked with fat LTO: besides the usual gains, it drops candle's quantized (GGUF)
# kernels, which tessera never calls, and whose fatbins are otherwise half the binary.
set -euo pipefail

with_tests=false
case "${1:-}" in
  --with-tests) with_tests=true ;;
  "") ;;
  *) echo "usage: $0 [--with-tests]" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cuda_root="${TESSERA_CUDA_ROOT:-$repo/target/cuda-root}"
out="$repo/target/gpu"
target_dir="$repo/target/cuda"
features=cuda
if [[ "${TESSERA_CUDNN:-0}" == 1 ]]; then
  out="$repo/target/gpu-cudnn"
  target_dir="$repo/target/cuda-cudnn"
  features=cuda,cudnn
fi
compute_cap="${CUDA_COMPUTE_CAP:-90}"
threads="${TESSERA_BUILD_THREADS:-$(nproc)}"
max_bytes=$((64 * 1024 * 1024))

# CUDA 13.0 (the newest CUDA that driver 580 runs) wheels; cuBLAS/cuRAND/NVRTC are stubbed.
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.88
  nvidia-cuda-cccl==13.0.85
)

say() { printf '\033[1m[build.sh]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

for tool in cargo python3 cc strip; do
  command -v "$tool" >/dev/null || die "'$tool' is required (install it and run again)"
done
[[ "$(uname -m)" == x86_64 ]] || die "the CUDA wheels used here are for x86_64 Linux only"

start=$(date +%s)

# 1. The toolkit: nvcc, its front end (nvvm, crt), cudart and the cub/thrust headers.
if [[ ! -f "$cuda_root/.complete" ]]; then
  say "fetching the CUDA 13.0 toolkit from PyPI into $cuda_root"
  rm -rf "$cuda_root"
  mkdir -p "$cuda_root/wheels" "$cuda_root/unpacked"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --python-version 3.11 \
    -d "$cuda_root/wheels" "${wheels[@]}" \
    || die "pip could not download the CUDA wheels (is PyPI reachable?)"
  for whl in "$cuda_root"/wheels/*.whl; do
    python3 -m zipfile -e "$whl" "$cuda_root/unpacked"
  done
  # The wheels put the toolkit under nvidia/cu13/ (bin, include, lib, nvvm): one CUDA root.
  base="$cuda_root/unpacked/nvidia/cu13"
  [[ -x "$base/bin/nvcc" ]] || chmod +x "$base"/bin/* "$base"/nvvm/bin/* 2>/dev/null || true
  [[ -f "$base/bin/nvcc" ]] || die "unexpected wheel layout: no nvidia/cu13/bin/nvcc"
  chmod +x "$base"/bin/* "$base"/nvvm/bin/* 2>/dev/null || true
  ln -sfn "$base" "$cuda_root/home"
  # Linkers look for the unversioned name.
  [[ -e "$base/lib/libcudart.so" ]] || ln -s libcudart.so.13 "$base/lib/libcudart.so"
  touch "$cuda_root/.complete"
fi
cuda_home="$cuda_root/home"
nvcc_version="$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
[[ "$nvcc_version" == 13.0 ]] || die "nvcc reports CUDA $nvcc_version; driver 580 needs PTX from 13.0"
say "nvcc $nvcc_version at $cuda_home"

# 2. Link stubs for the libraries that only exist on the GPU machine.
cd "$repo"
cargo fetch --quiet
registry="$(dirname "$(cargo metadata --format-version 1 --features cuda \
  --manifest-path coordinator/Cargo.toml 2>/dev/null \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print(next(p["manifest_path"] for p in d["packages"] if p["name"]=="cudarc"))')")"
[[ -d "$registry/src" ]] || die "cudarc sources not found (cargo fetch failed?)"
stubs="$cuda_root/stubs"
mkdir -p "$stubs"
make_stub() { # make_stub <bindings dir> <library name> <soname>
  local dir="$1" name="$2" soname="$3" c="$stubs/$2.c"
  # Every function the bindings declare or load by name, as an empty definition: only
  # the symbol names matter at link time.
  { grep -rhoE 'load::<_F>\("[A-Za-z_][A-Za-z0-9_]*"\)' "$dir" | sed -E 's/.*\("(.*)"\)/\1/'
    grep -rhoE '^ +fn [A-Za-z_][A-Za-z0-9_]*\(' "$dir" | sed -E 's/ *fn (.*)\(/\1/'
  } | sort -u | sed 's/.*/void &(void) {}/' >"$c" || true
  [[ -s "$c" ]] || die "no symbols found for $name in $dir"
  cc -shared -fPIC -o "$stubs/lib$name.so" -Wl,-soname,"$soname" "$c"
}
make_stub "$registry/src/driver/sys" cuda libcuda.so.1
make_stub "$registry/src/nvrtc/sys" nvrtc libnvrtc.so.13
make_stub "$registry/src/curand/sys" curand libcurand.so.10
make_stub "$registry/src/cublas/sys" cublas libcublas.so.13
make_stub "$registry/src/cublaslt/sys" cublasLt libcublasLt.so.13
make_stub "$registry/src/cudnn/sys" cudnn libcudnn.so.9
say "link stubs in $stubs"

# 3. The build. cudaforge compiles candle's kernels with nvcc for $compute_cap.
say "building tessera (release, --features $features, sm_$compute_cap) with $threads threads"
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" NVCC="$cuda_home/bin/nvcc"
export PATH="$cuda_home/bin:$PATH"
export CUDA_COMPUTE_CAP="$compute_cap" CUDARC_CUDA_VERSION=13000 CUDAFORGE_THREADS="$threads"
export LIBRARY_PATH="$stubs:$cuda_home/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$stubs -L native=$cuda_home/lib -C link-arg=-Wl,-rpath,\$ORIGIN"
CARGO_PROFILE_RELEASE_LTO=fat CARGO_TARGET_DIR="$target_dir" cargo build --release --locked \
  --features "$features" -p tessera-coordinator --bin tessera -j "$threads"

if $with_tests; then
  say "building the parity tests for the GPU"
  mkdir -p "$out/tests"
  CARGO_TARGET_DIR="$target_dir" cargo test --release --locked --features "$features" \
    -p tessera-worker --no-run -j "$threads" --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe and "/parity_" in exe:
        print(exe)' \
    | while read -r exe; do
        name="$(basename "$exe")"
        strip -o "$out/tests/${name%-*}" "$exe"
        say "test binary $out/tests/${name%-*}"
      done
fi

# 4. Strip, check the size, ship cudart beside it.
mkdir -p "$out"
strip -o "$out/tessera" "$target_dir/release/tessera"
cp -L "$cuda_home/lib/libcudart.so.13" "$out/"
size=$(stat -c %s "$out/tessera")
elapsed=$(($(date +%s) - start))
say "built $out/tessera: $((size / 1024 / 1024)) MiB ($size bytes) in ${elapsed}s"
say "ship it with $out/libcudart.so.13; needed at run time: driver >= 580, libcublas.so.13," \
  "libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 on LD_LIBRARY_PATH"
((size < max_bytes)) || die "the binary is over 64 MiB ($size bytes)"

# 5. One compressed bundle of everything above (binary, cudart, test binaries): what a GPU
# window carries over and bench/gpu/profile.sh unpacks.
tar -C "$(dirname "$out")" -cJf "$out.tar.xz" "$(basename "$out")"
bundle_size=$(stat -c %s "$out.tar.xz")
say "bundle $out.tar.xz: $((bundle_size / 1024 / 1024)) MiB"
((bundle_size < max_bytes)) || say "warning: the bundle is over 64 MiB: carry target/gpu/tessera alone"
