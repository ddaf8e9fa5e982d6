"""Test helpers for the quarantine web page: accounts with known TOTP secrets, a gateway with
the page on loopback, mail put in quarantine through the real SMTP port, and an HTTP client
that logs in as a person does."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.message import EmailMessage

import aiohttp
import aiosmtplib
import pyotp

from gateway.accounts import AccountFile
from gateway.service import Running
from tests.conftest import DOMAIN


@dataclass(frozen=True)
class User:
    name: str
    password: str
    secret: str
    role: str

    def code(self, steps: int = 0) -> str:
        totp = pyotp.TOTP(self.secret)
        return totp.at(time.time() + steps * totp.interval)


ADMIN = User("claire", "mot-de-passe-claire-2026", pyotp.random_base32(), "admin")
READER = User("secretariat", "mot-de-passe-secretariat", pyotp.random_base32(), "lecteur")


def add_users(accounts: AccountFile) -> None:
    for u in (ADMIN, READER):
        accounts.add(u.name, u.password, role=u.role, totp_secret=u.secret)


def suspicious(subject: str = "Facture en attente", *, sender: str = "contact@labo-analyses.example",
               display: str = "Laboratoire", html: str | None = None, n: int = 0,
               body: str = "Bonjour,\nVeuillez trouver la facture jointe.\n",
               also: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    """A mail the gateway quarantines: a script file attached (ATTACH_DANGEROUS_TYPE)."""
    m = EmailMessage()
    m["From"] = f"{display} <{sender}>"
    m["To"] = f"docteur@{DOMAIN}"
    m["Subject"] = subject
    m["Date"] = "Sat, 28 Nov 2026 10:00:00 +0100"
    m["Message-ID"] = f"<web-{n}-{abs(hash(subject))}@labo-analyses.example>"
    m.set_content(body)
    if html is not None:
        m.add_alternative(html, subtype="html")
    for name, data in also:  # more attachments, before the script
        m.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    m.add_attachment(b"WScript.Echo('facture')\r\n", maintype="application",
                     subtype="octet-stream", filename="facture.js")
    return bytes(m).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def quarantine(gw: Running, raw: bytes, sender: str = "contact@labo-analyses.example") -> str:
    """Send through the gateway's SMTP port; the id of the quarantine item it made."""
    store = gw.runtime.store
    assert store is not None
    before = {i.id for i in await store.list_items(limit=1000)}
    _, reply = await aiosmtplib.send(raw, sender=sender, recipients=[f"docteur@{DOMAIN}"],
                                     hostname="127.0.0.1", port=gw.port, start_tls=False)
    assert "quarantaine" in reply, reply
    new = [i.id for i in await store.list_items(limit=1000) if i.id not in before]
    assert len(new) == 1
    return new[0]


CSRF = re.compile(r'name="csrf" value="([^"]+)"')
FORM_TOKEN = re.compile(r'name="jeton" value="([^"]+)"')


class Client:
    """An HTTP client on the web page, cookies kept (loopback IP hosts allowed)."""

    def __init__(self, base: str, *, source: str = "127.0.0.1") -> None:
        """`source`: the loopback address the client connects from (another client)."""
        self.base = base
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(local_addr=(source, 0)))
        self.csrf = ""
        self.form_token = ""

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str, **kw: object) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.base + path, allow_redirects=False, **kw) as r:  # type: ignore[arg-type]
            text = await r.text()
            if m := CSRF.search(text):
                self.csrf = m.group(1)
            if m := FORM_TOKEN.search(text):
                self.form_token = m.group(1)
            return r.status, text, r

    async def post(self, path: str, data: dict[str, str] | list[tuple[str, str]],
                   **kw: object) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.post(self.base + path, data=data, allow_redirects=False,
                                  **kw) as r:  # type: ignore[arg-type]
            return r.status, await r.text(), r

    async def login(self, user: User, *, code: str | None = None) -> int:
        """As a person does: open the login page (its form token), then post the form."""
        await self.get("/connexion")
        status, _, _ = await self.post("/connexion", {
            "jeton": self.form_token, "utilisateur": user.name, "mot_de_passe": user.password,
            "code": code if code is not None else user.code()})
        if status == 303:
            await self.get("/")
        return status
