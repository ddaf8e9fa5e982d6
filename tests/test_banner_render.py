"""The HTML banner as a person sees it: rendered by Debian's Chromium (driven by Playwright)."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
from pathlib import Path

import pytest

from gateway import banner
from gateway.message import parse_message
from tests.test_banner import MARK, TPL, WARNING, base, crlf

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root, without a display and without this workplace's closed network calling out.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parents[1] / "docs"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian package chromium not installed (make test installs it)")


def test_html_banner_renders_at_the_top_of_the_mail(tmp_path: Path):
    from playwright.sync_api import sync_playwright

    m = base("Remboursement en attente")
    m.set_content(
        '<html><body style="margin:16px;font-family:Georgia,serif">'
        "<h2>Assurance Maladie</h2><p>Votre remboursement de 248,90 &euro; est en attente. "
        'Mettez &agrave; jour vos coordonn&eacute;es bancaires : <a href="http://ameli-rembourse'
        '.example/">Mon espace</a></p></body></html>\n', subtype="html")
    data = crlf(m)
    out = banner.apply(data, parse_message(data), WARNING, TPL, MARK).raw
    part = email.message_from_bytes(out, policy=email.policy.default)
    page_html = part.get_content()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.set_content(page_html)
            box = page.locator("[data-gateway-banner]")
            assert box.is_visible()
            geometry = box.bounding_box()
            assert geometry is not None and geometry["y"] < 40 and geometry["height"] > 80
            title = page.get_by_text("Attention : ce message semble suspect")
            assert title.is_visible()
            reason = page.get_by_text("n'a pas été envoyé par ses serveurs", exact=False)
            assert reason.is_visible()
            # The banner comes before the mail's own content.
            content = page.get_by_text("Votre remboursement", exact=False).bounding_box()
            assert content is not None and content["y"] > geometry["y"] + geometry["height"]
            shot = tmp_path / "banner.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("GATEWAY_UPDATE_DOCS"):
                DOCS.mkdir(exist_ok=True)
                shutil.copy(shot, DOCS / "banner.png")
        finally:
            browser.close()
