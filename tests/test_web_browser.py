"""The quarantine web page in a real browser: Debian's Chromium driven by Playwright.

Log in with password and TOTP, lockout, list/filter/open, a hostile HTML mail previewed without
running or loading anything, release to the next hop, a reader who cannot release, CSRF.
Set GATEWAY_UPDATE_DOCS=1 to refresh the screenshots in docs/.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.accounts import AccountFile
from gateway.service import running
from tests.conftest import DOMAIN, make_config
from tests.support.sink import Sink
from tests.support.webclient import ADMIN, READER, User, add_users, quarantine, suspicious
from tests.test_banner_render import CHROMIUM, DOCS, FLAGS

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian package chromium not installed (make test installs it)")


@pytest.fixture
async def tracker() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback HTTP server standing for the phisher's: it records every request."""
    hits: list[str] = []

    async def any_path(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"GIF89a", content_type="image/gif")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", hits
    await runner.cleanup()


@pytest.fixture
async def browser():
    from playwright.async_api import async_playwright
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            await b.close()


async def login(page, base: str, user: User, code: str | None = None) -> None:
    await page.goto(base + "/")
    assert page.url.endswith("/connexion")
    await page.get_by_label("Identifiant").fill(user.name)
    await page.get_by_label("Mot de passe").fill(user.password)
    await page.get_by_label("Code à 6 chiffres", exact=False).fill(code or user.code())
    await page.get_by_role("button", name="Se connecter").click()


@pytest.mark.promise("preview-safe")
async def test_admin_reviews_previews_safely_and_releases(tmp_path: Path, sink: Sink, browser,
                                                          tracker):
    remote, hits = tracker
    cfg = web_config(tmp_path / "data", sink)
    hostile = (
        f'<html><head><link rel="stylesheet" href="{remote}/style.css"></head><body>'
        f'<p>Bonjour, votre facture est disponible.</p>'
        f'<script>alert("script")</script>'
        f'<img src="{remote}/pixel.png" onerror="alert(\'onerror\')">'
        f'<div style="background:url({remote}/bg.png)">fond</div>'
        f'<a href="{remote}/login">Se connecter à Ameli</a>'
        f'<iframe src="{remote}/frame"></iframe>'
        f'<form action="{remote}/steal"><input name="password"></form></body></html>')
    async with running(cfg) as gw:
        base = f"http://127.0.0.1:{gw.web_port}"
        item = await quarantine(gw, suspicious("Votre facture Ameli", html=hostile))
        await quarantine(gw, suspicious("Autre message", n=2))
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        dialogs: list[str] = []
        requests: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        context.on("request", lambda r: requests.append(r.url))

        # Wrong TOTP refused, then the right one.
        await login(page, base, ADMIN, code="000000")
        assert await page.get_by_role("alert").inner_text() == \
            "Identifiant, mot de passe ou code à usage unique incorrect."
        await login(page, base, ADMIN)
        await page.get_by_role("heading", name="Tableau de bord", exact=False).wait_for()

        # List, filter, open.
        await page.get_by_role("link", name="Quarantaine").click()
        assert await page.locator("table.items tbody tr").count() == 2
        await page.get_by_label("Objet", exact=True).fill("facture ameli")
        await page.get_by_role("button", name="Filtrer").click()
        rows = page.locator("table.items tbody tr")
        assert await rows.count() == 1
        assert "programme ou un fichier qui s'exécute" in await rows.first.inner_text()
        if os.environ.get("GATEWAY_UPDATE_DOCS"):
            await page.get_by_label("Objet", exact=True).fill("")
            await page.get_by_role("button", name="Filtrer").click()
            await page.screenshot(path=str(DOCS / "quarantine-list.png"), full_page=True)
            await page.get_by_label("Objet", exact=True).fill("facture ameli")
            await page.get_by_role("button", name="Filtrer").click()
        await page.get_by_role("link", name="Votre facture Ameli").click()
        await page.get_by_role("heading", name="Aperçu sécurisé").wait_for()

        # The sanitised HTML preview: nothing ran, nothing was fetched.
        frame_el = page.locator("iframe.preview")
        await frame_el.wait_for()
        frame = page.frame_locator("iframe.preview")
        await frame.get_by_text("votre facture est disponible").wait_for()
        assert await frame.locator("script, img, iframe, form, link").count() == 0
        assert await frame.get_by_text("Se connecter à Ameli").get_attribute("href") is None
        assert await frame_el.get_attribute("sandbox") == ""
        await page.wait_for_timeout(500)
        assert dialogs == []
        assert hits == []
        assert all(u.startswith(base) for u in requests), [u for u in requests
                                                           if not u.startswith(base)]
        assert "facture.js" in await page.locator("table").nth(2).inner_text()
        if os.environ.get("GATEWAY_UPDATE_DOCS"):
            # A full-page capture leaves the sandboxed (out-of-process) frame blank: a tall
            # viewport instead.
            await page.set_viewport_size({"width": 1280, "height": 2100})
            await frame.get_by_text("votre facture est disponible").wait_for()
            await page.wait_for_timeout(300)
            await page.screenshot(path=str(DOCS / "quarantine-message.png"))
            await page.set_viewport_size({"width": 1280, "height": 900})

        # Release: the original message reaches the next hop.
        # Held for a program attached: deleting is the first button, releasing asks first.
        buttons = page.locator(".actions button")
        assert await buttons.first.inner_text() == "Supprimer"
        await page.get_by_role("button", name="Libérer malgré le danger…").click()
        await page.get_by_role("heading", name="Libérer un message dangereux ?").wait_for()
        assert "facture.js" in await page.locator("main").inner_text()
        assert sink.empty()
        await page.get_by_role("button", name="Je confirme : libérer ce message").click()
        await page.get_by_text("Message libéré et remis au destinataire").wait_for()
        got = await sink.get()
        _, stored = await gw.runtime.store.get(item)  # type: ignore[union-attr]
        attachment = stored[stored.index(b'filename="facture.js"'):].split(b"\r\n\r\n", 1)[1]
        assert attachment.split(b"\r\n--")[0] in got.data  # the attachment, byte for byte
        assert got.rcpts == [f"docteur@{DOMAIN}"] and b"Votre facture Ameli" in got.data
        assert (await gw.runtime.store.item(item)).state == "released"  # type: ignore[union-attr]
        assert hits == [] and dialogs == []

        # The dashboard counts what went through, with its chart drawn server-side.
        await page.get_by_role("link", name="Tableau de bord").click()
        chart = page.locator("svg.chart")
        await chart.wait_for()
        assert await chart.locator("rect[fill='#fb8c00']").count() >= 1  # quarantined today
        assert await page.locator(".card.quarantine b").inner_text() == "2"
        if os.environ.get("GATEWAY_UPDATE_DOCS"):
            await page.screenshot(path=str(DOCS / "dashboard.png"), full_page=True)
        await context.close()


def web_config(data: Path, sink: Sink):
    cfg = make_config(data, next_hop={"address": sink.address, "starttls": "off"},
                      web={"listen": "127.0.0.1:0"})
    add_users(AccountFile(cfg.web_users_file))
    return cfg


@pytest.mark.promise("web-csrf-origin")
async def test_reader_cannot_release_and_csrf_is_required(tmp_path: Path, sink: Sink, browser):
    async with running(web_config(tmp_path / "data", sink)) as gw:
        base = f"http://127.0.0.1:{gw.web_port}"
        item = await quarantine(gw, suspicious())
        # Throttling: five wrong codes, then even the right one must wait a while.
        context = await browser.new_context()
        page = await context.new_page()
        for _ in range(5):
            await login(page, base, READER, code="000000")
        await login(page, base, READER)
        assert "réessayez dans" in await page.get_by_role("alert").inner_text()
        await context.close()

        context = await browser.new_context()
        page = await context.new_page()
        await login(page, base, ADMIN)
        await page.goto(f"{base}/quarantaine/{item}")
        # A POST without the CSRF token (as a forged form would send) is refused.
        resp = await page.request.post(f"{base}/quarantaine/{item}/liberer", form={})
        assert resp.status == 403 and "jeton de sécurité" in await resp.text()
        await context.close()

    # A reader, on a fresh gateway (the lockout above still holds for this account).
    async with running(web_config(tmp_path / "data2", sink)) as gw:
        base = f"http://127.0.0.1:{gw.web_port}"
        item = await quarantine(gw, suspicious())
        context = await browser.new_context()
        page = await context.new_page()
        await login(page, base, READER)
        await page.goto(f"{base}/quarantaine/{item}")
        await page.get_by_role("heading", name="Aperçu sécurisé").wait_for()
        assert await page.get_by_role("button", name="Libérer", exact=True).count() == 0
        csrf = await page.locator('input[name="csrf"]').first.get_attribute("value")
        resp = await page.request.post(f"{base}/quarantaine/{item}/liberer",
                                       form={"csrf": csrf or ""})
        assert resp.status == 403 and "réservée aux administrateurs" in await resp.text()
        assert (await gw.runtime.store.item(item)).state == "quarantined"  # type: ignore[union-attr]
        assert sink.empty()
        await context.close()


async def test_tracking_search_by_each_kind_of_id(tmp_path: Path, sink: Sink, browser):
    """The admin types the id a sender read in a reply, then the quarantine id, in the
    "Suivi des messages" page, and goes from the record to the held message."""
    async with running(web_config(tmp_path / "data", sink)) as gw:
        base = f"http://127.0.0.1:{gw.web_port}"
        held = await quarantine(gw, suspicious("Facture en attente"))
        await gw.runtime.pipeline.flush_tracking()
        store = gw.runtime.store
        assert store is not None
        queue_id = (await store.item(held)).queue_id
        context = await browser.new_context(viewport={"width": 1280, "height": 900},
                                            locale="fr-FR")
        page = await context.new_page()
        await login(page, base, ADMIN)
        await page.get_by_role("link", name="Suivi des messages").click()
        for ident in (queue_id.lower(), held):
            await page.get_by_label("Rechercher").fill(ident)
            await page.get_by_role("button", name="Rechercher").click()
            await page.wait_for_url(f"**/suivi?q={ident}*")
            row = page.locator(f'tr[id="{queue_id}"]')
            await row.wait_for()
            assert "mis en quarantaine" in await row.inner_text()
            assert "1 message(s)." in await page.locator("main").inner_text()
        await row.get_by_role("link", name="voir le message retenu").click()
        await page.wait_for_url(f"{base}/quarantaine/{held}")
        await page.get_by_role("heading", name="Facture en attente").wait_for()
        if os.environ.get("GATEWAY_UPDATE_DOCS"):
            await page.goto(f"{base}/suivi?q={queue_id}")
            await page.screenshot(path=str(DOCS / "web-tracking.png"), full_page=True)
        await context.close()


async def test_digest_mail_and_its_link_pages_in_chromium(tmp_path: Path, sink: Sink, browser):
    """A recipient reads her digest in a browser (the HTML part, as a webmail shows it),
    follows the links: one asks the admin, the other releases a low-risk message."""
    from tests.test_digest import DOCTOR, bulk, digests, hold, site_on_a_known_port, take

    cfg, _ = site_on_a_known_port(tmp_path / "data", sink)
    async with running(cfg) as gw:
        danger = await hold(gw, suspicious("Résultats d'analyses : facture impayée"), [DOCTOR],
                            sender="contact@labo-analyses.example")
        await hold(gw, bulk("Promotion : tensiomètres -30 %"), [DOCTOR])
        assert gw.runtime.digests is not None
        await gw.runtime.digests.send_now()
        mail = digests(take(sink))[DOCTOR][1]
        html = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
        context = await browser.new_context(viewport={"width": 900, "height": 700},
                                            locale="fr-FR", java_script_enabled=False)
        page = await context.new_page()
        await page.set_content(html)
        text = await page.locator("body").inner_text()
        assert "Rapport de quarantaine du" in text and "facture impayée" in text
        assert "Promotion : tensiomètres -30 %" in text
        if os.environ.get("GATEWAY_UPDATE_DOCS"):
            await page.screenshot(path=str(DOCS / "digest-mail.png"), full_page=True)
        # The dangerous file: a request only.
        row = page.locator("tr", has_text="facture impayée")
        assert await row.get_by_role("link", name="Libérer", exact=True).count() == 0
        await row.get_by_role("link", name="Demander la libération").click()
        await page.get_by_role("heading", name=f"Message retenu pour {DOCTOR}").wait_for()
        await page.get_by_role("button", name="Demander la libération à l'administrateur").click()
        await page.get_by_role("status").wait_for()
        assert "transmise" in await page.get_by_role("status").inner_text()
        store = gw.runtime.store
        assert store is not None and (await store.item(danger)).state == "quarantined"
        # The offer: released at once, into the mailbox (the sink).
        await page.set_content(html)
        await page.locator("tr", has_text="tensiomètres").get_by_role(
            "link", name="Libérer", exact=True).click()
        await page.get_by_role("button", name="Libérer ce message").wait_for()
        if os.environ.get("GATEWAY_UPDATE_DOCS"):
            await page.screenshot(path=str(DOCS / "digest-link.png"), full_page=True)
        await page.get_by_role("button", name="Libérer ce message").click()
        await page.get_by_role("status").wait_for()
        assert "libéré" in await page.get_by_role("status").inner_text()
        released = await sink.get()
        assert released.rcpts == [DOCTOR] and b"tensiom" in released.data
        await context.close()
