#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then runs them and
# ends with one summary line (passed, failed, skipped, minutes).
# Usage: bash tests/run.sh            (README's second command; .ci/run calls exactly this)
#
# One build profile serves clippy, the tests and the README's quick start (`test`: optimised,
# as model code needs on 2 cores), so target/ holds one build of the workspace, not three.
set -uo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
log=target/tests-run.log
stage="setup"

# The last line, however the run ends: what ran, what passed, how long it took.
summary() {
  local status=$1 passed=0 failed=0 skipped=0
  if [ -f "$log" ] && [ "$stage" != "setup" ]; then
    read -r passed failed skipped < <(awk '
      /^test result:/ {
        for (i = 1; i <= NF; i++) {
          if ($(i + 1) ~ /^passed/) p += $i
          if ($(i + 1) ~ /^failed/) f += $i
          if ($(i + 1) ~ /^ignored/) s += $i
        }
      }
      END { print p + 0, f + 0, s + 0 }' "$log")
  fi
  local minutes
  minutes=$(awk -v s="$(( $(date +%s) - started ))" 'BEGIN { printf "%.1f", s / 60 }')
  if [ "$status" -eq 0 ]; then
    echo "tests/run.sh: ok: $passed passed, $failed failed, $skipped skipped in $minutes minutes"
  elif [ "$stage" = "cargo test" ]; then
    local note=""
    [ "$failed" -eq 0 ] && note=" (a test binary did not build or finish; see $log)"
    echo "tests/run.sh: FAILED: $passed passed, $failed failed, $skipped skipped in $minutes minutes$note"
  else
    echo "tests/run.sh: FAILED at $stage: $passed passed, $failed failed, $skipped skipped in $minutes minutes"
  fi
}
trap 'summary $?' EXIT
set -e

need() { command -v "$1" >/dev/null 2>&1; }
if ! need cargo; then
  echo "tests/run.sh: cargo is missing; install Rust from https://rustup.rs and run again" >&2
  exit 1
fi
if ! need cc || ! need c++; then
  echo "tests/run.sh: installing C and C++ compilers (some crates' build scripts; the GPU kernels' CPU emulation in the tests)" >&2
  apt-get update -qq && apt-get install -y -qq build-essential >/dev/null
fi
if ! need redis-server || ! need openssl; then
  echo "tests/run.sh: installing redis-server and openssl (the Redis store tests run a real server)" >&2
  apt-get update -qq && apt-get install -y -qq redis-server openssl >/dev/null
fi

if ! need chromium && ! need chromium-browser && ! need google-chrome; then
  echo "tests/run.sh: installing chromium (the dashboard's test drives a real headless browser)" >&2
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi

mkdir -p target
: >"$log"
stage="cargo fmt"
cargo fmt --all -- --check
stage="cargo clippy"
cargo clippy --workspace --all-targets --locked --profile test -- -D warnings
stage="cargo test"
# Every test binary runs even when one fails, so the summary counts them all.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
