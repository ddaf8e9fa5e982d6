"""aiosmtpd's private names: its SMTP protocol class seen through public-named hooks."""

from __future__ import annotations

import asyncio
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Session

# (name, what the gateway does with it): checked by tests/test_dependencies.py
PRIVATE_METHODS = {
    "_authenticate": "the submission port keeps the decoded credentials (keep_credentials)",
    "_call_handler_hook": "our DATA command calls the DATA hook (call_data_hook)",
    "_reset_timeout": "DATA read and transaction deadlines (restart_timer)",
    "_timeout_cb": "421 4.4.2 said before a timeout closes (before_timeout_close)",
    "_set_rset_state": "RSET/EHLO/STARTTLS drop the next-hop transaction (on_reset)",
    "_set_post_data_state": "the envelope reset after DATA (end_transaction)",
    "_create_session": "our session class (new_session)",
    "check_helo_needed": "command order before our path checks",
    "check_auth_needed": "command order before our path checks",
    "_getaddr": "MAIL and RCPT paths read without a class made per call (get_path)",
}
PRIVATE_ATTRIBUTES = ["_reader", "_original_transport", "_auth_require_tls", "_proxy_timeout",
                      "_smtp_methods"]


class SMTPBase(SMTP):
    """aiosmtpd's SMTP with its private hooks turned into methods a subclass overrides or
    calls; nothing outside this module names them."""

    # ---- hooks a subclass overrides -------------------------------------------------------

    def new_session(self) -> Session:
        return Session(self.loop)

    def on_reset(self) -> None:
        """A transaction ended without DATA (RSET, EHLO/HELO, STARTTLS)."""

    def before_timeout_close(self) -> None:
        """The idle or DATA timer fired; the connection closes right after."""

    def keep_credentials(self, mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd decoded an AUTH PLAIN/LOGIN exchange (synchronously)."""
        return AuthResult(success=False, handled=False)

    # ---- what a subclass calls ------------------------------------------------------------

    def restart_timer(self, seconds: float | None = None) -> None:
        """The idle timer, from now (the configured timeout, or `seconds`)."""
        self._reset_timeout(seconds)

    def close_for_timeout(self) -> None:
        """As when the timer fires: our reply, then aiosmtpd closes."""
        self._timeout_cb()

    def end_transaction(self) -> None:
        """The envelope reset that follows DATA."""
        self._set_post_data_state()  # type: ignore[no-untyped-call]

    async def call_data_hook(self) -> str:
        return str(await self._call_handler_hook("DATA"))

    @property
    def reader(self) -> asyncio.StreamReader:
        return self._reader

    @property
    def fresh_connection(self) -> bool:
        """connection_made for the client's connection, not after STARTTLS's handshake."""
        return self._original_transport is None and self.transport is None

    def require_tls_for_auth(self, required: bool) -> None:
        self._auth_require_tls = required

    def expect_proxy_header(self, timeout_s: float | None) -> None:
        """This connection starts with a PROXY protocol header (within `timeout_s`), handed
        to the handler's handle_PROXY before the greeting; None: it does not. Called from
        connection_made, before aiosmtpd's session task starts."""
        self._proxy_timeout = timeout_s

    def restart_session(self) -> None:
        """A new session on this connection, as after a new connection (XCLIENT): the
        envelope reset, a fresh Session with the same peer and TLS state, no HELO yet."""
        self._set_rset_state()
        old = self.session
        self.session = self._create_session()
        if old is not None:
            self.session.peer = old.peer
            self.session.ssl = old.ssl

    @property
    def ident(self) -> str:
        return str(self.__ident__)

    def add_command(self, name: str, method: Any) -> None:
        """A command name no `smtp_NAME` method can spell (a control character)."""
        self._smtp_methods[name] = method

    # ---- the private names, mapped --------------------------------------------------------

    def _create_session(self) -> Session:
        return self.new_session()

    def _set_rset_state(self) -> None:
        self.on_reset()
        super()._set_rset_state()  # type: ignore[no-untyped-call]

    def _timeout_cb(self) -> None:
        self.before_timeout_close()
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        return self.keep_credentials(mechanism, auth_data)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return get_path(arg, self.local_part_limit)


def get_path(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """aiosmtpd's reading of a MAIL or RCPT argument (the path, and the rest: parameters),
    the same calls without the typing.Protocol class it defines on every call (33 of its
    46 µs, twice a message). (None, None) when unreadable, including where the stdlib parser
    itself fails (IndexError on "<a@": aiosmtpd answered that with a 500 error)."""
    if not arg:
        return "", ""
    address: Any
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except (HeaderParseError, IndexError, ValueError):
        return None, None
    addr = str(address.addr_spec)
    if local_part_limit and len(addr.rpartition("@")[0]) > local_part_limit:
        return None, None
    return addr, rest
