"""The desktop app in a real browser: Debian's chromium, headless, driven by Playwright.

Started by tests/tests/app.rs, which runs the network (gateway, relays, bot bridge) and two
`meshgram app`s (alice's and bob's profiles, not signed in), and passes where they are in the
environment. Everything here goes through the UI as a user would, finding controls by their
role and accessible name; the CLI is used only where a user would use it (making a bot, sending
from a terminal into the same node). Screenshots of each screen in light and dark theme go to
$SHOTS. Exits non-zero (an assertion or a timeout) when something does not work.
"""

import base64
import http.client
import json
import os
import re
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib

from playwright.sync_api import expect, sync_playwright

ENV = os.environ
CLI = ENV["MESHGRAM"]
CODES = ENV["CODES"]
SHOTS = ENV["SHOTS"]
BOT_API = ENV.get("BOT_API", "")
# The harness does to the network what a scenario asks through files here (offline scenario).
CONTROL = ENV.get("CONTROL", "")
A_URL, B_URL = ENV["A_URL"], ENV["B_URL"]
A_PROFILE, B_PROFILE = ENV["A_PROFILE"], ENV["B_PROFILE"]
A_PHONE, B_PHONE = ENV.get("A_PHONE", "+15550007001"), ENV.get("B_PHONE", "+15550007002")
# Usernames unique per pair of phones, so that a rerun on the same network finds them free.
BOB_NAME, ALICE_NAME, BOT_NAME = f"bob_{B_PHONE[-4:]}", f"alice_{A_PHONE[-4:]}", f"ui_{A_PHONE[-4:]}_bot"
# Debug builds on two cores: a message crosses the mesh in well under this.
WAIT_MS = 30_000


def log(*args):
    print("[ui]", *args, flush=True)


def shot(page, name):
    """The page as it is now, in light and in dark theme."""
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        page.screenshot(path=os.path.join(SHOTS, f"{name}-{scheme}.png"))
    page.emulate_media(color_scheme="light")


def codes_for(phone):
    """The codes the gateway 'texted' to phone so far, from its code sink file."""
    codes = []
    try:
        with open(CODES) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("phone") == phone:
                    codes.append(entry["code"])
    except FileNotFoundError:
        pass
    return codes


def code_for(phone, nth, timeout=20):
    """The nth code sent to phone, once it is there."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        codes = codes_for(phone)
        if len(codes) > nth:
            return codes[nth]
        time.sleep(0.1)
    raise AssertionError(f"no code #{nth} for {phone} in {CODES}")


def cli(profile, *args):
    out = subprocess.run([CLI, "--profile", profile, "--json", *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"meshgram {' '.join(args)} failed: {out.stdout} {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def png(width, height):
    """A small gradient PNG, made here (no image library needed)."""
    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 160)) for x in range(width)) for y in range(height)
    )

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def bot(method, **params):
    request = urllib.request.Request(f"{BOT_API}/{method}", data=json.dumps(params).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert body["ok"], body
    return body["result"]


def raw(url, method="GET", headers=None, body=None):
    """One request outside the browser: (status, JSON body)."""
    request = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def sign_in(page, phone, wrong_first=False, password=None):
    sent_before = len(codes_for(phone))
    page.get_by_label("Phone number").fill(phone)
    page.get_by_role("button", name="Send code").click()
    code = code_for(phone, sent_before)
    if wrong_first:
        wrong = "".join(str((int(c) + 1) % 10) for c in code)
        page.get_by_label("Code").fill(wrong)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert").first).not_to_be_empty(timeout=WAIT_MS)
        log("a wrong code is refused:", page.get_by_role("alert").first.inner_text())
    page.get_by_label("Code").fill(code)
    page.get_by_role("button", name="Sign in").click()
    if password:
        expect(page.get_by_role("alert").first).to_contain_text("password", timeout=WAIT_MS)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("list", name="Chats")).to_be_visible(timeout=WAIT_MS)


def open_chat(page, name):
    """Opens the chat whose name starts with `name` ("Alice" is not "Secret chat with Alice")."""
    page.get_by_role("list", name="Chats").get_by_role("button", name=re.compile("^" + re.escape(name))).first.click()
    expect(page.get_by_role("textbox", name="Message")).to_be_enabled(timeout=WAIT_MS)


def new_chat(page, who):
    """Opens a chat with `who` (@name or +phone) from the New chat dialog, once it is open."""
    page.get_by_role("button", name="New chat").click()
    page.get_by_label("Username or phone").fill(who)
    page.get_by_role("button", name="Open chat").click()
    expect(page.get_by_role("dialog")).to_be_hidden(timeout=WAIT_MS)
    expect(page.get_by_role("log", name="Messages").get_by_text("Loading…")).to_have_count(0, timeout=WAIT_MS)


def send(page, text):
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


def see_message(page, text):
    expect(page.get_by_role("log", name="Messages").get_by_text(text, exact=True).first).to_be_visible(timeout=WAIT_MS)


def check_guards():
    """What is not the app's own page is refused: no token, another site, another host name."""
    base = A_URL.split("#")[0].rstrip("/")
    status, body = raw(f"{base}/api/state")
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED", (status, body)
    token = A_URL.split("token=")[1]
    auth = {"Authorization": f"Bearer {token}"}
    status, _ = raw(f"{base}/api/state", headers=auth)
    assert status == 200, status
    status, body = raw(f"{base}/api/call", "POST", {**auth, "Origin": "http://evil.example", "Content-Type": "application/json"},
                       b'{"call":"whoami"}')
    assert status == 403 and body["error"]["code"] == "FORBIDDEN", (status, body)
    status, body = raw(f"{base}/api/state", headers={**auth, "Host": "evil.example"})
    assert status == 403, (status, body)
    status, body = raw(f"{base}/api/auth", "POST", {"Content-Type": "application/json"}, b'{"token":"00"}')
    assert status == 401, (status, body)
    status, body = raw(f"{base}/api/call", "POST", auth, b"not json")
    assert status == 400 and body["error"]["code"] == "BAD_REQUEST", (status, body)
    status, body = raw(f"{base}/api/call", "POST", auth, b'{"call":"download","message":"00000000000000000000000000000000","out":"/etc"}')
    assert status == 400 and body["error"]["code"] == "USAGE", (status, body)
    # A file bigger than any the network takes is refused from its length, before its bytes.
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/api/upload?to=1&name=huge.bin")
    connection.putheader("Authorization", f"Bearer {token}")
    connection.putheader("Content-Length", str(1 << 40))
    connection.endheaders()
    answer = connection.getresponse()
    body = json.loads(answer.read())
    assert answer.status == 413 and body["error"]["code"] == "FILE_TOO_BIG", (answer.status, body)
    log("guards: no token 401, other origin 403, other host 403, bad token 401, bad calls 400, huge file", answer.status)


def ask_harness(what, timeout=90):
    """Asks the harness to do `what` to the network and waits until it says it is done."""
    open(os.path.join(CONTROL, what), "w").close()
    done = os.path.join(CONTROL, f"{what}-done")
    deadline = time.time() + timeout
    while not os.path.exists(done):
        assert time.time() < deadline, f"the harness did not {what}"
        time.sleep(0.1)


def offline():
    """The only relay dies: the page says so, a message written meanwhile waits, and once the
    relay is back the banner goes and the message arrives."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        alice = browser.new_context().new_page()
        bob = browser.new_context().new_page()
        alice.goto(A_URL)
        sign_in(alice, A_PHONE)
        bob.goto(B_URL)
        sign_in(bob, B_PHONE)
        new_chat(alice, B_PHONE)
        send(alice, "before the relay died")
        expect(bob.get_by_role("list", name="Chats").get_by_role("button")).to_have_count(1, timeout=WAIT_MS)
        ask_harness("kill-relay")
        banner = alice.get_by_role("status").filter(has_text="reach the relays")
        expect(banner).to_be_visible(timeout=90_000)
        shot(alice, "10-relays-unreachable")
        send(alice, "written while the relay was down")
        see_message(alice, "written while the relay was down")
        log("relay down: the page says so:", banner.inner_text())
        ask_harness("restart-relay")
        expect(banner).to_be_hidden(timeout=90_000)
        bob.get_by_role("list", name="Chats").get_by_role("button").first.click()
        see_message(bob, "before the relay died")
        see_message(bob, "written while the relay was down")
        expect(alice.get_by_role("log", name="Messages").get_by_label("not sent yet")).to_have_count(0, timeout=WAIT_MS)
        log("relay back: banner gone, the waiting message delivered")
        browser.close()


def main():
    os.makedirs(SHOTS, exist_ok=True)
    check_guards()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        alice = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
        bob = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
        for page, who in ((alice, "alice"), (bob, "bob")):
            page.on("console", lambda m, who=who: log(f"{who} console:", m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e, who=who: (_ for _ in ()).throw(AssertionError(f"{who} page error: {e}")))

        # Sign in through the UI, with the codes the gateway "texted".
        alice.goto(A_URL)
        expect(alice.get_by_role("form", name="Sign in")).to_be_visible()
        shot(alice, "01-sign-in")
        sign_in(alice, A_PHONE, wrong_first=True)
        bob.goto(B_URL)
        sign_in(bob, B_PHONE)
        assert "token" not in alice.url, "the token is taken out of the address bar"
        cli(A_PROFILE, "profile", "set", "--name", "Alice", "--username", ALICE_NAME)
        # bob names himself in the app's settings.
        bob.get_by_role("button", name="Settings").click()
        bob.get_by_label("Name", exact=True).fill("Bob")
        bob.get_by_label("Username").fill(BOB_NAME)
        bob.get_by_role("button", name="Save").click()
        expect(bob.get_by_role("dialog")).to_be_hidden(timeout=WAIT_MS)
        assert cli(B_PROFILE, "whoami")["account"]["username"] == BOB_NAME
        log("both signed in through the UI")

        # alice starts a chat with bob and they talk both ways.
        new_chat(alice, "@" + BOB_NAME)
        send(alice, "hello bob, from the app")
        expect(bob.get_by_role("list", name="Chats").get_by_role("button", name="Alice")).to_be_visible(timeout=WAIT_MS)
        shot(bob, "02-chat-list")
        open_chat(bob, "Alice")
        see_message(bob, "hello bob, from the app")
        send(bob, "hi alice!\nsecond line")
        see_message(alice, "hi alice!\nsecond line")
        # bob has it open: alice sees it read (✓✓).
        expect(alice.get_by_role("log", name="Messages").get_by_label("read").first).to_be_visible(timeout=WAIT_MS)
        log("chat both ways; receipts reach read")

        # The CLI and the app are one node: a message sent from the terminal shows in the app.
        cli(A_PROFILE, "send", "@" + BOB_NAME, "from alice's terminal")
        see_message(alice, "from alice's terminal")
        see_message(bob, "from alice's terminal")
        log("the CLI's message shows in both apps")

        # Reply, edit, delete.
        msg = bob.get_by_role("log", name="Messages").get_by_role("listitem").filter(has_text="from alice's terminal")
        msg.hover()
        msg.get_by_role("button", name="Reply").click()
        send(bob, "a reply")
        expect(alice.get_by_role("log", name="Messages").locator("li", has_text="a reply").locator(".quote")).to_contain_text(
            "from alice's terminal", timeout=WAIT_MS)
        own = alice.get_by_role("log", name="Messages").get_by_role("listitem").filter(has_text="hello bob, from the app")
        own.hover()
        own.get_by_role("button", name="Edit").click()
        box = alice.get_by_role("textbox", name="Message")
        box.fill("hello bob, edited")
        box.press("Enter")
        see_message(bob, "hello bob, edited")
        alice.once("dialog", lambda d: d.accept())
        own = alice.get_by_role("log", name="Messages").get_by_role("listitem").filter(has_text="hello bob, edited")
        own.hover()
        own.get_by_role("button", name="Delete").click()
        see_message(bob, "This message was deleted.")
        log("reply, edit and delete reach the other side")
        shot(alice, "03-chat")

        # Typing shows on the other side.
        bob.get_by_role("textbox", name="Message").press_sequentially("typ", delay=50)
        expect(alice.locator("#chat-status")).to_have_text("typing…", timeout=WAIT_MS)
        bob.get_by_role("textbox", name="Message").fill("")

        # A photo: the preview on the other side, then the picture.
        alice.locator("#attach-file").set_input_files(files=[{"name": "gradient.png", "mimeType": "image/png", "buffer": png(320, 200)}])
        photo = bob.get_by_role("log", name="Messages").get_by_role("img", name="gradient.png")
        expect(photo).to_be_visible(timeout=WAIT_MS)
        bob.wait_for_function("() => { const i = document.querySelector('img.photo'); return i && i.complete && i.naturalWidth > 0 && i.classList.contains('loaded'); }", timeout=WAIT_MS)
        assert bob.evaluate("document.querySelector('img.photo').naturalWidth") == 320
        log("the photo shows on bob's side, preview then picture")

        # A video bigger than one media window: playback starts from the first windows.
        media_answers = []
        bob.on("response", lambda r: media_answers.append((r.status, r.headers.get("content-range"))) if "/api/media/" in r.url else None)
        video_b64 = alice.evaluate("""async () => {
            const canvas = document.createElement('canvas'); canvas.width = 640; canvas.height = 360;
            const ctx = canvas.getContext('2d');
            const stream = canvas.captureStream(30);
            const recorder = new MediaRecorder(stream, { mimeType: 'video/webm;codecs=vp8', videoBitsPerSecond: 12000000 });
            const chunks = [];
            recorder.ondataavailable = (e) => chunks.push(e.data);
            const done = new Promise((r) => { recorder.onstop = r; });
            recorder.start(250);
            const image = ctx.createImageData(640, 360);
            const end = performance.now() + 4000;
            while (performance.now() < end) {
                for (let i = 0; i < image.data.length; i += 4) { image.data[i] = Math.random() * 255; image.data[i + 1] = Math.random() * 255; image.data[i + 2] = Math.random() * 255; image.data[i + 3] = 255; }
                ctx.putImageData(image, 0, 0);
                await new Promise((r) => setTimeout(r, 33));
            }
            recorder.stop();
            await done;
            const bytes = new Uint8Array(await new Blob(chunks).arrayBuffer());
            let text = ''; for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
            return btoa(text);
        }""")
        video = base64.b64decode(video_b64)
        log(f"recorded a {len(video)}-byte video")
        assert len(video) > 2 * 1024 * 1024 * 1.2, "the video is bigger than one media window"
        alice.locator("#attach-file").set_input_files(files=[{"name": "noise.webm", "mimeType": "video/webm", "buffer": video}])
        player = bob.get_by_role("log", name="Messages").locator("video")
        expect(player).to_be_visible(timeout=WAIT_MS)
        bob.evaluate("document.querySelector('video').muted = true; document.querySelector('video').play()")
        bob.wait_for_function("() => document.querySelector('video').currentTime > 0.2", timeout=WAIT_MS)
        partial = [a for a in media_answers if a[0] == 206]
        assert partial, f"the video came in ranges: {media_answers}"
        first_end = int(partial[0][1].split("-")[1].split("/")[0])
        assert first_end + 1 < len(video), f"the first answer is a window, not the whole file: {partial[0]}"
        log(f"video plays from ranged answers: {partial[:3]}")

        # A group: alice creates it with bob; both write in it.
        alice.get_by_role("button", name="New group").click()
        alice.get_by_label("Group name").fill("App testers")
        alice.get_by_label("Members").fill("@" + BOB_NAME)
        alice.get_by_role("button", name="Create group").click()
        expect(alice.get_by_role("heading", name="App testers")).to_be_visible(timeout=WAIT_MS)
        send(alice, "welcome to the group")
        expect(bob.get_by_role("list", name="Chats").get_by_role("button", name="App testers")).to_be_visible(timeout=WAIT_MS)
        open_chat(bob, "App testers")
        see_message(bob, "welcome to the group")
        send(bob, "glad to be here")
        see_message(alice, "glad to be here")
        alice.get_by_role("button", name="Group info").click()
        expect(alice.get_by_role("dialog").get_by_role("list", name="Members")).to_contain_text("Bob")
        alice.get_by_role("button", name="Make invite link").click()
        expect(alice.get_by_role("dialog").get_by_label("Invite link")).not_to_be_empty(timeout=WAIT_MS)
        shot(alice, "04-group-info")
        alice.keyboard.press("Escape")
        log("group created, messages both ways, invite link made")

        # A channel: only its admin posts.
        alice.get_by_role("button", name="New channel").click()
        alice.get_by_label("Channel name").fill("App news")
        alice.get_by_role("button", name="Create channel").click()
        expect(alice.get_by_role("heading", name="App news")).to_be_visible(timeout=WAIT_MS)
        send(alice, "first post")
        see_message(alice, "first post")
        channel_name = f"news_{A_PHONE[-4:]}"
        alice.get_by_role("button", name="Channel info").click()
        alice.get_by_label("Public name").fill("@" + channel_name)
        alice.get_by_role("button", name="Set name").click()
        expect(alice.locator("#toast")).to_contain_text("@" + channel_name, timeout=WAIT_MS)
        alice.keyboard.press("Escape")
        bob.get_by_role("button", name="Join with a link").click()
        bob.get_by_label("Invite link, channel link or @name").fill("@" + channel_name)
        bob.get_by_role("dialog").get_by_role("button", name="Join", exact=True).click()
        expect(bob.get_by_role("heading", name="App news")).to_be_visible(timeout=WAIT_MS)
        see_message(bob, "first post")
        log("channel created, posted to, named, and subscribed to by its @name")

        # A secret chat: alice starts it, bob accepts, both see the same key.
        open_chat(alice, "Bob")
        alice.get_by_role("button", name="Start secret chat").click()
        expect(bob.get_by_role("list", name="Chats").get_by_role("button", name="Secret chat with Alice")).to_be_visible(timeout=WAIT_MS)
        open_chat(bob, "Secret chat with Alice")
        bob.get_by_role("button", name="Accept").click()
        expect(alice.get_by_role("button", name="Encryption key")).to_be_visible(timeout=WAIT_MS)
        send(alice, "a secret hello")
        see_message(bob, "a secret hello")
        alice.get_by_label("Self-destruct timer").select_option("30")
        expect(alice.locator("#chat-status")).to_contain_text("self-destruct 30 s", timeout=WAIT_MS)
        keys = []
        for page in (alice, bob):
            page.get_by_role("button", name="Encryption key").click()
            emoji = page.get_by_label("Key as emoji").inner_text()
            hexes = page.get_by_label("Key as hex").inner_text()
            keys.append((emoji, hexes))
        assert keys[0] == keys[1] and keys[0][0] != "—", keys
        shot(bob, "05-secret-key")
        for page in (alice, bob):
            page.keyboard.press("Escape")
        log("secret chat: same fingerprint on both sides:", keys[0][0])
        alice.locator("#attach-file").set_input_files(files=[{"name": "secret.png", "mimeType": "image/png", "buffer": png(120, 80)}])
        secret_photo = bob.get_by_role("log", name="Messages").get_by_role("img", name="secret.png")
        expect(secret_photo).to_be_visible(timeout=WAIT_MS)
        bob.wait_for_function("() => [...document.querySelectorAll('img.photo')].some((i) => i.alt === 'secret.png' && i.complete && i.naturalWidth === 120)", timeout=WAIT_MS)
        log("a photo in the secret chat shows on the other device")

        # A bot with an inline keyboard: press its button, see its answer.
        made = cli(A_PROFILE, "bot", "create", "--username", BOT_NAME, "--name", "UI bot")
        global BOT_API
        BOT_API = f"{BOT_API}/bot{made['token']}"
        bot("getMe")
        new_chat(alice, "@" + BOT_NAME)
        send(alice, "/start")
        # ✓✓: the bot's device has it (a refusal would be a toast on the page).
        start_line = alice.get_by_role("log", name="Messages").get_by_role("listitem").filter(has_text="/start")
        expect(start_line.get_by_label(re.compile("^(delivered|read)$"))).to_be_visible(timeout=WAIT_MS)
        deadline = time.time() + 60
        offset, chat_id = 0, None
        while chat_id is None and time.time() < deadline:
            for update in bot("getUpdates", offset=offset, timeout=5):
                offset = update["update_id"] + 1
                if update.get("message", {}).get("text") == "/start":
                    chat_id = update["message"]["chat"]["id"]
        assert chat_id, "the bot got /start"
        bot("sendMessage", chat_id=chat_id, text="Pick one",
            reply_markup={"inline_keyboard": [[{"text": "Press me", "callback_data": "pressed-1"}]]})
        alice.get_by_role("group", name="Buttons").get_by_role("button", name="Press me").click()
        answered = False
        while not answered and time.time() < deadline:
            for update in bot("getUpdates", offset=offset, timeout=5):
                offset = update["update_id"] + 1
                if "callback_query" in update:
                    assert update["callback_query"]["data"] == "pressed-1"
                    bot("answerCallbackQuery", callback_query_id=update["callback_query"]["id"], text="Pressed!")
                    answered = True
        assert answered, "the bot got the press"
        expect(alice.locator("#toast")).to_have_text("Pressed!", timeout=WAIT_MS)
        bot("sendMessage", chat_id=chat_id, text="Yes or no?",
            reply_markup={"keyboard": [[{"text": "Yes"}, {"text": "No"}]], "resize_keyboard": True})
        alice.get_by_role("group", name="Bot keyboard").get_by_role("button", name="Yes").click()
        said, deadline = None, time.time() + 60
        while said is None and time.time() < deadline:
            for update in bot("getUpdates", offset=offset, timeout=5):
                offset = update["update_id"] + 1
                said = update.get("message", {}).get("text", said)
        assert said == "Yes", said
        shot(alice, "06-bot")
        log("bot: inline button pressed and answered; a reply keyboard's button sent its text")

        # Settings: profile and sessions.
        alice.get_by_role("button", name="Settings").click()
        expect(alice.get_by_role("list", name="Sessions")).to_contain_text("this device")
        shot(alice, "07-settings")
        alice.keyboard.press("Escape")

        # 2FA: alice sets a password in her settings; her new device must give it, asks her
        # first device for the history, gets it, and is then signed out from the first.
        alice.get_by_role("button", name="Settings").click()
        alice.get_by_label("New password").fill("correct horse")
        alice.get_by_role("button", name="Save").click()
        expect(alice.get_by_role("dialog")).to_be_hidden(timeout=WAIT_MS)
        third_profile = os.path.join(os.path.dirname(A_PROFILE), "alice-laptop")
        third = subprocess.Popen([CLI, "--profile", third_profile, "app", "--no-open", *ENV["LOGIN_ARGS"].split()],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        try:
            laptop = browser.new_context().new_page()
            laptop.goto(json.loads(third.stdout.readline())["url"])
            sign_in(laptop, A_PHONE, password="correct horse")
            asked = alice.get_by_role("dialog", name="A new device asks for your history")
            expect(asked).to_be_visible(timeout=WAIT_MS)
            shot(alice, "11-device-asks")
            asked.get_by_role("button", name="Send history").click()
            expect(laptop.get_by_role("list", name="Chats").get_by_role("button", name="Bob")).to_be_visible(timeout=WAIT_MS)
            log("2FA sign-in on a new device; the history came from the first")
            alice.get_by_role("button", name="Settings").click()
            sessions = alice.get_by_role("list", name="Sessions")
            expect(sessions.get_by_role("listitem")).to_have_count(2)
            sessions.get_by_role("button", name="Revoke").first.click()
            expect(sessions.get_by_role("listitem")).to_have_count(1, timeout=WAIT_MS)
            alice.keyboard.press("Escape")
            assert len(cli(A_PROFILE, "sessions")) == 1
            log("the new device's session revoked from the first")
        finally:
            third.terminate()
            third.wait(30)

        # A new message while bob's tab is hidden becomes a desktop notification.
        watcher_context = bob.context
        watcher_context.grant_permissions(["notifications"])
        watcher = watcher_context.new_page()
        watcher.add_init_script("""(() => {
            const Real = window.Notification; window.__notes = [];
            class Counted extends Real { constructor(title, options) { super(title, options); window.__notes.push([title, options && options.body]); } }
            Object.defineProperty(Counted, 'permission', { get: () => Real.permission });
            Counted.requestPermission = () => Real.requestPermission();
            window.Notification = Counted;
            Object.defineProperty(document, 'hidden', { get: () => window.__hidden === true });
        })()""")
        watcher.goto(B_URL.split("#")[0])
        expect(watcher.get_by_role("list", name="Chats")).to_be_visible(timeout=WAIT_MS)
        watcher.evaluate("window.__hidden = true")
        open_chat(alice, "Bob")
        send(alice, "are you there?")
        watcher.wait_for_function("() => window.__notes.some(([t, b]) => b === 'are you there?')", timeout=WAIT_MS)
        log("a hidden tab shows a desktop notification:", watcher.evaluate("window.__notes"))

        # Every control has an accessible name (what assistive technology reads out).
        unnamed = alice.evaluate("""() => [...document.querySelectorAll('button, input, textarea, select, [role=button]')]
            .filter((el) => el.type !== 'file' && !el.closest('[hidden]'))
            .filter((el) => !(el.getAttribute('aria-label') || (el.labels && el.labels.length) || el.textContent.trim() || el.title))
            .map((el) => el.outerHTML.slice(0, 120))""")
        assert not unnamed, f"controls without a name: {unnamed}"

        # The keyboard alone: Ctrl+K, Tab to the chats, Enter opens one, type, Enter sends.
        alice.keyboard.press("Control+k")
        alice.keyboard.press("Tab")
        expect(alice.get_by_role("list", name="Chats").get_by_role("button").first).to_be_focused()
        alice.keyboard.press("Enter")
        expect(alice.get_by_role("textbox", name="Message")).to_be_focused(timeout=WAIT_MS)
        alice.keyboard.type("typed with the keyboard alone")
        alice.keyboard.press("Shift+Enter")
        alice.keyboard.type("on two lines")
        alice.keyboard.press("Enter")
        see_message(alice, "typed with the keyboard alone\non two lines")
        log("keyboard alone: search, chat list, open, Shift+Enter, Enter")

        # A file dropped on the chat is sent.
        alice.evaluate("""() => {
            const data = new DataTransfer();
            data.items.add(new File(['dropped bytes'], 'dropped.txt', { type: 'text/plain' }));
            document.querySelector('#pane').dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
        }""")
        expect(alice.get_by_role("log", name="Messages").get_by_role("link", name="Download dropped.txt")).to_be_visible(timeout=WAIT_MS)
        log("drag and drop sends the file")

        # Ctrl+K searches the chat list.
        alice.keyboard.press("Control+k")
        expect(alice.get_by_role("searchbox", name="Search")).to_be_focused()
        alice.keyboard.type("testers")
        expect(alice.get_by_role("list", name="Chats").get_by_role("button")).to_have_count(1)
        alice.keyboard.press("Escape")

        # A phone-sized window: the list, then the chat with a way back.
        narrow = browser.new_context(viewport={"width": 390, "height": 780}).new_page()
        narrow.goto(B_URL)
        expect(narrow.get_by_role("list", name="Chats")).to_be_visible(timeout=WAIT_MS)
        shot(narrow, "08-narrow-list")
        open_chat(narrow, "Alice")
        expect(narrow.get_by_role("list", name="Chats")).to_be_hidden()
        see_message(narrow, "are you there?")
        shot(narrow, "09-narrow-chat")
        narrow.get_by_role("button", name="Back to chats").click()
        expect(narrow.get_by_role("list", name="Chats")).to_be_visible()
        log("narrow window: list, chat, back")
        browser.close()
    log("all UI checks passed")


if __name__ == "__main__":
    try:
        offline() if sys.argv[1:] == ["offline"] else main()
    except Exception as e:  # the harness shows this output when the test fails
        log("FAILED:", repr(e))
        raise
    sys.exit(0)
