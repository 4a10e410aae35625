#!/usr/bin/env bash
# Mesh vs mosquitto, in one run: messages/s and end-to-end latency (p50/p99/p99.9) for one
# sender → one recipient through three real meshgram-relay processes with durable acks (R=2),
# saturated and paced at 1,000 msg/s, against a mosquitto broker (QoS 1) started here on
# loopback; then relay memory per idle connected client (5,000 clients) against mosquitto's.
#
#   tests/bench/mesh_vs_mosquitto.sh                      # the full run (see docs/BENCHMARKS.md)
#   tests/bench/mesh_vs_mosquitto.sh --messages 10000     # extra flags go to the benchmark
#   tests/bench/mesh_vs_mosquitto.sh --help               # its flags
#
# Installs mosquitto (Debian package) if missing, builds the release binaries and the benchmark,
# raises the open-files limit, then runs relay/benches/mesh under `timeout`. Every server the
# benchmark starts listens on 127.0.0.1 (port 0 or a free port), runs under `timeout` in a temp
# dir, and is stopped by pid when the benchmark ends; the trap below stops any that are left.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
# Whole benchmark run after the build, in seconds: bounded well under 15 minutes.
BENCH_LIMIT=${MESHGRAM_BENCH_LIMIT:-840}
# Each idle client holds a socket in the benchmark and one in the server.
WANT_OPEN_FILES=65536

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "== installing mosquitto (Debian package)"
    apt-get update
    apt-get install -y mosquitto
fi
MOSQUITTO=$(command -v mosquitto 2>/dev/null || echo /usr/sbin/mosquitto)
echo "== $("$MOSQUITTO" -h 2>/dev/null | head -1 || true)"

echo "== building (release)"
cargo build --release --workspace --bins
# The bench's own artifact (the relay binary is built for it too and also has an executable).
BENCH_EXE=$(cargo bench --no-run -p meshgram-relay --bench mesh --message-format=json \
    | grep '"kind":\["bench"\]' | grep '"name":"mesh"' \
    | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
if [ -z "$BENCH_EXE" ] || [ ! -x "$BENCH_EXE" ]; then
    echo "could not find the built benchmark executable" >&2
    exit 1
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac

# Raise the soft limit as far as the hard limit allows (a sandbox may cap it below 65536).
HARD=$(ulimit -Hn)
if [ "$HARD" = unlimited ] || [ "$HARD" -ge "$WANT_OPEN_FILES" ]; then
    ulimit -n "$WANT_OPEN_FILES"
else
    ulimit -n "$HARD"
fi
echo "== open files limit: $(ulimit -n)"

WORK=$(mktemp -d -t mesh-vs-mosquitto.XXXXXX)
PIDFILE=$WORK/pids
: >"$PIDFILE"
# Signals the recorded pids that are still ours: every process of this run has $WORK on its
# command line (the benchmark's --work-dir, the servers' data dirs and configs), so a pid the
# system has since reused for something else is left alone.
signal_ours() {
    local sig=$1 pid
    while read -r pid; do
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$WORK"; then
            kill "-$sig" "$pid" 2>/dev/null || true
        fi
    done <"$PIDFILE"
}
cleanup() {
    if [ -s "$PIDFILE" ]; then
        signal_ours TERM
        sleep 1
        signal_ours KILL
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== running the benchmark (at most ${BENCH_LIMIT} s)"
MESHGRAM_BENCH_PIDFILE=$PIDFILE timeout --kill-after=10s "${BENCH_LIMIT}s" "$BENCH_EXE" --bench \
    --bin-dir "$TARGET_DIR/release" --mosquitto "$MOSQUITTO" --work-dir "$WORK" \
    --server-limit-secs "$BENCH_LIMIT" "$@" &
BENCH_PID=$!
echo "$BENCH_PID" >>"$PIDFILE"
wait "$BENCH_PID"
