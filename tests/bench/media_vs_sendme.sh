#!/usr/bin/env bash
# Media through the mesh vs sendme (iroh), in one run: upload and download MB/s of a 1 GiB
# file (and a 100 MB one) through `meshgram up` (3 relays, R=2, every part durable on two
# relays before it is acknowledged), then sendme sending the same file between two processes
# in a network namespace with only loopback; ratios against sendme; peak RSS of the uploading
# and downloading clients and of the relays per file size.
#
#   tests/bench/media_vs_sendme.sh                 # 100 MB and 1 GiB (see docs/BENCHMARKS.md)
#   tests/bench/media_vs_sendme.sh --sizes-mib 64  # other sizes
#
# Installs sendme (`cargo install sendme`) if missing, builds the release binaries, then runs
# tests/bench/media_vs_sendme.py under `timeout`. Everything listens on 127.0.0.1 in a temp dir
# and is stopped when the run ends.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
LIMIT=${MESHGRAM_BENCH_LIMIT:-1500}

if ! command -v sendme >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/sendme" ]; then
    echo "== installing sendme"
    cargo install sendme --locked
fi
SENDME=$(command -v sendme 2>/dev/null || echo "$HOME/.cargo/bin/sendme")
echo "== $("$SENDME" --version 2>/dev/null || echo sendme)"
if ! command -v unshare >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq util-linux iproute2
fi

echo "== building (release)"
cargo build --release --workspace --bins
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac

exec timeout --kill-after=10 "$LIMIT" python3 "$ROOT/tests/bench/media_vs_sendme.py" \
    --bin-dir "$TARGET_DIR/release" --sendme "$SENDME" "$@"
