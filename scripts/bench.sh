#!/usr/bin/env bash
# fnode's benchmark: builds the echo function and runs `fnode bench` on it (cold boots in a
# pass of their own, then restore, in-place reset and the raw-KVM floor interleaved), then a
# density run: 1,000 restored VMs alive and idle at once, spread over worker processes (one
# per 64 VMs; FNODE_BENCH_ARGS="--density-workers K" picks another count).
# Results go to target/bench/: bench.json, bench.svg (latency CDFs) and bench.txt (the table).
#
#   scripts/bench.sh [ITERATIONS] [DENSITY]      defaults: 200 iterations, 1000 VMs
# Extra `fnode bench` options can be passed in FNODE_BENCH_ARGS (e.g. "--payload hello").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
iterations="${1:-200}"
density="${2:-1000}"
echo "== building the fnode CLI" >&2
cargo build --release -q -p fnode-agent
target="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
fnode="$target/release/fnode"
out="$target/bench"
mkdir -p "$out"
echo "== fnode build functions/echo" >&2
"$fnode" build functions/echo -o "$out/echo.elf" >/dev/null 2>&1
echo "== fnode bench ($iterations iterations, density $density)" >&2
# shellcheck disable=SC2086 # FNODE_BENCH_ARGS is a list of words on purpose
"$fnode" bench "$out/echo.elf" --iterations "$iterations" --density "$density" \
    --json "$out/bench.json" --plot "$out/bench.svg" ${FNODE_BENCH_ARGS:-} | tee "$out/bench.txt"
echo "== results: $out/bench.json, $out/bench.svg, $out/bench.txt" >&2
