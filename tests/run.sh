#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then runs them.
# Usage: bash tests/run.sh            (README's second command; .ci/run calls exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need cargo; then
  echo "tests/run.sh: cargo is missing; install Rust from https://rustup.rs and run again" >&2
  exit 1
fi
if ! need cc; then
  echo "tests/run.sh: installing a C compiler (needed by some crates' build scripts)" >&2
  apt-get update -qq && apt-get install -y -qq build-essential >/dev/null
fi
if ! need redis-server || ! need openssl; then
  echo "tests/run.sh: installing redis-server and openssl (the Redis store tests run a real server)" >&2
  apt-get update -qq && apt-get install -y -qq redis-server openssl >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The test profile is optimised (Cargo.toml): model code is slow unoptimised on 2 cores.
cargo test --workspace --locked
