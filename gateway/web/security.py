"""Login, sessions, CSRF and security headers of the quarantine web page.

* Login needs the password (argon2, `gateway.accounts`) and a TOTP code (RFC 6238, pyotp, one
  step of clock drift either way); a code is accepted once (replay refused).
* Failed attempts are counted per account and per client address (gateway/ratelimit.py); past
  `max_login_failures` within `lockout_minutes` (four times that for an address), logins are
  refused for `lockout_minutes`, right password or not.
* Sessions live in the serving process that runs the web page (one process, see service.py):
  a random 256-bit id in a cookie (HttpOnly, SameSite=Strict, Path=/, Secure and `__Host-`
  prefix over HTTPS), an idle timeout and a maximum age; logging out forgets it.
* Every POST carries the session's CSRF token (a hidden form field), compared in constant time;
  the Origin header, when present, must be ours.
* Every answer gets a strict CSP (no script at all, frame-ancestors 'none'), no-referrer,
  nosniff, no caching.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

import pyotp
import segno

from gateway.config import WebSection

CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-src 'self'; frame-ancestors 'none'; base-uri 'none'")
# The sanitised mail preview, inside a sandboxed frame: nothing but inline styles and images
# carried in the message itself.
PREVIEW_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
               "frame-ancestors 'self'; base-uri 'none'; form-action 'none'; sandbox")
HEADERS = {
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


@dataclass(slots=True, kw_only=True)
class Session:
    sid: str
    user: str
    role: str
    csrf: str
    created: float
    seen: float

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class Sessions:
    def __init__(self, cfg: WebSection) -> None:
        self._idle = cfg.session_idle_minutes * 60
        self._max = cfg.session_max_hours * 3600
        self._by_id: dict[str, Session] = {}

    def create(self, user: str, role: str) -> Session:
        now = time.time()
        s = Session(sid=secrets.token_urlsafe(32), user=user, role=role,
                    csrf=secrets.token_urlsafe(32), created=now, seen=now)
        self._by_id[s.sid] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        now = time.time()
        if s is None:
            return None
        if now - s.seen > self._idle or now - s.created > self._max:
            self._by_id.pop(sid, None)
            return None
        s.seen = now
        return s

    def drop(self, sid: str) -> None:
        self._by_id.pop(sid, None)

    def drop_user(self, user: str) -> None:
        for sid in [k for k, s in self._by_id.items() if s.user == user]:
            self._by_id.pop(sid, None)


class TotpGuard:
    """TOTP codes, each accepted once per account."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] = {}  # (account, secret): the last step used

    def verify(self, user: str, secret: str, code: str) -> bool:
        code = code.strip().replace(" ", "")
        if not secret or len(code) != 6 or not code.isdigit():
            return False
        totp = pyotp.TOTP(secret)
        now = time.time()
        for drift in (0, -1, 1):
            at = now + drift * totp.interval
            if hmac.compare_digest(totp.at(at), code):
                step = int(at // totp.interval)
                if self._last.get((user, secret), -1) >= step:
                    return False  # replayed
                self._last[(user, secret)] = step
                return True
        return False


def new_totp_secret() -> str:
    return pyotp.random_base32()


def enrolment_qr(secret: str, user: str, hostname: str) -> segno.QRCode:
    """The QR code an authenticator app scans (otpauth:// URI, RFC 6238 parameters)."""
    uri = pyotp.TOTP(secret).provisioning_uri(name=user, issuer_name=f"Passerelle {hostname}")
    return segno.make(uri, error="m")


def same_token(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
