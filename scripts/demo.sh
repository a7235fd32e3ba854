#!/usr/bin/env bash
# fnode's main job, end to end: build the guest kernel and boot it on KVM (and under QEMU
# microvm), then build example functions into images with `fnode build` and invoke each once
# with `fnode invoke --timings` (phases and host-side counts on stderr).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
echo "== building the guest kernel" >&2
image="$(scripts/build-guest.sh | tail -n 1)"
echo "== building fnode-vmm and the fnode CLI" >&2
cargo build --release -q -p fnode-vmm -p fnode-agent
target="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
vmm="$target/release/fnode-vmm"
fnode="$target/release/fnode"
echo "== booting $image under fnode-vmm" >&2
"$vmm" boot "$image"
echo "== booting the same image under QEMU microvm" >&2
scripts/qemu-boot.sh "$image" >/dev/null

out="$target/demo"
mkdir -p "$out"
for f in echo sha256 wordcount primes counter spin; do
    echo "== fnode build functions/$f" >&2
    "$fnode" build "functions/$f" -o "$out/$f.elf" 2>/dev/null >/dev/null
done

echo "== fnode invoke echo" >&2
response="$("$fnode" invoke "$out/echo.elf" --payload "hello from the host" --timings)"
echo "response: $response"

echo "== fnode invoke sha256 (1 MiB of random bytes), checked against sha256sum" >&2
head -c 1048576 /dev/urandom >"$out/payload.bin"
guest="$("$fnode" invoke "$out/sha256.elf" --payload "@$out/payload.bin" --timings)"
host="$(sha256sum "$out/payload.bin" | cut -d ' ' -f 1)"
echo "fnode:     $guest"
echo "sha256sum: $host"
if [ "$guest" != "$host" ]; then
    echo "demo: the function's digest differs from sha256sum's" >&2
    exit 1
fi

echo "== fnode invoke wordcount" >&2
response="$("$fnode" invoke "$out/wordcount.elf" --timings \
    --payload '{"text": "the quick brown fox jumps over the lazy dog; the dog sleeps"}')"
echo "response: $response"

echo "== fnode invoke primes (init sieves 2^25 numbers once; the request is a lookup)" >&2
response="$("$fnode" invoke "$out/primes.elf" --payload 1000003 --timings)"
echo "response: $response"

echo "== fnode snapshot primes, then invoke from the snapshot: restore once, reset in place between calls" >&2
"$fnode" snapshot "$out/primes.elf" -o "$out/primes.snap"
"$fnode" invoke "$out/primes.snap" --payload 1000003 --repeat 3 --timings

echo "== fnode snapshot counter (counts calls in a static): every reset VM answers 'calls 1'" >&2
"$fnode" snapshot "$out/counter.elf" -o "$out/counter.snap" >/dev/null
"$fnode" invoke "$out/counter.snap" --payload a --repeat 3
echo "== the same without reset (--reset none): the state carries over" >&2
"$fnode" invoke "$out/counter.snap" --payload a --repeat 3 --reset none

echo "== fnode invoke spin (a handler that never returns is stopped at --timeout-ms)" >&2
status=0
"$fnode" invoke "$out/spin.elf" --timeout-ms 500 || status=$?
echo "exit status $status (4: stopped at the timeout)"

echo "== boot benchmark (20 rounds; scripts/bench-boot.sh N for more)" >&2
"$vmm" bench "$image" --runs 20
