#!/usr/bin/env bash
# Boot benchmark: N cold boots of the guest kernel in-process under fnode-vmm, N raw-KVM floor
# runs (create VM + vCPU + map memory + registers + a few instructions to HLT), N whole
# fnode-vmm processes and N QEMU microvm processes, all interleaved in one run. Prints
# p50/p90/p99/max per phase (hdrhistogram) and the ratios between them.
#
# Usage: scripts/bench-boot.sh [RUNS] [extra fnode-vmm bench options, e.g. --no-qemu]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs="${1:-100}"
shift || true
image="$("$root/scripts/build-guest.sh" | tail -n 1)"
cd "$root"
cargo build --release -q -p fnode-vmm
vmm="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/fnode-vmm"
exec "$vmm" bench "$image" --runs "$runs" "$@"
