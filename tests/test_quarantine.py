"""Quarantine: durable, encrypted at rest, intact after a restart, released through the CLI."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import shutil
import stat
from pathlib import Path

import aiosmtplib
import pytest

from gateway import cli
from gateway.service import quarantine_root, running
from quarantine.crypto import RecordError
from quarantine.store import Store
from tests.conftest import DOMAIN, make_config
from tests.support.sink import Sink

SUBJECT = b"Compte rendu Mme Lefebvre"
BODY = b"Contenu confidentiel du compte rendu operatoire 8f3a91"
SENDER = "secretariat@clinique.example"
# No Date, no Message-ID: with the low thresholds below, this is quarantined.
SUSPECT = (b"From: Clinique <" + SENDER.encode() + b">\r\nTo: docteur@" + DOMAIN.encode() +
           b"\r\nSubject: " + SUBJECT + b"\r\n\r\n" + BODY + b"\r\n")


def quarantine_config(tmp_path: Path, sink: Sink):
    return make_config(tmp_path / "data",
                       scoring={"tag": 0.2, "quarantine": 1.0, "reject": 50.0},
                       next_hop={"address": sink.address, "starttls": "off"})


async def send(port: int, data: bytes = SUSPECT) -> str:
    _, reply = await aiosmtplib.send(data, sender=SENDER, recipients=[f"docteur@{DOMAIN}"],
                                     hostname="127.0.0.1", port=port, start_tls=False)
    return reply


def write_config(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[gateway]\ndomains = ["{DOMAIN}"]\ndata_dir = "{cfg.gateway.data_dir}"\n'
        f'[next_hop]\naddress = "{cfg.next_hop.address}"\nstarttls = "off"\n'
        f'[dns]\nnameservers = ["{cfg.dns.nameservers[0]}"]\n')
    return path


@pytest.mark.promise("quarantine-encrypted")
async def test_quarantined_mail_is_encrypted_on_disk_and_intact_after_restart(
        tmp_path: Path, sink: Sink):
    cfg = quarantine_config(tmp_path, sink)
    async with running(cfg) as gw:
        reply = await send(gw.port)
    assert reply.startswith("2.0.0 Message accepte et mis en quarantaine")
    assert sink.empty()

    # Nothing personal in clear anywhere under the data folder (files, index, WAL).
    data_dir = Path(cfg.gateway.data_dir)
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".qmsg" for p in files)
    for path in files:
        content = path.read_bytes()
        for secret in (SUBJECT, BODY, SENDER.encode(), b"Lefebvre", b"clinique"):
            assert secret not in content, f"{secret!r} in clear in {path}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    # A new store on the same folder (a restart) reads it back.
    store = await Store.open(quarantine_root(cfg), cfg.key_file)
    try:
        [item] = await store.list_items()
        assert item.state == "quarantined"
        assert item.subject == SUBJECT.decode()
        assert item.mail_from == SENDER and item.rcpts == (f"docteur@{DOMAIN}",)
        assert {s.name for s in item.symbols} >= {"DATE_MISSING", "MESSAGE_ID_MISSING"}
        got_item, raw = await store.get(item.id)
        assert raw.endswith(SUSPECT)
        assert b"X-Gateway-Action: quarantine" in raw
    finally:
        await store.close()


@pytest.mark.promise("durable-before-250")
async def test_held_mail_is_synced_to_disk_before_its_250(tmp_path: Path, sink: Sink,
                                                           monkeypatch: pytest.MonkeyPatch):
    """`250` for held mail only once its sealed file and the folder's new entry are on disk
    (fsync'd): a power cut right after the reply must not lose it. The system call is
    watched, not replaced: each fsync still happens, and its file is noted."""
    synced: list[Path] = []
    real_fsync = os.fsync

    def watched_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", watched_fsync)
    cfg = quarantine_config(tmp_path, sink)
    async with running(cfg) as gw:
        reply = await send(gw.port)
        at_reply = list(synced)
    assert reply.startswith("2.0.0 Message accepte et mis en quarantaine")
    [sealed] = Path(cfg.gateway.data_dir).rglob("*.qmsg")
    # The file was written under a temporary name, synced, then renamed; then its folder.
    assert any(p.parent == sealed.parent and p.name.startswith(f".{sealed.name}.")
               for p in at_reply), at_reply
    assert sealed.parent in at_reply, at_reply


async def test_release_through_the_cli_delivers_the_original(tmp_path: Path, sink: Sink):
    cfg = quarantine_config(tmp_path, sink)
    async with running(cfg) as gw:
        await send(gw.port)
    conf = write_config(tmp_path, cfg)
    store = await Store.open(quarantine_root(cfg), cfg.key_file)
    [item] = await store.list_items()
    await store.close()

    status = await asyncio.to_thread(cli.main, ["quarantine", "--config", str(conf),
                                                "release", item.id])
    assert status == 0
    got = await sink.get()
    assert got.mail_from == SENDER and got.rcpts == [f"docteur@{DOMAIN}"]
    assert got.data.startswith(b"X-Gateway-Released: by cli:")
    # The reader sees why it was held, that it was released, and the original text.
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    assert str(msg["Subject"]) == "[SUSPECT] " + SUBJECT.decode()
    text = msg.get_content()
    assert text.index("retenu en quarantaine, puis libéré") < text.index(BODY.decode())
    assert "n'a pas de date d'envoi" in text
    assert msg.get_content_charset() == "utf-8"
    # Released once: a second release is refused, the state says who did it.
    assert await asyncio.to_thread(cli.main, ["quarantine", "--config", str(conf),
                                              "release", item.id]) == 1
    store = await Store.open(quarantine_root(cfg), cfg.key_file)
    try:
        after = await store.item(item.id)
        assert after.state == "released" and after.state_by.startswith("cli:")
        entries, _ = await store.audit_log()  # the CLI's actions are in the audit log too
        assert [(e.action, e.target) for e in entries] == [("release", item.id)]
        assert entries[0].user.startswith("cli:")
    finally:
        await store.close()


async def test_delete_and_purge(tmp_path: Path, sink: Sink):
    cfg = quarantine_config(tmp_path, sink)
    async with running(cfg) as gw:
        await send(gw.port)
        await send(gw.port)
    now = [1e10]
    store = await Store.open(quarantine_root(cfg), cfg.key_file, clock=lambda: now[0])
    try:
        first, second = await store.list_items()
        await store.delete(first.id, by="test")
        assert (await store.item(first.id)).state == "deleted"
        assert not list(quarantine_root(cfg).glob(f"msgs/{first.id}*"))
        assert await store.purge(older_than_days=30) == 2
        assert await store.list_items() == []
        assert not list(quarantine_root(cfg).glob("msgs/*.qmsg"))
    finally:
        await store.close()


@pytest.mark.promise("quarantine-encrypted")
async def test_altered_or_swapped_records_are_refused(tmp_path: Path, sink: Sink):
    cfg = quarantine_config(tmp_path, sink)
    async with running(cfg) as gw:
        await send(gw.port)
        await send(gw.port)
    store = await Store.open(quarantine_root(cfg), cfg.key_file)
    try:
        a, b = await store.list_items()
        msgs = quarantine_root(cfg) / "msgs"
        shutil.copy(msgs / f"{a.id}.qmsg", msgs / f"{b.id}.qmsg")  # a poses as b
        with pytest.raises(RecordError):
            await store.get(b.id)
        blob = bytearray((msgs / f"{a.id}.qmsg").read_bytes())
        blob[-40] ^= 1
        (msgs / f"{a.id}.qmsg").write_bytes(bytes(blob))
        with pytest.raises(RecordError):
            await store.get(a.id)
    finally:
        await store.close()


async def test_index_is_rebuilt_from_the_files(tmp_path: Path, sink: Sink):
    cfg = quarantine_config(tmp_path, sink)
    async with running(cfg) as gw:
        await send(gw.port)
    root = quarantine_root(cfg)
    for p in root.glob("index.sqlite3*"):
        p.unlink()
    store = await Store.open(root, cfg.key_file)
    try:
        [item] = await store.list_items()
        assert item.subject == SUBJECT.decode()
    finally:
        await store.close()


@pytest.mark.promise("durable-before-250")
async def test_quarantine_write_failure_gives_451_and_loses_nothing(tmp_path: Path, sink: Sink):
    cfg = quarantine_config(tmp_path, sink)
    async with running(cfg) as gw:
        msgs = quarantine_root(cfg) / "msgs"
        shutil.rmtree(msgs)
        msgs.write_bytes(b"")  # a file where the folder should be: every write fails
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw.port)
        assert exc.value.code == 451
        assert exc.value.message.startswith("4.3.0 ")
    assert sink.empty()


@pytest.mark.promise("secrets-private")
async def test_key_file_is_created_0600_and_a_loose_one_is_refused(tmp_path: Path, sink: Sink):
    cfg = quarantine_config(tmp_path, sink)
    async with running(cfg):
        pass
    assert stat.S_IMODE(cfg.key_file.stat().st_mode) == 0o600
    os.chmod(cfg.key_file, 0o644)
    conf = write_config(tmp_path, cfg)
    status = await asyncio.to_thread(cli.main, ["quarantine", "--config", str(conf), "list"])
    assert status == 2
