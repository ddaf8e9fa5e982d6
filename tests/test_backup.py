"""`gateway backup` while the gateway serves, then `gateway restore` into an empty folder:
every held message readable again, the key never inside the backup, and a backup that does
not check out (altered, wrong key, folder not empty) never put back."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

from gateway import cli
from gateway.service import quarantine_root, running
from quarantine.store import Store
from tests.conftest import DOMAIN
from tests.support.sink import Sink
from tests.test_quarantine import SUSPECT, quarantine_config, send, write_config


def run_cli(*args: str) -> int:
    return cli.main(list(args))


async def items_and_bodies(root: Path, key: Path) -> dict[str, tuple[str, bytes]]:
    store = await Store.open(root, key)
    try:
        out = {}
        for item in await store.list_items(limit=1000):
            if item.state != "deleted":
                _, raw = await store.get(item.id)
                out[item.id] = (item.state, raw)
        return out
    finally:
        await store.close()


def elsewhere_config(tmp_path: Path, conf: Path, cfg) -> tuple[Path, Path]:
    """The same installation's configuration with an empty data folder to restore into."""
    restored = tmp_path / "restaure"
    new_conf = tmp_path / "restaure.toml"
    new_conf.write_text(conf.read_text().replace(str(cfg.gateway.data_dir), str(restored)))
    return restored, new_conf


async def backed_up_one_held_message(tmp_path: Path, sink: Sink):
    """An installation holding one message, and its backup (the key left out)."""
    cfg = quarantine_config(tmp_path, sink)
    conf = write_config(tmp_path, cfg)
    saved = tmp_path / "sauvegarde"
    async with running(cfg) as gw:
        await send(gw.port)
    assert run_cli("backup", "--config", str(conf), str(saved)) == 0
    return cfg, conf, saved


def modes(folder: Path) -> set[str]:
    return {oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.rglob("*") if p.is_file()}


async def test_backup_while_serving_then_restore_gives_back_every_held_message(
        tmp_path: Path, sink: Sink, capsys):
    cfg = quarantine_config(tmp_path, sink)
    conf = write_config(tmp_path, cfg)
    saved, key_copy = tmp_path / "sauvegarde", tmp_path / "cle-usb" / "quarantine.key"
    async with running(cfg) as gw:
        for i in range(3):
            assert (await send(gw.port, SUSPECT.replace(b"8f3a91", f"n{i}".encode())
                               )).startswith("2.0.0 Message accepte et mis en quarantaine")
        before = await items_and_bodies(quarantine_root(cfg), cfg.key_file)
        one = sorted(before)[0]
        assert await asyncio.to_thread(run_cli, "quarantine", "--config", str(conf),
                                       "delete", one) == 0
        del before[one]
        # The gateway is still serving: the online copy.
        assert await asyncio.to_thread(run_cli, "backup", "--config", str(conf), str(saved),
                                       "--cle", str(key_copy)) == 0
    said = capsys.readouterr().out
    assert f"Sauvegarde écrite dans {saved} : 3 messages dans l'index" in said
    assert "la clé et les données sont sur le même support" in said  # both under tmp_path
    # The key is not in the backup; everything is private.
    key_hex = cfg.key_file.read_text().strip()
    assert all(key_hex.encode() not in p.read_bytes() for p in saved.rglob("*") if p.is_file())
    assert stat.S_IMODE(saved.stat().st_mode) == 0o700 and modes(saved) == {"0o600"}
    assert key_copy.read_text().strip() == key_hex and modes(key_copy.parent) == {"0o600"}
    manifest = json.loads((saved / "MANIFEST.json").read_text())
    assert manifest["items"] == 3 and len([f for f in manifest["files"] if ".qmsg" in f]) == 2

    # Restore into an empty folder, with the key from its own medium.
    restored, new_conf = elsewhere_config(tmp_path, conf, cfg)
    assert await asyncio.to_thread(run_cli, "restore", "--config", str(new_conf), str(saved),
                                   "--cle", str(key_copy)) == 0
    assert "2 messages relus sans erreur" in capsys.readouterr().out
    after = await items_and_bodies(restored / "quarantine", restored / "quarantine.key")
    assert after == before
    assert stat.S_IMODE((restored / "quarantine.key").stat().st_mode) == 0o600
    # The restored installation releases what was held.
    status = await asyncio.to_thread(run_cli, "quarantine", "--config", str(new_conf),
                                     "release", sorted(after)[0])
    assert status == 0
    got = await sink.get()
    assert got.rcpts == [f"docteur@{DOMAIN}"] and b"X-Gateway-Released" in got.data


async def test_a_backup_that_does_not_check_out_is_never_put_back(tmp_path: Path, sink: Sink,
                                                                  capsys):
    cfg, conf, saved = await backed_up_one_held_message(tmp_path, sink)
    assert "la clé de quarantaine n'est pas dans la sauvegarde" in capsys.readouterr().out
    # Into a folder that is not empty (here: the live data): refused.
    assert run_cli("restore", "--config", str(conf), str(saved)) == 1
    assert "n'est pas vide" in capsys.readouterr().err

    restored, new_conf = elsewhere_config(tmp_path, conf, cfg)
    # No key given and none in place; then another installation's key.
    assert run_cli("restore", "--config", str(new_conf), str(saved)) == 1
    assert "donnez-la avec --cle" in capsys.readouterr().err
    other = tmp_path / "autre.key"
    other.write_text(os.urandom(32).hex() + "\n")
    os.chmod(other, 0o600)
    assert run_cli("restore", "--config", str(new_conf), str(saved), "--cle", str(other)) == 1
    assert "cette clé n'est pas celle de la sauvegarde" in capsys.readouterr().err
    # One byte of a sealed file changed.
    [sealed] = (saved / "quarantine" / "msgs").glob("*.qmsg")
    blob = bytearray(sealed.read_bytes())
    blob[-1] ^= 1
    sealed.write_bytes(bytes(blob))
    assert run_cli("restore", "--config", str(new_conf), str(saved), "--cle",
                   str(cfg.key_file)) == 1
    assert "fichier altéré ou abîmé dans la sauvegarde : quarantine/msgs/" in \
        capsys.readouterr().err
    assert not restored.exists() or not any(restored.iterdir())
    # A second backup into the same folder is refused: nothing written over.
    assert run_cli("backup", "--config", str(conf), str(saved)) == 1
    assert "n'est pas vide" in capsys.readouterr().err


async def test_a_backup_altered_by_someone_without_the_key_is_refused(tmp_path: Path, sink: Sink,
                                                                      capsys):
    """Re-hashing the files after a change is not enough: the manifest's MAC is keyed; and a
    file replaced by a link is never followed."""
    import hashlib
    import sqlite3
    cfg, conf, saved = await backed_up_one_held_message(tmp_path, sink)
    restored, new_conf = elsewhere_config(tmp_path, conf, cfg)
    manifest_path = saved / "MANIFEST.json"
    original = manifest_path.read_text()
    index_bytes = (saved / "quarantine" / "index.sqlite3").read_bytes()
    # Every held message marked deleted in the index, the hashes recomputed.
    db = sqlite3.connect(saved / "quarantine" / "index.sqlite3")
    with db:
        db.execute("UPDATE items SET state = 'deleted'")
    db.close()
    manifest = json.loads(original)
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((saved / name).read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_cli("restore", "--config", str(new_conf), str(saved), "--cle",
                   str(cfg.key_file)) == 1
    assert "MANIFEST.json altéré" in capsys.readouterr().err
    assert not restored.exists() or not any(restored.iterdir())
    # A listed file replaced by a link to a file of the same bytes elsewhere.
    manifest_path.write_text(original)
    (saved / "quarantine" / "index.sqlite3").write_bytes(index_bytes)
    [sealed] = (saved / "quarantine" / "msgs").glob("*.qmsg")
    elsewhere = tmp_path / "ailleurs.qmsg"
    os.replace(sealed, elsewhere)
    sealed.symlink_to(elsewhere)
    assert run_cli("restore", "--config", str(new_conf), str(saved), "--cle",
                   str(cfg.key_file)) == 1
    err = capsys.readouterr().err
    assert "fichier illisible dans la sauvegarde : " in err, err
    assert not restored.exists() or not any(restored.iterdir())
