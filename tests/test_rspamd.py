"""rspamd as a check, against a real rspamd (and its Redis) started with the configuration
shipped in docker/rspamd/ (tests/support/rspamd.py): its score becomes RSPAMD_SCORE with
its top symbols, its own authentication checks are not counted twice, and rspamd down
follows the failure contract."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from gateway.accounts import AccountFile
from gateway.cli import to_crlf
from gateway.config import RSPAMD_IGNORED
from gateway.rspamd import read_answer
from gateway.service import running
from tests.conftest import DNS, DOMAIN, make_config
from tests.support.rspamd import PASSWORD, RspamdServer
from tests.support.sink import Sink
from tests.support.webclient import ADMIN, Client, add_users, quarantine


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdServer]:
    server = RspamdServer(tmp_path_factory.mktemp("rspamd"), DNS.address)
    asyncio.run(server.start())
    yield server
    asyncio.run(server.stop())


def engine(server: RspamdServer, **extra: object) -> dict:
    return {"rspamd": {"enabled": True, "url": server.url,
                       "controller_url": server.controller_url, **extra}}


def careless() -> bytes:
    """Mail sent as bulk senders who hide do: no Message-ID, no Date, a subject in capitals,
    an HTML part alone. rspamd's rules score each (MISSING_MID, MISSING_DATE...)."""
    m = EmailMessage()
    m["From"] = "Offre <offre@promo-sante.example>"
    m["To"] = f"docteur@{DOMAIN}"
    m["Subject"] = "OFFRE EXCEPTIONNELLE GAGNEZ UN IPHONE"
    m.set_content("<html><body><p>Cliquez <a href='http://promo-sante.example/x'>ici</a> "
                  "pour gagner !!!</p></body></html>", subtype="html")
    return to_crlf(bytes(m))


async def send(port: int, raw: bytes) -> str:
    _, reply = await aiosmtplib.send(raw, sender="offre@promo-sante.example",
                                     recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                                     port=port, start_tls=False, timeout=60)
    return reply


def scored(header: str, name: str) -> float:
    """The score of `name` in an X-Gateway-Symbols value ("A(1), B(2.5)")."""
    found = re.search(rf"\b{name}\(([-0-9.]+)\)", header)
    assert found, f"{name} not in {header}"
    return float(found.group(1))


async def test_rspamds_score_and_top_symbols_are_in_the_verdict(tmp_path: Path, sink: Sink,
                                                                rspamd: RspamdServer):
    cfg = make_config(tmp_path, next_hop={"address": sink.address, "starttls": "off"},
                      engines=engine(rspamd))
    async with running(cfg) as gw:
        assert (await send(gw.port, careless())).startswith("2.0.0")
    got = message_from_bytes((await sink.get()).data)
    symbols = got["X-Gateway-Symbols"]
    assert scored(symbols, "RSPAMD_SCORE") > 0, symbols
    # rspamd's own checks of SPF, DKIM, DMARC (off in the shipped configuration, and left
    # out of the count in any case) never show among its counted symbols.
    detail = got["X-Gateway-Symbols"]
    assert "R_SPF" not in detail and "DMARC" not in detail.replace("DMARC_NONE", "")


async def test_weight_and_cap_apply(tmp_path: Path, sink: Sink, rspamd: RspamdServer):
    hop = {"address": sink.address, "starttls": "off"}
    async with running(make_config(tmp_path / "w", next_hop=hop,
                                   engines=engine(rspamd, weight=0.5))) as gw:
        await send(gw.port, careless())
    half = scored(message_from_bytes((await sink.get()).data)["X-Gateway-Symbols"], "RSPAMD_SCORE")
    async with running(make_config(tmp_path / "f", next_hop=hop, engines=engine(rspamd))) as gw:
        await send(gw.port, careless())
    full = scored(message_from_bytes((await sink.get()).data)["X-Gateway-Symbols"], "RSPAMD_SCORE")
    assert half == pytest.approx(full / 2, abs=0.01)
    async with running(make_config(tmp_path / "c", next_hop=hop,
                                   engines=engine(rspamd, max_score=0.5))) as gw:
        await send(gw.port, careless())
    capped = scored(message_from_bytes((await sink.get()).data)["X-Gateway-Symbols"],
                    "RSPAMD_SCORE")
    assert capped == 0.5 < full


def test_ignored_symbols_are_not_counted():
    body = {"is_skipped": False, "score": 9.0, "symbols": {
        "R_SPF_FAIL": {"score": 4.0}, "DMARC_POLICY_REJECT": {"score": 2.0},
        "R_DKIM_REJECT": {"score": 1.0}, "MISSING_MID": {"score": 2.5},
        "BAYES_HAM": {"score": -3.0}, "RDNS_NONE": {"score": 1.0},
        "HFILTER_HELO_5": {"score": 3.0}}}
    answer = read_answer(body, RSPAMD_IGNORED)
    assert answer.score == 2.5
    assert answer.symbols == (("HFILTER_HELO_5", 3.0), ("MISSING_MID", 2.5), ("BAYES_HAM", -3.0))


@pytest.mark.promise("engines-fail-closed")
async def test_rspamd_down_gives_451_or_is_said_when_failing_open(tmp_path: Path, sink: Sink):
    hop = {"address": sink.address, "starttls": "off"}
    down = {"url": "http://127.0.0.1:9", "controller_url": "http://127.0.0.1:9"}
    async with running(make_config(tmp_path / "r", next_hop=hop,
                                   engines={"rspamd": {"enabled": True, **down}})) as gw:
        with pytest.raises(aiosmtplib.SMTPDataError) as exc:
            await send(gw.port, careless())
    assert exc.value.code == 451
    await sink.settled()
    assert sink.empty()
    async with running(make_config(tmp_path / "o", next_hop=hop, engines={"rspamd": {
            "enabled": True, "on_failure": "open", **down}})) as gw:
        assert (await send(gw.port, careless())).startswith("2.0.0")
    assert "RSPAMD_UNCHECKED" in message_from_bytes((await sink.get()).data)["X-Gateway-Symbols"]


def offer(n: int) -> bytes:
    """A held offer with enough words for Bayes to learn from (rspamd's min_tokens)."""
    m = EmailMessage()
    m["From"] = "Offre <offre@promo-sante.example>"
    m["To"] = f"docteur@{DOMAIN}"
    m["Subject"] = f"OFFRE EXCEPTIONNELLE NUMERO {n}"
    m.set_content(
        "<html><body><p>Madame, Monsieur, notre société propose aux cabinets médicaux une "
        "offre exceptionnelle sur les fournitures, les blouses, les gants et le matériel de "
        f"consultation. Remise de {10 + n} pour cent valable cette semaine seulement, "
        "livraison gratuite partout en France, paiement en plusieurs fois sans frais. "
        "<a href='http://promo-sante.example/x'>Commandez ici</a> avant vendredi.</p>"
        "</body></html>", subtype="html")
    return to_crlf(bytes(m))


def with_web(tmp_path: Path, sink: Sink, rspamd: RspamdServer, password: str):
    """The gateway with its web page (an admin account) and rspamd, the controller's
    password in a 0600 file; held from a score of 4."""
    secret = tmp_path / "rspamd-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    cfg = make_config(tmp_path / "data", next_hop={"address": sink.address, "starttls": "off"},
                      web={"listen": "127.0.0.1:0"}, scoring={"tag": 2, "quarantine": 4},
                      engines=engine(rspamd, password_file=str(secret)))
    add_users(AccountFile(cfg.web_users_file))
    return cfg


async def test_the_admins_decisions_are_taught_to_rspamd_once(tmp_path: Path, sink: Sink,
                                                               rspamd: RspamdServer):
    cfg = with_web(tmp_path, sink, rspamd, PASSWORD)
    ham_before = await rspamd.learned("ham")
    spam_before = await rspamd.learned("spam")
    async with running(cfg) as gw:
        kept = await quarantine(gw, offer(1), sender="offre@promo-sante.example")
        dropped = await quarantine(gw, offer(2), sender="offre@promo-sante.example")
        web = Client(f"http://127.0.0.1:{gw.web_port}")
        try:
            assert await web.login(ADMIN) == 303
            _, page, _ = await web.get(f"/quarantaine/{kept}")
            assert "Le filtre antispam (rspamd) attribue à ce message un score de" in page
            assert "RSPAMD_SCORE" in page and "Libérer : ce n&#39;est pas un spam" in page
            status, _, resp = await web.post(f"/quarantaine/{kept}/liberer-pas-spam",
                                             {"csrf": web.csrf})
            assert status == 303
            _, page, _ = await web.get(resp.headers["Location"])
            assert "Message libéré" in page and "légitime" in page
            assert b"OFFRE EXCEPTIONNELLE NUMERO 1" in (await sink.get()).data
            assert await rspamd.learned("ham") == ham_before + 1
            # Blocking the sender says "spam": taught. Deleting it as spam afterwards does
            # not teach it again (once per message).
            await web.get(f"/quarantaine/{dropped}")
            _, _, resp = await web.post(f"/quarantaine/{dropped}/bloquer", {"csrf": web.csrf})
            _, page, _ = await web.get(resp.headers["Location"])
            assert "bloqué" in page and "apprendra à reconnaître" in page
            assert await rspamd.learned("spam") == spam_before + 1
            _, _, resp = await web.post(f"/quarantaine/{dropped}/supprimer-spam",
                                        {"csrf": web.csrf})
            _, page, _ = await web.get(resp.headers["Location"])
            assert "Message supprimé" in page and "déjà été transmis" in page
            assert await rspamd.learned("spam") == spam_before + 1
            _, journal, _ = await web.get("/journal")
            assert "appris comme légitime par le filtre antispam" in journal
            assert "appris comme spam par le filtre antispam" in journal
        finally:
            await web.close()
        store = gw.runtime.store
        assert store is not None
        learnt, _ = await store.audit_log(action="learn_ham")
        assert [e.target for e in learnt] == [kept]
        learnt, _ = await store.audit_log(action="learn_spam")
        assert [e.target for e in learnt] == [dropped]


async def test_a_decision_stands_when_rspamd_cannot_learn_it(tmp_path: Path, sink: Sink,
                                                             rspamd: RspamdServer):
    cfg = with_web(tmp_path, sink, rspamd, "pas-le-bon")
    spam_before = await rspamd.learned("spam")
    async with running(cfg) as gw:
        item = await quarantine(gw, offer(3), sender="offre@promo-sante.example")
        web = Client(f"http://127.0.0.1:{gw.web_port}")
        try:
            assert await web.login(ADMIN) == 303
            await web.get(f"/quarantaine/{item}")
            _, _, resp = await web.post(f"/quarantaine/{item}/supprimer-spam", {"csrf": web.csrf})
            _, page, _ = await web.get(resp.headers["Location"])
            assert "Message supprimé" in page and "n&#39;a pas pu en être informé" in page
        finally:
            await web.close()
        store = gw.runtime.store
        assert store is not None
        assert [e.target for e in (await store.audit_log(action="verdict_spam"))[0]] == [item]
        assert [e.target for e in (await store.audit_log(action="learn_failed"))[0]] == [item]
    assert await rspamd.learned("spam") == spam_before


def test_a_password_file_others_can_read_is_refused(tmp_path: Path):
    from gateway.errors import ConfigError
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        make_config(tmp_path, engines={"rspamd": {"enabled": True, "password_file": str(secret)}})


async def test_a_value_rspamd_cannot_be_sent_follows_the_failure_contract(tmp_path: Path,
                                                                          rspamd: RspamdServer):
    """A HELO with a control character (the SMTP side refuses those; this is the check's own
    guard) cannot be an HTTP header: rspamd is unavailable for it, 451, never skipped."""
    from gateway.message import Inbound
    from gateway.service import build_runtime
    from gateway.symbols import Action
    rt = await build_runtime(make_config(tmp_path, engines=engine(rspamd)), with_store=False)
    try:
        v = (await rt.pipeline.analyse(Inbound(
            queue_id="t", peer_ip="192.0.2.1", helo="a\rb", mail_from="",
            rcpts=(f"docteur@{DOMAIN}",), raw=careless()))).verdict
    finally:
        await rt.close()
    assert "RSPAMD_UNAVAILABLE" in {s.name for s in v.symbols}
    assert v.action is Action.TEMPFAIL


async def test_the_controller_password_never_follows_a_redirect(tmp_path: Path):
    from aiohttp import web

    from gateway.rspamd import Rspamd, RspamdUnavailable
    seen: list[str | None] = []

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.2:{port}/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Password"))
        return web.json_response({"success": True})

    app = web.Application()
    app.router.add_post("/learnspam", moved)
    app.router.add_post("/elsewhere", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    site2 = web.TCPSite(runner, "127.0.0.2", 0)
    await site2.start()
    port = site2._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    first = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = Rspamd("http://127.0.0.1:9", controller_url=f"http://127.0.0.1:{first}",
                    password="secret-du-controleur")
    try:
        with pytest.raises(RspamdUnavailable, match="307"):
            await client.learn(careless(), spam=True)
    finally:
        await client.close()
        await runner.cleanup()
    assert seen == []


def test_a_password_in_the_url_is_refused(tmp_path: Path):
    from gateway.errors import ConfigError
    with pytest.raises(ConfigError, match="password_file") as exc:
        make_config(tmp_path, engines={"rspamd": {
            "controller_url": "http://admin:secret@127.0.0.1:11334"}})
    assert "secret" not in str(exc.value)
