"""The quarantine web page without a browser: access control, login, lockout, cookies, headers,
CSRF, escaping, actions, lists used by the pipeline, audit log, retention, sender release.
(The browser tests are in tests/test_web_browser.py.)"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiosmtplib
import pytest

from gateway.accounts import AccountFile
from gateway.service import Running, purge_expired, running
from quarantine.store import NewItem, SymbolRecord
from tests.conftest import DOMAIN, make_config
from tests.support.certs import self_signed
from tests.support.sink import Sink
from tests.support.webclient import ADMIN, READER, Client, add_users, quarantine, suspicious


@dataclass
class Web:
    gw: Running
    sink: Sink
    client: Client


async def start_web(tmp_path: Path, sink: Sink, **web: object):
    cfg = make_config(tmp_path / "data", next_hop={"address": sink.address, "starttls": "off"},
                      web={"listen": "127.0.0.1:0", **web})
    add_users(AccountFile(cfg.web_users_file))
    return running(cfg)


@pytest.fixture
async def site(tmp_path: Path, sink: Sink) -> AsyncIterator[Web]:
    async with await start_web(tmp_path, sink) as gw:
        client = Client(f"http://127.0.0.1:{gw.web_port}")
        try:
            yield Web(gw=gw, sink=sink, client=client)
        finally:
            await client.close()


PAGES = ["/", "/quarantaine", "/quarantaine/20261128T100000-0123456789ab",
         "/quarantaine/20261128T100000-0123456789ab/apercu",
         "/quarantaine/20261128T100000-0123456789ab/telecharger", "/listes", "/journal"]
ACTIONS = ["/deconnexion", "/quarantaine/actions", "/listes",
           "/quarantaine/20261128T100000-0123456789ab/liberer",
           "/quarantaine/20261128T100000-0123456789ab/supprimer"]


@pytest.mark.promise("web-login-2fa")
async def test_every_page_and_action_needs_a_session(site: Web):
    item = await quarantine(site.gw, suspicious())
    for path in [*PAGES, f"/quarantaine/{item}", f"/quarantaine/{item}/apercu"]:
        status, _, resp = await site.client.get(path)
        assert status == 303 and resp.headers["Location"] == "/connexion", path
    for path in [*ACTIONS, f"/quarantaine/{item}/liberer"]:
        status, text, _ = await site.client.post(path, {"csrf": "x", "ids": item})
        assert status == 401 and "reconnectez-vous" in text, path
    assert (await site.gw.runtime.store.item(item)).state == "quarantined"  # type: ignore[union-attr]
    assert site.sink.empty()


@pytest.mark.promise("web-login-2fa")
async def test_login_needs_password_and_totp_and_sets_a_strict_cookie(site: Web):
    c = site.client
    assert await c.login(ADMIN, code="000000") == 401
    assert await c.login(ADMIN, code="12345") == 401
    status, text, resp = await c.post("/connexion", {"jeton": c.form_token,
                                                     "utilisateur": ADMIN.name,
                                                     "mot_de_passe": "pas le bon",
                                                     "code": ADMIN.code()})
    assert status == 401 and "incorrect" in text
    # Without the login form's token (a form posted from another site): refused.
    status, text, _ = await c.post("/connexion", {"utilisateur": ADMIN.name,
                                                  "mot_de_passe": ADMIN.password,
                                                  "code": ADMIN.code()})
    assert status == 403 and "Formulaire expiré" in text
    used = ADMIN.code()
    status, _, resp = await c.post("/connexion", {"jeton": c.form_token,
                                                  "utilisateur": ADMIN.name,
                                                  "mot_de_passe": ADMIN.password,
                                                  "code": used})
    assert status == 303
    cookie = resp.headers.getall("Set-Cookie")[-1]
    assert cookie.startswith("session=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Max-Age=36000" in cookie  # expires with the session's maximum age (10 hours)
    status, text, _ = await c.get("/")
    assert status == 200 and "Tableau de bord" in text and "claire" in text
    # The same code cannot be used twice (replay): the very code used above, not the
    # clock's code of now, which a 30 s step boundary could have made a new one.
    other = Client(c.base)
    try:
        assert await other.login(ADMIN, code=used) == 401
    finally:
        await other.close()


@pytest.mark.promise("login-throttle")
async def test_guessing_is_slowed_and_the_real_admin_still_logs_in(site: Web):
    guesser = Client(site.client.base, source="127.0.0.2")
    try:
        for _ in range(5):  # max_login_failures: free tries for this account and address
            assert await guesser.login(ADMIN, code="000000") == 401
        # Then each try waits (4 s, 8 s, 16 s...), right password or not.
        await guesser.get("/connexion")
        status, text, _ = await guesser.post("/connexion", {
            "jeton": guesser.form_token, "utilisateur": ADMIN.name,
            "mot_de_passe": ADMIN.password, "code": ADMIN.code()})
        assert status == 429 and re.search(r"réessayez dans [1-4] seconde\(s\)", text)
        # The admin, from the practice's own address, is not slowed down.
        assert await site.client.login(ADMIN) == 303
    finally:
        await guesser.close()


@pytest.mark.promise("login-throttle")
async def test_an_address_guessing_many_accounts_is_locked_out(site: Web):
    guesser = Client(site.client.base, source="127.0.0.3")
    try:
        for name in ("a", "b", "c"):  # 19 failures on four accounts: each pair within its
            for _ in range(5):        # free tries, the address one short of its limit (20)
                assert await guesser.login(replace(ADMIN, name=name), code="000000") == 401
        for _ in range(4):
            assert await guesser.login(replace(ADMIN, name="d"), code="000000") == 401
        # Its own account's login succeeds, and does not wipe the address's count...
        assert await guesser.login(READER) == 303
        assert await guesser.login(replace(ADMIN, name="e"), code="000000") == 401
        # ... so the twentieth failure locks the address, for every account.
        status, text, _ = await guesser.post("/connexion", {
            "jeton": guesser.form_token, "utilisateur": ADMIN.name,
            "mot_de_passe": ADMIN.password, "code": ADMIN.code()})
        assert status == 429 and "15 minute(s)" in text
    finally:
        await guesser.close()
    assert await site.client.login(ADMIN) == 303  # another address: not locked
    entries, _ = await site.gw.runtime.store.audit_log()  # type: ignore[union-attr]
    assert [e.action for e in entries].count("lockout") == 1


async def test_security_headers(site: Web):
    status, _, resp = await site.client.get("/connexion")
    assert status == 200
    h = resp.headers
    csp = h["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src" not in csp  # no script at all
    assert h["Referrer-Policy"] == "no-referrer" and h["X-Content-Type-Options"] == "nosniff"
    assert h["X-Frame-Options"] == "DENY" and h["Cache-Control"] == "no-store"


async def test_https_cookie_is_secure_with_host_prefix(tmp_path: Path, sink: Sink):
    import ssl
    cert, key = self_signed(tmp_path)
    async with await start_web(tmp_path, sink, tls_cert=str(cert), tls_key=str(key)) as gw:
        c = Client(f"https://127.0.0.1:{gw.web_port}")
        try:
            ctx = ssl.create_default_context(cafile=str(cert))
            await c.get("/connexion", ssl=ctx)
            status, _, resp = await c.post("/connexion", {
                "jeton": c.form_token, "utilisateur": ADMIN.name,
                "mot_de_passe": ADMIN.password, "code": ADMIN.code()}, ssl=ctx)
            assert status == 303
            cookie = next(v for v in resp.headers.getall("Set-Cookie")
                          if v.startswith("__Host-session="))
            assert cookie.startswith("__Host-session=") and "Secure" in cookie
            assert "Strict-Transport-Security" in resp.headers
        finally:
            await c.close()


def post_paths(gw: Running, item: str) -> list[str]:
    """Every POST route of the running page, its parameters filled in (an action route once
    per action): a route added later is covered without editing the tests."""
    assert gw.web is not None
    paths = []
    for route in gw.web.app.router.routes():
        if route.method != "POST":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        template = str(info.get("formatter") or info.get("path"))
        for action in (["liberer", "liberer-autoriser", "bloquer", "supprimer"]
                       if "{action}" in template else [""]):
            paths.append(template.replace("{id}", item).replace("{action}", action)
                         .replace("{token}", "x" * 43))
    return paths


@pytest.mark.promise("web-csrf-origin")
async def test_every_post_needs_its_token(site: Web):
    item = await quarantine(site.gw, suspicious())
    await site.client.login(ADMIN)
    paths = post_paths(site.gw, item)
    assert len(paths) >= 9, paths
    for path in paths:
        for form in ({"ids": item}, {"ids": item, "csrf": "faux", "jeton": "faux"}):
            status, text, _ = await site.client.post(path, form)
            if path == "/connexion":
                assert status == 403 and "Formulaire expiré" in text, path
            elif path.startswith(("/liberation/", "/rapport/")):
                # A made-up link: refused before its form (a real digest link's form needs
                # its token too: tests/test_digest.py).
                assert status == 404 and "Lien invalide" in text, path
            else:
                assert status == 403 and "jeton de sécurité" in text, (path, status)
    # Nothing happened: still held, nothing sent, still logged in.
    assert (await site.gw.runtime.store.item(item)).state == "quarantined"  # type: ignore[union-attr]
    assert site.sink.empty()
    assert (await site.client.get("/"))[0] == 200


@pytest.mark.promise("web-csrf-origin")
async def test_a_form_posted_from_another_site_is_refused(site: Web):
    item = await quarantine(site.gw, suspicious())
    await site.client.login(ADMIN)
    for path in post_paths(site.gw, item):
        status, text, _ = await site.client.post(
            path, {"ids": item, "csrf": site.client.csrf, "jeton": site.client.form_token},
            headers={"Origin": "https://attaquant.example"})
        assert status == 403 and "origine inconnue" in text, (path, status)
    assert (await site.gw.runtime.store.item(item)).state == "quarantined"  # type: ignore[union-attr]
    assert site.sink.empty()
    # The page's own origin is accepted.
    status, _, _ = await site.client.post(
        f"/quarantaine/{item}/supprimer", {"csrf": site.client.csrf},
        headers={"Origin": site.client.base})
    assert status == 303
    assert (await site.gw.runtime.store.item(item)).state == "deleted"  # type: ignore[union-attr]


@pytest.mark.promise("web-csrf-origin")
async def test_post_without_csrf_token_is_refused(site: Web):
    item = await quarantine(site.gw, suspicious())
    await site.client.login(ADMIN)
    status, text, _ = await site.client.post(f"/quarantaine/{item}/liberer", {})
    assert status == 403 and "jeton de sécurité" in text
    status, _, _ = await site.client.post(f"/quarantaine/{item}/liberer", {"csrf": "faux"})
    assert status == 403
    assert (await site.gw.runtime.store.item(item)).state == "quarantined"  # type: ignore[union-attr]
    assert site.sink.empty()


@pytest.mark.promise("preview-safe")
async def test_subject_and_sender_with_html_are_escaped(site: Web):
    raw = suspicious('<script>alert("objet")</script><b>Urgent</b>',
                     display='<img src=x onerror=alert(1)>Labo')
    item = await quarantine(site.gw, raw)
    await site.client.login(ADMIN)
    for path in ("/quarantaine", f"/quarantaine/{item}"):
        status, text, _ = await site.client.get(path)
        assert status == 200
        assert "<script>alert" not in text and "<img src=x" not in text
        assert "&lt;script&gt;alert(&#34;objet&#34;)&lt;/script&gt;" in text
        assert "&lt;img src=x onerror=alert(1)&gt;Labo" in text


@pytest.mark.promise("web-roles")
async def test_reader_can_view_but_not_act(site: Web):
    item = await quarantine(site.gw, suspicious())
    c = site.client
    assert await c.login(READER) == 303
    status, text, _ = await c.get(f"/quarantaine/{item}")
    assert status == 200 and "Libérer" not in text
    for action in ("liberer", "supprimer", "bloquer"):
        status, text, _ = await c.post(f"/quarantaine/{item}/{action}", {"csrf": c.csrf})
        assert status == 403 and "réservée aux administrateurs" in text
    status, _, _ = await c.get(f"/quarantaine/{item}/telecharger?confirme=1")
    assert status == 403
    assert (await site.gw.runtime.store.item(item)).state == "quarantined"  # type: ignore[union-attr]


async def test_release_delete_download_and_the_audit_log(site: Web):
    store = site.gw.runtime.store
    assert store is not None
    one = await quarantine(site.gw, suspicious("Premier", n=1))
    two = await quarantine(site.gw, suspicious("Second", n=2))
    c = site.client
    await c.login(ADMIN)
    status, text, _ = await c.get(f"/quarantaine/{one}")
    assert "facture.js" in text and "ATTACH_DANGEROUS_TYPE" in text
    status, text, resp = await c.get(f"/quarantaine/{one}/telecharger")
    assert status == 200 and "peut être dangereux" in text
    status, _, resp = await c.get(f"/quarantaine/{one}/telecharger?confirme=1")
    assert status == 200 and resp.headers["Content-Disposition"].startswith("attachment")
    # Held for a program attached: releasing asks first, naming the file; nothing is sent.
    status, text, _ = await c.post(f"/quarantaine/{one}/liberer", {"csrf": c.csrf})
    assert status == 200 and "Libérer un message dangereux ?" in text and "facture.js" in text
    assert site.sink.empty() and (await store.item(one)).state == "quarantined"
    status, _, resp = await c.post(f"/quarantaine/{one}/liberer", {"csrf": c.csrf,
                                                                   "confirme": "1"})
    assert status == 303
    got = await site.sink.get()
    assert got.rcpts == [f"docteur@{DOMAIN}"] and b"Subject: [SUSPECT] Premier" in got.data
    assert b"X-Gateway-Released: by web:claire" in got.data
    # Released twice (another tab): told in French, nothing sent again.
    status, _, resp = await c.post(f"/quarantaine/{one}/liberer", {"csrf": c.csrf})
    assert status == 303
    status, text, _ = await c.get(resp.headers["Location"])
    assert "Impossible : ce message n&#39;est plus en quarantaine (état : libéré)" in text
    assert site.sink.empty()
    status, _, _ = await c.post(f"/quarantaine/{two}/supprimer", {"csrf": c.csrf})
    assert status == 303
    assert (await store.item(one)).state == "released"
    assert (await store.item(two)).state == "deleted"
    status, text, _ = await c.get("/journal")
    for word in ("connexion", "consultation", "téléchargement", "libération", "suppression"):
        assert word in text
    assert "web:" not in text  # the store's tagged names read as people's names
    # Append-only: the database itself refuses to change the log.
    import sqlite3
    db = sqlite3.connect(store.root / "index.sqlite3")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")
    db.close()


async def test_bulk_release(site: Web):
    """A batch releases what needs no confirmation; a message held for a dangerous file is
    released one by one, after its confirmation, never in a batch."""
    store = site.gw.runtime.store
    assert store is not None
    raw = suspicious("x").replace(b"facture.js", b"facture.txt")
    lure = (SymbolRecord(name="PHISH_SPF_FAIL_LURE_LINK", score=4.0, detail="x"),)
    ids = [await store.put(NewItem(
        queue_id=f"L{i}", received_at=time.time(), direction="inbound", action="quarantine",
        score=9.0, symbols=lure, mail_from="contact@labo-analyses.example",
        rcpts=(f"docteur@{DOMAIN}",), subject=f"Lot {i}", from_header="", client_ip="",
        helo=""), raw.replace(b"Subject: x", f"Subject: Lot {i}".encode()))
        for i in range(3)]
    dangerous = await quarantine(site.gw, suspicious("Programme joint", n=30))
    c = site.client
    await c.login(ADMIN)
    await c.get("/quarantaine")
    status, _, resp = await c.post("/quarantaine/actions", [
        ("csrf", c.csrf), ("action", "liberer"), *[("ids", i) for i in [*ids[:2], dangerous]]])
    assert status == 303 and "2+message" in resp.headers["Location"].replace("%28s%29", "")
    assert "sur+3" in resp.headers["Location"]
    subjects = {(await site.sink.get()).data.split(b"Subject: ")[1].split(b"\r\n")[0]
                for _ in range(2)}
    assert subjects == {b"[SUSPECT] Lot 0", b"[SUSPECT] Lot 1"}
    assert site.sink.empty() and (await store.item(dangerous)).state == "quarantined"


async def test_filters_and_pagination(site: Web):
    store = site.gw.runtime.store
    assert store is not None
    await quarantine(site.gw, suspicious("Résultats labo", sender="a@labo-un.example", n=20),
                     sender="a@labo-un.example")
    await quarantine(site.gw, suspicious("Autre chose", sender="b@autre.example", n=21),
                     sender="b@autre.example")
    c = site.client
    await c.login(ADMIN)
    _, text, _ = await c.get("/quarantaine?expediteur=labo-un")
    assert "Résultats labo" in text and "Autre chose" not in text
    _, text, _ = await c.get("/quarantaine?objet=autre")
    assert "Autre chose" in text and "Résultats labo" not in text
    _, text, _ = await c.get("/quarantaine?raison=ATTACH_DANGEROUS_TYPE&score_min=1")
    assert "2 message(s)" in text
    _, text, _ = await c.get("/quarantaine?raison=DMARC_POLICY_REJECT")
    assert "0 message(s)" in text
    _, text, _ = await c.get("/quarantaine?etat=released")
    assert "0 message(s)" in text
    tomorrow = time.strftime("%Y-%m-%d", time.localtime(time.time() + 86400))
    _, text, _ = await c.get(f"/quarantaine?du={tomorrow}")
    assert "0 message(s)" in text


async def test_block_from_the_page_refuses_the_next_mail(site: Web):
    item = await quarantine(site.gw, suspicious())
    c = site.client
    await c.login(ADMIN)
    await c.get(f"/quarantaine/{item}")
    status, _, _ = await c.post(f"/quarantaine/{item}/bloquer", {"csrf": c.csrf})
    assert status == 303
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await aiosmtplib.send(suspicious("Encore", n=99).replace(b"facture.js", b"facture.txt"),
                              sender="contact@labo-analyses.example",
                              recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                              port=site.gw.port, start_tls=False)
    assert exc.value.code == 550
    _, text, _ = await c.get("/listes")
    assert "contact@labo-analyses.example" in text and "bloqué" in text


async def test_the_admin_edits_the_sender_lists_on_the_page(site: Web):
    from gateway.sender_lists import SenderLists

    lists = SenderLists(site.gw.runtime.cfg.data_dir / "sender-lists.json")
    c = site.client
    await c.login(ADMIN)
    await c.get("/listes")
    status, _, resp = await c.post("/listes", {"csrf": c.csrf, "type": "block",
                                               "valeur": " @Pub-Exemple.example ",
                                               "note": "publicité"})
    assert status == 303 and resp.headers["Location"] == "/listes"
    status, _, _ = await c.post("/listes", {"csrf": c.csrf, "type": "allow",
                                            "valeur": "resultats@labo-bio.example"})
    assert status == 303
    assert {(e.kind, e.value, e.added_by) for e in lists.entries()} == {
        ("block", "@pub-exemple.example", "claire"),
        ("allow", "resultats@labo-bio.example", "claire")}
    _, text, _ = await c.get("/listes")
    assert "@pub-exemple.example" in text and "publicité" in text
    # What is not an address or a domain is refused, in French, and nothing is added.
    status, text, _ = await c.post("/listes", {"csrf": c.csrf, "type": "allow",
                                               "valeur": "pas une adresse"})
    assert status == 400 and "adresse ou domaine invalide" in text
    assert len(lists.entries()) == 2
    status, _, _ = await c.post("/listes", {"csrf": c.csrf, "valeur": "@pub-exemple.example",
                                            "retirer": "1"})
    assert status == 303
    assert [e.value for e in lists.entries()] == ["resultats@labo-bio.example"]
    store = site.gw.runtime.store
    assert store is not None
    entries, _ = await store.audit_log()
    assert [(e.action, e.detail, e.user) for e in entries[:3]] == [
        ("list_remove", "@pub-exemple.example", "claire"),
        ("allow", "resultats@labo-bio.example", "claire"),
        ("block", "@pub-exemple.example", "claire")]
    # A reader sees the lists but cannot change them.
    reader = Client(c.base)
    try:
        await reader.login(READER)
        await reader.get("/listes")
        status, text, _ = await reader.post("/listes", {"csrf": reader.csrf, "type": "block",
                                                        "valeur": "@autre.example"})
        assert status == 403 and "réservée aux administrateurs" in text
    finally:
        await reader.close()
    assert len(lists.entries()) == 1


@pytest.mark.promise("web-login-2fa")
async def test_logging_out_ends_the_session_on_the_server(site: Web):
    c = site.client
    await c.login(ADMIN)
    cookie = next(m.value for m in c.http.cookie_jar if m.key == "session")
    status, _, resp = await c.post("/deconnexion", {"csrf": c.csrf})
    assert status == 303 and resp.headers["Location"] == "/connexion"
    assert any(h.startswith("session=;") or 'session=""' in h
               for h in resp.headers.getall("Set-Cookie"))
    # The old cookie, replayed (a copy kept by malware or a shared computer), opens nothing.
    replay = Client(c.base)
    try:
        status, _, resp = await replay.get("/", headers={"Cookie": f"session={cookie}"})
        assert status == 303 and resp.headers["Location"] == "/connexion"
    finally:
        await replay.close()
    store = site.gw.runtime.store
    assert store is not None
    entries, _ = await store.audit_log()
    assert (entries[0].action, entries[0].user) == ("logout", "claire")


async def test_tracking_page_finds_a_message_by_any_of_its_ids(site: Web):
    held = await quarantine(site.gw, suspicious("Facture en attente"))
    _, delivered_reply = await aiosmtplib.send(
        suspicious("Compte rendu", n=7).replace(b"facture.js", b"facture.txt"),
        sender="contact@labo-analyses.example", recipients=[f"docteur@{DOMAIN}"],
        hostname="127.0.0.1", port=site.gw.port, start_tls=False)
    delivered = re.search(r"id=([0-9A-Z]{12})", delivered_reply).group(1)  # type: ignore[union-attr]
    await site.gw.runtime.pipeline.flush_tracking()
    store = site.gw.runtime.store
    assert store is not None
    item = await store.item(held)
    c = site.client
    await c.login(ADMIN)
    # The reply's id: its record, with what was done and the reply given.
    status, text, _ = await c.get(f"/suivi?q={delivered.lower()}")
    assert status == 200 and f'id="{delivered}"' in text and "Compte rendu" in text
    assert "remis" in text and f"id={delivered}" in text and "Facture en attente" not in text
    # The held message's record links to it, found by either id.
    for ident in (item.queue_id, held):
        status, text, _ = await c.get(f"/suivi?q={ident}")
        assert status == 200 and f'href="/quarantaine/{held}"' in text, ident
        assert "mis en quarantaine" in text
    # An id typed in the quarantine list's search opens the message, or its record.
    status, _, resp = await c.get(f"/quarantaine?id={item.queue_id}")
    assert status == 303 and resp.headers["Location"] == f"/quarantaine/{held}"
    status, _, resp = await c.get(f"/quarantaine?id={held.upper()}")
    assert status == 303 and resp.headers["Location"] == f"/quarantaine/{held}"
    status, _, resp = await c.get(f"/quarantaine?id={delivered}")
    assert status == 303 and resp.headers["Location"] == f"/suivi?q={delivered}"
    # The message page names both ids and links to the record.
    _, text, _ = await c.get(f"/quarantaine/{held}")
    assert f"id={item.queue_id}" in text and f'href="/suivi?q={held}"' in text
    # Words: sender's domain, newest first; nothing found says so.
    _, text, _ = await c.get("/suivi?q=labo-analyses")
    assert "2 message(s)" in text
    assert text.index("Compte rendu") < text.index("Facture en attente")
    _, text, _ = await c.get("/suivi?q=introuvable")
    assert "Aucun message ne correspond." in text
    # What was done: held, delivered (a next hop's refusal would be "refusé" with ours).
    _, text, _ = await c.get("/suivi?issue=retenu")
    assert "Facture en attente" in text and "Compte rendu" not in text
    _, text, _ = await c.get("/suivi?issue=remis")
    assert "Compte rendu" in text and "Facture en attente" not in text
    _, text, _ = await c.get("/suivi?issue=refuse")
    assert "0 message(s)" in text
    # Searches are in the audit log (the words sealed there, as every detail).
    entries, _ = await store.audit_log(action="track_search")
    assert [e.detail for e in entries][-1] == delivered.lower()
    # A reader sees held mail only: not every message's sender and subject.
    reader = Client(c.base)
    try:
        await reader.login(READER)
        status, text, _ = await reader.get(f"/suivi?q={delivered}")
        assert status == 403 and "réservée aux administrateurs" in text
        status, _, resp = await reader.get(f"/quarantaine?id={item.queue_id}")
        assert status == 303 and resp.headers["Location"] == f"/quarantaine/{held}"
        status, _, resp = await reader.get(f"/quarantaine?id={delivered}")
        assert status == 303 and resp.headers["Location"].startswith("/quarantaine?info=")
        assert "Suivi des messages" not in (await reader.get("/quarantaine"))[1]
    finally:
        await reader.close()


async def test_dashboard_counts_and_chart(site: Web):
    await quarantine(site.gw, suspicious())
    c = site.client
    await c.login(ADMIN)
    status, text, _ = await c.get("/")
    assert status == 200 and "<svg" in text and "ATTACH_DANGEROUS_TYPE" in text
    assert re.search(r"<b>1</b> en quarantaine", text)
    assert "<script" not in text


async def test_retention_purge_is_in_the_audit_log(site: Web):
    store = site.gw.runtime.store
    assert store is not None
    old = NewItem(queue_id="q", received_at=time.time() - 40 * 86400, direction="inbound",
                  action="quarantine", score=12.0, symbols=(), mail_from="x@y.example",
                  rcpts=(f"docteur@{DOMAIN}",), subject="vieux", from_header="", client_ip="",
                  helo="")
    item = await store.put(old, b"Subject: vieux\r\n\r\nx\r\n")
    assert await purge_expired(site.gw.runtime) == 1
    entries, _ = await store.audit_log()
    assert entries[0].action == "purge" and entries[0].user == "système"
    assert item not in {i.id for i in await store.list_items(state=None)}


def test_cli_admin_add_user_enrols_totp(tmp_path: Path):
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    qr = tmp_path / "qr.svg"
    res = subprocess.run([sys.executable, "-m", "gateway", "admin", "--domain", DOMAIN,
                          "--data-dir", str(data), "add-user", "Claire", "--role", "admin",
                          "--password-stdin", "--qr", str(qr)],
                         input="un-mot-de-passe-solide\n", capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    secret = re.search(r"saisissez cette clé : ([A-Z2-7]+)", res.stdout).group(1)  # type: ignore[union-attr]
    assert "▀" in res.stdout or "█" in res.stdout  # the QR code in the terminal
    assert qr.read_text().startswith("<?xml") and os.stat(qr).st_mode & 0o777 == 0o600
    path = data / "web-users.json"
    assert os.stat(path).st_mode & 0o777 == 0o600
    account = AccountFile(path).verify("claire", "un-mot-de-passe-solide")
    assert account is not None and account.role == "admin" and account.totp_secret == secret


@pytest.mark.parametrize(("spf", "expected"), [
    ("v=spf1 ip4:192.0.2.7 -all", "SENDER_LIST_ALLOWED"),  # the mail comes from the domain
    ("v=spf1 -all", "SENDER_LIST_ALLOWED_UNVERIFIED"),  # anyone can write that From line
])
async def test_allow_list_counts_only_for_authenticated_mail(tmp_path: Path, dns_zone, spf: str,
                                                            expected: str):
    from gateway.message import Inbound
    from gateway.sender_lists import SenderLists
    from gateway.service import build_runtime

    cfg = make_config(tmp_path)
    SenderLists(cfg.data_dir / "sender-lists.json").add("allow", "@labo-analyses.example",
                                                        by="claire")
    dns_zone.load({"labo-analyses.example": [("TXT", spf)]})
    rt = await build_runtime(cfg, with_store=False)
    try:
        raw = suspicious("Résultats").replace(b"facture.js", b"facture.txt")
        analysis = await rt.pipeline.analyse(Inbound(
            queue_id="a", peer_ip="192.0.2.7", helo="mx.labo-analyses.example",
            mail_from="contact@labo-analyses.example", rcpts=(f"docteur@{DOMAIN}",), raw=raw))
        names = {s.name: s.score for s in analysis.verdict.symbols}
        assert expected in names
        assert names[expected] == (-8 if expected == "SENDER_LIST_ALLOWED" else 0)
    finally:
        await rt.close()


@pytest.mark.promise("web-roles")
async def test_admin_manages_accounts_and_a_reader_cannot(site: Web):
    import pyotp

    c = site.client
    await c.login(ADMIN)
    await c.get("/comptes")
    status, text, _ = await c.post("/comptes", {"csrf": c.csrf, "utilisateur": "remplacante",
                                                "mot_de_passe": "un-mot-de-passe-long",
                                                "role": "lecteur"})
    assert status == 200 and "Compte remplacante créé" in text
    assert 'src="data:image/svg+xml' in text
    secret = re.search(r'<code class="secret">([A-Z2-7]+)</code>', text).group(1)  # type: ignore[union-attr]
    newcomer = Client(c.base)
    try:
        await newcomer.get("/connexion")
        status, _, _ = await newcomer.post("/connexion", {
            "jeton": newcomer.form_token, "utilisateur": "remplacante",
            "mot_de_passe": "un-mot-de-passe-long", "code": pyotp.TOTP(secret).now()})
        assert status == 303
        await newcomer.get("/")
        status, _, _ = await newcomer.get("/comptes")
        assert status == 403
        # Removing the account ends its sessions at once.
        status, _, _ = await c.post("/comptes", {"csrf": c.csrf, "utilisateur": "remplacante",
                                                 "supprimer": "1"})
        assert status == 303
        status, _, resp = await newcomer.get("/quarantaine")
        assert status == 303 and resp.headers["Location"] == "/connexion"
    finally:
        await newcomer.close()
    status, text, _ = await c.post("/comptes", {"csrf": c.csrf, "utilisateur": ADMIN.name,
                                                "supprimer": "1"})
    assert status == 400 and "dernier administrateur" in text
    _, text, _ = await c.get("/journal")
    assert "compte créé" in text and "compte supprimé" in text


@pytest.mark.promise("preview-safe")
async def test_social_security_numbers_are_masked_in_the_preview(site: Web):
    from tests.test_outbound import NIR

    spaced = f"{NIR[0]} {NIR[1:3]} {NIR[3:5]} {NIR[5:7]} {NIR[7:10]} {NIR[10:13]} {NIR[13:]}"
    item = await quarantine(site.gw, suspicious(body=f"Assurée : {spaced}\n",
                                                html=f"<p>NIR {NIR}</p>"))
    c = site.client
    await c.login(ADMIN)
    for path in (f"/quarantaine/{item}", f"/quarantaine/{item}/apercu"):
        _, text, _ = await c.get(path)
        assert NIR not in text.replace(" ", "") and "2 95 10 ** *** *** **" in text
    _, text, _ = await c.get(f"/quarantaine/{item}?identifiants=1")
    assert spaced in text
    _, text, _ = await c.get("/journal")
    assert "identifiants affichés" in text


async def test_hostile_paths_and_parameters_are_refused_cleanly(site: Web):
    c = site.client
    await c.login(ADMIN)
    for path in ("/quarantaine/..%2F..%2Fetc%2Fpasswd", "/quarantaine/%00",
                 "/quarantaine/20261128T100000-0123456789ab",
                 "/quarantaine/" + "9" * 5000):
        status, text, _ = await c.get(path)
        assert status == 404 and "introuvable" in text, path
    status, _, _ = await c.get("/quarantaine/..%2F..%2Fetc%2Fpasswd/apercu")
    assert status == 404
    for query in ("page=-3", "page=abc", "du=2026-13-45&au=x", "score_min=NaN%20x",
                  "raison=%25%27%22", "expediteur=" + "é" * 1000):
        status, text, _ = await c.get("/quarantaine?" + query)
        assert status == 200 and "message(s)" in text, query
    status, _, _ = await c.get("/journal?page=999999")
    assert status == 200


async def test_unknown_pages_get_a_french_error_page_with_the_headers(site: Web):
    await site.client.login(ADMIN)
    status, text, resp = await site.client.get("/nexiste-pas")
    assert status == 404 and "Page introuvable" in text
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    status, text, _ = await site.client.post("/journal", {"csrf": site.client.csrf})
    assert status == 405 and "non permise" in text


def test_sessions_end_when_idle_or_too_old(tmp_path: Path):
    from gateway.authstate import AuthState

    now = [1_800_000_000.0]
    state = AuthState.open(tmp_path / "auth.sqlite3", clock=lambda: now[0])
    limits = {"idle_s": 30 * 60, "max_s": 10 * 3600}
    idle = state.new_session("claire", "admin", "stamp", max_s=limits["max_s"])
    assert state.session(idle.sid, **limits) == idle
    now[0] += 31 * 60
    assert state.session(idle.sid, **limits) is None
    assert state.session(idle.sid, **limits) is None  # forgotten
    old = state.new_session("claire", "admin", "stamp", max_s=limits["max_s"])
    for _ in range(25):  # active all along (every 25 min), but past the maximum age at last
        now[0] += 25 * 60
        if state.session(old.sid, **limits) is None:
            break
    assert now[0] - old.created > 10 * 3600
    assert state.session("", **limits) is None and state.session("unknown", **limits) is None
    # The database holds no cookie that works: only digests of the session ids.
    live = state.new_session("claire", "admin", "stamp", max_s=limits["max_s"])
    assert live.sid.encode() not in (tmp_path / "auth.sqlite3").read_bytes()
    state.close()


async def test_login_counts_are_bounded_by_their_window(tmp_path: Path):
    from gateway.authstate import AuthState, Throttle

    now = [1_800_000_000.0]
    state = AuthState.open(tmp_path / "auth.sqlite3", clock=lambda: now[0])
    throttle = Throttle(state=state, scope="web", free_tries=2, address_limit=8,
                        window_s=900, lock_s=900)
    for i in range(3000):  # a flood of made-up names
        await throttle.failed(await throttle.begin(f"x{i}", f"192.0.2.{i % 200}"))
    now[0] += 901  # past the window: the next attempt clears what is older
    attempt = await throttle.begin("claire", "192.0.2.1")
    (rows,) = state._run(lambda db: db.execute("SELECT count(*) FROM login_failures").fetchone())
    assert rows == 2  # the attempt's, for its pair and its address; nothing older
    await throttle.failed(attempt)
    # Growing delays per pair after its free tries.
    await throttle.failed(await throttle.begin("claire", "192.0.2.1"))
    assert (await throttle.begin("claire", "192.0.2.1")).wait == 4.0
    now[0] += 4
    await throttle.failed(await throttle.begin("claire", "192.0.2.1"))
    assert (await throttle.begin("claire", "192.0.2.1")).wait == 8.0
    assert (await throttle.begin("claire", "192.0.2.9")).wait == 0  # another address
    state.close()


async def test_second_factor_reset_after_a_lost_phone(site: Web):
    import pyotp

    reader = Client(site.client.base)
    try:
        assert await reader.login(READER) == 303
        c = site.client
        await c.login(ADMIN)
        await c.get("/comptes")
        status, text, _ = await c.post("/comptes", {"csrf": c.csrf, "utilisateur": READER.name,
                                                    "nouveau_code": "1"})
        assert status == 200 and "les anciens codes ne marchent plus" in text
        secret = re.search(r'<code class="secret">([A-Z2-7]+)</code>', text).group(1)  # type: ignore[union-attr]
        status, _, _ = await reader.get("/quarantaine")
        assert status == 303  # the reader's sessions ended
        assert await reader.login(READER, code=READER.code(1)) == 401  # old secret
        assert await reader.login(READER, code=pyotp.TOTP(secret).now()) == 303
        _, text, _ = await c.get("/journal")
        assert "second facteur renouvelé" in text
    finally:
        await reader.close()


def test_cli_admin_reset_totp(tmp_path: Path):
    import subprocess
    import sys

    data = tmp_path / "data"
    accounts = AccountFile(data / "web-users.json")
    accounts.add("claire", "un-mot-de-passe-solide", role="admin", totp_secret="A" * 32)
    res = subprocess.run([sys.executable, "-m", "gateway", "admin", "--domain", DOMAIN,
                          "--data-dir", str(data), "reset-totp", "claire"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    secret = re.search(r"saisissez cette clé : ([A-Z2-7]+)", res.stdout).group(1)  # type: ignore[union-attr]
    assert AccountFile(data / "web-users.json").load()["claire"].totp_secret == secret != "A" * 32
    res = subprocess.run([sys.executable, "-m", "gateway", "admin", "--domain", DOMAIN,
                          "--data-dir", str(data), "reset-totp", "inconnu"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "Compte inconnu" in res.stderr


async def test_message_page_lists_the_yara_rules_of_each_attachment(site: Web):
    lure = (b"Assurance Maladie : pour votre remboursement, envoyez vos coordonnees "
            b"bancaires.")
    raw = suspicious("Votre document", also=(("courrier.txt", lure),))
    item = await quarantine(site.gw, raw)
    await site.client.login(ADMIN)
    _, text, _ = await site.client.get(f"/quarantaine/{item}")
    rows = {r.split("</td>")[0].split(">")[-1]: r for r in text.split("<tr><td>")[1:]}
    assert "French_Health_Lure_In_Document" in rows["courrier.txt"]
    assert "aucune" in rows["facture.js"]


async def test_an_ipv6_client_cannot_start_afresh_with_a_new_address(tmp_path: Path):
    from gateway.authstate import AuthState, Throttle

    state = AuthState.open(tmp_path / "auth.sqlite3")
    throttle = Throttle.of(state, "web", failures=1, minutes=15)  # 4 per address
    for i in range(4):  # four addresses of one /64, four accounts
        await throttle.failed(await throttle.begin(f"n{i}", f"2001:db8:1:2::{i + 1}"))
    assert (await throttle.begin("claire", "2001:db8:1:2::99")).wait > 800  # locked: its /64
    assert (await throttle.begin("claire", "2001:db8:1:3::1")).wait == 0  # another /64
    state.close()


def test_dashboard_chart_labels_sit_on_their_gridlines_in_whole_messages():
    """Each y-axis label of the dashboard's chart is a whole number of messages, written on
    its own gridline, the top one at or above the busiest day (no "0, 0, 1" for a peak of 1,
    no "2" half-way up for a peak of 3)."""
    from gateway.web import charts
    now = time.mktime((2026, 11, 30, 12, 0, 0, 0, 0, -1))
    for peak in (1, 2, 3, 7, 11, 99, 1234):
        svg = charts.daily_bars([("2026-11-30", "inbound", "accept", "", peak)], now=now)
        lines = [float(y) for y in re.findall(r'<line x1="40" y1="([\d.]+)"', svg)]
        labels = re.findall(r'<text x="34" y="([\d.]+)"[^>]*>(\d+)</text>', svg)
        values = [int(v) for _, v in labels]
        assert values == sorted(set(values)) and values[0] == 0 and values[-1] >= peak, values
        assert 2 <= len(values) <= 6, (peak, values)
        steps = {b - a for a, b in zip(values, values[1:], strict=False)}
        assert len(steps) == 1, values  # evenly spaced
        for (y, _), line in zip(labels, lines, strict=True):
            assert abs(float(y) - 4 - line) < 0.2  # the label's baseline on its gridline
        (bar,) = re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="([\d.]+)"',
                            svg.split("<title>")[0] + "<title>")
        top_line = min(lines)
        assert float(bar[0]) >= top_line - 0.2  # the bar stays under the top gridline


async def test_message_page_gives_each_findings_detail_in_french(site: Web):
    """The page shows a finding's values through the symbol's French template (the English
    detail is for the logs): a program named .pdf, the SPF and DMARC domains."""
    from tests.test_attachments import PE
    raw = suspicious("Votre facture", also=(("facture.pdf", PE),))
    with pytest.raises(aiosmtplib.SMTPDataError):  # refused; its copy kept for review
        await aiosmtplib.send(raw, sender="contact@labo-analyses.example",
                              recipients=[f"docteur@{DOMAIN}"], hostname="127.0.0.1",
                              port=site.gw.port, start_tls=False)
    (kept,) = await site.gw.runtime.store.list_items(state="refused")  # type: ignore[union-attr]
    item = kept.id
    await site.client.login(ADMIN)
    _, page, _ = await site.client.get(f"/quarantaine/{item}")
    # The reasons' table (the message's own headers, shown further down, are its data).
    text = re.sub(r"<[^>]+>", " ", page.split("<h2>Raisons")[1].split("<h2>")[0])
    assert "Fichier : facture.pdf ; nommé .pdf, type réel : application/" in text
    assert "Domaine vérifié : labo-analyses.example (identité MAIL FROM)" in text
    assert "Domaine affiché : labo-analyses.example : aucun enregistrement DMARC." in text
    for english in ("named .pdf", "really", "no record", "mailfrom="):
        assert english not in text, english


def test_french_details_show_values_as_given_and_hide_only_missing_ones(site: Web):
    q = site.gw.runtime.quarantine
    assert q is not None

    def detail(name: str, **args: str) -> str:
        return q.detail(SymbolRecord(name=name, score=1.0, detail="english", args=tuple(
            args.items())))

    # A value that looks like a placeholder, or like a French contraction, is shown as is.
    assert detail("ATTACH_DANGEROUS_TYPE", file="facture{x}.exe",
                  kind="application/x-dosexec") == \
        "Fichier : facture{x}.exe ; type réel : application/x-dosexec."
    assert detail("FAKE_REPLY", subject="RE: Note de le docteur") == \
        "Objet : RE: Note de le docteur."
    # Where a QR code leads is on the page.
    assert detail("ATTACH_QR_LINK", file="scan.png", url="https://x.example/p") == \
        "Fichier : scan.png ; lien : https://x.example/p."
    # An executable in an encrypted archive has no type: its file is still named.
    assert detail("ATTACH_EXEC_IN_ARCHIVE", file="a.zip/b.exe") == "Fichier : a.zip/b.exe."
    assert detail("DMARC_FAIL", domain="labo.example", policy="none") == \
        "Domaine affiché : labo.example ; politique appliquée : p=none."
    # A value missing (an older record): no detail rather than a template.
    assert detail("ATTACH_TYPE_MISMATCH", file="f.pdf") == ""
    assert detail("MIME_MALFORMED") == ""  # no French template: the English is never shown
