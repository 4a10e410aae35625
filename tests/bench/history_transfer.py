#!/usr/bin/env python3
"""History to a new device, and encrypted backups: see history_transfer.sh, which builds and runs this."""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meshnet import Network, last_json, log, random_file  # noqa: E402

ALICE = "+15550001111"
MB = 1_000_000


def contact_phone(i):
    return f"+1555100{i:04d}"


def setup(net, args):
    """alice on d1, the contacts, the messages and the media: what d1's history holds."""
    started = time.monotonic()
    net.login("d1", ALICE)
    contacts = [contact_phone(i) for i in range(args.chats)]
    for i, phone in enumerate(contacts):
        net.login(f"c{i}", phone)
    log(f"== signed in alice (d1) and {len(contacts)} contacts in {time.monotonic() - started:.1f} s")
    send_s = 0.0
    for i, phone in enumerate(contacts):
        lines = "".join(f"chat {i} message {j}: the quick brown fox jumps over the lazy dog {os.urandom(4).hex()}\n"
                        for j in range(args.per_chat))
        out, wall, _ = net.run("d1", "send", phone, "--lines", stdin=lines.encode(), timeout=600)
        sent = last_json(out, "send")
        if sent["sent"] != args.per_chat or sent["status"] != "sent":
            raise SystemExit(f"send to {phone}: {sent['sent']} messages {sent['status']}, not {args.per_chat} sent")
        send_s += wall
    total = args.chats * args.per_chat
    log(f"== sent {total} messages in {send_s:.1f} s ({total / send_s:.0f} msg/s)")
    upload_s = 0.0
    for k in range(args.files):
        media = net.work / f"media-{k}.bin"
        random_file(media, args.file_mb * MB)
        _, wall, _ = net.run("d1", "upload", media, "--to", contacts[k % len(contacts)], timeout=600)
        upload_s += wall
        media.unlink()
    media_bytes = args.files * args.file_mb * MB
    log(f"== uploaded {args.files} files, {media_bytes / MB:.0f} MB, in {upload_s:.1f} s "
        f"({media_bytes / MB / upload_s:.0f} MB/s)")
    messages, _, _ = net.messages("d1")
    files = [m for m in messages if m.get("file")]
    referenced = sum(m["file"]["size"] for m in files)
    log(f"== d1 holds {len(messages)} messages, {len(files)} with files ({referenced / MB:.0f} MB referenced)")
    return messages, {"messages": len(messages), "file_messages": len(files), "referenced_bytes": referenced,
                      "send_s": send_s, "upload_s": upload_s}


def history_transfer(net, d1_messages):
    """d2 signs in as alice, d1 approves it, d2 fetches and merges: the figures."""
    d1_count = len(d1_messages)
    login = net.login("d2", ALICE)
    if not login.get("history_requested"):
        raise SystemExit(f"d2's login did not ask for the history: {login}")
    d2 = login["device"]
    out, _, _ = net.run("d1", "devices")
    devices = json.loads(out)
    asking = [d for d in devices if d["device"] == d2]
    if not asking or not asking[0]["asked_for_history"]:
        raise SystemExit(f"d1 does not see d2's request: {devices}")
    out, approve_s, approve_rss = net.run("d1", "devices", "approve", d2, timeout=900)
    sent = last_json(out, "devices approve")
    if sent["messages"] != d1_count:
        raise SystemExit(f"approve sent {sent['messages']} messages, d1 holds {d1_count}")
    # The one-shot node fetches the History envelope, downloads the export and merges it; if
    # the export cannot be fetched yet it is left for the next call, so retry a few times.
    started = time.monotonic()
    attempts, fetch_rss = 0, 0
    while True:
        attempts += 1
        messages, _, rss = net.messages("d2", timeout=900)
        fetch_rss = max(fetch_rss, rss)
        if len(messages) >= d1_count or attempts >= 10:
            break
        time.sleep(0.5)
    fetch_s = time.monotonic() - started
    if len(messages) != d1_count:
        raise SystemExit(f"d2 holds {len(messages)} messages after {attempts} fetches, d1 holds {d1_count}")
    if {m["id"] for m in messages} != {m["id"] for m in d1_messages}:
        raise SystemExit("d2 holds other messages than d1")
    # What the same call costs with nothing to fetch: listing 10,000 messages as JSON.
    _, list_s, _ = net.messages("d2", timeout=600)
    # The references moved, not the bytes: d2 downloads one of the files from the chunk store.
    media = [m for m in messages if m.get("file")][0]
    out_path = net.work / "media-on-d2.bin"
    _, media_s, _ = net.run("d2", "download", media["id"], "-o", out_path, timeout=600)
    if out_path.stat().st_size != media["file"]["size"]:
        raise SystemExit("d2's download of a file from the history has the wrong size")
    out_path.unlink()
    total_s = approve_s + fetch_s
    return {"messages": sent["messages"], "export_bytes": sent["bytes"], "approve_s": approve_s,
            "fetch_merge_s": fetch_s, "fetch_attempts": attempts, "total_s": total_s,
            "messages_per_s": sent["messages"] / total_s, "approve_rss_kib": approve_rss,
            "fetch_rss_kib": fetch_rss, "d2_file_messages": sum(1 for m in messages if m.get("file")),
            "d2_list_s": list_s, "d2_media_download_bytes": media["file"]["size"], "d2_media_download_s": media_s}


def baseline(net, contact, size):
    """The chunk store's floor for `size` bytes: upload d1 → contact, download by the contact."""
    net.messages(contact)  # drain what waits, so that the lookup below is quick
    path = net.work / "baseline.bin"
    random_file(path, size)
    _, up_s, _ = net.run("d1", "upload", path, "--to", contact_phone(int(contact[1:])), timeout=600)
    path.unlink()
    messages, ref_s, _ = net.messages(contact)
    message = [m for m in messages if m.get("file") and m["file"]["size"] == size][-1]
    out = net.work / "baseline.out"
    _, down_s, _ = net.run(contact, "download", message["id"], "-o", out, timeout=600)
    if out.stat().st_size != size:
        raise SystemExit("the baseline download has the wrong size")
    out.unlink()
    return {"bytes": size, "upload_s": up_s, "download_s": down_s, "total_s": up_s + down_s,
            "contact_messages_s": ref_s}


def backups(net, d1_count):
    out, relays_s, _ = net.run("d1", "backup", "create", timeout=900)
    made = last_json(out, "backup create")
    code = made.get("recovery_code")
    if not code:
        raise SystemExit(f"the first backup showed no recovery code: {made}")
    file = net.work / "alice.backup"
    out, file_s, _ = net.run("d1", "backup", "create", "-o", file, timeout=900)
    made_file = last_json(out, "backup create -o")
    # A later backup to the relays: the profile keeps the key, so no argon2id derivation.
    out, again_s, _ = net.run("d1", "backup", "create", timeout=900)
    made_again = last_json(out, "backup create (again)")
    if made_again.get("recovery_code"):
        raise SystemExit("a later backup showed a new recovery code")
    for m in (made, made_file, made_again):
        if m["messages"] != d1_count:
            raise SystemExit(f"a backup holds {m['messages']} messages, d1 {d1_count}")
    # Each restore into a fresh profile signed in as alice, so both import the whole history.
    net.login("d3", ALICE)
    out, restore_relays_s, _ = net.run("d3", "backup", "restore", "--code", code, timeout=900)
    restored_relays = last_json(out, "backup restore")["restored"]
    net.login("d4", ALICE)
    out, restore_file_s, _ = net.run("d4", "backup", "restore", "--code", code, "--from", file, timeout=900)
    restored_file = last_json(out, "backup restore --from")["restored"]
    for r in (restored_relays, restored_file):
        if r["new_messages"] != d1_count:
            raise SystemExit(f"a restore brought {r['new_messages']} new messages, d1 holds {d1_count}: {r}")
    d3_messages, _, _ = net.messages("d3")
    if len(d3_messages) != d1_count:
        raise SystemExit(f"d3 shows {len(d3_messages)} messages after the restore, d1 holds {d1_count}")
    return {"relays": {"messages": made["messages"], "export_bytes": made["bytes"], "create_s": relays_s,
                       "again_create_s": again_s, "restore_s": restore_relays_s, "restored": restored_relays,
                       "restore_messages_per_s": restored_relays["new_messages"] / restore_relays_s},
            "file": {"messages": made_file["messages"], "export_bytes": made_file["bytes"],
                     "file_bytes": file.stat().st_size, "create_s": file_s, "restore_s": restore_file_s,
                     "restored": restored_file,
                     "restore_messages_per_s": restored_file["new_messages"] / restore_file_s}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--chats", type=int, default=20, help="contacts, one chat each")
    parser.add_argument("--per-chat", type=int, default=500, help="messages alice sends to each")
    parser.add_argument("--files", type=int, default=20, help="files alice uploads (spread over the chats)")
    parser.add_argument("--file-mb", type=int, default=5, help="size of each file, MB")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (network data, profiles)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="history-transfer."))
    log(f"== work dir {work}")
    net = Network(args.bin_dir, work)
    try:
        d1_messages, held = setup(net, args)
        n = held["messages"]
        transfer = history_transfer(net, d1_messages)
        log(json.dumps({"history_transfer": transfer}))
        base = baseline(net, "c0", transfer["export_bytes"])
        log(json.dumps({"baseline": base}))
        d1_now, _, _ = net.messages("d1")  # the baseline's upload is one more message
        backup = backups(net, len(d1_now))
        log(json.dumps({"backups": backup}))
    except BaseException:
        log(f"== the run failed; its network data, profiles and logs are in {work}")
        raise
    finally:
        net.stop()
    if args.keep:
        log(f"== kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    t, b, r, f = transfer, base, backup["relays"], backup["file"]
    ratio = t["total_s"] / b["total_s"]
    log(f"\nd1: {n:,} messages in {args.chats} chats, {held['file_messages']} with files "
        f"({held['referenced_bytes'] / MB:.0f} MB of media referenced, not moved)")
    log(f"history to d2: export {t['export_bytes'] / MB:.2f} MB; approve {t['approve_s']:.2f} s + fetch and merge "
        f"{t['fetch_merge_s']:.2f} s ({t['fetch_attempts']} call(s); the same call with nothing to fetch: "
        f"{t['d2_list_s']:.2f} s) = {t['total_s']:.2f} s, "
        f"{t['messages_per_s']:,.0f} msg/s; peak RSS approve / fetch {t['approve_rss_kib'] / 1024:.0f} / "
        f"{t['fetch_rss_kib'] / 1024:.0f} MiB; d2 then downloads a {t['d2_media_download_bytes'] / MB:.0f} MB file "
        f"from the history in {t['d2_media_download_s']:.2f} s")
    log(f"baseline: upload {b['upload_s']:.2f} s + download {b['download_s']:.2f} s = {b['total_s']:.2f} s "
        f"of a random {b['bytes'] / MB:.2f} MB file; history ÷ baseline = {ratio:.2f}×")
    log(f"backup to the relays: {r['export_bytes'] / MB:.2f} MB in {r['create_s']:.2f} s (first, making the key), "
        f"{r['again_create_s']:.2f} s (later, key kept); restored "
        f"{r['restored']['new_messages']:,} messages in {r['restore_s']:.2f} s ({r['restore_messages_per_s']:,.0f} msg/s)")
    log(f"backup to a file: {f['file_bytes'] / MB:.2f} MB in {f['create_s']:.2f} s; restored "
        f"{f['restored']['new_messages']:,} messages in {f['restore_s']:.2f} s ({f['restore_messages_per_s']:,.0f} msg/s)")
    log("\n| What | Figure | Baseline (same run) | Ratio |")
    log("|---|---|---|---|")
    log(f"| History to a new device: {t['messages']:,} messages in {args.chats} chats, {held['file_messages']} "
        f"file references ({held['referenced_bytes'] / MB:.0f} MB of media), export {t['export_bytes'] / MB:.2f} MB "
        f"| approve {t['approve_s']:.2f} s + fetch and merge {t['fetch_merge_s']:.2f} s = **{t['total_s']:.2f} s** "
        f"({t['messages_per_s']:,.0f} msg/s) | `upload` + `download` of a random {b['bytes'] / MB:.2f} MB file: "
        f"{b['upload_s']:.2f} + {b['download_s']:.2f} = {b['total_s']:.2f} s | {ratio:.2f}× |")
    log(f"| Backup to the relays (`backup create`), {r['messages']:,} messages: first (makes the recovery code "
        f"and key) / later | {r['export_bytes'] / MB:.2f} MB in {r['create_s']:.2f} s / {r['again_create_s']:.2f} s "
        f"| `upload` of the same size: {b['upload_s']:.2f} s "
        f"| {r['create_s'] / b['upload_s']:.2f}× / {r['again_create_s'] / b['upload_s']:.2f}× |")
    log(f"| Restore from the relays (`backup restore --code`), fresh profile | {r['restored']['new_messages']:,} "
        f"messages in {r['restore_s']:.2f} s ({r['restore_messages_per_s']:,.0f} msg/s) "
        f"| `download` of the same size: {b['download_s']:.2f} s | {r['restore_s'] / b['download_s']:.2f}× |")
    log(f"| Backup to a file (`backup create -o`) | {f['file_bytes'] / MB:.2f} MB file in {f['create_s']:.2f} s "
        f"| — | — |")
    log(f"| Restore from a file (`backup restore --from`), fresh profile | {f['restored']['new_messages']:,} "
        f"messages in {f['restore_s']:.2f} s ({f['restore_messages_per_s']:,.0f} msg/s) | — | — |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
