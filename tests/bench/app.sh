#!/usr/bin/env bash
# The desktop app's speed (issue 15), in one run: `meshgram up`, a chat of 100,000 messages and
# a baseline chat of 100, then `meshgram app` timed to its first paint and an interactive chat
# list, each chat opened, the long one scrolled back (frame times), and the tab's memory; a
# table with the long chat against the baseline. See tests/bench/app.py.
#
#   tests/bench/app.sh                        # release binaries, 100,000 messages
#   tests/bench/app.sh --messages 20000       # a quicker run
#   BIN_DIR=target/debug tests/bench/app.sh   # binaries already built (no build step)
#
# Uses Debian's chromium through Playwright (tests/run installs both). Everything listens on
# 127.0.0.1 in a temp dir and is stopped when the run ends.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
LIMIT=${MESHGRAM_BENCH_LIMIT:-1800}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
if [ -z "${BIN_DIR:-}" ]; then
  echo "== building (release)"
  cargo build --release --workspace --bins
  BIN_DIR=$TARGET_DIR/release
fi
exec timeout --kill-after=10 "$LIMIT" python3 "$ROOT/tests/bench/app.py" --bin-dir "$BIN_DIR" "$@"
