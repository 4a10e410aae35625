#!/usr/bin/env python3
"""A stand-in for a Web Push service (RFC 8030) in the push tests, and a device's side of RFC 8291.

  push_service.py serve LOG     HTTP on 127.0.0.1 (any port); prints {"event":"ready","url":…};
                                appends every POST to LOG as a JSON line {path, headers,
                                body (base64), at}. How it answers depends on the path's first
                                part: /ok/… 201; /gone/… 410; /fail/… 500; /flaky/… 503 with
                                Retry-After: 1 the first time per path, then 201; /slow/… waits
                                30 s, then 201.
  push_service.py keys [--hyphen]
                                a device's subscription keys: {"private", "p256dh", "auth"}
                                (base64url; private is the raw P-256 scalar); with --hyphen the
                                auth secret starts with '-'.
  push_service.py vapid HEADER  checks an `Authorization: vapid t=JWT, k=KEY` header (RFC 8292):
                                the JWT's ES256 signature by KEY; prints its claims.
  push_service.py decrypt PRIVATE AUTH
                                reads a body (base64) on stdin and writes its plaintext,
                                decrypted with http_ece (aes128gcm), an implementation of its
                                own: what a woken device does.
"""

import base64
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import http_ece
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def keys(hyphen: bool) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public = private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    scalar = private.private_numbers().private_value.to_bytes(32, "big")
    auth = bytearray(os.urandom(16))
    if hyphen:
        # The first six bits 62: base64url's '-'.
        auth[0] = 0xF8 | (auth[0] & 0x03)
    print(json.dumps({"private": b64url(scalar), "p256dh": b64url(public), "auth": b64url(bytes(auth))}))


def decrypt(private_b64: str, auth_b64: str) -> None:
    scalar = int.from_bytes(unb64url(private_b64), "big")
    private = ec.derive_private_key(scalar, ec.SECP256R1())
    body = base64.b64decode(sys.stdin.read())
    plaintext = http_ece.decrypt(body, private_key=private, auth_secret=unb64url(auth_b64), version="aes128gcm")
    sys.stdout.buffer.write(plaintext)


def vapid(header: str) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    scheme, _, params = header.partition(" ")
    assert scheme == "vapid", f"not a vapid header: {header}"
    fields = dict(part.strip().split("=", 1) for part in params.split(","))
    header_b64, claims_b64, signature_b64 = fields["t"].split(".")
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(fields["k"]))
    signature = unb64url(signature_b64)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    key.verify(der, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    assert json.loads(unb64url(header_b64)) == {"typ": "JWT", "alg": "ES256"}
    print(json.dumps(json.loads(unb64url(claims_b64))))


def serve(log_path: str) -> None:
    lock = threading.Lock()
    flaky_seen = set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            entry = {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": base64.b64encode(body).decode(),
                "at": time.time(),
            }
            with lock:
                with open(log_path, "a") as log:
                    log.write(json.dumps(entry) + "\n")
            kind = self.path.strip("/").split("/")[0]
            status, headers = 201, {}
            if kind == "gone":
                status = 410
            elif kind == "fail":
                status = 500
            elif kind == "flaky":
                with lock:
                    first = self.path not in flaky_seen
                    flaky_seen.add(self.path)
                if first:
                    status, headers = 503, {"Retry-After": "1"}
            elif kind == "slow":
                time.sleep(30)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(json.dumps({"event": "ready", "url": f"http://127.0.0.1:{server.server_address[1]}"}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "serve" and len(sys.argv) == 3:
        serve(sys.argv[2])
    elif command == "keys" and sys.argv[2:] in ([], ["--hyphen"]):
        keys(sys.argv[2:] == ["--hyphen"])
    elif command == "vapid" and len(sys.argv) == 3:
        vapid(sys.argv[2])
    elif command == "decrypt" and len(sys.argv) == 4:
        decrypt(sys.argv[2], sys.argv[3])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
