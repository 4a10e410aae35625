"""What the benchmarks share: `meshgram up` in a temp dir, signed-in profiles on it, and
commands run to completion with their wall time and peak RSS."""

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def log(*args):
    print(*args, flush=True)


def random_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n


def last_json(out, what):
    """The last JSON line of a command's output (the result; earlier lines are progress events)."""
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line:
            value = json.loads(line)
            if isinstance(value, dict) and "error" in value:
                raise SystemExit(f"{what}: {value['error']}")
            return value
    raise SystemExit(f"{what}: no output")


class Network:
    """`meshgram up` in a temp dir, and signed-in profiles on it."""

    def __init__(self, bins, work):
        self.bins, self.work = bins, work
        self.data = work / "net"
        self.proc = subprocess.Popen(
            [bins / "meshgram", "up", "--data", self.data, "--relays", "3", "--replication", "2"],
            stdout=subprocess.DEVNULL, stderr=open(work / "up.log", "wb"), stdin=subprocess.PIPE,
            start_new_session=True)
        deadline = time.monotonic() + 120
        network = self.data / "network.json"
        while not network.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"meshgram up did not start; see {work / 'up.log'}")
            time.sleep(0.2)
        time.sleep(2)
        self.code_sink = Path(json.loads(network.read_text())["gateway"]["code_sink"])
        if not self.code_sink.is_absolute():
            self.code_sink = self.data / self.code_sink

    def meshgram(self, profile, *args):
        return [self.bins / "meshgram", "--profile", self.work / profile, "--json", *map(str, args)]

    def run(self, profile, *args, timeout=600, stdin=b""):
        """Runs one command to completion: (stdout, wall seconds, peak RSS in KiB). Output goes to
        files, not pipes, so that a chatty command never blocks on a full pipe."""
        what = f"{profile}: meshgram {' '.join(map(str, args))}"
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
            inp.write(stdin)
            inp.seek(0)
            started = time.monotonic()
            proc = subprocess.Popen(self.meshgram(profile, *args), stdin=inp, stdout=out, stderr=err)
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() - started > timeout:
                    proc.kill()
                    proc.wait()
                    raise SystemExit(f"timed out after {timeout} s: {what}")
                time.sleep(0.005)
            wall = time.monotonic() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            if proc.returncode != 0:
                raise SystemExit(f"failed ({proc.returncode}): {what}\n{stdout[-4000:]}\n"
                                 f"{err.read().decode(errors='replace')[-4000:]}")
        return stdout, wall, usage.ru_maxrss

    def messages(self, profile, *chat, timeout=600):
        out, wall, rss = self.run(profile, "messages", *chat, timeout=timeout)
        messages = json.loads(out)
        if not isinstance(messages, list):
            raise SystemExit(f"{profile}: messages: {messages}")
        return messages, wall, rss

    def codes(self, phone):
        if not self.code_sink.exists():
            return []
        codes = []
        for line in self.code_sink.read_text().splitlines():
            try:
                j = json.loads(line)
            except ValueError:
                continue  # a line being written
            if j.get("phone") == phone:
                codes.append(j["code"])
        return codes

    def login(self, profile, phone):
        """Signs `profile` in, answering the code from the code sink; the login's JSON."""
        before = len(self.codes(phone))
        login = subprocess.Popen(
            self.meshgram(profile, "login", "--network", self.data / "network.json", "--phone", phone,
                          "--device-name", profile),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(self.codes(phone)) <= before:
            if time.monotonic() > deadline or login.poll() is not None:
                login.kill()
                out, err = login.communicate()
                raise SystemExit(f"no login code arrived for {phone}: {out.decode()} {err.decode()}")
            time.sleep(0.05)
        try:
            out, err = login.communicate(self.codes(phone)[-1].encode() + b"\n", timeout=60)
        except subprocess.TimeoutExpired:
            login.kill()
            raise SystemExit(f"login of {profile} timed out")
        if login.returncode != 0:
            raise SystemExit(f"login of {profile} failed: {out.decode()} {err.decode()}")
        return last_json(out.decode(), f"login {profile}")

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
