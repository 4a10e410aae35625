#!/usr/bin/env python3
"""The benchmark's echo bot: the Bot API by hand (long-polled getUpdates, sendMessage), so
that what is measured is the bridge and the network, not a library's scheduling.

Usage: echo_bot.py BASE_URL TOKEN   (BASE_URL: network.json's bot_api)
"""
import json
import sys
import urllib.parse
import urllib.request


def call(base, token, method, **params):
    data = json.dumps(params).encode()
    request = urllib.request.Request(f"{base}{token}/{method}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["result"]


def main():
    base, token = sys.argv[1], sys.argv[2]
    offset = 0
    print("echo bot polling", flush=True)
    while True:
        for update in call(base, token, "getUpdates", offset=offset, timeout=30):
            offset = update["update_id"] + 1
            message = update.get("message")
            if message and "text" in message:
                call(base, token, "sendMessage", chat_id=message["chat"]["id"], text="echo: " + message["text"])


if __name__ == "__main__":
    main()
