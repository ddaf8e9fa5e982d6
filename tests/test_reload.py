"""Reload without restart (SIGHUP, `gateway reload`): the rules, the YARA folders and the TLS
certificate are taken again; a set that does not load or compile is refused whole, the one
in use stays (in the serving process and in its worker processes), and it is said."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.service import running
from tests.conftest import DNS, DOMAIN, make_config
from tests.support.certs import self_signed
from tests.test_attachments import analyse, message_with
from tests.test_cli import free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
MOTIF = b"motif-secret-du-test-42"
GOOD = 'rule Local_Test { strings: $a = "motif-secret-du-test-42" condition: $a }'
BROKEN = "rule Local_Test { strings: $a = "


def rules_copy(tmp_path: Path) -> Path:
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    return rules


async def symbols_of(gw, raw: bytes) -> dict[str, float]:
    return {s.name: s.score for s in (await analyse(gw.runtime, raw)).symbols}


async def test_reload_takes_new_rules_and_keeps_the_old_ones_when_the_new_are_broken(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    extra = tmp_path / "yara"
    extra.mkdir()
    rules = rules_copy(tmp_path)
    cfg = make_config(tmp_path / "d", gateway={"rules_dir": str(rules)},
                      attachments={"yara_dirs": [str(extra)]})
    # With a file: the attachments run in a worker process (the rules installed there);
    # without: in a thread of the serving process. Both must follow.
    with_file = message_with("note.txt", MOTIF)
    no_date = b"From: <a@labo.example>\r\nSubject: x\r\n\r\n" + MOTIF + b"\r\n"
    async with running(cfg) as gw:
        assert "YARA_MATCH" not in await symbols_of(gw, with_file)
        (extra / "local.yar").write_text(GOOD)
        text = (rules / "symbols.toml").read_text()
        (rules / "symbols.toml").write_text(text.replace(
            "[symbols.DATE_MISSING]\ngroup = \"structure\"\nscore = 1.0",
            "[symbols.DATE_MISSING]\ngroup = \"structure\"\nscore = 2.5"))
        assert await gw.reload() is None
        assert "YARA_MATCH" in await symbols_of(gw, with_file)
        found = await symbols_of(gw, no_date)
        assert "YARA_MATCH" in found and found["DATE_MISSING"] == 2.5

        # A rule file that no longer compiles: the whole new set is refused.
        caplog.set_level(logging.INFO)
        (extra / "local.yar").write_text(BROKEN)
        (rules / "symbols.toml").write_text(text)  # (this change is refused with it)
        error = await gw.reload()
        assert error is not None and "local.yar" in error
        assert "YARA_MATCH" in await symbols_of(gw, with_file)  # the worker processes' rules
        found = await symbols_of(gw, no_date)
        assert "YARA_MATCH" in found and found["DATE_MISSING"] == 2.5
        refused = [r for r in caplog.records if r.getMessage() ==
                   "reload refused; the rules in use stay"]
        assert len(refused) == 1 and refused[0].levelno == logging.ERROR

        # A symbol table that does not load: refused too.
        (extra / "local.yar").write_text(GOOD)
        (rules / "symbols.toml").write_text(text + "\n[symbols.DATE_MISSING\n")
        error = await gw.reload()
        assert error is not None and "symbols.toml" in error
        assert (await symbols_of(gw, no_date))["DATE_MISSING"] == 2.5


async def test_reload_renews_the_tls_certificate(tmp_path: Path, sink):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    cert, key = self_signed(first)
    new_cert, new_key = self_signed(second)
    live_cert, live_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(cert, live_cert)
    shutil.copy(key, live_key)
    cfg = make_config(tmp_path / "d", smtp={"tls_cert": str(live_cert), "tls_key": str(live_key)},
                      next_hop={"address": sink.address, "starttls": "off"})

    async def served_certificate(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO client.example\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writer.write(b"STARTTLS\r\n")
        assert (await reader.readline()).startswith(b"220")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        await writer.start_tls(ctx)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return der

    async with running(cfg) as gw:
        before = await served_certificate(gw.port)
        shutil.copy(new_cert, live_cert)
        shutil.copy(new_key, live_key)
        assert await gw.reload() is None
        after = await served_certificate(gw.port)
    assert before == ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert after == ssl.PEM_cert_to_DER_cert(new_cert.read_text())


def test_gateway_reload_checks_signals_and_reports(tmp_path: Path):
    extra = tmp_path / "yara"
    extra.mkdir()
    (extra / "local.yar").write_text(GOOD)
    rules = rules_copy(tmp_path)
    port = free_port()
    conf = tmp_path / "gateway.toml"
    conf.write_text(f'[gateway]\ndomains = ["{DOMAIN}"]\ndata_dir = "{tmp_path / "data"}"\n'
                    f'rules_dir = "{rules}"\nworkers = 2\n[smtp]\nlisten = "127.0.0.1:{port}"\n'
                    f'[web]\nlisten = ""\n[metrics]\nlisten = ""\n'
                    f'[dns]\nnameservers = ["{DNS.address}"]\n'
                    f'[attachments]\nyara_dirs = ["{extra}"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(conf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "reload", "--config", str(conf)],
                              capture_output=True, text=True, timeout=90)
    try:
        wait_port(port, proc)
        res = reload()
        assert res.returncode == 0 and res.stdout.strip() == \
            "Règles relues par les 2 processus de service.", res.stderr
        # A YARA file that stops compiling: each serving process refuses, and says so.
        (extra / "local.yar").write_text(BROKEN)
        res = reload()
        assert res.returncode == 1
        lines = [line for line in res.stderr.splitlines() if line.startswith("Processus ")]
        assert len(lines) == 2 and all("règles refusées, les précédentes restent en service"
                                       in line and "local.yar" in line for line in lines)
        # A rule file that does not load: refused before anything is signalled.
        (extra / "local.yar").write_text(GOOD)
        (rules / "lures.toml").write_text("[[lure\n")
        res = reload()
        assert res.returncode == 1
        assert res.stderr.startswith("Règles refusées, rien n'est changé : "), res.stderr
        (rules / "lures.toml").write_text((ROOT / "rules" / "lures.toml").read_text())
        # A second gateway on the same data folder stops before it changes anything.
        second = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config",
                                 str(conf), "--listen", f"127.0.0.1:{free_port()}"],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert "une passerelle tourne déjà avec ce dossier de données" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=40)
    assert proc.returncode == 0, stderr
    # The pid file stays, unlocked: `gateway reload` knows nobody is there to signal.
    res = reload()
    assert res.returncode == 1 and res.stderr.startswith(
        "La passerelle ne tourne pas avec ce dossier de données."), res.stderr
