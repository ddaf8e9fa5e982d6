"""Login, sessions, CSRF and security headers of the quarantine web page.

* Login needs the password (argon2, `gateway.accounts`) and a TOTP code (RFC 6238, pyotp, one
  step of clock drift either way); a code is accepted once (replay refused).
* Failed attempts are throttled per account and client address, and an address is locked
  after many (gateway/authstate.py: `max_login_failures` free tries per pair, four times that
  per address within `lockout_minutes`).
* Sessions are kept in the shared auth state (gateway/authstate.py), so they survive a
  restart: a random 256-bit id in a cookie (HttpOnly, SameSite=Strict, Path=/, Secure and
  `__Host-` prefix over HTTPS), an idle timeout and a maximum age; logging out forgets it, and
  any change of the account's credentials (password, second factor, role) ends it.
* Every POST carries the session's CSRF token (a hidden form field), compared in constant time;
  the Origin header, when present, must be ours.
* Every answer gets a strict CSP (no script at all, frame-ancestors 'none'), no-referrer,
  nosniff, no caching.
"""

from __future__ import annotations

import hmac
import time

import pyotp
import segno

from gateway.authstate import AuthState, Session
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


class Sessions:
    """The web page's sessions, in the shared auth state (gateway/authstate.py)."""

    def __init__(self, cfg: WebSection, state: AuthState) -> None:
        self._idle = cfg.session_idle_minutes * 60
        self._max = cfg.session_max_hours * 3600
        self._state = state

    async def create(self, user: str, role: str, stamp: str) -> Session:
        return await self._state.off_loop(self._state.new_session, user, role, stamp,
                                          max_s=self._max)

    async def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 100:
            return None
        return await self._state.off_loop(self._state.session, sid, idle_s=self._idle,
                                          max_s=self._max)

    async def drop(self, sid: str) -> None:
        await self._state.off_loop(self._state.drop_session, sid)

    async def drop_user(self, user: str) -> None:
        await self._state.off_loop(self._state.drop_user, user)


class TotpGuard:
    """TOTP codes, each accepted once per account (the steps used are in the shared state,
    so a code cannot be replayed on another serving process nor after a restart)."""

    def __init__(self, state: AuthState) -> None:
        self._state = state

    async def verify(self, user: str, secret: str, code: str) -> bool:
        code = code.strip().replace(" ", "")
        if not secret or len(code) != 6 or not code.isdigit():
            return False
        totp = pyotp.TOTP(secret)
        now = time.time()
        for drift in (0, -1, 1):
            at = now + drift * totp.interval
            if hmac.compare_digest(totp.at(at), code):
                step = int(at // totp.interval)
                return await self._state.off_loop(self._state.use_totp_step, user, secret,
                                                  step)
        return False


def new_totp_secret() -> str:
    return pyotp.random_base32()


def enrolment_qr(secret: str, user: str, hostname: str) -> segno.QRCode:
    """The QR code an authenticator app scans (otpauth:// URI, RFC 6238 parameters)."""
    uri = pyotp.TOTP(secret).provisioning_uri(name=user, issuer_name=f"Passerelle {hostname}")
    return segno.make(uri, error="m")


def same_token(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
