#!/usr/bin/env bash
# fnode's test command: unit tests, and integration tests that boot real VMs on /dev/kvm
# (and the same guest under QEMU microvm). Set FNODE_REQUIRE_KVM=1 to fail instead of
# skipping KVM tests when /dev/kvm is missing. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The guest kernel is built once here so that test binaries find it ready.
scripts/build-guest.sh >/dev/null
# The host crates (the workspace's default members), then the function SDK's runtime and
# the guest kernel's pure logic, which also build and test on the host.
cargo test "$@"
cargo test -p fnode-guest --features runtime "$@"
cargo test -p fnode-guest-kernel "$@"
