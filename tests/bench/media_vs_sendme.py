#!/usr/bin/env python3
"""Media through the mesh vs sendme: see media_vs_sendme.sh, which builds and runs this."""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meshnet import Network, log, random_file  # noqa: E402

ALICE, BOB = "+15550001111", "+15550002222"
MB = 1_000_000


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def run_measured(args, timeout, stdin=None):
    """Runs a command to completion: (stdout, wall seconds, peak RSS in KiB)."""
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin or subprocess.DEVNULL)
    deadline = started + timeout
    out = bytearray()
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        chunk = proc.stdout.read()
        if chunk:
            out.extend(chunk)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"timed out: {' '.join(map(str, args))}")
        time.sleep(0.01)
    wall = time.monotonic() - started
    rest = proc.stdout.read()
    if rest:
        out.extend(rest)
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{out.decode(errors='replace')}\n{err}")
    return out.decode(), wall, usage.ru_maxrss


def relay_peak_rss_kib(work):
    """Peak RSS (VmHWM) of this run's relays, in KiB."""
    peaks = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not cmd or not cmd[0].endswith(b"meshgram-relay") or str(work).encode() not in b" ".join(cmd):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]))
        except OSError:
            continue
    return peaks


def mesh_transfer(net, path, size):
    """Uploads `path` from alice to bob and downloads it: figures for this size."""
    _, up_s, up_rss = run_measured(net.meshgram("alice", "upload", path, "--to", BOB), timeout=1200)
    messages = json.loads(subprocess.run(net.meshgram("bob", "messages"), capture_output=True, check=True).stdout)
    message = [m for m in messages if m.get("file") and m["file"]["size"] == size][-1]
    out = net.work / f"downloaded-{size}"
    _, down_s, down_rss = run_measured(net.meshgram("bob", "download", message["id"], "-o", out), timeout=1200)
    if sha256_of(out) != sha256_of(path):
        raise SystemExit("the downloaded file differs")
    out.unlink()
    return {"upload_mb_s": size / MB / up_s, "download_mb_s": size / MB / down_s,
            "upload_s": up_s, "download_s": down_s, "upload_rss_kib": up_rss, "download_rss_kib": down_rss,
            "relay_peak_rss_kib": max(relay_peak_rss_kib(net.work) or [0])}


SENDME_IN_NETNS = r'''
set -euo pipefail
ip link set lo up
cd "$RECV_DIR"
start=$(date +%s.%N)
"$SENDME" send "$FILE" --relay disabled --ticket-type addresses --magic-ipv4-addr 127.0.0.1:0 >"$SEND_LOG" 2>&1 &
sender=$!
for _ in $(seq 1 600); do
    ticket=$(grep -o 'blob[a-z0-9]\{20,\}' "$SEND_LOG" | head -1 || true)
    [ -n "$ticket" ] && break
    sleep 0.1
done
[ -n "$ticket" ] || { cat "$SEND_LOG" >&2; exit 1; }
ready=$(date +%s.%N)
"$SENDME" receive "$ticket" --relay disabled --magic-ipv4-addr 127.0.0.1:0 >"$RECV_LOG" 2>&1
done_at=$(date +%s.%N)
kill "$sender" 2>/dev/null || true
echo "$start $ready $done_at"
'''


def sendme_transfer(sendme, work, path, size):
    recv = work / f"sendme-recv-{size}"
    recv.mkdir()
    env = dict(os.environ, SENDME=str(sendme), FILE=str(path), RECV_DIR=str(recv),
               SEND_LOG=str(work / "sendme-send.log"), RECV_LOG=str(work / "sendme-recv.log"))
    out = subprocess.run(["unshare", "--net", "bash", "-c", SENDME_IN_NETNS], env=env, capture_output=True,
                         check=True, timeout=1200).stdout.decode().split()
    start, ready, done = map(float, out[-3:])
    received = recv / path.name
    if sha256_of(received) != sha256_of(path):
        raise SystemExit("sendme's received file differs")
    received.unlink()
    return {"end_to_end_mb_s": size / MB / (done - start), "receive_mb_s": size / MB / (done - ready)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--sendme", type=Path, required=True)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[95, 1024], help="file sizes (95 MiB ≈ 100 MB)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="media-vs-sendme."))
    net = Network(args.bin_dir, work)
    results = []
    try:
        net.login("alice", ALICE)
        net.login("bob", BOB)
        for mib in args.sizes_mib:
            size = mib * 1024 * 1024
            path = work / f"file-{mib}MiB.bin"
            random_file(path, size)
            mesh = mesh_transfer(net, path, size)
            peer = sendme_transfer(args.sendme, work, path, size)
            path.unlink()
            results.append((mib, mesh, peer))
            log(json.dumps({"size_mib": mib, "mesh": mesh, "sendme": peer}))
    finally:
        net.stop()
    log("\n| file | mesh upload (R=2) | mesh download | sendme end to end | upload ÷ sendme | download ÷ sendme "
        "| peak RSS: uploader / downloader / relays |")
    log("|---|---|---|---|---|---|---|")
    for mib, mesh, peer in results:
        base = peer["end_to_end_mb_s"]
        log(f"| {mib} MiB | {mesh['upload_mb_s']:.0f} MB/s | {mesh['download_mb_s']:.0f} MB/s | {base:.0f} MB/s "
            f"| {mesh['upload_mb_s'] / base:.2f}× | {mesh['download_mb_s'] / base:.2f}× "
            f"| {mesh['upload_rss_kib'] / 1024:.0f} / {mesh['download_rss_kib'] / 1024:.0f} / "
            f"{mesh['relay_peak_rss_kib'] / 1024:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
