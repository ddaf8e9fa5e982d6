"""Quarantine store at its edges: concurrent releases (one delivery), a release that fails or
whose process dies, a sealed file without its index row, interrupted writes, a full disk and a
read-only folder. Real files, real SQLite, a real SMTP sink; the tmpfs and read-only tests mount
filesystems and need root (skipped otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from gateway.errors import DownstreamRejected, DownstreamUnavailable
from gateway.relay import create_next_hop, deliver
from gateway.service import Running, quarantine_root, running
from quarantine import store as store_module
from quarantine.files import write_private
from quarantine.store import (
    STALE_AFTER_S,
    Item,
    NewItem,
    NotQuarantined,
    QuarantineWriteError,
    Store,
    SymbolRecord,
)
from tests.conftest import DOMAIN, make_config
from tests.support.sink import Sink

REPO = Path(__file__).resolve().parents[1]
SENDER = "secretariat@clinique.example"
RCPT = f"docteur@{DOMAIN}"
PAGE = 4096


def suspect(body_bytes: int = 100) -> bytes:
    """No Date, no Message-ID: quarantined with the thresholds of `config`."""
    line = b"Compte rendu operatoire, suite du texte " + b"x" * 36 + b"\r\n"  # 78 bytes
    return (b"From: Clinique <" + SENDER.encode() + b">\r\nTo: " + RCPT.encode() +
            b"\r\nSubject: Compte rendu\r\n\r\n" + line * (body_bytes // len(line) + 1))


def config(data_dir: Path, sink: Sink):
    return make_config(data_dir, scoring={"tag": 0.2, "quarantine": 1.0, "reject": 50.0},
                       next_hop={"address": sink.address, "starttls": "off"})


async def send(port: int, data: bytes) -> str:
    _, reply = await aiosmtplib.send(data, sender=SENDER, recipients=[RCPT],
                                     hostname="127.0.0.1", port=port, start_tls=False)
    return reply


def new_item() -> NewItem:
    return NewItem(received_at=time.time(), direction="inbound", action="quarantine", score=6.0,
                   symbols=(SymbolRecord(name="DATE_MISSING", score=3.0, detail="",
                                         description="Le message n'a pas de date d'envoi."),),
                   queue_id="Q1", mail_from=SENDER, rcpts=(RCPT,), subject="Compte rendu",
                   from_header=f"Clinique <{SENDER}>", client_ip="192.0.2.7", helo="clinique")


def to_sink(tmp_path: Path, sink: Sink):
    """A `deliver` callback for Store.release that sends the message to the sink over SMTP."""
    hop = create_next_hop(config(tmp_path / "hop", sink))

    async def _deliver(item: Item, raw: bytes) -> None:
        await deliver(hop, item.mail_from, item.rcpts, b"", raw)
    return _deliver


def errors(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and text in r.getMessage()]


# ---- one state change at a time ------------------------------------------------------------


@pytest.mark.promise("release-once")
async def test_two_stores_racing_one_release_deliver_it_once(tmp_path: Path, sink: Sink):
    root, key = tmp_path / "q", tmp_path / "q.key"
    web, link = await Store.open(root, key), await Store.open(root, key)  # two pages, one folder
    try:
        item_id = await web.put(new_item(), suspect())
        send_it = to_sink(tmp_path, sink)
        calls: list[str] = []

        async def slow(item: Item, raw: bytes) -> None:
            calls.append(item.id)
            await asyncio.sleep(0.3)  # the other release arrives meanwhile
            with pytest.raises(NotQuarantined):  # nor can it be deleted while being released
                await link.delete(item_id, by="web:claire")
            await send_it(item, raw)

        results = await asyncio.gather(web.release(item_id, by="web:claire", deliver=slow),
                                       link.release(item_id, by=f"sender:{SENDER}", deliver=slow),
                                       return_exceptions=True)
        [won] = [r for r in results if isinstance(r, Item)]
        [lost] = [r for r in results if isinstance(r, BaseException)]
        assert isinstance(lost, NotQuarantined)
        assert lost.text_fr.endswith("(état : libération en cours)")
        assert lost.state == "releasing" and "not quarantined" in str(lost)
        assert won.state == "released" and calls == [item_id]
        assert (await sink.get()).rcpts == [RCPT]
        await sink.settled()
        assert sink.empty()  # exactly one delivery
        for store in (web, link):
            assert (await store.item(item_id)).state == "released"
        # Released: neither can release it again; it can still be deleted, twice harmlessly.
        with pytest.raises(NotQuarantined):
            await link.release(item_id, by="web:claire", deliver=slow)
        await link.delete(item_id, by="cli:root")
        await web.delete(item_id, by="cli:root")
        assert (await web.item(item_id)).state == "deleted"
        assert not list((root / "msgs").iterdir())
    finally:
        await web.close()
        await link.close()


@pytest.mark.promise("release-once")
async def test_the_cli_in_another_process_cannot_release_an_item_being_released(
        tmp_path: Path, sink: Sink):
    cfg = config(tmp_path / "data", sink)
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'[gateway]\ndomains = ["{DOMAIN}"]\ndata_dir = "{cfg.data_dir}"\n'
                    f'[next_hop]\naddress = "{sink.address}"\nstarttls = "off"\n'
                    f'[dns]\nnameservers = ["{cfg.dns.nameservers[0]}"]\n')
    store = await Store.open(quarantine_root(cfg), cfg.key_file)
    try:
        item_id = await store.put(new_item(), suspect())
        send_it, go = to_sink(tmp_path, sink), asyncio.Event()

        async def held(item: Item, raw: bytes) -> None:
            await go.wait()
            await send_it(item, raw)

        web = asyncio.create_task(store.release(item_id, by="web:claire", deliver=held))
        for _ in range(500):
            if (await store.item(item_id)).state == "releasing":
                break
            await asyncio.sleep(0.01)
        assert (await store.item(item_id)).state == "releasing"
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "quarantine", "--config", str(conf), "release",
            item_id, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await cli.communicate()
        assert cli.returncode == 1
        assert "Impossible : ce message n'est plus en quarantaine (état : libération en cours)" \
            in err.decode()
        go.set()
        assert (await web).state == "released"
        assert (await sink.get()).data.endswith(suspect())
        await sink.settled()
        assert sink.empty()
    finally:
        await store.close()


@pytest.mark.promise("release-once")
async def test_a_failed_delivery_puts_the_item_back_in_quarantine(gateway: Running, sink: Sink):
    store = gateway.runtime.store
    assert store is not None
    item_id = await store.put(new_item(), suspect())
    for reply, error in (("451 4.3.0 Reessayez plus tard", DownstreamUnavailable),
                         ("554 5.7.1 Refuse", DownstreamRejected)):
        sink.behaviour.data_reply = reply
        with pytest.raises(error):
            # The web page's and the CLI's way.
            await gateway.runtime.quarantine.release(item_id, by="web:claire")
        item = await store.item(item_id)
        assert (item.state, item.state_by, item.state_changed_at) == ("quarantined", None, None)
    sink.behaviour.data_reply = None
    released = await gateway.runtime.quarantine.release(item_id, by="web:claire")
    assert released.state == "released"
    assert (await sink.get()).data.startswith(b"X-Gateway-Released: by web:claire")
    assert sink.empty()


async def test_a_release_past_its_time_limit_is_abandoned(gateway: Running, sink: Sink,
                                                          monkeypatch: pytest.MonkeyPatch):
    # The limit keeps a live release from ever looking like one a dead process left behind.
    assert store_module.RELEASE_LIMIT_S < STALE_AFTER_S
    store = gateway.runtime.store
    assert store is not None
    item_id = await store.put(new_item(), suspect())
    monkeypatch.setattr(store_module, "RELEASE_LIMIT_S", 0.0)
    with pytest.raises(DownstreamUnavailable):  # the web page's "réessayez plus tard"
        await gateway.runtime.quarantine.release(item_id, by="web:claire")
    assert (await store.item(item_id)).state == "quarantined"
    await sink.settled()
    assert sink.empty()


KILLED_MID_DELIVERY = """
import asyncio, sys
from pathlib import Path
from quarantine.store import Store

async def main():
    store = await Store.open(Path(sys.argv[1]), Path(sys.argv[2]))
    async def hang(item, raw):
        print("delivering", flush=True)
        await asyncio.sleep(3600)
    await store.release(sys.argv[3], by="web:claire", deliver=hang)

asyncio.run(main())
"""


async def test_an_item_left_releasing_by_a_killed_process_goes_back_to_quarantine(
        tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture):
    root, key = tmp_path / "q", tmp_path / "q.key"
    store = await Store.open(root, key)
    # A held message, and a refused one's kept copy (which must stay refused: released only
    # after a confirmation).
    item_ids = [await store.put(new_item(), suspect()),
                await store.put(dataclasses.replace(new_item(), action="reject"), suspect(),
                                state="refused")]
    await store.close()
    now = [0.0]
    for item_id, recovery, back in zip(item_ids, ("open", "purge"), ("quarantined", "refused"),
                                       strict=True):
        now[0] = time.time()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLED_MID_DELIVERY, str(root), str(key), item_id, cwd=REPO,
            stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"delivering\n"
        proc.kill()
        await proc.wait()
        # Young, it may belong to a live process: nobody takes it over.
        store = await Store.open(root, key, clock=lambda: now[0])
        try:
            assert (await store.item(item_id)).state == "releasing"
            with pytest.raises(NotQuarantined):
                await store.release(item_id, by="cli:root", deliver=to_sink(tmp_path, sink))
            now[0] += STALE_AFTER_S + 60
            if recovery == "open":  # a restart
                await store.close()
                store = await Store.open(root, key, clock=lambda: now[0])
            else:  # the hourly purge of a gateway that keeps running
                assert await store.purge(older_than_days=30) == 0
            item = await store.item(item_id)
            assert (item.state, item.state_by) == (back, None)
            assert any(item_id in r.getMessage() and "left releasing" in r.getMessage()
                       for r in caplog.records if r.levelno == logging.WARNING)
            await store.release(item_id, by="web:claire", deliver=to_sink(tmp_path, sink))
            assert (await sink.get()).rcpts == [RCPT]
        finally:
            await store.close()


# ---- the sealed file and its index row are one unit ------------------------------------------


@pytest.mark.promise("durable-before-250")
async def test_a_failed_index_write_gives_451_and_leaves_no_file(
        tmp_path: Path, sink: Sink, caplog: pytest.LogCaptureFixture):
    cfg = config(tmp_path / "data", sink)
    async with running(cfg) as gw:
        root = quarantine_root(cfg)
        # A real SQLite failure at the INSERT, after the sealed file was written.
        with contextlib.closing(sqlite3.connect(root / "index.sqlite3", isolation_level=None)) as db:
            db.execute("CREATE TRIGGER full BEFORE INSERT ON items "
                       "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
            with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                await send(gw.port, suspect())
            assert exc.value.code == 451
            assert not list((root / "msgs").iterdir())  # no .qmsg left for a re-index
            assert errors(caplog, "bytes free in")
            db.execute("DROP TRIGGER full")
        assert "quarantaine" in await send(gw.port, suspect())  # the sender's retry
    store = await Store.open(root, cfg.key_file)  # a restart finds one held message, not two
    try:
        assert len(await store.list_items()) == 1
    finally:
        await store.close()
    assert sink.empty()


async def test_a_file_left_by_a_crash_during_delete_is_removed_at_open(tmp_path: Path):
    root, key = tmp_path / "q", tmp_path / "q.key"
    store = await Store.open(root, key)
    item_id = await store.put(new_item(), suspect())
    sealed = (root / "msgs" / f"{item_id}.qmsg").read_bytes()
    await store.delete(item_id, by="web:claire")
    await store.close()
    (root / "msgs" / f"{item_id}.qmsg").write_bytes(sealed)  # the row said deleted, the file stayed
    store = await Store.open(root, key)
    try:
        assert (await store.item(item_id)).state == "deleted"  # not re-indexed as quarantined
        assert not list((root / "msgs").iterdir())
    finally:
        await store.close()


# ---- interrupted writes ----------------------------------------------------------------------


def test_write_private_removes_its_temporary_file_when_it_fails(tmp_path: Path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_bytes(b"")  # a non-empty folder cannot be replaced by a file
    with pytest.raises(OSError):
        write_private(target, b"secret", sync_dir=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


async def test_stale_temporary_files_are_removed_at_open(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture):
    root, key = tmp_path / "q", tmp_path / "q.key"
    await (await Store.open(root, key)).close()
    old = root / "msgs" / ".20261128T100000-0123456789ab.qmsg.4242.tmp"
    young = root / "msgs" / ".20261128T100001-0123456789ab.qmsg.4243.tmp"  # another process's
    for path in (old, young):
        path.write_bytes(b"partial")
    long_ago = time.time() - STALE_AFTER_S - 60
    os.utime(old, (long_ago, long_ago))
    with caplog.at_level(logging.WARNING, logger="quarantine.store"):
        await (await Store.open(root, key)).close()
    assert not old.exists() and young.exists()
    assert "1 stale temporary file(s) removed" in caplog.text


# ---- full disk, read-only folder (root: mounts) -----------------------------------------------


def mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed: {done.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB filesystem of its own, to fill up."""
    path = tmp_path / "small"
    path.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path))
    try:
        yield path
    finally:
        umount(path)


def fill(fs: Path, *, leave: int) -> Path:
    """Take the space of `fs` but `leave` bytes (whole 4 KiB pages); the filler's path."""
    filler = fs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(fs).free - leave))
    assert shutil.disk_usage(fs).free == leave
    return filler


def test_write_private_leaves_nothing_on_a_full_disk(tmpfs: Path):
    filler = fill(tmpfs, leave=4 * PAGE)
    with pytest.raises(OSError) as exc:
        write_private(tmpfs / "big", b"x" * 10 * PAGE)
    assert exc.value.errno == errno.ENOSPC
    assert list(tmpfs.iterdir()) == [filler]


@pytest.mark.promise("durable-before-250")
async def test_disk_full_gives_451_then_the_retry_is_held_once(
        tmpfs: Path, sink: Sink, caplog: pytest.LogCaptureFixture):
    cfg = config(tmpfs / "data", sink)
    message = suspect(100_000)
    async with running(cfg) as gw:
        msgs = quarantine_root(cfg) / "msgs"
        filler = fill(tmpfs, leave=8 * PAGE)  # room for the index, not for the message
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw.port, message)
        assert exc.value.code == 451
        assert not list(msgs.iterdir())  # no .qmsg, no .tmp
        assert errors(caplog, "No space left on device") and errors(caplog, "bytes free in")
        filler.unlink()
        assert "quarantaine" in await send(gw.port, message)
        store = gw.runtime.store
        assert store is not None
        [item] = await store.list_items()
        assert [p.name for p in msgs.iterdir()] == [f"{item.id}.qmsg"]
    assert sink.empty()


async def test_no_room_for_the_index_row_leaves_no_sealed_file(tmp_path: Path, tmpfs: Path,
                                                               caplog: pytest.LogCaptureFixture):
    raw = suspect(60_000)
    scratch = await Store.open(tmp_path / "scratch", tmp_path / "scratch.key")
    try:  # the sealed file's size (the same under any key)
        size = (scratch.root / "msgs" / f"{await scratch.put(new_item(), raw)}.qmsg").stat().st_size
    finally:
        await scratch.close()
    store = await Store.open(tmpfs / "q", tmpfs / "q.key")
    try:
        filler = fill(tmpfs, leave=-(-size // PAGE) * PAGE)  # the file fits, its row does not
        with pytest.raises(QuarantineWriteError) as exc:
            await store.put(new_item(), raw)
        assert isinstance(exc.value.__cause__, sqlite3.Error)
        assert not list((tmpfs / "q" / "msgs").iterdir())
        assert errors(caplog, "bytes free in")
        filler.unlink()
        await store.put(new_item(), raw)
    finally:
        await store.close()
    store = await Store.open(tmpfs / "q", tmpfs / "q.key")
    try:
        assert await store.count() == 1
    finally:
        await store.close()


async def test_a_read_only_quarantine_folder_gives_451(tmp_path: Path, sink: Sink,
                                                       caplog: pytest.LogCaptureFixture):
    cfg = config(tmp_path / "data", sink)
    async with running(cfg) as gw:
        msgs = quarantine_root(cfg) / "msgs"
        mount("--bind", str(msgs), str(msgs))
        try:
            mount("-o", "remount,bind,ro", str(msgs))
            with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                await send(gw.port, suspect())
            assert exc.value.code == 451
            assert errors(caplog, "Read-only file system")
        finally:
            umount(msgs)
        assert not list(msgs.iterdir())
        assert "quarantaine" in await send(gw.port, suspect())
    assert sink.empty()


async def test_the_store_audits_its_own_state_changes(tmp_path: Path, sink: Sink):
    """Whoever asks (web page, sender's link, CLI, the pipeline withdrawing a copy), a
    release, a failed release and a deletion are in the audit log: the store writes them."""
    store = await Store.open(tmp_path / "q", tmp_path / "key")
    try:
        one, two = await store.put(new_item(), suspect()), await store.put(new_item(), suspect())

        async def refused(item: Item, raw: bytes) -> None:
            raise DownstreamRejected(550, "5.1.1 unknown")

        with pytest.raises(DownstreamRejected):
            await store.release(one, by="web:claire", deliver=refused, client="192.0.2.7")
        await store.release(one, by="sender:docteur@cabinet.test",
                            deliver=to_sink(tmp_path, sink))
        await store.delete(two, by="system:retry")
        await store.delete(two, by="system:retry")  # twice: one record
        entries, total = await store.audit_log()
    finally:
        await store.close()
    assert total == 3
    assert [(e.action, e.target, e.user) for e in reversed(entries)] == [
        ("release_failed", one, "web:claire"), ("release", one, "sender:docteur@cabinet.test"),
        ("delete", two, "system:retry")]
    assert entries[-1].client == "192.0.2.7" and entries[-1].detail == "550 5.1.1 unknown"
    assert (await sink.get()).rcpts == [RCPT]
