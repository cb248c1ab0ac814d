#!/usr/bin/env bash
# bench/gpu/profile.sh — everything issue 15 measures on a GPU, in one run that builds nothing.
#
#   bash bench/gpu/profile.sh [GROUP...]       GROUPs: unet diffusers parity ncu kernels renders
#                                              (default: all, in that order)
#
# Run from the repository root on the GPU machine (driver >= 580, PyTorch + diffusers, ncu; no
# Rust, no network needed), with the build of `deploy/gpu/build.sh --with-tests` carried over:
# either target/gpu.tar.xz (the bundle build.sh writes, small enough to carry; unpacked here
# into a scratch folder) or target/gpu/ itself; TESSERA_GPU_BUNDLE names another bundle. Writes everything under $OUT (default ./gpu-profile-out):
#   summary.md        what ran, how long, exit codes, and the headline figures
#   unet_<levers>_<size>.out   `tessera bench unet --json` (ms, ms until queued, TFLOP/s,
#                     peak memory) with TESSERA_GPU_LEVERS=none (tessera as it runs by default,
#                     no lever on), host (the host-side levers) and all (host levers + fused
#                     kernels); see worker/src/gpu/switches.rs
#   diffusers.jsonl   bench/gpu/diffusers_baseline.py at the same sizes, one JSON line each,
#                     with the SDPA backend PyTorch picked; diffusers_<size>/kernels.csv (its
#                     torch.profiler kernel table) and trace.json.gz
#   parity_<levers>.out   the GPU parity tests in f16 (bar 1e-2), levers none and all
#   ncu_<levers>.csv  per-kernel device time of one tessera evaluation at 1024² (ncu)
#   kernels.md        `tessera bench kernels`: those tables by category beside diffusers'
#   render_<size>.log the 4096² and 8192² hybrid renders with the fastest lever set that
#                     passed parity (per-stage summary; the progress lines when cut by the
#                     time limit), render_levers.txt, smi.csv (GPU memory every 200 ms)
#
# Every step has a hard timeout, and the whole run stops starting steps once its budget
# (TESSERA_PROFILE_BUDGET_S, default 450 s) is spent, so a slow step cannot eat the window;
# a cut step keeps what it wrote. Nothing here needs a GPU to be fast or correct: the figures
# are only what the run measured.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
OUT="${OUT:-$repo/gpu-profile-out}"
mkdir -p "$OUT"
budget="${TESSERA_PROFILE_BUDGET_S:-450}"
t0=$(date +%s)
groups=("$@")
((${#groups[@]})) || groups=(unet diffusers parity ncu kernels renders)

now() { echo $(($(date +%s) - t0)); }
left() { echo $((budget - $(now))); }
log() { echo "[+$(now)s] $*" | tee -a "$OUT/profile.log" >&2; }
want() { [[ " ${groups[*]} " == *" $1 "* ]]; }
printf 'step\texit\tseconds\ttimeout\n' >"$OUT/steps.tsv"

# step NAME MAX_SECONDS COMMAND...: stdout to $OUT/NAME.out, stderr to $OUT/NAME.err, under
# a timeout of MAX_SECONDS or what is left of the budget, whichever is less.
step() {
  local name=$1 max=$2
  shift 2
  local t
  t=$(left)
  ((t > max)) && t=$max
  if ((t < 15)); then
    log "skipped $name: budget spent"
    printf '%s\tskipped\t0\t0\n' "$name" >>"$OUT/steps.tsv"
    return 99
  fi
  log "$name (timeout ${t}s)"
  local s rc
  s=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $(($(date +%s) - s)) "$t" >>"$OUT/steps.tsv"
  ((rc == 124 || rc == 137)) && log "$name: cut at ${t}s"
  ((rc != 0 && rc != 124 && rc != 137)) && log "$name: exit $rc (see $name.err)"
  return "$rc"
}

# --- The build, its libraries, the tools -------------------------------------------------
# TESSERA_BIN_DIR: use that folder's tessera as it is (e.g. a CPU build, to dry-run the
# `kernels` group on sample files).
bin_dir="${TESSERA_BIN_DIR:-$repo/target/gpu}"
bundle="${TESSERA_GPU_BUNDLE:-$repo/target/gpu.tar.xz}"
if [[ -z "${TESSERA_BIN_DIR:-}" && -f "$bundle" ]]; then
  scratch_bin="$(mktemp -d)"
  log "unpacking $bundle"
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    "$bundle" "$scratch_bin"
  bin_dir="$(dirname "$(ls "$scratch_bin"/*/tessera | head -1)")"
fi
tessera="$bin_dir/tessera"
[[ -x "$tessera" ]] || { log "no tessera binary in $bin_dir: run deploy/gpu/build.sh --with-tests and carry target/gpu.tar.xz"; exit 2; }
# cuBLAS, cuRAND and NVRTC from the PyTorch install; cudart beside the binary.
libs="$(python3 - <<'EOF'
import glob, os, site
dirs = set()
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for pattern in ("libcublas.so.*", "libcurand.so.*", "libnvrtc.so.*", "libcudnn.so.*"):
        for f in glob.glob(os.path.join(base, "nvidia", "**", pattern), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
EOF
)"
export LD_LIBRARY_PATH="$bin_dir:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ncu="$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)'
  echo "ncu: ${ncu:-none}"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$tessera" | grep -E 'cuda|cublas|curand|nvrtc|not found'
} >"$OUT/machine.txt" 2>&1
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits \
  -lms 200 >"$OUT/smi.csv" 2>/dev/null &
smi_pid=$!
trap 'kill $smi_pid 2>/dev/null' EXIT

sizes=(1024x1024 2048x2048)
config=/tmp/tessera-synthetic-sdxl-v1/unet/config.json

# --- tessera's UNet: levers none / default / all, both sizes ------------------------------
bench_unet() { # LEVERS SIZE MAX [extra flags]
  local levers=$1 size=$2 max=$3
  shift 3
  local iters=(--warmup 2 --iters 5)
  [[ $size == 2048x2048 ]] && iters=(--warmup 1 --iters 3)
  step "unet_${levers}_${size%%x*}" "$max" env TESSERA_GPU_LEVERS="$levers" \
    "$tessera" bench unet --model synthetic:sdxl --device cuda:0 --size "$size" --batch 2 \
    "${iters[@]}" --json "$@"
}
if want unet; then
  bench_unet none 1024x1024 120         # first: also writes the synthetic config, times the peak
  bench_unet all 1024x1024 90 --no-peak
  bench_unet none 2048x2048 120 --no-peak
  bench_unet all 2048x2048 120 --no-peak
  bench_unet host 1024x1024 90 --no-peak
  bench_unet host 2048x2048 120 --no-peak
fi

# --- diffusers at the same sizes, profiled ---------------------------------------------------
if want diffusers; then
  [[ -f $config ]] || step unet_config 60 "$tessera" bench unet --model synthetic:sdxl \
    --device cuda:0 --size 64x64 --warmup 0 --iters 1 --no-peak --json
  step diffusers 200 python3 bench/gpu/diffusers_baseline.py --config "$config" \
    --size "$(IFS=,; echo "${sizes[*]}")" --batch 2 --iters 5 --profile "$OUT/diffusers"
  cp "$OUT/diffusers.out" "$OUT/diffusers.jsonl" 2>/dev/null
  gzip -f "$OUT"/diffusers/*/trace.json 2>/dev/null
fi

# --- parity in half precision, without and with the levers -------------------------------
parity() { # LEVERS
  local t rc=0
  compgen -G "$bin_dir/tests/parity_*" >/dev/null \
    || { echo "no parity test binaries in $bin_dir/tests: build with --with-tests" >&2; return 2; }
  for t in "$bin_dir"/tests/parity_*; do
    TESSERA_GPU_LEVERS=$1 TESSERA_TEST_DEVICE=cuda:0 TESSERA_PARITY_FIXTURES=tests/parity/fixtures \
      "$t" --nocapture --test-threads 1 || rc=1
  done
  return $rc
}
if want parity; then
  export -f parity
  export bin_dir
  step parity_all 120 bash -c 'parity all'
  step parity_none 120 bash -c 'parity none'
fi

# --- ncu: one evaluation at 1024², kernel by kernel ----------------------------------------
ncu_unet() { # LEVERS MAX
  [[ -n $ncu ]] || { log "no ncu on this machine"; return; }
  step "ncu_$1" "$2" env TESSERA_GPU_LEVERS="$1" "$ncu" --profile-from-start off --csv \
    --print-units base --metrics gpu__time_duration.sum --cache-control none \
    --clock-control none --log-file "$OUT/ncu_$1.csv" \
    "$tessera" bench unet --model synthetic:sdxl --device cuda:0 --size 1024x1024 --batch 2 \
    --warmup 1 --iters 1 --no-peak --profile-range --json
}
if want ncu; then
  ncu_unet all 150
  ncu_unet none 150
fi
if want kernels; then
  args=()
  labels=()
  for l in none all; do
    [[ -s $OUT/ncu_$l.csv ]] && args+=(--ncu "$OUT/ncu_$l.csv") && labels+=("tessera-$l")
  done
  t="$OUT/diffusers/1024x1024/kernels.csv"
  [[ -s $t ]] && args+=(--torch "$t") && labels+=(diffusers)
  ((${#args[@]})) && step kernels 30 "$tessera" bench kernels "${args[@]}" \
    --labels "$(IFS=,; echo "${labels[*]}")" --markdown "$OUT/kernels.md"
fi

# --- end to end: hybrid renders at 4096² and 8192² ----------------------------------------
# With the levers that passed parity (all, else the defaults). The progress bar only draws on
# a terminal: `script` gives it one, so a render cut by its timeout still shows its stage,
# step, views done and elapsed time in render_<size>.log.
if want renders; then
  # The lever set with the lowest 2048² time; `all` only if its parity run passed
  # (TESSERA_RENDER_LEVERS overrides, e.g. when `renders` runs alone in a later window).
  levers="${TESSERA_RENDER_LEVERS:-$(python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
passed = any(l.startswith("parity_all\t0\t") for l in open(os.path.join(out, "steps.tsv")))
best = ("none", float("inf"))
for lev in ("none", "host", "all"):
    if lev == "all" and not passed:
        continue
    try:
        r = json.loads(open(os.path.join(out, f"unet_{lev}_2048.out")).read().strip().splitlines()[-1])
    except Exception:
        continue
    if r["ms_median"] < best[1]:
        best = (lev, r["ms_median"])
print(best[0])
EOF
)}"
  scratch="$(mktemp -d)"
  for size in 4096 8192; do
    cmd="TESSERA_GPU_LEVERS=$levers TESSERA_LOG=tessera_worker::tasks=debug '$tessera' render \
      --model synthetic:sdxl --device cuda:0 --method hybrid --size ${size}x${size} \
      --prompt 'a lighthouse on a cliff at dawn' --seed 1 --dzi never \
      --output '$scratch/render_$size.png'"
    max=$((size == 4096 ? 240 : 420))
    if command -v script >/dev/null; then
      step "render_$size" "$max" script -qefc "$cmd" "$OUT/render_$size.log"
    else
      step "render_$size" "$max" bash -c "$cmd"
    fi
    rm -f "$scratch"/render_*
  done
  echo "levers: $levers" >"$OUT/render_levers.txt"
fi

# --- summary -----------------------------------------------------------------------------
{
  echo "# GPU profile ($(head -1 "$OUT/machine.txt" 2>/dev/null))"
  echo
  sed -n '3,4p' "$OUT/machine.txt"
  echo
  echo '| step | exit | seconds | timeout |'
  echo '|---|---|---|---|'
  tail -n +2 "$OUT/steps.tsv" | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
  echo
  python3 - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "unet_*.out"))):
    try:
        r = json.loads(open(f).read().strip().splitlines()[-1])
    except Exception:
        continue
    name = os.path.basename(f)[5:-4]
    rows[name] = r
    print(f"- tessera {name}: {r['ms_median']:.1f} ms (queued in {r['ms_enqueue_median']:.1f} ms, "
          f"{100 * r['enqueue_fraction']:.0f}%), {r['tflops']:.1f} TFLOP/s, "
          f"peak {r.get('peak_memory_gib') or 0:.2f} GiB")
try:
    lines = open(os.path.join(out, "diffusers.out")).read().strip().splitlines()
    for d in (json.loads(l) for l in lines if l.startswith("{")):
        size = d["size"][0]
        prof = d.get("profile") or {}
        print(f"- diffusers {size}: {d['ms_median']:.1f} ms, attention backend "
              f"{prof.get('attention_backend')}")
        for lev in ("none", "host", "all"):
            r = rows.get(f"{lev}_{size}")
            if r:
                print(f"  - tessera ({lev}) speed / diffusers at {size}: "
                      f"{d['ms_median'] / r['ms_median']:.2f}x")
except Exception as e:
    print(f"- diffusers: no result ({e})")
EOF
} >"$OUT/summary.md" 2>&1
log "done in $(now)s; summary in $OUT/summary.md"
