#!/usr/bin/env bash
# Builds the fnode guest kernel image (release, x86_64-unknown-none) and prints its absolute
# path as the last line of stdout; cargo's own output goes to stderr.
#
# Usage: scripts/build-guest.sh   (from any directory; honours CARGO_TARGET_DIR)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v cargo >/dev/null 2>&1; then
    echo "build-guest.sh: cargo not found: install Rust with rustup (rust-toolchain.toml pins the version)" >&2
    exit 1
fi
# A relative CARGO_TARGET_DIR means relative to where the caller stands.
if [ -n "${CARGO_TARGET_DIR:-}" ] && [ "${CARGO_TARGET_DIR#/}" = "$CARGO_TARGET_DIR" ]; then
    export CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR"
fi

# Build from the workspace root so that rust-toolchain.toml and .cargo/config.toml
# (-C relocation-model=static for the guest target) apply. Cargo names the executable it
# produced in its JSON messages; diagnostics still go to stderr as usual.
cd "$root"
image="$(
    cargo build --release -p fnode-guest-kernel --target x86_64-unknown-none \
        --message-format=json-render-diagnostics |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
)"
if [ -z "$image" ] || [ ! -f "$image" ]; then
    echo "build-guest.sh: cargo built no fnode-guest-kernel executable" >&2
    exit 1
fi
echo "$(cd "$(dirname "$image")" && pwd -P)/$(basename "$image")"
