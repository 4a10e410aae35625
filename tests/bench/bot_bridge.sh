#!/usr/bin/env bash
# The bot bridge's speed (issue 14), in one run: an axum hello-world handler measured by wrk
# (the baseline); then `meshgram up`, a bot, and the echo round trip user → bot → user (alice's
# running node sends on its control socket, a minimal echo bot answers through the bridge,
# her node shows the answer), one message at a time, p50/p99; then wrk on sendMessage, each
# request a message sent durably to alice. Prints a table with the ratio to the baseline.
#
#   tests/bench/bot_bridge.sh                                  # 10 s per wrk run, 300 round trips
#   tests/bench/bot_bridge.sh --duration 5 --round-trips 50    # a quick run
#
# Builds the release binaries (and the hello-world example), installs wrk from Debian if it
# is missing, then runs tests/bench/bot_bridge.py under `timeout`. Everything listens on
# 127.0.0.1 in a temp dir and is stopped when the run ends.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
LIMIT=${MESHGRAM_BENCH_LIMIT:-900}

if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk
fi
echo "== building (release)"
cargo build --release --workspace --bins
cargo build --release -p meshgram-bot-bridge --example hello
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac

exec timeout --kill-after=10 "$LIMIT" python3 "$ROOT/tests/bench/bot_bridge.py" \
    --bin-dir "$TARGET_DIR/release" "$@"
