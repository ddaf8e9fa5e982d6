"""The quarantine web page (aiohttp, server-rendered jinja2 pages, no JavaScript at all).

Served by `gateway serve` in one serving process, on the gateway's event loop, with the same
quarantine store and next hops (service.py). Pages are French. See security.py for login,
sessions, CSRF and headers, preview.py for the safe preview.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import math
import re
import secrets
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import digest
from gateway.accounts import AccountFile
from gateway.authstate import AuthState, Session, Throttle
from gateway.chains import held_for_exposure_only
from gateway.config import Config
from gateway.errors import DownstreamRejected, Refused, TemporaryError
from gateway.message import header_addresses
from gateway.monitoring import listening_port
from gateway.netaddr import client_key
from gateway.notice import release_token
from gateway.quarantine_service import QuarantineService
from gateway.sender_lists import SenderLists
from gateway.web import charts, preview
from gateway.web.security import (
    CSP,
    HEADERS,
    PREVIEW_CSP,
    Sessions,
    TotpGuard,
    enrolment_qr,
    new_totp_secret,
    same_token,
)
from gateway.workers import Workers
from quarantine.store import (
    OUTCOME_GROUPS,
    OUTCOMES_FR,
    QUEUE_ID_RE,
    RELEASABLE,
    STATES_FR,
    Filters,
    Item,
    NotFound,
    NotQuarantined,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 25
AUDIT_FR = {
    "login": "connexion", "login_failed": "connexion refusée", "lockout": "compte verrouillé",
    "logout": "déconnexion", "view": "consultation", "view_identifiers": "identifiants affichés",
    "release": "libération", "release_failed": "libération échouée", "delete": "suppression",
    "download": "téléchargement", "allow": "expéditeur autorisé", "block": "expéditeur bloqué",
    "list_remove": "retrait de liste", "purge": "purge (rétention)",
    "track_search": "recherche dans le suivi",
    "sender_release": "libération par l'expéditeur", "user_add": "compte créé",
    "user_remove": "compte supprimé", "totp_reset": "second facteur renouvelé",
    "release_request": "demande de libération (rapport)", "digest_view": "lien du rapport ouvert",
    "digest_optout": "rapport de quarantaine désactivé",
    "digest_optout_view": "lien de désinscription du rapport ouvert",
    "digest_optin": "rapport de quarantaine réactivé",
    "verdict_spam": "jugé spam", "verdict_ham": "jugé légitime (pas un spam)",
    "learn_spam": "appris comme spam par le filtre antispam",
    "learn_ham": "appris comme légitime par le filtre antispam",
    "learn_failed": "filtre antispam non informé (erreur)",
}
ITEM_ACTIONS = ("liberer", "liberer-pas-spam", "liberer-autoriser", "bloquer", "supprimer",
                "supprimer-spam")
# The actions that say what the message is: spam (True) or not (False).
LEARNT_AS = {"liberer-pas-spam": False, "liberer-autoriser": False, "bloquer": True,
             "supprimer-spam": True}
# Pages opened from a link in a mail, without an account: rate-limited per client address.
LINK_PATHS = ("/rapport/", "/liberation/")
LINK_REQUESTS = 60  # per client address (IPv6: its /64) and LINK_WINDOW_S
LINK_WINDOW_S = 300.0

ERRORS_FR = {404: "Page introuvable.", 405: "Action non permise sur cette page.",
             413: "Demande trop volumineuse."}

SESSION = web.RequestKey("session", Session)
FORM_COOKIE = "formulaire"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebApp:
    """The page sees held mail through the quarantine service only (reads from its store,
    changes through it), logins through the shared AuthState, and runs its previews in the
    worker threads."""

    def __init__(self, cfg: Config, quarantine: QuarantineService, auth: AuthState,
                 workers: Workers, secret: bytes) -> None:
        self.cfg = cfg
        self.quarantine = quarantine
        self.store = quarantine.store
        self.table = quarantine.table.symbols
        self.workers = workers
        self.secret = secret
        self.accounts = AccountFile(cfg.web_users_file)
        self.lists = SenderLists(cfg.data_dir / "sender-lists.json")
        self.sessions = Sessions(cfg.web, auth)
        self.throttle = Throttle.of(auth, "web", failures=cfg.web.max_login_failures,
                                    minutes=cfg.web.lockout_minutes)
        self.totp = TotpGuard(auth)
        self.link_limit = RateLimit(LINK_REQUESTS, LINK_WINDOW_S)
        self.secure = bool(cfg.web.tls_cert) or cfg.web.public_url.startswith("https://")
        self.cookie = "__Host-session" if self.secure else "session"
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined)
        self.env.filters["when"] = cfg.when
        self.env.filters["size"] = _size
        self.env.filters["actor"] = actor_fr
        self.env.globals.update(states_fr=STATES_FR, audit_fr=AUDIT_FR, outcomes_fr=OUTCOMES_FR)

    # ---- plumbing ---------------------------------------------------------------------

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self.headers_mw, self.auth_mw],
                              client_max_size=1024 * 1024)
        r = app.router
        r.add_get("/connexion", self.login_page)
        r.add_post("/connexion", self.login)
        r.add_post("/deconnexion", self.logout)
        r.add_get("/", self.dashboard)
        r.add_get("/quarantaine", self.list_page)
        r.add_post("/quarantaine/actions", self.bulk)
        r.add_get("/quarantaine/{id}", self.message_page)
        r.add_get("/quarantaine/{id}/apercu", self.preview_frame)
        r.add_get("/quarantaine/{id}/telecharger", self.download)
        r.add_post("/quarantaine/{id}/{action}", self.item_action)
        r.add_get("/suivi", self.tracking_page)
        r.add_get("/listes", self.lists_page)
        r.add_post("/listes", self.lists_change)
        r.add_get("/journal", self.audit_page)
        r.add_get("/comptes", self.accounts_page)
        r.add_post("/comptes", self.accounts_change)
        r.add_get("/rapport/desabonnement/{token}", self.digest_optout_page)
        r.add_post("/rapport/desabonnement/{token}", self.digest_optout)
        r.add_get("/rapport/{token}", self.digest_link_page)
        r.add_post("/rapport/{token}", self.digest_link)
        r.add_get("/liberation/{id}/{token}", self.sender_release_page)
        r.add_post("/liberation/{id}/{token}", self.sender_release)
        r.add_static("/static", HERE / "static", append_version=False)
        return app

    @web.middleware
    async def headers_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            resp = exc
            if exc.status >= 400:  # aiohttp's own pages are English: ours instead
                resp = self.refuse(request, exc.status, ERRORS_FR.get(
                    exc.status, "La demande n'a pas pu être traitée."))
        except Exception:  # noqa: BLE001 - a bug must not show a traceback, nor stop the page
            log.exception("web page error", extra={"fields": {"path": request.path}})
            resp = self.refuse(request, 500, "Erreur interne : rien n'a été modifié. Réessayez ; "
                                             "si l'erreur revient, consultez les journaux.")
        resp.headers.setdefault("Content-Security-Policy", CSP)
        for k, v in HEADERS.items():
            resp.headers.setdefault(k, v)
        if self.secure:
            resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        if isinstance(resp, web.HTTPException):
            raise resp
        return await self._written(request, resp)

    async def _written(self, request: web.Request,
                       resp: web.StreamResponse) -> web.StreamResponse:
        """Send the answer here, within a deadline: a client that never reads its answers
        (pipelined requests) would otherwise hold its connection for ever, waiting for the
        socket to drain."""
        try:
            async with asyncio.timeout(self.cfg.web.body_timeout_s):
                await resp.prepare(request)
                await resp.write_eof()
        except TimeoutError:
            log.warning("web client not reading its answers; connection closed",
                        extra={"fields": {"client": self.client(request)}})
            if request.transport is not None:
                request.transport.abort()
        return resp

    @web.middleware
    async def auth_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        public = path in ("/connexion",) or path.startswith(("/static/", "/liberation/",
                                                             "/rapport/"))
        if path.startswith(LINK_PATHS) and not self.link_limit.allow(client_key(self.client(
                request)), time.monotonic()):
            # Pages opened by a link, no account: a guesser gets a few tries per minute.
            return self.refuse(request, 429, "Trop de demandes depuis votre adresse : "
                                             "réessayez dans quelques minutes.")
        session = await self.sessions.get(request.cookies.get(self.cookie))
        account = self.accounts.load().get(session.user) if session is not None else None
        if session is not None and (account is None or session.stamp != account.stamp):
            # The account was removed, or its password, second factor or role changed (on
            # this page, with the CLI or in the file): its sessions end.
            await self.sessions.drop_user(session.user)
            session = None
        if session is not None:
            request[SESSION] = session
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("Origin")
            if origin and origin != "null" and origin != f"{request.scheme}://{request.host}":
                return self.refuse(request, 403, "Requête refusée : origine inconnue.")
            try:  # a body trickled in slowly must not hold the page (aiohttp has no limit)
                async with asyncio.timeout(self.cfg.web.body_timeout_s):
                    await request.post()
            except TimeoutError:
                log.warning("web request body too slow", extra={"fields": {
                    "client": self.client(request), "path": request.path}})
                resp = self.refuse(request, 408, "Demande trop lente : recommencez.")
                resp.force_close()  # the rest of the body is not waited for
                return resp
        if public:
            return await handler(request)
        if session is None:
            if request.method in ("GET", "HEAD"):
                raise web.HTTPSeeOther("/connexion")
            return self.refuse(request, 401, "Session expirée : reconnectez-vous.")
        if request.method not in ("GET", "HEAD"):
            form = await request.post()
            token = form.get("csrf")
            if not isinstance(token, str) or not same_token(session.csrf, token):
                return self.refuse(request, 403, "Requête refusée : jeton de sécurité absent ou "
                                                 "invalide. Rechargez la page et recommencez.")
        return await handler(request)

    def render(self, request: web.Request, template: str, status: int = 200,
               **context: Any) -> web.Response:
        session = request.get(SESSION)
        html = self.env.get_template(template).render(session=session, path=request.path,
                                                      **context)
        try:
            body = html.encode("utf-8")
        except UnicodeEncodeError:
            # A held message's raw 8-bit header bytes, kept by the parser as lone surrogates:
            # read as UTF-8 where they are, replaced where they are not.
            body = html.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode()
        return web.Response(body=body, status=status, content_type="text/html",
                            charset="utf-8")

    def refuse(self, request: web.Request, status: int, message: str) -> web.Response:
        return self.render(request, "error.html", status=status, message=message)

    def client(self, request: web.Request) -> str:
        return request.remote or ""

    async def audit(self, request: web.Request, action: str, target: str = "",
                    detail: str = "", user: str | None = None) -> None:
        session = request.get(SESSION)
        assert self.store is not None
        await self.store.audit(user=user or (session.user if session else "-"), action=action,
                               target=target, client=self.client(request), detail=detail)

    def admin_only(self, request: web.Request) -> web.Response | None:
        if not request[SESSION].is_admin:
            return self.refuse(request, 403, "Action réservée aux administrateurs.")
        return None

    # ---- login ------------------------------------------------------------------------

    # Forms used without a session (login, a sender's release link) carry a token that must
    # equal a cookie set with the form (double submit): another site cannot post them.
    def _with_form_token(self, request: web.Request, template: str, status: int = 200,
                         **context: Any) -> web.Response:
        token = request.cookies.get(FORM_COOKIE) or secrets.token_urlsafe(32)
        resp = self.render(request, template, status=status, form_token=token, **context)
        resp.set_cookie(FORM_COOKIE, token, httponly=True, samesite="Strict", path="/",
                        secure=self.secure)
        return resp

    def _form_token_ok(self, request: web.Request, form: Any) -> bool:
        cookie = request.cookies.get(FORM_COOKIE, "")
        return bool(cookie) and same_token(cookie, str(form.get("jeton", "")))

    async def login_page(self, request: web.Request) -> web.Response:
        return self._with_form_token(request, "login.html", error="", name="")

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if not self._form_token_ok(request, form):
            return self._with_form_token(request, "login.html", status=403, name="", error=(
                "Formulaire expiré ou envoyé d'ailleurs : rechargez la page et recommencez."))
        name = str(form.get("utilisateur", "")).strip().lower()[:100]
        password = str(form.get("mot_de_passe", ""))
        code = str(form.get("code", ""))
        client = self.client(request)
        attempt = await self.throttle.begin(name, client)
        if attempt.wait > 0:
            await self.audit(request, "login_failed", name, "trop d'essais : attente imposée",
                             user=name or "-")
            return self._with_form_token(request, "login.html", status=429, name=name, error=(
                f"Trop d'essais : réessayez dans {_duration(attempt.wait)}."))
        account = await self.accounts.verify_async(name, password) if name else None
        if account is None or not await self.totp.verify(account.name, account.totp_secret,
                                                         code):
            locked = await self.throttle.failed(attempt)
            await self.audit(request, "lockout" if locked else "login_failed", name,
                             "mot de passe ou code refusé", user=name or "-")
            return self._with_form_token(request, "login.html", status=401, name=name, error=(
                "Trop d'essais depuis cette adresse : connexion bloquée pendant "
                f"{self.cfg.web.lockout_minutes} minutes." if locked else
                "Identifiant, mot de passe ou code à usage unique incorrect."))
        await self.throttle.succeeded(attempt)
        session = await self.sessions.create(account.name, account.role, account.stamp)
        request[SESSION] = session
        await self.audit(request, "login")
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(self.cookie, session.sid, httponly=True, samesite="Strict", path="/",
                        secure=self.secure, max_age=self.cfg.web.session_max_hours * 3600)
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION]
        await self.audit(request, "logout")
        await self.sessions.drop(session.sid)
        resp = web.HTTPSeeOther("/connexion")
        resp.del_cookie(self.cookie, path="/")
        raise resp

    # ---- pages ------------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.Response:
        assert self.store is not None
        since = time.strftime("%Y-%m-%d", time.localtime(time.time() - 29 * 86400))
        rows = await self.quarantine.stats(since_day=since)
        held, size = await self.store.total_size()
        by_action: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        for _day, _direction, action, reason, n in rows:
            by_action[action] = by_action.get(action, 0) + n
            if reason:
                by_reason[reason] = by_reason.get(reason, 0) + n
        table = self.table
        reasons = sorted(by_reason.items(), key=lambda kv: -kv[1])[:10]
        return self.render(
            request, "dashboard.html", by_action=by_action, held=held, size=size,
            requests=await self.store.pending_requests(),
            reasons=[(name, _label(table[name].description, 200) if name in table else "", n)
                     for name, n in reasons], labels=charts.LABELS,
            chart=charts.daily_bars(rows, days=30), total=sum(by_action.values()))

    async def list_page(self, request: web.Request) -> web.Response:
        assert self.store is not None
        q = request.query
        if ident := q.get("id", "").strip()[:100]:
            # An id: a quarantine id, or a reply's id of a held message, opens the message;
            # another reply's id its tracking record (for an admin). Not words.
            held = ident[:8] + ident[8:9].upper() + ident[9:].lower()
            with contextlib.suppress(NotFound):
                raise web.HTTPSeeOther(f"/quarantaine/{(await self.store.item(held)).id}")
            if QUEUE_ID_RE.match(ident.upper()):
                records, _ = await self.store.tracking(ident, limit=1)
                if records and records[0].quarantine_id:
                    raise web.HTTPSeeOther(f"/quarantaine/{records[0].quarantine_id}")
                if request[SESSION].is_admin:
                    raise web.HTTPSeeOther("/suivi?" + urlencode({"q": ident}))
            raise web.HTTPSeeOther("/quarantaine?" + urlencode(
                {"info": f"Aucun message retenu n'a l'identifiant {ident}."}))
        filters = Filters(
            state=q.get("etat", "quarantined") or None, direction=q.get("sens") or None,
            since=_day(q.get("du")), until=_day(q.get("au"), end=True),
            min_score=_float(q.get("score_min")), reason=q.get("raison") or None,
            sender=q.get("expediteur", "")[:200], rcpt=q.get("destinataire", "")[:200],
            subject=q.get("objet", "")[:200], requested=q.get("demandes") == "1")
        page = _page(q.get("page"))
        items, total = await self.store.search(filters, limit=PAGE_SIZE,
                                               offset=(page - 1) * PAGE_SIZE)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        args = {k: v for k, v in q.items() if k != "page"}
        return self.render(
            request, "list.html", items=[(i, self.quarantine.reasons(i)) for i in items], total=total,
            page=page, pages=pages, q=q, reasons=[
                (name, _label(self.table[name].description)
                 if name in self.table else name)
                for name in await self.store.symbol_names()],
            page_url=lambda n: "/quarantaine?" + urlencode({**args, "page": n}))

    async def tracking_page(self, request: web.Request) -> web.Response:
        """Message tracking ("Suivi des messages"): any id a reply or the quarantine gave, or
        words of the sender, a recipient or the subject; each search is audited."""
        if (refused := self.admin_only(request)) is not None:
            return refused  # every message's sender and subject: not a reader's view
        assert self.store is not None
        q = request.query
        query = q.get("q", "").strip()[:200]
        page = _page(q.get("page"))
        records, total = await self.store.tracking(
            query, since=_day(q.get("du")), until=_day(q.get("au"), end=True),
            direction=q.get("sens") or None, outcomes=OUTCOME_GROUPS.get(q.get("issue", ""), ()),
            limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        if query:
            await self.audit(request, "track_search", "", query)
        args = {k: v for k, v in q.items() if k != "page"}
        return self.render(
            request, "tracking.html", records=[(r, self.quarantine.reasons(r)) for r in records],
            total=total, page=page, pages=max(1, math.ceil(total / PAGE_SIZE)), q=q,
            page_url=lambda n: "/suivi?" + urlencode({**args, "page": n}))

    async def message_page(self, request: web.Request) -> web.Response:
        assert self.store is not None
        item_id = request.match_info["id"]
        show = request.query.get("identifiants") == "1" and request[SESSION].is_admin
        try:
            item = await self.store.item(item_id)
            raw = (await self.store.get(item_id))[1] if item.state in RELEASABLE else None
        except NotFound:
            return self.refuse(request, 404, "Message introuvable (supprimé ou purgé).")
        view = None
        if raw is not None:
            view = await self.workers.run(_preview, raw, show,
                                                  limit_s=self.cfg.timeouts.preview_s)
        await self.audit(request, "view_identifiers" if show else "view", item_id)
        table = self.table
        symbols = [(s, s.description or (table[s.name].description if s.name in table else ""),
                    self.quarantine.detail(s)) for s in item.symbols]
        yara = {a.name: _yara_rules(item, a.name) for a in view.attachments} if view else {}
        return self.render(request, "message.html", item=item, view=view, symbols=symbols,
                           requests=await self.store.release_requests(item.id),
                           dangerous=self.quarantine.needs_confirmation(item),
                           show=show, reasons=self.quarantine.reasons(item), yara=yara,
                           info=request.query.get("info", "")[:300])

    async def preview_frame(self, request: web.Request) -> web.Response:
        assert self.store is not None
        item_id = request.match_info["id"]
        show = request.query.get("identifiants") == "1" and request[SESSION].is_admin
        try:
            _, raw = await self.store.get(item_id)
        except NotFound:
            raise web.HTTPNotFound() from None
        view = await self.workers.run(_preview, raw, show,
                                              limit_s=self.cfg.timeouts.preview_s)
        resp = web.Response(text=preview.document(view.html or ""), content_type="text/html",
                            charset="utf-8")
        resp.headers["Content-Security-Policy"] = PREVIEW_CSP
        resp.headers["X-Frame-Options"] = "SAMEORIGIN"
        return resp

    async def download(self, request: web.Request) -> web.StreamResponse:
        if (refused := self.admin_only(request)) is not None:
            return refused
        assert self.store is not None
        item_id = request.match_info["id"]
        try:
            item, raw = await self.store.get(item_id)
        except NotFound:
            return self.refuse(request, 404, "Message introuvable (supprimé ou purgé).")
        if request.query.get("confirme") != "1":
            return self.render(request, "download.html", item=item)
        await self.audit(request, "download", item_id)
        return web.Response(body=raw, content_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="quarantaine-{item_id}.eml"'})

    # ---- actions ----------------------------------------------------------------------

    async def item_action(self, request: web.Request) -> web.StreamResponse:
        if (refused := self.admin_only(request)) is not None:
            return refused
        item_id = request.match_info["id"]
        action = request.match_info["action"]
        if action not in ITEM_ACTIONS:
            raise web.HTTPNotFound()
        if action.startswith("liberer"):
            form = await request.post()
            assert self.store is not None
            try:
                item = await self.store.item(item_id)
            except NotFound:
                return self.refuse(request, 404, "Message introuvable (supprimé ou purgé).")
            if item.state in RELEASABLE and self.quarantine.needs_confirmation(item) \
                    and form.get("confirme") != "1":
                # Refused (the sender was told no), or held for a dangerous file: releasing
                # says yes after all. Ask, naming why.
                return self.render(request, "confirm_release.html", item=item, action=action,
                                   reasons=self.quarantine.reasons(item))
        message = await self._act(request, item_id, action)
        raise web.HTTPSeeOther(f"/quarantaine/{item_id}?" + urlencode({"info": message}))

    async def bulk(self, request: web.Request) -> web.StreamResponse:
        if (refused := self.admin_only(request)) is not None:
            return refused
        form = await request.post()
        action = str(form.get("action", ""))
        ids = [str(v) for v in form.getall("ids", [])][:PAGE_SIZE * 4]
        if action not in ("liberer", "supprimer") or not ids:
            raise web.HTTPSeeOther("/quarantaine?" + urlencode({"info": "Aucun message choisi."}))
        results = [await self._bulk_one(request, i, action) for i in ids]
        ok = sum(1 for r in results if not r.startswith("Impossible"))
        raise web.HTTPSeeOther("/quarantaine?" + urlencode(
            {"info": f"{ok} message(s) traité(s) sur {len(ids)}."}))

    async def _bulk_one(self, request: web.Request, item_id: str, action: str) -> str:
        assert self.store is not None
        if action == "liberer":
            with contextlib.suppress(NotFound):
                if self.quarantine.needs_confirmation(await self.store.item(item_id)):
                    return "Impossible : ce message se libère un par un, après confirmation."
        return await self._act(request, item_id, action)

    async def _act(self, request: web.Request, item_id: str, action: str) -> str:
        """One action on one item; a French message for the page."""
        assert self.store is not None
        user = request[SESSION].user
        client = self.client(request)
        try:
            item = await self.store.item(item_id)
            # The admin's judgement (spam or not), taught to the spam engine when there is
            # one: before a delete, which removes the message.
            note = ""
            if action in LEARNT_AS:
                note = await self.quarantine.decide(item_id, spam=LEARNT_AS[action],
                                                    by=f"web:{user}", client=client)
            if action.startswith("supprimer"):
                await self.quarantine.delete(item_id, by=f"web:{user}", client=client)
                return _joined("Message supprimé.", note)
            if action == "bloquer":
                entry = await asyncio.to_thread(self.lists.add, "block", _sender(item), by=user)
                await self.audit(request, "block", item_id, entry.value)
                return _joined(f"Expéditeur {entry.value} bloqué pour les prochains messages.",
                               note)
            if action == "liberer-autoriser":
                entry = await asyncio.to_thread(self.lists.add, "allow", _sender(item), by=user)
                await self.audit(request, "allow", item_id, entry.value)
            await self.quarantine.release(item_id, by=f"web:{user}", client=client)
            return _joined("Message libéré et remis au destinataire.", note)
        except NotFound:
            return "Impossible : message introuvable."
        except NotQuarantined as exc:
            return f"Impossible : {exc.text_fr}."
        except Refused as exc:
            return f"Impossible : {exc}"
        except DownstreamRejected as exc:  # (the store audited the failure)
            return ("Impossible : le serveur de messagerie a refusé le message "
                    f"({exc.code}). Le message reste en quarantaine.")
        except TemporaryError:  # next hop down, preparation out of time
            return ("Impossible pour le moment : le message n'a pas pu être remis. Il reste en "
                    "quarantaine ; réessayez plus tard.")

    async def lists_page(self, request: web.Request) -> web.Response:
        entries = sorted(self.lists.entries(), key=lambda e: (e.kind, e.value))
        return self.render(request, "lists.html", entries=entries, error="")

    async def lists_change(self, request: web.Request) -> web.StreamResponse:
        if (refused := self.admin_only(request)) is not None:
            return refused
        form = await request.post()
        value = str(form.get("valeur", ""))
        try:
            if form.get("retirer"):
                if await asyncio.to_thread(self.lists.remove, value):
                    await self.audit(request, "list_remove", "", value)
            else:
                kind = "block" if form.get("type") == "block" else "allow"
                entry = await asyncio.to_thread(self.lists.add, kind, value,
                                                by=request[SESSION].user,
                                                note=str(form.get("note", ""))[:200])
                await self.audit(request, kind, "", entry.value)
        except Refused as exc:
            entries = sorted(self.lists.entries(), key=lambda e: (e.kind, e.value))
            return self.render(request, "lists.html", status=400, entries=entries,
                               error=str(exc))
        raise web.HTTPSeeOther("/listes")

    async def audit_page(self, request: web.Request) -> web.Response:
        assert self.store is not None
        page = _page(request.query.get("page"))
        entries, total = await self.store.audit_log(limit=100, offset=(page - 1) * 100)
        return self.render(request, "audit.html", entries=entries, total=total, page=page,
                           pages=max(1, math.ceil(total / 100)))

    # ---- accounts (admins) ------------------------------------------------------------------

    async def accounts_page(self, request: web.Request, *, status: int = 200, error: str = "",
                            enrolled: dict[str, str] | None = None) -> web.Response:
        if (refused := self.admin_only(request)) is not None:
            return refused
        users = sorted(self.accounts.load().values(), key=lambda a: a.name)
        return self.render(request, "accounts.html", status=status, users=users, error=error,
                           enrolled=enrolled)

    async def accounts_change(self, request: web.Request) -> web.StreamResponse:
        if (refused := self.admin_only(request)) is not None:
            return refused
        form = await request.post()
        name = str(form.get("utilisateur", "")).strip().lower()
        if form.get("supprimer"):
            admins = [a for a in self.accounts.load().values() if a.role == "admin"]
            if name == request[SESSION].user or [a.name for a in admins] == [name]:
                return await self.accounts_page(request, status=400, error=(
                    "Impossible de supprimer son propre compte ou le dernier administrateur."))
            try:
                await asyncio.to_thread(self.accounts.remove, name)
            except KeyError:
                return await self.accounts_page(request, status=404, error="Compte inconnu.")
            await self.sessions.drop_user(name)
            await self.audit(request, "user_remove", "", name)
            raise web.HTTPSeeOther("/comptes")
        if form.get("nouveau_code"):
            secret = new_totp_secret()
            try:
                await asyncio.to_thread(self.accounts.set_totp, name, secret)
            except KeyError:
                return await self.accounts_page(request, status=404, error="Compte inconnu.")
            await self.sessions.drop_user(name)
            await self.audit(request, "totp_reset", "", name)
            qr = enrolment_qr(secret, name, self.cfg.gateway.hostname)
            return await self.accounts_page(request, enrolled={
                "name": name, "secret": secret, "qr": qr.svg_data_uri(scale=5), "reset": "1"})
        role = "admin" if form.get("role") == "admin" else "lecteur"
        secret = new_totp_secret()
        try:
            account = await asyncio.to_thread(self.accounts.add, name, str(form.get("mot_de_passe", "")),
                                              role=role, totp_secret=secret)
        except Refused as exc:
            return await self.accounts_page(request, status=400, error=str(exc))
        await self.audit(request, "user_add", "", f"{account.name} ({role})")
        qr = enrolment_qr(secret, account.name, self.cfg.gateway.hostname)
        return await self.accounts_page(request, enrolled={
            "name": account.name, "secret": secret, "qr": qr.svg_data_uri(scale=5)})

    # ---- release by the sender (link in the outbound notice) -------------------------------

    async def _sender_item(self, request: web.Request) -> Item | None:
        assert self.store is not None
        item_id, token = request.match_info["id"], request.match_info["token"]
        try:
            item = await self.store.item(item_id)
        except NotFound:
            return None
        expected = release_token(self.secret, item.id, item.mail_from)
        if item.direction != "outbound" or not hmac.compare_digest(expected, token):
            return None
        # Held for anything but health data in clear (a dangerous file, an analysis that
        # could not finish): for the practice's admin only, whatever the link says. As decided
        # when it was held, and still so under today's rules.
        if not item.sender_may_release or not held_for_exposure_only(
                (s.name for s in item.symbols), item.score, self.quarantine.table,
                self.cfg.scoring.quarantine):
            return None
        return item

    async def sender_release_page(self, request: web.Request) -> web.Response:
        item = await self._sender_item(request)
        if item is None:
            return self.refuse(request, 404, "Lien invalide ou message introuvable.")
        return self._with_form_token(request, "sender_release.html", item=item, done="",
                                     reasons=self.quarantine.reasons(item))

    async def sender_release(self, request: web.Request) -> web.Response:
        item = await self._sender_item(request)
        if item is None:
            return self.refuse(request, 404, "Lien invalide ou message introuvable.")
        form = await request.post()
        if not self._form_token_ok(request, form):
            return self.refuse(request, 403, "Formulaire expiré ou envoyé d'ailleurs : rouvrez "
                                             "le lien du message et recommencez.")
        if form.get("confirme") != "1":
            return self.refuse(request, 400, "Cochez la case de confirmation.")
        try:
            await self.quarantine.release(item.id, by=f"sender:{item.mail_from}",
                          client=self.client(request))
        except (NotFound, NotQuarantined):
            done = "Ce message a déjà été traité."
        except (DownstreamRejected, TemporaryError):
            done = "L'envoi a échoué pour le moment ; le message reste retenu. Réessayez plus tard."
        else:
            done = "Le message a été libéré et envoyé."
        return self.render(request, "sender_release.html", item=item, done=done, reasons=[])

    # ---- the links of a quarantine digest ------------------------------------------------

    async def _digest_target(self, request: web.Request
                             ) -> tuple[digest.Link, Item, str] | web.Response:
        """The link's item and recipient, or the page that says why it cannot be used."""
        assert self.store is not None
        link = digest.Link.parse(request.match_info["token"])
        item = rcpt = None
        if link is not None:
            with contextlib.suppress(NotFound):
                item = await self.store.item(link.item_id)
            if item is not None:
                rcpt = digest.link_recipient(self.secret, link, item)
        if link is None or item is None or rcpt is None:
            log.warning("digest link refused", extra={"fields": {
                "client": self.client(request)}})
            return self.refuse(request, 404, "Lien invalide ou message introuvable (les "
                                             "messages sont supprimés après quelques jours).")
        return link, item, rcpt

    def _digest_state(self, link: digest.Link, item: Item, used: bool) -> str:
        """Why the link can no longer act, or ""."""
        if used:
            return "Ce lien a déjà servi."
        if item.state != "quarantined":
            return f"Ce message a déjà été traité ({STATES_FR.get(item.state, item.state)})."
        if time.time() > link.expires:
            return ("Ce lien a expiré. Si ce message est légitime, demandez à la personne qui "
                    "administre la passerelle de le libérer.")
        return ""

    async def digest_link_page(self, request: web.Request) -> web.Response:
        target = await self._digest_target(request)
        if isinstance(target, web.Response):
            return target
        link, item, rcpt = target
        await self.audit(request, "digest_view", item.id, user=f"digest:{rcpt}")
        state = self._digest_state(link, item, await self.store.link_used(link.mac))
        return self._with_form_token(request, "digest_link.html", item=item, rcpt=rcpt,
                                     link=link, done="", state=state,
                                     sender=digest.sender_of(item),
                                     subject=digest.shown(item.subject) or "(sans objet)",
                                     reason=digest.shown((self.quarantine.reasons(item, 1)
                                                          or [""])[0], 300))

    async def digest_link(self, request: web.Request) -> web.Response:
        target = await self._digest_target(request)
        if isinstance(target, web.Response):
            return target
        link, item, rcpt = target
        form = await request.post()
        if not self._form_token_ok(request, form):
            return self.refuse(request, 403, "Formulaire expiré ou envoyé d'ailleurs : rouvrez "
                                             "le lien du rapport et recommencez.")
        state = self._digest_state(link, item, await self.store.link_used(link.mac))
        done = state
        by = f"digest:{rcpt}"
        if state:
            pass
        elif link.action == "d":
            if await self.store.use_link(link.mac):
                await self.store.request_release(item.id, by=by, client=self.client(request))
                done = ("Votre demande a été transmise à la personne qui administre la "
                        "passerelle : le message vous sera remis si elle le libère.")
            else:
                done = "Ce lien a déjà servi."
        elif not self.quarantine.recipient_may_release(
                item, self.cfg.digest.direct_release_groups):
            # The rules or the settings changed since the digest: ask instead.
            if await self.store.use_link(link.mac):
                await self.store.request_release(item.id, by=by, client=self.client(request))
            done = ("Ce message ne peut plus être libéré depuis le rapport : votre demande a été "
                    "transmise à la personne qui administre la passerelle.")
        else:
            try:
                await self.quarantine.release(item.id, by=by, client=self.client(request))
            except (NotFound, NotQuarantined):
                done = "Ce message a déjà été traité."
            except (DownstreamRejected, TemporaryError):
                done = ("La remise a échoué pour le moment ; le message reste retenu. Réessayez "
                        "plus tard avec le même lien.")
            else:
                await self.store.use_link(link.mac)
                done = "Le message a été libéré : il arrive dans votre boîte de réception."
        return self.render(request, "digest_link.html", item=item, rcpt=rcpt, link=link,
                           done=done, state="", sender=digest.sender_of(item),
                           subject=digest.shown(item.subject) or "(sans objet)", reason="")

    async def _optout_actor(self, blind: str) -> str:
        """Who an opt-out link is for, for the journal: the recipient of a held item whose
        address has this blind token, else the token itself."""
        assert self.store is not None
        for item in await self.store.list_items(state="quarantined", limit=500):
            for rcpt in item.rcpts:
                if self.store.blind(rcpt) == blind:
                    return f"digest:{rcpt.lower()}"
        return f"digest:(jeton {blind})"

    async def digest_optout_page(self, request: web.Request) -> web.Response:
        blind = digest.optout_blind(self.secret, request.match_info["token"])
        if blind is None:
            return self.refuse(request, 404, "Lien invalide.")
        await self.audit(request, "digest_optout_view", "", user=await self._optout_actor(blind))
        out = blind in await self.store.digest_optouts()
        return self._with_form_token(request, "digest_optout.html", out=out, done="")

    async def digest_optout(self, request: web.Request) -> web.Response:
        """Opt out (or back in) with the link of a digest; a mail client's one-click
        unsubscribe (RFC 8058: `List-Unsubscribe=One-Click`, no form) opts out."""
        blind = digest.optout_blind(self.secret, request.match_info["token"])
        if blind is None:
            return self.refuse(request, 404, "Lien invalide.")
        form = await request.post()
        one_click = form.get("List-Unsubscribe") == "One-Click"
        if not one_click and not self._form_token_ok(request, form):
            return self.refuse(request, 403, "Formulaire expiré ou envoyé d'ailleurs : rouvrez "
                                             "le lien du rapport et recommencez.")
        out = one_click or form.get("choix") != "reprendre"
        await self.store.set_digest_optout(blind, out)
        await self.audit(request, "digest_optout" if out else "digest_optin", "",
                         user=await self._optout_actor(blind))
        done = ("Vous ne recevrez plus le rapport de quarantaine." if out else
                "Vous recevrez de nouveau le rapport de quarantaine.")
        return self._with_form_token(request, "digest_optout.html", out=out, done=done)


class RateLimit:
    """At most `n` requests per key in a sliding window of `window_s` (one process: the page
    is served by the primary process only). At most `keys` clients are remembered, the least
    recently seen forgotten first: constant work per request and bounded memory, however
    many addresses a client uses (the links' MACs make guessing futile anyway; the limit
    keeps a client from flooding the pages)."""

    def __init__(self, n: int, window_s: float, keys: int = 10000) -> None:
        self._n = n
        self._window_s = window_s
        self._keys = keys
        self._hits: collections.OrderedDict[str, collections.deque[float]] = \
            collections.OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = collections.deque(maxlen=self._n)
            while len(self._hits) > self._keys:
                self._hits.popitem(last=False)
        else:
            self._hits.move_to_end(key)
        while hits and hits[0] <= now - self._window_s:
            hits.popleft()
        if len(hits) >= self._n:
            return False
        hits.append(now)
        return True


def actor_fr(user: str) -> str:
    """Who did it, for the journal: the store records state changes by a tagged name
    (`web:claire`, `sender:dr@cabinet.fr`, `cli:root`, `system:retry`)."""
    kind, sep, name = user.partition(":")
    if not sep:
        return user
    return {"web": name, "sender": f"expéditeur {name}", "cli": f"{name} (ligne de commande)",
            "digest": f"destinataire {name} (rapport)", "system": "système"}.get(kind, user)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{math.ceil(seconds)} seconde(s)"
    return f"{math.ceil(seconds / 60)} minute(s)"


def _label(description: str, width: int = 80) -> str:
    """A French reason short enough for a drop-down (placeholders left out)."""
    text = re.sub(r"\s*\([^)]*\{[^}]*\}[^)]*\)", "", description)
    text = re.sub(r"\{[^}]*\}", "…", text).split(" : ")[0]
    return text if len(text) <= width else text[:width - 1].rsplit(" ", 1)[0] + "…"


def _yara_rules(item: Item, name: str) -> list[str]:
    """The YARA rules that matched this attachment (or a file inside it, `name/member`), from
    the values the analysis stored with each finding."""
    out = []
    for s in item.symbols:
        args = dict(s.args)
        where, rule = args.get("file", ""), args.get("rule", "")
        if rule and (where == name or where.startswith(name + "/")):
            out.append(rule)
    return list(dict.fromkeys(out))


def _preview(raw: bytes, show: bool) -> preview.Preview:
    return preview.build(raw, show_identifiers=show)


def _joined(*sentences: str) -> str:
    return " ".join(x for x in sentences if x)


def _sender(item: Item) -> str:
    """The address to allow or block: From's, else the envelope sender's."""
    found = [a for _, a in header_addresses(item.from_header) if "@" in a]
    return found[0] if found else item.mail_from


def _size(n: int) -> str:
    for unit in ("o", "Ko", "Mo", "Go"):
        if n < 1024 or unit == "Go":
            return f"{n:.0f} {unit}" if unit == "o" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def _page(text: str | None) -> int:
    """A page number from the query string: 1 when absent or absurd."""
    if not text or not text.isdigit() or len(text) > 6:
        return 1
    return max(1, int(text))


def _day(text: str | None, *, end: bool = False) -> float | None:
    if not text:
        return None
    try:
        ts = time.mktime(time.strptime(text, "%Y-%m-%d"))
    except ValueError:
        return None
    return ts + 86400 if end else ts


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


async def start_web(cfg: Config, quarantine: QuarantineService, auth: AuthState,
                    workers: Workers, secret: bytes, *, sock: Any = None) -> web.AppRunner:
    """Serve the web page on the running loop: on `sock` (bound by the parent), else on
    `web.listen`."""
    app = WebApp(cfg, quarantine, auth, workers, secret)
    if not app.accounts.load():
        log.warning("web page has no account yet: create one with "
                    "`gateway admin add-user NAME --role admin`")
    # keepalive_timeout also bounds the wait for a request's head from connection on (aiohttp
    # arms it at connection_made): a client sending its headers slowly is cut.
    runner = web.AppRunner(app.build(), access_log=None, handle_signals=False,
                           keepalive_timeout=cfg.web.header_timeout_s,
                           lingering_time=1.0,  # reading the unread rest of a refused body
                           logger=_ServerLog(logging.getLogger("gateway.web.server"), {}))
    await runner.setup()
    ctx = None
    if cfg.web.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cfg.web.tls_cert, cfg.web.tls_key)
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock, ssl_context=ctx)
    else:
        listen = cfg.web_listen
        assert listen is not None
        site = web.TCPSite(runner, listen.host, listen.port, ssl_context=ctx,
                           reuse_address=True)
    await site.start()
    server = getattr(site, "_server", None)
    names = [str(s.getsockname()) for s in server.sockets] if server is not None else []
    log.info("web page listening", extra={"fields": {"listen": names, "tls": ctx is not None}})
    return runner


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log: a malformed request from a client is one warning line, not an
    error with a traceback; anything else stays an error with its traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            self.warning("malformed HTTP request: %s", str(exc).splitlines()[0][:200])
            return
        self.error(msg, *args, exc_info=exc_info, **kw)


def web_port(runner: web.AppRunner) -> int:
    return listening_port(runner)
