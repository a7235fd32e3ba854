#!/usr/bin/env bash
# Installs what fnode's build and tests need on Debian 12: QEMU (the peer VMM the tests boot
# the guest under), binutils (the tests' minimal assembly guest) and the Rust toolchain and
# guest target pinned in rust-toolchain.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
# `as` and `ld` assemble the VMM tests' minimal PVH guest.
{ command -v as && command -v ld; } >/dev/null || need_apt+=(binutils)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "ci: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v rustup >/dev/null; then
    echo "ci: rustup is required (https://rustup.rs); it installs the pinned toolchain" >&2
    exit 1
fi
# rust-toolchain.toml names the toolchain and the x86_64-unknown-none target;
# 'rustup show' installs them if missing (quietly on newer rustup: call it explicitly).
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
rustup target list --installed | grep -qx x86_64-unknown-none || rustup target add x86_64-unknown-none
