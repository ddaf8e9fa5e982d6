"""Message tracking: every message the gateway answers at the end of DATA (relayed,
quarantined, refused, refused for now) gets a record, found with `gateway track` by the id
its reply gave the sender, by its quarantine id or by words of its sender, recipient or
subject; personal fields are sealed; the records go with the retention purge."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from gateway.service import running
from quarantine.store import TrackRecord
from tests.conftest import DNS, DOMAIN, make_config
from tests.support.sink import Sink
from tests.support.webclient import suspicious
from tests.test_attachments import EICAR, message_with

CLEAN = (f"From: Laboratoire <resultats@labo.example>\r\nTo: <docteur@{DOMAIN}>\r\n"
         "Subject: Resultats de Mme Durand\r\nDate: Mon, 30 Nov 2026 10:00:00 +0100\r\n"
         "Message-ID: <t1@labo.example>\r\n\r\nBonjour,\r\nResultats joints.\r\n").encode()
ID = re.compile(r"id=([0-9A-Z]{12})\b")


def track(data_dir: Path, *args: str) -> list[dict]:
    """`gateway track ... --json`, as an admin types it."""
    res = subprocess.run([sys.executable, "-m", "gateway", "track", *args, "--json",
                          "--data-dir", str(data_dir), "--domain", DOMAIN, "--dns", DNS.address],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode in (0, 1), res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


async def send(port: int, raw: bytes, sender: str = "resultats@labo.example") -> tuple[int, str]:
    try:
        _, reply = await aiosmtplib.send(raw, sender=sender, recipients=[f"docteur@{DOMAIN}"],
                                         hostname="127.0.0.1", port=port, start_tls=False)
        return 250, reply
    except aiosmtplib.SMTPDataError as exc:
        return exc.code, exc.message


async def test_every_kind_of_reply_finds_its_record(tmp_path: Path, sink: Sink):
    data = tmp_path / "data"
    cfg = make_config(data, next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        replies = {
            "delivered": await send(gw.port, CLEAN),
            "quarantined": await send(gw.port, suspicious("Facture en attente")),
            "rejected": await send(gw.port, message_with("test.txt", EICAR)),
        }
        sink.behaviour.data_reply = "452 4.3.1 Insufficient system storage"
        replies["tempfail_downstream"] = await send(gw.port, CLEAN.replace(b"t1@", b"t2@"))
        sink.behaviour.data_reply = ""
        await gw.runtime.pipeline.flush_tracking()
        store = gw.runtime.store
        assert store is not None
        held = (await store.list_items(state="quarantined"))[0].id
        kept = (await store.list_items(state="refused"))[0].id

    codes = {kind: code for kind, (code, _) in replies.items()}
    assert codes == {"delivered": 250, "quarantined": 250, "rejected": 550,
                     "tempfail_downstream": 451}
    for kind, (code, text) in replies.items():
        m = ID.search(text)
        assert m, (kind, text)  # every reply names the message's id
        [record] = track(data, m.group(1).lower())  # typed in lower case: found too
        assert record["queue_id"] == m.group(1)
        assert record["outcome"] == kind
        assert record["reply"].startswith(str(code)) and record["reply"].endswith(m.group(0))
        assert record["mail_from"] == "resultats@labo.example"
        assert record["rcpts"] == [f"docteur@{DOMAIN}"]
        assert record["quarantine_id"] == {"quarantined": held, "rejected": kept}.get(kind)
    rejected = track(data, ID.search(replies["rejected"][1]).group(1))[0]  # type: ignore[union-attr]
    assert rejected["action"] == "reject"
    assert "YARA_EICAR" in {s["name"] for s in rejected["symbols"]}
    # The quarantine id finds the same record as the queue id of its reply.
    assert track(data, held)[0]["queue_id"] == ID.search(replies["quarantined"][1]).group(1)  # type: ignore[union-attr]
    # Words of the subject or the sender: newest first.
    found = track(data, "durand")
    assert [r["outcome"] for r in found] == ["tempfail_downstream", "delivered"]
    assert len(track(data, "labo.example")) == 4
    assert len(track(data, "Résultats DURAND")) == 2  # any case, accents or not
    assert track(data, "dur") == []  # whole words: the index holds words, not their parts
    assert track(data, "--action", "reject")[0]["outcome"] == "rejected"
    assert track(data, "introuvable") == []
    # Personal fields are sealed in the index: the subject is not in the database in clear.
    db = sqlite3.connect(data / "quarantine" / "index.sqlite3")
    try:
        rows = db.execute("SELECT * FROM tracking").fetchall()
    finally:
        db.close()
    assert len(rows) == 4
    assert not any(b"Durand" in (c if isinstance(c, bytes) else str(c).encode())
                   for row in rows for c in row)


async def test_tracking_records_go_with_the_retention_purge(tmp_path: Path):
    from gateway.service import build_runtime

    rt = await build_runtime(make_config(tmp_path / "data"))
    try:
        store, service = rt.store, rt.quarantine
        assert store is not None and service is not None

        def record(queue_id: str, age_days: float, subject: str) -> TrackRecord:
            return TrackRecord(
                queue_id=queue_id, received_at=time.time() - age_days * 86400,
                direction="inbound", outcome="delivered", action="accept", score=0.0,
                symbols=(), quarantine_id=None, size=10, reply=f"250 ok id={queue_id}",
                downstream="", mail_from="a@b.example", rcpts=(f"docteur@{DOMAIN}",),
                delivered_to=(), subject=subject, from_header="", client_ip="", helo="")

        await store.track([record("B0000000000Z", 40, "vieux"), record("B0000000001Z", 1, "récent")])
        assert (await store.tracking())[1] == 2
        await service.purge()  # the retention period: 30 days by default
        records, total = await store.tracking()
        assert total == 1 and records[0].subject == "récent"
    finally:
        await rt.close()


def test_a_bad_date_is_said_in_french(tmp_path: Path):
    res = subprocess.run([sys.executable, "-m", "gateway", "track", "--depuis", "30/11/2026",
                          "--data-dir", str(tmp_path), "--domain", DOMAIN],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "date attendue sous la forme AAAA-MM-JJ" in res.stderr


@pytest.mark.parametrize("query", ["", "B0000000000Z"])
def test_nothing_found_says_so(tmp_path: Path, query: str):
    res = subprocess.run([sys.executable, "-m", "gateway", "track", query,
                          "--data-dir", str(tmp_path), "--domain", DOMAIN, "--dns", DNS.address],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Aucun message trouvé." in res.stdout, res.stderr


async def test_a_refused_message_kept_for_review_is_released_only_after_confirmation(
        tmp_path: Path, sink: Sink):
    from gateway.accounts import AccountFile
    from tests.support.webclient import ADMIN, Client, add_users

    data = tmp_path / "data"
    cfg = make_config(data, next_hop={"address": sink.address, "starttls": "off"},
                      web={"listen": "127.0.0.1:0"})
    add_users(AccountFile(cfg.web_users_file))
    async with running(cfg) as gw:
        code, text = await send(gw.port, message_with("test.txt", EICAR))
        assert code == 550
        store = gw.runtime.store
        assert store is not None
        [item] = await store.list_items(state="refused")
        assert item.queue_id == ID.search(text).group(1)  # type: ignore[union-attr]
        c = Client(f"http://127.0.0.1:{gw.web_port}")
        try:
            await c.login(ADMIN)
            _, page, _ = await c.get(f"/quarantaine/{item.id}")
            assert "son expéditeur a reçu un refus" in page
            # Releasing asks first, naming why the message was refused; nothing is sent.
            status, page, _ = await c.post(f"/quarantaine/{item.id}/liberer", {"csrf": c.csrf})
            assert status == 200 and "Libérer un message refusé ?" in page
            assert "le fichier de test des antivirus (EICAR)" in page
            assert (await store.item(item.id)).state == "refused" and sink.empty()
            status, _, _ = await c.post(f"/quarantaine/{item.id}/liberer",
                                        {"csrf": c.csrf, "confirme": "1"})
            assert status == 303
        finally:
            await c.close()
        got = await sink.get()
        assert b"X-Gateway-Released: by web:claire" in got.data
        assert (await store.item(item.id)).state == "released"
        # The CLI asks for the same confirmation.
        code, _ = await send(gw.port, message_with("test.txt", EICAR))
        assert code == 550
        second = (await store.list_items(state="refused"))[0].id
    res = subprocess.run([sys.executable, "-m", "gateway", "quarantine", "--data-dir", str(data),
                          "--domain", DOMAIN, "--dns", DNS.address, "release", second],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "--confirmer" in res.stderr


async def test_no_copy_of_refused_mail_when_the_admin_turns_it_off(tmp_path: Path, sink: Sink):
    cfg = make_config(tmp_path / "data", next_hop={"address": sink.address, "starttls": "off"},
                      quarantine={"keep_rejected": False})
    async with running(cfg) as gw:
        code, _ = await send(gw.port, message_with("test.txt", EICAR))
        assert code == 550
        await gw.runtime.pipeline.flush_tracking()
        store = gw.runtime.store
        assert store is not None
        assert await store.list_items(state=None) == []
        [record], _ = await store.tracking()
        assert record.outcome == "rejected" and record.quarantine_id is None


async def test_hostile_headers_neither_lose_records_nor_stall_the_gateway(tmp_path: Path,
                                                                         sink: Sink):
    """Raw 8-bit bytes that are not UTF-8 in a From (an old mailer's Latin-1, or a sender
    hiding its own record) and a From of a hundred thousand words: each message gets its
    record, the others of the batch too, cut to a bounded size; one that must be held is
    held (not refused for now)."""
    data = tmp_path / "data"
    cfg = make_config(data, next_hop={"address": sink.address, "starttls": "off"})
    latin1 = CLEAN.replace(b"From: Laboratoire <", b"From: Laboratoire d'analyses M\xe9dicales <")
    huge = CLEAN.replace(b"From: Laboratoire <", b"From: " + b"mot " * 100_000 + b"<")
    held = suspicious("Facture").replace(b"From: Laboratoire <",
                                         b"From: Laboratoire M\xe9dical <")
    async with running(cfg) as gw:
        replies = [await send(gw.port, CLEAN), await send(gw.port, latin1),
                   await send(gw.port, huge), await send(gw.port, held)]
        assert [code for code, _ in replies] == [250, 250, 250, 250]
        assert "quarantaine" in replies[3][1]
        await gw.runtime.pipeline.flush_tracking()
        store = gw.runtime.store
        assert store is not None
        records, total = await store.tracking()
        assert total == 4
        assert {r.queue_id for r in records} == {ID.search(t).group(1) for _, t in replies}  # type: ignore[union-attr]
        assert max(len(r.from_header) for r in records) <= 1000
        # Every one, the Latin-1 sender's included, is found by the envelope address, whole.
        found, _ = await store.tracking("resultats@labo.example")
        assert len(found) == 4
