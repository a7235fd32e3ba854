#!/usr/bin/env bash
# fnode's main job, end to end: build the guest kernel, boot it on KVM (banner + boot time),
# and check the same image boots under QEMU microvm.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
echo "== building the guest kernel" >&2
image="$(scripts/build-guest.sh | tail -n 1)"
echo "== building fnode-vmm" >&2
cargo build --release -q -p fnode-vmm
vmm="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/fnode-vmm"
echo "== booting $image under fnode-vmm" >&2
"$vmm" boot "$image"
echo "== booting the same image under QEMU microvm" >&2
scripts/qemu-boot.sh "$image" >/dev/null
echo "== boot benchmark (20 rounds; scripts/bench-boot.sh N for more)" >&2
"$vmm" bench "$image" --runs 20
