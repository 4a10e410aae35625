#!/usr/bin/env bash
# History to a new device, and encrypted backups (issue 11), in one run: alice on device 1
# with 10,000 messages in 20 chats and references to ~100 MB of media (20 files of 5 MB); a
# second device signs in as alice, device 1 approves it (`devices approve`: export, upload to
# the chunk store, reference sealed to the new device) and device 2 fetches and merges it
# (`messages`); baseline in the same run: `upload` + `download` of a random file as large as
# the export (the chunk store's floor for moving that many bytes); then `backup create` to the
# relays and to a file, each restored into a fresh profile signed in as alice.
#
#   tests/bench/history_transfer.sh                              # 20 chats × 500 messages
#   tests/bench/history_transfer.sh --chats 5 --per-chat 100     # a quick run
#
# Builds the release binaries, then runs tests/bench/history_transfer.py under `timeout`.
# Everything listens on 127.0.0.1 in a temp dir and is stopped when the run ends.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
LIMIT=${MESHGRAM_BENCH_LIMIT:-1500}

echo "== building (release)"
cargo build --release --workspace --bins
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac

exec timeout --kill-after=10 "$LIMIT" python3 "$ROOT/tests/bench/history_transfer.py" \
    --bin-dir "$TARGET_DIR/release" "$@"
