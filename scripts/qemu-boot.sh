#!/usr/bin/env bash
# Boots an fnode guest image under QEMU's microvm machine with KVM and checks that it booted:
# the banner must appear on the console and QEMU must exit with isa-debug-exit's code for
# abi::exit::SUCCESS ((SUCCESS << 1) | 1 = 33).
#
# Usage: scripts/qemu-boot.sh IMAGE [CMDLINE]
# Environment: FNODE_QEMU_TIMEOUT (seconds, default 20), FNODE_QEMU_MEM (default 64M),
#              FNODE_QEMU_ACCEL (kvm by default; tcg works too, slowly).
# Exit status: 0 on a good boot; otherwise QEMU's exit code (37: the guest reported a fault,
# 35: the guest failed, 124: timeout), or 1 (no banner, bad usage, QEMU missing).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
abi="$root/guest-runtime/src/abi.rs"

# The contract's values, read from abi.rs so that they are written once.
abi_const() {
    local v
    v="$(sed -n "s/^ *pub const $1: [^=]*= *\(.*\);$/\1/p" "$abi" | head -n 1)"
    if [ -z "$v" ]; then
        echo "qemu-boot.sh: cannot read $1 from $abi" >&2
        exit 1
    fi
    echo "$v"
}
banner_prefix="$(abi_const BANNER_PREFIX)"; banner_prefix="${banner_prefix//\"/}"
exit_port="$(abi_const PORT)"
qemu_code() { echo $(( ($(abi_const "$1") << 1) | 1 )); }
code_success="$(qemu_code SUCCESS)"
code_failure="$(qemu_code FAILURE)"
code_fault="$(qemu_code FAULT)"

usage() { echo "usage: $0 IMAGE [CMDLINE]" >&2; exit 1; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
image="$1"
cmdline="${2:-}"
timeout_s="${FNODE_QEMU_TIMEOUT:-20}"
mem="${FNODE_QEMU_MEM:-64M}"
accel="${FNODE_QEMU_ACCEL:-kvm}"

if [ ! -f "$image" ]; then
    echo "qemu-boot.sh: no image at $image: build one with scripts/build-guest.sh" >&2
    exit 1
fi
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "qemu-boot.sh: qemu-system-x86_64 not found: apt-get install qemu-system-x86" >&2
    exit 1
fi
cpu=()
if [ "$accel" = kvm ]; then
    if [ ! -w /dev/kvm ]; then
        echo "qemu-boot.sh: /dev/kvm is missing or not writable: enable KVM or set FNODE_QEMU_ACCEL=tcg" >&2
        exit 1
    fi
    cpu=(-cpu host)
fi

console="$(mktemp)"
trap 'rm -f "$console"' EXIT

# microvm with the legacy COM1 (isa-serial) as the console and isa-debug-exit as the exit
# port; no RTC, PIC or PIT, which the kernel does not use. -no-reboot turns a triple fault
# into an exit (code 0) instead of a reboot loop.
timeout -k 2 "$timeout_s" \
    qemu-system-x86_64 \
    -M microvm,isa-serial=on,rtc=off,pic=off,pit=off \
    -accel "$accel" "${cpu[@]}" \
    -m "$mem" -smp 1 \
    -nodefaults -no-user-config -nographic -no-reboot \
    -serial stdio \
    -device "isa-debug-exit,iobase=$exit_port,iosize=4" \
    -kernel "$image" -append "$cmdline" \
    </dev/null | tee "$console"
code=${PIPESTATUS[0]}

fail() {
    echo "qemu-boot.sh: $1" >&2
    [ "$code" -ne 0 ] && exit "$code"
    exit 1
}
case "$code" in
    124) fail "the guest did not exit within ${timeout_s}s (FNODE_QEMU_TIMEOUT)" ;;
    "$code_fault") fail "the guest reported a CPU exception (QEMU exit code $code; see the fault line above)" ;;
    "$code_failure") fail "the guest failed (QEMU exit code $code; its console says why)" ;;
esac
if ! grep -q "^$banner_prefix" "$console"; then
    fail "no banner ('$banner_prefix...') on the console (QEMU exit code $code)"
fi
if [ "$code" -ne "$code_success" ]; then
    fail "QEMU exited with $code, expected $code_success (guest success); 0 may mean a triple fault"
fi
echo "qemu-boot.sh: booted (banner seen, exit code $code)" >&2
