#!/usr/bin/env python3
"""The bot bridge's speed: see bot_bridge.sh, which builds and runs this."""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import queue
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meshnet import Network, last_json, log  # noqa: E402

ALICE = "+15550001111"


def wrk(url, args):
    """wrk's requests/s, latency p50/p99 (ms) and non-2xx count for GETs of `url`."""
    out = subprocess.run(["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url],
                         check=True, capture_output=True, text=True, timeout=args.duration + 60).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def percentile(p):
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, percentile(50), percentile(99), int(bad.group(1)) if bad else 0


def wait_ready(proc, what):
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"{what} did not start")
    return json.loads(line)


class Control:
    """A client node's control socket: calls on one connection, events on another."""

    def __init__(self, socket_path):
        self.calls = socket.socket(socket.AF_UNIX)
        self.calls.connect(str(socket_path))
        self.replies = self.calls.makefile("rb")
        self.events = queue.Queue()
        events = socket.socket(socket.AF_UNIX)
        events.connect(str(socket_path))
        events.sendall(b'{"call":"subscribe"}\n')
        lines = events.makefile("rb")
        lines.readline()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()

    def _read(self, lines):
        for line in lines:
            self.events.put(json.loads(line))

    def call(self, call):
        self.calls.sendall(json.dumps(call).encode() + b"\n")
        answer = json.loads(self.replies.readline())
        if "error" in answer:
            raise SystemExit(f"{call['call']}: {answer['error']}")
        return answer["ok"]

    def wait_text(self, text, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"no message {text!r} within {timeout} s")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event.get("event") == "message" and event.get("received") and event["message"]["text"] == text:
                return


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--round-trips", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="meshgram-bench-bots-"))
    procs = []
    net = None
    try:
        hello = subprocess.Popen([args.bin_dir / "examples" / "hello", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
        procs.append(hello)
        hello_url = wait_ready(hello, "the hello-world server")["http"] + "/botTOKEN/getMe"
        log(f"== baseline: axum hello world, wrk -t{args.threads} -c{args.connections} -d{args.duration}s")
        hello_rate, hello_p50, hello_p99, _ = wrk(hello_url, args)
        hello.kill()

        net = Network(args.bin_dir, work)
        alice = net.login("alice", ALICE)
        out, _, _ = net.run("alice", "bot", "create", "--username", "bench_bot", "--name", "Bench")
        created = last_json(out, "bot create")
        token, bot_id = created["token"], created["bot"]["user_id"]
        bot_api = json.loads((net.data / "network.json").read_text())["bot_api"]
        with urllib.request.urlopen(f"{bot_api}{token}/getMe", timeout=60) as response:
            json.load(response)

        # The echo round trip: alice's running node sends, the echo bot answers through the
        # bridge, alice's node shows the answer (its event), one message at a time.
        node = subprocess.Popen(net.meshgram("alice", "node"), stdout=subprocess.DEVNULL, stderr=open(work / "alice-node.log", "wb"))
        procs.append(node)
        sock = work / "alice" / "node.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline:
                raise SystemExit("alice's node did not start")
            time.sleep(0.1)
        time.sleep(1)
        bot = subprocess.Popen([sys.executable, Path(__file__).resolve().parent / "echo_bot.py", bot_api, token],
                               stdout=subprocess.DEVNULL)
        procs.append(bot)
        control = Control(sock)
        to = {"UserId": bot_id}
        rtts = []
        for i in range(args.round_trips + 10):
            text = f"ping {i} {os.urandom(4).hex()}"
            started = time.perf_counter()
            control.call({"call": "send", "to": to, "texts": [text], "reply_to": None})
            control.wait_text("echo: " + text)
            if i >= 10:  # the first ones warm up connections and caches
                rtts.append((time.perf_counter() - started) * 1000)
        rtts.sort()
        p50, p99 = statistics.median(rtts), rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
        log(f"== echo round trip user → bot → user, {len(rtts)} one at a time: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        bot.kill()
        node.kill()

        # sendMessage under load: every request a message sent durably to alice (her node is
        # stopped: the relays keep her mail, as for any user who is away).
        url = f"{bot_api}{token}/sendMessage?chat_id={alice['user_id']}&text=load"
        log(f"== sendMessage, wrk -t{args.threads} -c{args.connections} -d{args.duration}s")
        # MESHGRAM_BENCH_PERF=FILE: a system-wide `perf record -g` of the run, for `perf report`.
        perf = None
        if os.environ.get("MESHGRAM_BENCH_PERF"):
            perf = subprocess.Popen(["perf", "record", "-g", "-a", "-o", os.environ["MESHGRAM_BENCH_PERF"],
                                     "--", "sleep", str(args.duration)], stderr=subprocess.DEVNULL)
        rate, send_p50, send_p99, bad = wrk(url, args)
        if perf:
            perf.wait(timeout=60)

        print()
        print("| what | req/s | p50 | p99 | vs hello world |")
        print("|---|---|---|---|---|")
        print(f"| axum hello world (baseline) | {hello_rate:,.0f} | {hello_p50:.2f} ms | {hello_p99:.2f} ms | 1.00× |")
        print(f"| sendMessage, durable | {rate:,.0f} | {send_p50:.2f} ms | {send_p99:.2f} ms | {rate / hello_rate:.3f}× |")
        print(f"| non-2xx answers to sendMessage | {bad} | | | |")
        print(f"| echo round trip (one at a time) | | {p50:.1f} ms | {p99:.1f} ms | |")
        print()
        print(f"aims: sendMessage ≥ 25 % of hello world: {'met' if rate >= 0.25 * hello_rate else 'missed'} "
              f"({100 * rate / hello_rate:.1f} %); echo p50 ≤ 10 ms: {'met' if p50 <= 10 else 'missed'} ({p50:.1f} ms)")
    finally:
        for proc in procs:
            proc.kill()
        if net:
            net.stop()


if __name__ == "__main__":
    main()
