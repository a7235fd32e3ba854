#!/usr/bin/env bash
# What CI runs: install dependencies, then the README's test command (scripts/test.sh).
# Where /dev/kvm is usable, KVM tests must run: FNODE_REQUIRE_KVM=1 turns a skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh

if [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    export FNODE_REQUIRE_KVM=1
    echo "ci: /dev/kvm is usable: KVM tests must run, a skipped KVM test fails CI" >&2
else
    echo "ci: WARNING: /dev/kvm is not usable here: KVM tests will be SKIPPED" >&2
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
scripts/test.sh 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
    echo "ci: tests failed (exit $status)" >&2
    exit "$status"
fi
if [ "${FNODE_REQUIRE_KVM:-0}" = 1 ] && grep -q 'SKIPPED: /dev/kvm' "$log"; then
    echo "ci: a KVM test was skipped although /dev/kvm is usable" >&2
    exit 1
fi
echo "ci: green"
