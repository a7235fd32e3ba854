#!/usr/bin/env bash
# fnode's test command: unit tests, and integration tests that boot real VMs on /dev/kvm
# (and the same guest under QEMU microvm). Set FNODE_REQUIRE_KVM=1 to fail instead of
# skipping KVM tests when /dev/kvm is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# The guest kernel is built once here so that test binaries find it ready.
scripts/build-guest.sh >/dev/null
cargo test "$@"
