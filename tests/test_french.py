"""Everything a person reads is French: Chromium walks every page of the web interface (an
admin's, a reader's, the pages opened from a digest or a notice, the error pages) and the CLI
is run down its error paths; each text is searched for common English words.

What a page shows of the held mail itself (its headers, its preview, technical ids) is the
mail's own data and is left out: `<details>`, `<code>`, `.code`, `<pre>` and the preview
frame. In the CLI's messages, the commands, keys, values and paths they name are left out.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import aiosmtplib
import pytest

from gateway import cli
from gateway.service import running
from tests.conftest import DOMAIN
from tests.support.sink import Sink
from tests.support.webclient import ADMIN, READER, suspicious
from tests.test_attachments import PE
from tests.test_banner_render import CHROMIUM
from tests.test_digest import DOCTOR, bulk, digests, hold, site_on_a_known_port, take
from tests.test_web_browser import browser, login  # noqa: F401 - the fixture

# Words that are not French (nor a French spelling, nor a protocol term the pages keep, such
# as HELO or MAIL FROM), as whole words, any case.
ENGLISH = ("the", "and", "of", "with", "from", "for", "this", "that", "please", "error",
           "invalid", "failed", "named", "really", "shows", "goes", "click", "here", "sender",
           "recipient", "subject", "quarantine", "release", "released", "delete", "deleted",
           "login", "password", "user", "none", "unknown", "found", "expired", "request",
           "submit", "cancel", "back", "next", "yes", "record", "records", "policy",
           "header", "headers", "body", "attachment", "file", "size", "required", "choose",
           "choice", "expected", "unrecognized", "show", "help", "exit", "not", "no", "is",
           "are", "was", "to", "in", "on", "by")
_WORDS = re.compile(r"\b(" + "|".join(ENGLISH) + r")\b", re.IGNORECASE)

# The page's own text, without the held mail's data (see the module's docstring).
_VISIBLE = """() => {
  const main = document.body.cloneNode(true);
  main.querySelectorAll('details, code, .code, pre, iframe, input, select, textarea')
      .forEach(e => e.remove());
  return main.innerText;
}"""


def english_words(text: str) -> list[str]:
    text = text.replace("MAIL FROM", "")  # the SMTP command, as the SPF detail names it
    return sorted({m.group(0) for m in _WORDS.finditer(text)})


pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian package chromium not installed (make test installs it)")


async def test_every_page_is_french(tmp_path: Path, sink: Sink, browser):  # noqa: F811
    cfg, base = site_on_a_known_port(tmp_path / "data", sink, reject=20.0)
    async with running(cfg) as gw:
        store = gw.runtime.store
        assert store is not None and gw.runtime.digests is not None
        danger = await hold(gw, suspicious("Résultats d'analyses"), [DOCTOR],
                            sender="contact@labo-analyses.example")
        offer = await hold(gw, bulk("Promotion tensiomètres"), [DOCTOR])
        with pytest.raises(aiosmtplib.SMTPDataError):  # refused, its copy kept
            await aiosmtplib.send(suspicious("Votre facture", also=(("facture.pdf", PE),)),
                                  sender="contact@labo-analyses.example",
                                  recipients=[DOCTOR], hostname="127.0.0.1", port=gw.port,
                                  start_tls=False)
        (refused,) = await store.list_items(state="refused")
        await gw.runtime.pipeline.flush_tracking()
        await gw.runtime.digests.send_now()
        mail = digests(take(sink))[DOCTOR][1]
        item_links = [x for x in re.findall(re.escape(base) + r"(/rapport/[\w./-]+)",
                                            mail.get_body(("plain",)).get_content())
                      if "/desabonnement/" not in x]
        assert len(item_links) == 2
        optout = mail["List-Unsubscribe"].strip("<>")
        queue_id = (await store.item(danger)).queue_id

        seen: list[tuple[str, list[str]]] = []
        context = await browser.new_context(locale="fr-FR")
        page = await context.new_page()

        async def read(url: str) -> None:
            await page.goto(url)
            seen.append((url, english_words(await page.evaluate(_VISIBLE))))

        # Without an account: the login page, its refusal, the digest's and the notice's
        # link pages, an unknown page.
        await read(f"{base}/connexion")
        await login(page, base, ADMIN, code="000000")
        seen.append(("login refused", english_words(await page.evaluate(_VISIBLE))))
        for link in item_links:
            await read(base + link)
        await page.get_by_role("button").first.click()  # a request, or a release
        seen.append(("digest link used", english_words(await page.evaluate(_VISIBLE))))
        await read(optout)
        await read(f"{base}/rapport/20261128T100000-0123456789ab.0.d.1.{'0' * 32}")
        await read(f"{base}/liberation/20261128T100000-0123456789ab/{'0' * 32}")
        await read(f"{base}/nulle-part")

        # An admin: every page, each kind of item, the confirmation, a form refused.
        await login(page, base, ADMIN)
        for path in ("/", "/quarantaine", "/quarantaine?etat=", "/quarantaine?demandes=1",
                     f"/quarantaine/{danger}", f"/quarantaine/{offer}",
                     f"/quarantaine/{refused.id}", f"/quarantaine/{danger}/telecharger",
                     "/suivi", f"/suivi?q={queue_id}", "/suivi?q=facture", "/listes",
                     "/journal", "/comptes", "/quarantaine/20261128T100000-0123456789ab",
                     "/quarantaine?id=INCONNU"):
            await read(base + path)
        await page.goto(f"{base}/quarantaine/{refused.id}")
        await page.get_by_role("button", name=re.compile("Libérer malgré")).click()
        seen.append(("confirmation", english_words(await page.evaluate(_VISIBLE))))
        resp = await page.request.post(f"{base}/quarantaine/{danger}/liberer", form={})
        await page.set_content(await resp.text())
        seen.append(("csrf refused", english_words(await page.evaluate(_VISIBLE))))
        await context.close()

        # A reader: what an admin-only page says to her.
        context = await browser.new_context(locale="fr-FR")
        page = await context.new_page()
        await login(page, base, READER)
        await read(f"{base}/suivi")
        await read(f"{base}/comptes")
        await context.close()
    assert len(seen) == 29, [url for url, _ in seen]
    bad = [(url, words) for url, words in seen if words]
    assert bad == [], "\n".join(map(str, bad))


@pytest.mark.parametrize("argv", [
    [], ["inconnue"], ["quarantine"], ["quarantine", "list", "--state", "mauvais"],
    ["quarantine", "list", "--limit", "beaucoup"], ["track", "--depuis"],
    ["scan"], ["serve", "--nope"], ["admin", "add-user"], ["digest", "--envoyer", "en-trop"],
])
def test_cli_usage_errors_are_french(argv: list[str], capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("utilisation : gateway") and " : erreur : " in err
    # The error line, without the command's own words (its name, quoted values).
    message = err.split(" : erreur : ", 1)[1]
    assert english_words(re.sub(r"'[^']*'", "", message)) == [], err


def test_cli_help_is_french(capsys):
    for argv in (["--help"], ["quarantine", "--help"], ["quarantine", "list", "--help"],
                 ["scan", "--help"], ["digest", "--help"], ["track", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        # Option names and their English values (inbound, quarantined...) are the CLI's
        # words; everything around them is French.
        text = re.sub(r"(--?[\w-]+|^ {4}[\w-]+|\b(inbound|outbound|quarantined|refused|releasing|"
                      r"released|deleted|accept|tag|quarantine|reject|tempfail|yes|no)\b)",
                      "", out, flags=re.MULTILINE)
        assert english_words(text) == [], (argv, out)


def test_cli_run_errors_are_french(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("un-mot-de-passe-quelconque\n"))
    data = tmp_path / "data"
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(f'[gateway]\ndomains = ["{DOMAIN}"]\ndata_dir = "{data}"\n'
                           '[web]\nlisten = ""\n')
    c = ["--config", str(config_file)]
    for argv in (["quarantine", *c, "show", "pas-un-identifiant"],
                 ["quarantine", *c, "release", "20261128T100000-0123456789ab"],
                 ["quarantine", *c, "delete", "20261128T100000-0123456789ab"],
                 ["track", *c, "--depuis", "hier"],
                 ["track", *c, "aucun-message-de-ce-nom"],
                 ["admin", *c, "passwd", "--password-stdin", "personne"],
                 ["admin", *c, "remove-user", "personne"]):
        status = cli.main(argv)
        captured = capsys.readouterr()
        assert status != 0, argv
        text = captured.err + captured.out
        assert text.strip(), argv
        # Less the commands it names ("gateway quarantine list") and the paths.
        plain = re.sub(r"gateway( [a-z-]+)+|/\S+", "", text)
        assert english_words(plain) == [], (argv, text)
    # Configuration errors: the file missing, not TOML, keys and values refused.
    bad = tmp_path / "mauvais.toml"  # types and keys refused
    bad.write_text('[gateway]\ndomains = ["cabinet.fr"]\n[smtp]\nmax_recipients = "beaucoup"\n'
                   'port = 25\n[next_hop]\nstarttls = "peut-etre"\n')
    wrong = tmp_path / "incoherent.toml"  # values refused together
    wrong.write_text('[gateway]\ndomains = ["pas_un_domaine"]\nworkers = -1\ntimezone = "Lune"\n'
                     '[smtp]\nlisten = "partout"\ntls_cert = "/absent.pem"\n'
                     '[scoring]\ntag = 9\nquarantine = 5\n[web]\nlisten = "0.0.0.0:8080"\n'
                     '[digest]\nhour = 25\ndirect_release_groups = ["attachments"]\n')
    broken = tmp_path / "casse.toml"
    broken.write_text("[gateway\n")
    for argv in (["quarantine", "--config", str(tmp_path / "absent.toml"), "list"],
                 ["check-config", str(broken)], ["check-config", str(wrong)],
                 ["check-config", str(bad)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Configuration invalide :"), err
        # Less the keys, values and paths it names (and the TOML parser's own message).
        plain = re.sub(r"[\w-]+(\.[\w-]+)+|'[^']*'|/\S+|TOML invalide : .*", "", err)
        assert english_words(plain) == [], err
    text = err
    for key in ("smtp.max_recipients", "smtp.port", "next_hop.starttls"):
        assert key in text, text
