"""The desktop app's speed (issue 15), in one run; see tests/bench/app.sh.

`meshgram up`; alice and carol sign in with the CLI; bob sends alice --messages messages and
carol sends her --small (the baseline chat), while alice's node receives them. Then, timed from
the moment `meshgram app` is started on alice's profile: the ready line, the page's first
contentful paint, and an interactive chat list (chats shown, a button to press). Then in
chromium (headless, Debian's): opening each chat until its newest message is on screen,
scrolling back through the long one (frame times from requestAnimationFrame while it pages in
history), and the tab's JS heap and DOM size for each chat. Prints a table with the long chat
against the baseline chat.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from playwright.sync_api import expect, sync_playwright

ALICE, BOB, CAROL = "+15550009001", "+15550009002", "+15550009003"


def wait_line(process, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            raise SystemExit(f"exited before its ready line ({process.args})")
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if value.get("event") == "ready":
            return value
    raise SystemExit("no ready line in time")


def codes(sink, phone):
    try:
        with open(sink) as f:
            return [json.loads(line)["code"] for line in f if json.loads(line).get("phone") == phone]
    except FileNotFoundError:
        return []


class Net:
    def __init__(self, bin_dir, tmp):
        self.bin = os.path.join(bin_dir, "meshgram")
        self.tmp = tmp
        self.up = subprocess.Popen([self.bin, "--json", "up", "--data", os.path.join(tmp, "net")],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        ready = wait_line(self.up, 120)
        self.network = ready["network"]
        with open(self.network) as f:
            self.sink = json.load(f)["gateway"]["code_sink"]

    def cli(self, profile, *args, stdin=None, timeout=600):
        out = subprocess.run([self.bin, "--profile", profile, "--json", *args], input=stdin, capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise SystemExit(f"meshgram {args[:3]} failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        return out.stdout

    def login(self, name, phone):
        profile = os.path.join(self.tmp, name)
        before = len(codes(self.sink, phone))
        child = subprocess.Popen([self.bin, "--profile", profile, "--json", "login", "--network", self.network, "--phone", phone],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.time() + 30
        while len(codes(self.sink, phone)) <= before:
            if time.time() > deadline:
                raise SystemExit(f"no code for {phone}")
            time.sleep(0.05)
        child.communicate(codes(self.sink, phone)[-1] + "\n", timeout=60)
        if child.returncode != 0:
            raise SystemExit(f"login {phone} failed")
        return profile

    def stop(self):
        os.killpg(self.up.pid, signal.SIGTERM)
        try:
            self.up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.up.pid, signal.SIGKILL)


def fill_chat(net, sender, to, count, receiver_node):
    """`count` numbered messages from `sender` to `to`, in batches, while the receiver's node runs."""
    sent = 0
    batch = 10_000
    while sent < count:
        n = min(batch, count - sent)
        lines = "".join(f"message {sent + i + 1} of {count}\n" for i in range(n))
        net.cli(sender, "send", to, "--lines", stdin=lines)
        sent += n
        print(f"   {sent}/{count} sent", flush=True)
    last = f"message {count} of {count}"
    deadline = time.time() + 900
    while time.time() < deadline:
        out = net.cli(receiver_node, "chats")
        if last in out:
            return
        time.sleep(1)
    raise SystemExit(f"the receiver did not get {last!r}")


def open_chat_ms(page, name, last_text):
    start = time.perf_counter()
    page.get_by_role("list", name="Chats").get_by_role("button", name=name).first.click()
    expect(page.get_by_role("log", name="Messages").get_by_text(last_text, exact=True)).to_be_visible(timeout=120_000)
    return (time.perf_counter() - start) * 1000


def memory(page, cdp):
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return metrics["JSHeapUsedSize"] / 1024 / 1024, int(metrics["Nodes"])


def scroll_frames(page, seconds):
    """Scrolls the message list up with the wheel for `seconds`, returning frame intervals (ms)
    and how far back it got."""
    page.evaluate("""() => { window.__frames = []; let last = performance.now();
        const tick = (t) => { window.__frames.push(t - last); last = t; if (window.__frames.length < 100000) window.__raf = requestAnimationFrame(tick); };
        window.__raf = requestAnimationFrame(tick); }""")
    box = page.get_by_role("log", name="Messages").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    end = time.time() + seconds
    while time.time() < end:
        page.mouse.wheel(0, -800)
        page.wait_for_timeout(16)
    frames = page.evaluate("() => { cancelAnimationFrame(window.__raf); return window.__frames.slice(1); }")
    in_page = page.evaluate("() => document.querySelectorAll('#messages li.message').length")
    oldest = page.evaluate("() => document.querySelector('#messages li.message .text').textContent")
    return frames, f"{in_page} messages in the page, back to “{oldest}”"


def pct(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--scroll-seconds", type=float, default=10)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="meshgram-app-bench-")
    net = Net(args.bin_dir, tmp)
    app = None
    try:
        print("== signing in and filling the chats", flush=True)
        alice, bob, carol = net.login("alice", ALICE), net.login("bob", BOB), net.login("carol", CAROL)
        net.cli(bob, "profile", "set", "--name", "Bob")
        net.cli(carol, "profile", "set", "--name", "Carol")
        node = subprocess.Popen([net.bin, "--profile", alice, "--json", "node"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        wait_line(node, 60)
        fill_chat(net, carol, ALICE, args.small, alice)
        fill_chat(net, bob, ALICE, args.messages, alice)
        node.terminate()
        node.wait(30)

        print("== the app", flush=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
            started = time.perf_counter()
            app = subprocess.Popen([net.bin, "--profile", alice, "--json", "app", "--no-open"], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
            url = wait_line(app, 60)["url"]
            ready_ms = (time.perf_counter() - started) * 1000
            page.goto(url)
            page.wait_for_function("() => performance.getEntriesByName('first-contentful-paint').length > 0")
            nav_ms = (time.perf_counter() - started) * 1000 - page.evaluate("() => performance.now()")
            paint_ms = nav_ms + page.evaluate("() => performance.getEntriesByName('first-contentful-paint')[0].startTime")
            expect(page.get_by_role("list", name="Chats").get_by_role("button", name="Bob")).to_be_visible(timeout=120_000)
            interactive_ms = (time.perf_counter() - started) * 1000
            cdp = page.context.new_cdp_session(page)
            cdp.send("Performance.enable")

            small_ms = open_chat_ms(page, "Carol", f"message {args.small} of {args.small}")
            small_heap, small_nodes = memory(page, cdp)
            big_ms = open_chat_ms(page, "Bob", f"message {args.messages} of {args.messages}")
            big_heap, big_nodes = memory(page, cdp)
            frames, loaded = scroll_frames(page, args.scroll_seconds)
            scrolled_heap, scrolled_nodes = memory(page, cdp)
            browser.close()

        print()
        print(f"meshgram app on a profile with chats of {args.messages:,} and {args.small:,} messages (binaries: {args.bin_dir})")
        print(f"| What | Figure |")
        print(f"|---|---|")
        print(f"| `meshgram app` started → ready line | {ready_ms:.0f} ms |")
        print(f"| → first contentful paint | {paint_ms:.0f} ms |")
        print(f"| → interactive chat list | {interactive_ms:.0f} ms |")
        print(f"| open the {args.small}-message chat (baseline) | {small_ms:.0f} ms |")
        print(f"| open the {args.messages:,}-message chat | {big_ms:.0f} ms ({big_ms / small_ms:.2f}× the baseline) |")
        print(f"| scrolling back {args.scroll_seconds:.0f} s: frames p50 / p99 / max | {pct(frames, 0.5):.1f} / {pct(frames, 0.99):.1f} / {max(frames):.1f} ms ({len(frames)} frames; {loaded}) |")
        print(f"| JS heap, DOM nodes: baseline chat open | {small_heap:.1f} MiB, {small_nodes:,} |")
        print(f"| JS heap, DOM nodes: long chat open | {big_heap:.1f} MiB, {big_nodes:,} ({big_heap / small_heap:.2f}× the baseline heap) |")
        print(f"| JS heap, DOM nodes: after scrolling back | {scrolled_heap:.1f} MiB, {scrolled_nodes:,} |")
    finally:
        if app:
            app.terminate()
        net.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
