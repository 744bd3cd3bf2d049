#!/usr/bin/env bash
# The release binaries, built the one way every user of them needs (e2e/release.sh for the
# images, e2e/test.sh, the benchmarks): the operator and the demo app dynamically linked; the
# sidecar and the preStop hook statically linked (crt-static). The hook runs inside application
# images, whose libc (if any) is unknown; the sidecar runs in every pod, and linked statically it
# maps no shared libraries (about 1 MiB less resident memory per pod, BENCHMARKS.md). Only the
# final binary gets the flag (`cargo rustc`), so the dependencies are shared with every other
# release build.
#
# Usage: e2e/scripts/build-release.sh [operator|sidecar|demo|hook]...   (default: all four)
# Env:   CARGO_TARGET_DIR as cargo; CARGO_QUIET=1 passes -q.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || set -- operator sidecar demo hook
Q=(); [ "${CARGO_QUIET:-0}" = 1 ] && Q=(-q)
dynamic=()
for what in "$@"; do
  case $what in
    operator) dynamic+=(-p shardmesh-operator --bin shardmesh-operator) ;;
    demo) dynamic+=(-p shardmesh-demo --bin shardmesh-demo) ;;
    sidecar | hook) ;;
    *) echo "build-release.sh: unknown binary $what (operator, sidecar, demo or hook)" >&2; exit 2 ;;
  esac
done
[ ${#dynamic[@]} -eq 0 ] || cargo build "${Q[@]}" --release --locked "${dynamic[@]}"
for what in "$@"; do
  case $what in
    sidecar | hook)
      cargo rustc "${Q[@]}" --release --locked -p "shardmesh-$what" --bin "shardmesh-$what" \
        -- -C target-feature=+crt-static ;;
  esac
done
