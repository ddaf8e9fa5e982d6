"""Fuzz targets: (a) the SMTP session, (b) the MIME walk.

(a) A hypothesis state machine drives a real gateway (`gateway.service.running`) over loopback
TCP, its next hop a real sink (tests/support/sink.py): EHLO/HELO with junk, MAIL FROM and RCPT
TO with hostile addresses (NUL and control bytes, invalid UTF-8, `%`, `!`, quoted `@`, source
routes, very long, SMTPUTF8 and other parameters, bare LF, `<>`), RSET, NOOP, junk commands,
pipelined batches, DATA bodies of random bytes with end-of-data markers and bare-LF dots in
various places (sent in pieces, so that the chunked reader sees split markers), over the size
limit, abrupt disconnects (FIN or RST, mid-command, mid-DATA), other clients from the same
address leaving at once. Properties: every reply is well-formed SMTP (three-digit code 2xx-5xx,
one code per reply, RFC 5321 text: no control characters), never aiosmtpd's exception reply nor
the gateway's internal-error 451; syntax errors in an address get 5xx; no relay outside our
domain nor through %, ! or a quoted @; a bare-LF dot never ends DATA (exactly one reply per
message); 552 exactly when the message is over the limit; nothing logged at ERROR or with a
traceback; no next-hop connection and no session left open once the client left; every message
answered "accepted and relayed" reached the sink; and after every example a normal client
still gets its message delivered. Every read has a timeout: a hang fails the test.

(b) `parse_message` (what the pipeline runs on every message) on random bytes and on mutations
of well-formed messages (nested multiparts, broken boundaries, bad base64 / quoted-printable,
RFC 2047 / 2231 words with bad charsets, huge headers, NUL bytes). Properties: it returns
(it is documented never to raise), within a time bound, with a consistent part list (spans
inside the message and in order, size = payload length), and the parts' text and transfer
decoding do not raise either. Also: `decode_words` raises only its documented errors, and the
banner (applied to every message tagged suspect) does not raise on the same mutated messages.

At the end, the regression tests: the smallest reproducer of each bug the targets found.

Default mode: 100 to 300 examples per target, derandomized (the same inputs on every run,
for CI stability), a few seconds each. Long mode, new random inputs on each run:

    GATEWAY_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_fuzz.py
    .venv/bin/python bench/fuzz.py --minutes 10      # rounds with fresh seeds until time is up

A failure prints the falsifying example (the steps, for the SMTP state machine) and a
`@reproduce_failure` blob. In long mode, `--hypothesis-seed=N` replays a run; without a seed,
failing inputs are saved to bench/out/fuzz-db (git-ignored) and tried first by the next long run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import quopri
import re
import select
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway import banner, replies
from gateway.config import DEFAULT_RULES_DIR
from gateway.message import MAX_DEPTH, MAX_PARTS, decode_transfer, decode_words, parse_message
from gateway.service import Running, running
from tests.conftest import DOMAIN, make_config
from tests.support.sink import Sink

ROOT = Path(__file__).resolve().parents[1]
LONG_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "0") or 0)


def fuzz_settings(default_examples: int, **kwargs: Any) -> settings:
    """Derandomized and without a database by default (CI); GATEWAY_FUZZ_EXAMPLES=N: N random
    examples, failures kept in bench/out/fuzz-db."""
    common: dict[str, Any] = {
        "deadline": None, "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                  HealthCheck.filter_too_much, HealthCheck.large_base_example]}
    common.update(kwargs)
    if LONG_EXAMPLES:
        return settings(max_examples=LONG_EXAMPLES, derandomize=False,
                        database=DirectoryBasedExampleDatabase(ROOT / "bench/out/fuzz-db"),
                        **common)
    return settings(max_examples=default_examples, derandomize=True, database=None, **common)


# =============================================================================================
# (a) The SMTP session against a live gateway
# =============================================================================================

REPLY_TIMEOUT_S = 15.0  # far above any normal reply here: past it, the gateway is hung
SETTLE_TIMEOUT_S = 5.0  # for sessions and next-hop connections to close after the client left
MAX_MESSAGE_BYTES = 100_000  # small, so that bodies over the limit are cheap to fuzz
WATCHED_LOGGERS = ("gateway", "quarantine", "mail.log", "asyncio")


class Hang(AssertionError):
    pass


class Live:
    """The gateway and its sink on an event loop of their own, in a thread: the fuzz client
    is plain blocking sockets with timeouts, and hypothesis runs examples synchronously."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.sink = Sink()
        self.gw: Running | None = None
        self.records: list[logging.LogRecord] = []
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-gateway", daemon=True)
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._handler = _ListHandler(self.records)

    def start(self) -> None:
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
        self._thread.start()
        if not self._ready.wait(30) or self.gw is None:
            raise RuntimeError(f"fuzz gateway did not start: {self._failed!r}")

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        for name in WATCHED_LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._failed = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        await self.sink.start()
        cfg = make_config(self._data_dir,
                          next_hop={"address": self.sink.address, "starttls": "off"},
                          smtp={"max_message_bytes": MAX_MESSAGE_BYTES})
        try:
            async with running(cfg) as gw:
                self.gw = gw
                self._ready.set()
                await self._stop.wait()
        finally:
            await self.sink.stop()

    @property
    def port(self) -> int:
        assert self.gw is not None
        return self.gw.port

    @property
    def sessions(self) -> int:
        assert self.gw is not None
        return self.gw.counter.active

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (a coroutine function) on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(REPLY_TIMEOUT_S)

    def drain_sink(self) -> list[bytes]:
        async def drain() -> list[bytes]:
            out = []
            while not self.sink.queue.empty():
                out.append(self.sink.queue.get_nowait().data)
            return out
        result: list[bytes] = self.call(drain)
        return result

    def take_problems(self) -> list[logging.LogRecord]:
        """Records logged at ERROR or with a traceback since the last call."""
        out = [r for r in self.records if r.levelno >= logging.ERROR or r.exc_info]
        self.records.clear()
        return out


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self._records = records

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    gw = Live(tmp_path_factory.mktemp("fuzz") / "data")
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def describe(records: list[logging.LogRecord]) -> str:
    out = []
    for r in records:
        out.append(f"{r.name} {r.levelname}: {r.getMessage()}")
        if r.exc_info and r.exc_info[1] is not None:
            exc = r.exc_info[1]
            out.append(f"    {type(exc).__name__}: {exc}")
    return "\n".join(out)


# ---- a blocking SMTP client that checks every reply ------------------------------------------

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)\r\n", re.S)
# RFC 5321 4.2: textstring = 1*(HT / SP / %d33-126), and UTF-8 with SMTPUTF8 (RFC 6531).
_TEXT = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_AIOSMTPD_EXCEPTION = re.compile(rb"^500 Error: \(\w+\)|Cannot describe error|Traceback")
_INTERNAL = str(replies.TEMPFAIL_INTERNAL).encode()


@dataclass
class Reply:
    code: int
    lines: list[bytes]

    @property
    def text(self) -> bytes:
        return b"".join(self.lines)


def check_reply(lines: list[bytes], sent: bytes) -> Reply:
    """The reply-level properties; `sent` is named in failure messages."""
    codes = set()
    for i, line in enumerate(lines):
        m = _REPLY_LINE.fullmatch(line)
        assert m is not None, f"non-SMTP reply line {line!r} to {sent!r}"
        assert (m[2] == b" ") == (i == len(lines) - 1), f"bad continuation {lines!r}"
        assert _TEXT.fullmatch(m[3]), f"control characters in reply {line!r} to {sent!r}"
        try:
            m[3].decode("utf-8")
        except UnicodeDecodeError:
            raise AssertionError(f"reply is not UTF-8: {line!r} to {sent!r}") from None
        codes.add(int(m[1]))
    assert len(codes) == 1, f"several codes in one reply {lines!r}"
    text = b"".join(lines)
    assert not _AIOSMTPD_EXCEPTION.search(text), f"exception text in reply {text!r} to {sent!r}"
    assert _INTERNAL not in text, f"internal error (451 4.3.0) for {sent!r}"
    return Reply(code=codes.pop(), lines=lines)


class Client:
    """A non-blocking socket: it reads replies while it writes, so that a server answering
    pipelined commands while we still write never waits on us (nor we on it)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self._buf = b""
        self._eof = False  # the server closed (or reset) the connection
        self.closed = False
        self.reset = False

    def send(self, data: bytes, pieces: tuple[int, ...] = ()) -> None:
        """Send `data`; cut at `pieces` offsets, with a pause, so the server reads it in parts."""
        cuts = sorted({p for p in pieces if 0 < p < len(data)})
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            view = memoryview(data)[a:b]
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while view and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Hang(f"the server read nothing for {REPLY_TIMEOUT_S} s")
                readable, writable, _ = select.select([self.sock], [self.sock], [], left)
                if readable:
                    self._receive()
                if writable and not self._eof:
                    try:
                        sent = self.sock.send(view[:65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # closed by the server (421, 502): seen on read
                        self._eof = self.reset = True
                        break
                    view = view[sent:]
                    deadline = time.monotonic() + REPLY_TIMEOUT_S
            if b < len(data):
                time.sleep(0.002)

    def _receive(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._eof = self.reset = True
            return
        if not chunk:
            self._eof = True
        self._buf += chunk

    def _line(self) -> bytes | None:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while b"\n" not in self._buf:
            if self._eof:
                self.closed = True
                if self.reset:
                    # The server closed while our pipelined input was still unread (after 421
                    # or 502), so TCP reset the connection and dropped what we had not read
                    # yet: a line cut short is not the server's doing.
                    self._buf = b""
                assert not self._buf, f"connection closed inside a reply line: {self._buf!r}"
                return None
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise Hang(f"no reply line within {REPLY_TIMEOUT_S} s (got {self._buf!r})")
            self._receive()
        line, _, self._buf = self._buf.partition(b"\n")
        return line + b"\n"

    def reply(self, sent: bytes) -> Reply | None:
        """One complete, checked reply; None when the server closed the connection."""
        lines: list[bytes] = []
        while True:
            line = self._line()
            if line is None:
                assert not lines or self.reset, f"connection closed inside a reply: {lines!r}"
                return None
            lines.append(line)
            if line[3:4] != b"-":
                return check_reply(lines, sent)

    def close(self, *, reset: bool = False) -> None:
        if reset:  # RST instead of FIN
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()
        self.closed = True


# ---- what the fuzz client sends --------------------------------------------------------------

@dataclass(frozen=True)
class Addr:
    """An address argument as sent, with what the gateway must make of it."""

    wire: bytes  # e.g. b"<u@d>" or b"u@d" (no brackets)
    hostile: bool = False  # malformed (NUL, control bytes, invalid UTF-8, no ">"): 5xx
    relay_trick: bool = False  # %, ! or a quoted @ in the local part: 5xx as a recipient
    ours: bool = False  # the domain is the gateway's own (else never 2xx as a recipient)
    plain: bool = False  # an ordinary address the sink accepts


_CONTROL = [bytes([c]) for c in [*range(0, 9), *range(11, 32), 127] if c != 10]
_BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf4\x90\x80\x80"]
_LOCALS = [b"docteur", b"secretariat", b"a.b", b"x+tag", b"m\xc3\xa9decin", b"O'Brien",
           b"a_b-c", b"DOCTEUR", b"1234"]
_TRICK_LOCALS = [b"u%evil.example", b"evil.example!u", b'"u@evil.example"', b"u%evil.example%",
                 b'"u@evil.example"%x', b"a!b!c", b"%", b"!"]
_ODD_LOCALS = [b'"a b"', b'"a\\"b"', b'""', b"a..b", b".a", b"a.", b"(comment)a", b"a b"]
_FOREIGN = [b"labo.example", b"evil.example", b"[127.0.0.1]", b"[IPv6:::1]", b"evil.cabinet.test",
            b"cabinet.test.evil.example", b"cabinet.tes", b"localhost", b"xn--mdecin-bva.example",
            b"d\xc3\xa9j\xc3\xa0.example"]
_OURS = [DOMAIN.encode(), DOMAIN.upper().encode(), DOMAIN.encode() + b"."]


@st.composite
def addresses(draw: st.DrawFn) -> Addr:
    kind = draw(st.sampled_from(["plain", "trick", "odd", "hostile", "long", "null", "noat",
                                 "junk"]))
    if kind == "null":
        return Addr(wire=draw(st.sampled_from([b"<>", b"< >", b"<<>>", b"<@a.example:>"])))
    if kind == "junk":  # anything but a line end
        return Addr(wire=draw(st.binary(max_size=40)).replace(b"\n", b""))
    if kind == "noat":  # no domain: local to the next hop (RFC 5321 even wants <Postmaster>)
        return Addr(wire=b"<" + draw(st.sampled_from([b"postmaster", b"Postmaster", b"abuse",
                                                       b"docteur"])) + b">", ours=True)
    ours = draw(st.booleans())
    domain = draw(st.sampled_from(_OURS if ours else _FOREIGN))
    hostile = relay_trick = False
    if kind == "trick":
        local = draw(st.sampled_from(_TRICK_LOCALS))
        relay_trick = True
    elif kind == "odd":
        local = draw(st.sampled_from(_ODD_LOCALS))
    elif kind == "long":
        local = b"a" * draw(st.integers(60, 1500))
    else:
        local = draw(st.sampled_from(_LOCALS))
    if kind == "hostile":
        # Inside the local part or the domain, never at an end (where blanks are stripped).
        bad = draw(st.sampled_from(_CONTROL + _BAD_UTF8))
        if draw(st.booleans()):
            cut = draw(st.integers(1, len(local) - 1))
            local = local[:cut] + bad + local[cut:]
        else:
            domain = domain[:1] + bad + domain[1:]
        hostile = True
    addr = local + b"@" + domain
    form = draw(st.sampled_from(["angle", "angle", "angle", "bare", "route", "unclosed",
                                 "spaced"]))
    if form == "bare":
        wire = addr
    elif form == "route":
        route = draw(st.sampled_from([b"@a.example,@b.example:", b"@" + DOMAIN.encode() + b":",
                                      b"@evil.example:"]))
        wire = b"<" + route + addr + b">"
    elif form == "unclosed":
        wire = b"<" + addr
    elif form == "spaced":
        wire = b" <" + addr + b"> "
    else:
        wire = b"<" + addr + b">"
    plain = kind == "plain" and form in ("angle", "route", "spaced") and not hostile
    return Addr(wire=wire, hostile=hostile or form == "unclosed", relay_trick=relay_trick,
                ours=ours, plain=plain)


_SENDERS = st.one_of(st.just(Addr(wire=b"<a@labo.example>", plain=True)), addresses())
_MAIL_PARAMS = [b"", b"", b" SMTPUTF8", b" BODY=8BITMIME", b" BODY=7BIT", b" SIZE=1000",
                b" SIZE=999999999999", b" BODY=BINARYMIME", b" SMTPUTF8=x", b" FOO=bar", b" SIZE=",
                b" SIZE=-1", b" RET=HDRS", b" ENVID=x", b" AUTH=<>", b" SMTPUTF8 SMTPUTF8",
                b" body=8bitmime smtputf8", b"\x00", b" \xff"]
_RCPT_PARAMS = [b"", b"", b"", b" NOTIFY=NEVER", b" ORCPT=rfc822;a@b", b" X", b" \xc3\xa9"]
_EOL = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r\r\n"])
_HELO_ARGS = st.one_of(
    st.sampled_from([b"client.example", b"[192.0.2.1]", b"", b" ", b"x" * 600, b"m\xc3\xa9l",
                     b"a\x00b", b"\xff\xfe", b"a\rb", b"<script>", b"localhost",
                     b"mx." + DOMAIN.encode()]),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")))
# Commands that do not change the transaction state (or are refused): one reply each.
_JUNK_VERBS = [b"NOOP", b"VRFY", b"EXPN", b"HELP", b"XYZZY", b"BDAT", b"AUTH", b"STARTTLS",
               b"ETRN", b"TURN", b"", b"noop", b"\xff", b"MAIL", b"RCPT", b"DATA x"]


_JUNK_ARGS = [b"x" * 2000, b"\x00", b"\r", b"@\x08", b"<<\xff", b"[\x1b[31m", b"@\xc3", b":\x7f",
              b"<a@b> \x00", b"%s%n"]


_STATEFUL = {b"HELO", b"EHLO", b"LHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"QUIT", b"BDAT",
             b"STARTTLS", b"AUTH"}


def _harmless_verb(verb: bytes) -> bool:
    return (b" " not in verb and b"\n" not in verb
            and verb.rstrip(b"\r\t\x0b\x0c").upper() not in _STATEFUL)


@st.composite
def junk_lines(draw: st.DrawFn) -> bytes:
    verb = draw(st.one_of(st.sampled_from(_JUNK_VERBS),
                          st.binary(min_size=1, max_size=12).filter(_harmless_verb)))
    if verb in (b"MAIL", b"RCPT"):  # without FROM:/TO:, refused with 501
        verb += draw(st.sampled_from([b" FRM:<a@b>", b" TOO:<a@b>", b" FROM", b" TO", b""]))
    arg = draw(st.one_of(st.just(b""), st.binary(max_size=40), st.sampled_from(_JUNK_ARGS)))
    arg = arg.replace(b"\n", b"")
    return verb + (b" " + arg if arg else b"") + draw(_EOL)


END = b"\r\n.\r\n"
_DOT_SHAPES = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n..\r\n", b"\r\n.", b".\r\n",
               b"\r\n. \r\n", b"\r\n.\r\r\n", b"\n..\n", b"\r\n.\x00\r\n"]
_SMUGGLED = [b"MAIL FROM:<evil@evil.example>\r\nRCPT TO:<docteur@" + DOMAIN.encode() + b">\r\n"
             b"DATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n",
             b"RSET\r\n", b"NOOP\r\nNOOP\r\n", b"QUIT\r\n", b"junk\r\n", b"RCPT TO:<x@evil.example>\r\n",
             b"\r\n", b"EHLO again\r\n"]
_HEADERISH = [b"From: <a@labo.example>\r\n", b"Subject: fuzz\r\n", b"X-Gateway-Action: accept\r\n",
              b"Content-Type: multipart/mixed; boundary=b\r\n", b"--b\r\n", b"--b--\r\n", b"\r\n",
              b"Content-Transfer-Encoding: base64\r\n", b"Subject: =?x-bad?Q?=FF?=\r\n",
              b"From: =?utf-8?B?####?= <\x00@x>\r\n", b"Received: from x\r\n",
              b'Content-Type: text/plain; charset="utf-8\x00"\r\n',
              b"Content-Type: text/html; charset=utf-7\r\n", b"+\x01 https://ameli.fr.example/\r\n",
              b"Subject: =?utf-8?B?=ZZw6k=?=\r\n", b"Reply-To: =?utf-8?B?QQ?= <x@evil.example>\r\n"]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """What follows 354, up to (not including) the final CRLF.CRLF: a message of header-like
    lines, random bytes, dot lines of every shape and large runs (over the size limit too),
    then maybe an early end of data followed by pipelined commands."""
    pieces = draw(st.lists(st.one_of(
        st.sampled_from(_HEADERISH),
        st.sampled_from(_DOT_SHAPES),
        st.binary(max_size=120),
        st.builds(lambda n, c: c * n, st.sampled_from([1000, 70_000, MAX_MESSAGE_BYTES + 10]),
                  st.sampled_from([b"x", b".\r\n", b"\r\n", b"\n", b"\r"])),
    ), max_size=6))
    if draw(st.booleans()):  # smuggling: what follows the first end is read as commands
        pieces.append(END)
        pieces += draw(st.lists(st.one_of(st.sampled_from(_SMUGGLED), st.sampled_from(_DOT_SHAPES),
                                          st.binary(max_size=60), st.just(END)), max_size=4))
    return b"".join(pieces)


def smuggles(body: bytes) -> bool:
    """True when the server must see an end of data before the one we append."""
    full = b"\r\n" + body + END
    return full.find(END) != len(full) - len(END)


# ---- the state machine ------------------------------------------------------------------------

class SmtpFuzz(RuleBasedStateMachine):
    live: Live  # set by the test
    runs = 0

    def __init__(self) -> None:
        super().__init__()
        self.live.take_problems()  # what earlier examples left
        self.live.drain_sink()
        # Connections an earlier (failing) example leaked are its own finding, not this one's.
        self.base_sessions = self.live.sessions
        self.base_next_hop = self.live.sink.open_connections
        self.client: Client | None = None
        self.in_data = False  # 354 received, body not sent yet
        self.delivered: list[bytes] = []  # queue ids answered "accepted and relayed"
        self.syncs = 0
        self._open()

    def _open(self) -> Client:
        client = Client(self.live.port)
        greeting = client.reply(b"<connect>")
        assert greeting is not None and greeting.code == 220, f"greeting {greeting!r}"
        self.client = client
        self.in_data = False
        return client

    def _conn(self) -> Client:
        if self.client is None or self.client.closed:
            return self._open()
        return self.client

    def _closed(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        self.in_data = False

    def _after(self, line: bytes, reply: Reply | None, kind: str, addr: Addr | None = None
               ) -> None:
        """The per-command properties, and the model's transaction state."""
        if reply is None:
            self._closed()
            return
        code = reply.code
        if kind == "mail":
            assert addr is not None
            if addr.hostile:
                assert code >= 500, f"MAIL with a malformed address got {reply.text!r}: {line!r}"
        elif kind == "rcpt":
            assert addr is not None
            if addr.hostile:
                assert code >= 500, f"RCPT with a malformed address got {reply.text!r}: {line!r}"
            if not addr.ours and not addr.hostile:
                assert code >= 400, f"relay outside our domain: {line!r} got {reply.text!r}"
            if addr.relay_trick and addr.ours and not addr.hostile:
                assert code >= 500, f"relay trick accepted: {line!r} got {reply.text!r}"
        elif kind == "data" and code == 354:
            self.in_data = True
        if code == 221 or code == 421 or reply.text.startswith(b"502 5.5.1 Too many"):
            # The server ends the session after these: it must then close.
            assert self.client is not None
            assert self.client._line() is None, "session not closed after " + repr(reply.text)
            self._closed()

    def _one(self, line: bytes, kind: str, addr: Addr | None = None) -> None:
        client = self._conn()
        client.send(line)
        self._after(line, client.reply(line), kind, addr)

    # -- commands -----------------------------------------------------------------------------

    @precondition(lambda self: not self.in_data)
    @rule(verb=st.sampled_from([b"EHLO", b"HELO", b"ehlo", b"LHLO"]), arg=_HELO_ARGS, eol=_EOL)
    def helo(self, verb: bytes, arg: bytes, eol: bytes) -> None:
        self._one(verb + (b" " + arg if arg else b"") + eol, "helo")

    @precondition(lambda self: not self.in_data)
    @rule(addr=addresses(), params=st.sampled_from(_MAIL_PARAMS), eol=_EOL,
          keyword=st.sampled_from([b"MAIL FROM:", b"mail from:", b"MAIL FROM: ", b"MAIL FROM :"]))
    def mail(self, addr: Addr, params: bytes, eol: bytes, keyword: bytes) -> None:
        line = keyword + addr.wire + params + eol
        self._one(line, "mail", addr if keyword != b"MAIL FROM :" else Addr(wire=addr.wire))

    @precondition(lambda self: not self.in_data)
    @rule(addr=addresses(), params=st.sampled_from(_RCPT_PARAMS), eol=_EOL)
    def rcpt(self, addr: Addr, params: bytes, eol: bytes) -> None:
        self._one(b"RCPT TO:" + addr.wire + params + eol, "rcpt",
                  addr if not params else Addr(wire=addr.wire, hostile=addr.hostile))

    @precondition(lambda self: not self.in_data)
    @rule(helo=_HELO_ARGS, sender=_SENDERS, rcpt=addresses())
    def transaction_start(self, helo: bytes, sender: Addr, rcpt: Addr) -> None:
        """EHLO, MAIL FROM, then a plain recipient and a fuzzed one: gets the machine to
        RCPT and DATA often, with every kind of sender."""
        steps = [(b"EHLO " + helo + b"\r\n", "helo", None),
                 (b"MAIL FROM:" + sender.wire + b"\r\n", "mail", sender),
                 (b"RCPT TO:<docteur@" + DOMAIN.encode() + b">\r\n", "rcpt",
                  Addr(wire=b"", ours=True, plain=True)),
                 (b"RCPT TO:" + rcpt.wire + b"\r\n", "rcpt", rcpt)]
        for line, kind, addr in steps:
            self._one(line, kind, addr)
            if self.client is None:
                return

    @precondition(lambda self: not self.in_data)
    @rule(sender=_SENDERS, body=bodies(), pieces=st.lists(st.integers(0, 200_000), max_size=3))
    def message(self, sender: Addr, body: bytes, pieces: list[int]) -> None:
        """A whole transaction, pipelined up to DATA, then a fuzzed body."""
        self.pipelined([("helo", b"EHLO client.example\r\n", None),
                        ("mail", b"MAIL FROM:" + sender.wire + b"\r\n", sender),
                        ("rcpt", b"RCPT TO:<docteur@" + DOMAIN.encode() + b">\r\n",
                         Addr(wire=b"", ours=True, plain=True))], then_data=True)
        if self.in_data:
            self.body(body, pieces)

    @precondition(lambda self: not self.in_data)
    @rule(arg=st.sampled_from([b"", b"", b" x"]), eol=_EOL)
    def rset(self, arg: bytes, eol: bytes) -> None:
        self._one(b"RSET" + arg + eol, "rset")

    @precondition(lambda self: not self.in_data)
    @rule(line=junk_lines())
    def junk(self, line: bytes) -> None:
        self._one(line, "junk")

    @precondition(lambda self: not self.in_data)
    @rule(arg=st.sampled_from([b"", b"", b" x"]), eol=_EOL)
    def data(self, arg: bytes, eol: bytes) -> None:
        self._one(b"DATA" + arg + eol, "data")

    @precondition(lambda self: not self.in_data)
    @rule(steps=st.lists(st.one_of(
        st.tuples(st.just("helo"), st.just(b"EHLO pipe.example\r\n"), st.none()),
        addresses().map(lambda a: ("mail", b"MAIL FROM:" + a.wire + b"\r\n", a)),
        addresses().map(lambda a: ("rcpt", b"RCPT TO:" + a.wire + b"\r\n", a)),
        st.tuples(st.just("rset"), st.just(b"RSET\r\n"), st.none()),
        junk_lines().map(lambda line: ("junk", line, None)),
    ), min_size=2, max_size=6), then_data=st.booleans())
    def pipelined(self, steps: list[tuple[str, bytes, Addr | None]], then_data: bool) -> None:
        """Several commands in one write (RFC 2920); DATA only last (it needs a reply)."""
        if then_data:
            steps = [*steps, ("data", b"DATA\r\n", None)]
        client = self._conn()
        client.send(b"".join(line for _, line, _ in steps))
        for kind, line, addr in steps:
            self._after(line, client.reply(line), kind, addr)
            if self.client is None:
                return

    # -- DATA body ----------------------------------------------------------------------------

    @precondition(lambda self: self.in_data)
    @rule(body=bodies(), pieces=st.lists(st.integers(0, 200_000), max_size=3))
    def data_body(self, body: bytes, pieces: list[int]) -> None:
        self.body(body, pieces)

    def body(self, body: bytes, pieces: list[int]) -> None:
        client = self._conn()
        self.in_data = False
        self.syncs += 1
        token = b"@sync-%d@" % self.syncs
        sync = b"VRFY " + token + b"\r\n"
        # Cuts fall anywhere, the end marker too: the chunked reader must join them.
        payload = body + END + b"RSET\r\n" + sync
        cuts = (*pieces, len(body) + 1, len(body) + 3)
        client.send(payload, cuts)
        got: list[Reply] = []
        while True:
            reply = client.reply(b"<DATA body %r...>" % body[:60])
            if reply is None:
                assert smuggles(body), f"closed after a plain body; replies {got!r}"
                self._closed()
                return
            if token in reply.text:
                break
            got.append(reply)
        assert got, "no reply at all to the end of data"
        final = got[0]
        assert final.code != 354, "end of data answered 354"
        if not smuggles(body):
            # One reply for the message, one for RSET: a bare-LF dot never ended the data.
            assert len(got) == 2, f"{len(got)} replies to one message: {[r.text for r in got]}"
            assert got[1].code == 250, f"RSET after DATA got {got[1].text!r}"
            # The size limit is on the message as unstuffed (RFC 5321 4.5.2), CRLF before the
            # final dot included; whatever the reads were.
            data = b"\r\n" + body + b"\r\n"
            unstuffed = len(data.replace(b"\r\n.", b"\r\n")) - 2
            if unstuffed > MAX_MESSAGE_BYTES:
                assert final.code == 552, f"oversized message ({unstuffed}) got {final.text!r}"
            if len(body) + 2 <= MAX_MESSAGE_BYTES:
                assert final.code != 552, f"message of {len(body) + 2} bytes got 552"
        for reply in got:
            m = re.match(rb"250 .*id=(\w+)", reply.text)
            if m and str(replies.DELIVERED).encode() in reply.text:
                self.delivered.append(m[1])

    @rule(ends=st.lists(st.sampled_from(["quit", "close", "reset", "mid-command", "mid-data"]),
                        min_size=2, max_size=14))
    def parallel(self, ends: list[str]) -> None:
        """Other clients from the same address, each holding a next-hop transaction (or
        refused one past the per-client limit), leaving in different ways at once."""
        rcpt = b"RCPT TO:<docteur@" + DOMAIN.encode() + b">\r\n"
        before = self.live.sessions
        steps = [("helo", b"EHLO other.example\r\n", None),
                 ("mail", b"MAIL FROM:<a@labo.example>\r\n", Addr(wire=b"")),
                 ("rcpt", rcpt, Addr(wire=b"", ours=True, plain=True))]
        clients = [Client(self.live.port) for _ in ends]
        for client in clients:
            assert (greeting := client.reply(b"<connect>")) and greeting.code == 220
            client.send(b"".join(line for _, line, _ in steps))
        for client in clients:
            for _, line, _ in steps:
                if client.reply(line) is None:
                    break
        for client, end in zip(clients, ends, strict=True):
            if end == "quit":
                client.send(b"QUIT\r\n")
            elif end == "mid-command":
                client.send(b"RCPT TO:<docteur@")
            elif end == "mid-data":
                client.send(b"DATA\r\nSubject: x\r\n\r\npartial")
            client.close(reset=end in ("reset", "mid-data"))
        # Their sessions (and next-hop slots) gone before the next step, whose replies would
        # otherwise depend on timing (451 for a client holding too many transactions).
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while self.live.sessions > before and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.live.sessions <= before, f"{self.live.sessions - before} session(s) left"

    # -- leaving ------------------------------------------------------------------------------

    @rule(partial=st.sampled_from([b"", b"MAIL FROM:<a@b", b"DATA\r\n", b"\r\n.", b"\x00" * 10,
                                   b"RCPT TO:<docteur@" + DOMAIN.encode() + b">"]),
          reset=st.booleans())
    def disconnect(self, partial: bytes, reset: bool) -> None:
        client = self._conn()
        client.send(partial)
        client.close(reset=reset)
        self._closed()

    @precondition(lambda self: not self.in_data)
    @rule()
    def quit(self) -> None:
        self._one(b"QUIT\r\n", "quit")

    def teardown(self) -> None:
        if self.client is not None:
            self.client.close(reset=False)
            self.client = None
        live = self.live
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while ((live.sessions > self.base_sessions
                or live.sink.open_connections > self.base_next_hop)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        problems = live.take_problems()
        assert not problems, "logged at ERROR or with a traceback:\n" + describe(problems)
        assert live.sessions <= self.base_sessions, (
            f"{live.sessions - self.base_sessions} SMTP session(s) still open")
        assert live.sink.open_connections <= self.base_next_hop, (
            f"{live.sink.open_connections - self.base_next_hop} next-hop connection(s) leaked")
        # Our Received field names the queue id (maybe folded).
        heads = [re.sub(rb"\r\n[ \t]+", b" ", data[:8192]) for data in live.drain_sink()]
        for qid in self.delivered:
            assert any(b" id " + qid in head for head in heads), (
                f"answered 'accepted and relayed' (id={qid!r}) but the sink has no such message")
        SmtpFuzz.runs += 1
        normal_delivery(live, f"after-example-{SmtpFuzz.runs}")


def normal_delivery(live: Live, tag: str) -> None:
    """A plain client still gets its message delivered."""
    live.drain_sink()
    msg = (f"From: <a@labo.example>\r\nTo: <docteur@{DOMAIN}>\r\n"
           f"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <{tag}@labo.example>\r\n"
           f"Subject: normal\r\n\r\nbonjour\r\n").encode()
    with smtplib.SMTP("127.0.0.1", live.port, timeout=REPLY_TIMEOUT_S) as smtp:
        refused = smtp.sendmail("a@labo.example", [f"docteur@{DOMAIN}"], msg)
    assert not refused
    received = live.drain_sink()
    assert any(f"<{tag}@labo.example>".encode() in data for data in received)


def test_smtp_session_fuzz(live: Live) -> None:
    SmtpFuzz.live = live
    normal_delivery(live, "before-fuzz")
    try:
        run_state_machine_as_test(
            SmtpFuzz, settings=fuzz_settings(100, stateful_step_count=12))
    finally:
        normal_delivery(live, "after-fuzz")  # never crashed nor hung, whatever was found


# =============================================================================================
# (b) The MIME walk
# =============================================================================================

PARSE_TIME_LIMIT_S = 10.0  # per message, whatever the input (they are at most a few 100 KB)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging) when the block runs longer than `seconds`."""
    def expired(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_parse(raw: bytes) -> None:
    """parse_message never raises, stays within its limits, and its parts are consistent."""
    with time_limit(PARSE_TIME_LIMIT_S):
        parsed = parse_message(raw)
        paths = [p.path for p in parsed.parts]
        assert len(set(paths)) == len(paths), f"duplicate part paths {paths}"
        assert paths[:1] == ["1"]
        assert len(parsed.parts) <= MAX_PARTS + 1, len(parsed.parts)
        for part in parsed.parts:
            assert 0 <= part.depth <= MAX_DEPTH, part
            assert 0 <= part.start <= part.body_start <= len(raw), part
            for a, b in part.spans:
                assert 0 <= a <= b <= len(raw), f"span {(a, b)} of part {part.path}: {part}"
            payload = part.payload(raw)
            assert len(payload) == part.size, (
                f"part {part.path}: size {part.size} but payload {payload[:80]!r} "
                f"({len(payload)} bytes), spans {part.spans}")
            decode_transfer(payload, part.transfer_encoding)
            if part.content_type.startswith("text/"):
                part.text(raw)  # None when it cannot be decoded, never an exception


@given(raw=st.binary(max_size=4000))
@fuzz_settings(300)
def test_mime_walk_random_bytes(raw: bytes) -> None:
    check_parse(raw)


_CHARSETS = ["utf-8", "iso-8859-1", "windows-1252", "us-ascii", "x-unknown", "utf-7", "utf-16",
             "", "UTF-8'", "gb2312", "iso-2022-jp", "utf_8\x00", "hz", "iso-2022-kr", "\xe9"]
_CTES = ["7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode", "BASE64 ", "bogus",
         ""]


def _encode(body: bytes, cte: str) -> bytes:
    cte = cte.strip().lower()
    if cte == "base64":
        return base64.encodebytes(body).replace(b"\n", b"\r\n")
    if cte == "quoted-printable":
        return quopri.encodestring(body).replace(b"\n", b"\r\n")
    return body


_WORDS = [b"=?utf-8?B?w6k=?=", b"=?x-bad?Q?=FF?=", b"=?utf-8?B?####?=", b"=?iso-8859-1?q?caf=e9?=",
          b"=?utf-8?Q?a_b?==?utf-8?Q?c?=", b"=?utf-16?B?AA?=", b"=??B??=", b"=?utf-8*fr?Q?x?=",
          b"plain", b"caf\xc3\xa9", b"\x00", b"=?utf-8?b?" + b"QUFB" * 300 + b"?=",
          b"=?utf-8?B?=ZZw6k=?="]
_PARAMS_2231 = [b"; filename*=utf-8''%C3%A9t%C3%A9.pdf", b"; filename*=x-bad''%FF.exe",
                b"; filename*0*=utf-8''a; filename*1*=%ZZ", b"; filename*=''%",
                b"; filename*=utf-8'fr'%E2%80%AEfdp.exe", b"; filename=\"=?x-bad?B?QQ==?=\"",
                b"; name*2=c; name*0=a", b"; filename*=us-ascii''\x00", b""]


@st.composite
def entities(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A well-formed MIME entity (headers, blank line, body), CRLF line ends."""
    kind = draw(st.sampled_from(["leaf", "leaf", "multipart", "message", "dsn"]
                                if depth < 6 else ["leaf"]))
    headers: list[bytes] = []
    if draw(st.booleans()):
        headers.append(b"Subject: " + b" ".join(draw(st.lists(st.sampled_from(_WORDS),
                                                             max_size=3))))
    if draw(st.booleans()):
        headers.append(b"From: " + draw(st.sampled_from(_WORDS)) + b" <a@labo.example>")
    if kind == "multipart":
        boundary = draw(st.sampled_from([b"b1", b"=_part_%d" % depth, b"----", b"a b",
                                         b"x" * 70, b"\xc3\xa9"]))
        subtype = draw(st.sampled_from([b"mixed", b"alternative", b"digest", b"related",
                                        b"signed", b"report"]))
        headers.append(b'Content-Type: multipart/' + subtype + b'; boundary="' + boundary + b'"')
        children = draw(st.lists(entities(depth + 1), max_size=4))
        body = draw(st.sampled_from([b"", b"preamble\r\n"]))
        for child in children:
            body += b"--" + boundary + b"\r\n" + child + b"\r\n"
        body += b"--" + boundary + b"--\r\n" + draw(st.sampled_from([b"", b"epilogue\r\n"]))
    elif kind == "message":
        headers.append(b"Content-Type: message/rfc822")
        body = draw(entities(depth + 1))
    elif kind == "dsn":
        headers.append(b"Content-Type: message/delivery-status")
        body = b"Reporting-MTA: dns; x\r\n\r\nFinal-Recipient: rfc822; a@b\r\nStatus: 5.0.0\r\n"
    else:
        ctype = draw(st.sampled_from([b"text/plain", b"text/html", b"application/pdf",
                                      b"application/octet-stream", b"image/png", b"text/calendar",
                                      b"application/pkcs7-mime; smime-type=enveloped-data"]))
        charset = draw(st.sampled_from(_CHARSETS)).encode("latin-1")
        cte = draw(st.sampled_from(_CTES))
        headers.append(b"Content-Type: " + ctype + (b"; charset=" + charset if charset else b""))
        if cte:
            headers.append(b"Content-Transfer-Encoding: " + cte.encode())
        if draw(st.booleans()):
            headers.append(b"Content-Disposition: attachment" + draw(st.sampled_from(_PARAMS_2231)))
        body = _encode(draw(st.binary(max_size=300)), cte)
    if draw(st.integers(0, 7)) == 0:  # a unix-from line ending the header block
        headers.append(b"From someone@labo.example Sat Nov 28 10:00:00 2026")
    # A part of headers only may end without the blank line (the boundary's CRLF follows).
    sep = b"\r\n\r\n" if body or draw(st.booleans()) else b"\r\n"
    return b"\r\n".join(headers) + sep + body


_SNIPPETS = [b"\x00", b"\x00" * 16, b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"--b1\r\n", b"--b1--\r\n",
             b"--\r\n", b"\r\n--=_part_1\r\n", b"=\r\n", b"=ZZ", b"====", b"QUJD\r\n", b"\xff\xfe",
             b"Content-Type: multipart/mixed; boundary=\"\"\r\n",
             b"Content-Type: multipart/mixed\r\n", b"Content-Type: message/rfc822\r\n\r\n",
             b"Content-Transfer-Encoding: base64\r\n", b"From x\r\n", b": \r\n", b" cont\r\n",
             b"=?x-bad?B?QQ?=", b"=?utf-8?Q?=C3?=", b"\r\n.\r\n", b"\n.\n", b"\t", b"X-Huge: ",
             b"Content-Type: text/plain; charset*=x''a\r\n", b"\xe2\x80\xae"]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    raw = bytearray(b"From: <a@labo.example>\r\nMessage-ID: <m@labo.example>\r\n"
                    + draw(entities()))
    if draw(st.booleans()):
        raw = bytearray(raw.replace(b"\r\n", draw(st.sampled_from([b"\n", b"\r", b"\r\n"]))))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["insert", "insert", "delete", "flip", "dup", "truncate",
                                   "huge"]))
        at = draw(st.integers(0, len(raw)))
        if op == "insert":
            raw[at:at] = draw(st.sampled_from(_SNIPPETS))
        elif op == "delete":
            del raw[at:at + draw(st.integers(1, 40))]
        elif op == "flip" and at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "dup":
            n = draw(st.integers(1, 200))
            raw[at:at] = raw[at:at + n] * draw(st.integers(1, 50))
        elif op == "truncate":
            del raw[at:]
        elif op == "huge":  # a header or body line of 100 KB, or many short header lines
            raw[at:at] = draw(st.sampled_from([b"X-Huge: " + b"a" * 100_000 + b"\r\n",
                                               b"X-A: b\r\n" * 20_000, b"-" * 100_000,
                                               b"--b1\r\n" * 5_000]))
    return bytes(raw)


@given(raw=mutated_messages())
@fuzz_settings(300)
def test_mime_walk_mutated_messages(raw: bytes) -> None:
    check_parse(raw)


_ENCODED_WORDS = st.builds(
    "=?{}?{}?{}?=".format,
    st.sampled_from(["utf-8", "iso-8859-1", "x-bad", "utf-16", "", "utf-8*fr", "UTF-8"]),
    st.sampled_from(["B", "b", "Q", "q", "X"]),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_%?", max_size=12))


@given(value=st.one_of(
    st.lists(st.one_of(st.sampled_from([w.decode("latin-1") for w in _WORDS]
                                       + [" ", "\t", "?", "=", "\udcff"]), _ENCODED_WORDS),
             max_size=6).map("".join),
    st.text(max_size=80)))
@fuzz_settings(300)
def test_decode_words_raises_only_documented_errors(value: str) -> None:
    """decode_words: 'raises ValueError/LookupError on broken ones' (gateway/message.py)."""
    with time_limit(PARSE_TIME_LIMIT_S), contextlib.suppress(ValueError, LookupError):
        decode_words(value)


# The banner is applied to the parse result of every message tagged suspect; the pipeline
# logs any exception from it as a bug and sends the message without its banner.
_TEMPLATES = banner.load_templates(DEFAULT_RULES_DIR / "banner.toml")
_WARNING = banner.Warning(style=_TEMPLATES.suspect, reasons=("Message suspect.",))
_MARK = banner.marker(b"fuzz secret")


@given(raw=mutated_messages())
@fuzz_settings(200)
def test_banner_on_mutated_messages(raw: bytes) -> None:
    with time_limit(PARSE_TIME_LIMIT_S):
        result = banner.apply(raw, parse_message(raw), _WARNING, _TEMPLATES, _MARK)
        parse_message(result.raw)


# =============================================================================================
# Regressions: what the fuzz targets found (each the smallest input showing it)
# =============================================================================================

def _session(live: Live, *lines: bytes) -> list[Reply | None]:
    """One connection: each line sent, its reply read and checked (check_reply)."""
    client = Client(live.port)
    try:
        out = [client.reply(b"<connect>")]
        for line in lines:
            client.send(line)
            out.append(client.reply(line))
        return out
    finally:
        client.close()


def _start(live: Live) -> tuple[int, int]:
    """A clean slate: earlier logs and deliveries dropped; the open sessions and next-hop
    connections now (none, unless an earlier test leaked some)."""
    live.take_problems()
    live.drain_sink()
    return live.sessions, live.sink.open_connections


def _settled(live: Live, before: tuple[int, int]) -> list[logging.LogRecord]:
    """What was logged at ERROR or with a traceback, once every session and next-hop
    connection opened since `before` is closed (asserted)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while ((live.sessions > before[0] or live.sink.open_connections > before[1])
           and time.monotonic() < deadline):
        time.sleep(0.01)
    assert live.sessions <= before[0], "SMTP session(s) left open"
    assert live.sink.open_connections <= before[1], "next-hop connection(s) leaked"
    return live.take_problems()


def test_null_reverse_path_is_relayed(live: Live) -> None:
    """MAIL FROM:<> (bounces, read receipts; RFC 5321 4.5.5) was taken, then RCPT got
    451 4.3.0 with a traceback: the gateway handed "<>" to aiosmtplib as the sender
    (ValueError: Address '<>' contains characters not permitted in an SMTP mailbox)."""
    before = _start(live)
    msg = (b"From: <mailer-daemon@labo.example>\r\nSubject: Undelivered\r\n"
           b"Message-ID: <dsn@labo.example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0100\r\n\r\nx\r\n")
    replies_ = _session(live, b"EHLO labo.example\r\n", b"MAIL FROM:<>\r\n",
                        b"RCPT TO:<docteur@" + DOMAIN.encode() + b">\r\n", b"DATA\r\n",
                        msg + b".\r\n")
    assert [r.code if r else None for r in replies_] == [220, 250, 250, 250, 354, 250]
    assert not (problems := _settled(live, before)), describe(problems)
    received = [d for d in live.drain_sink() if b"<dsn@labo.example>" in d]
    assert len(received) == 1


@pytest.mark.parametrize("line", [b"\x00\r\n", b"X\x1b[2J\r\n", b"VRFY @\x08\r\n",
                                  b"VRFY @\rRCPT\r\n"])
def test_replies_do_not_echo_control_characters(live: Live, line: bytes) -> None:
    """aiosmtpd echoes the client's text in '500 Error: command "..." not recognized' and
    '502 Could not VRFY ...', control characters (NUL, ESC, a bare CR) included: not an
    RFC 5321 reply text, and a way to write into the client's logs and terminal."""
    _start(live)
    assert _session(live, b"EHLO c.example\r\n", line)[-1] is not None  # checked in reply()


def test_vrfy_with_undecodable_bytes_has_no_traceback(live: Live) -> None:
    """VRFY <<\\xff: aiosmtpd echoes the argument (decoded with surrogateescape) in
    '502 Could not VRFY', whose encoding raises UnicodeEncodeError: logged as an SMTP session
    error with its traceback, and the client reads 451 4.3.0."""
    before = _start(live)
    assert _session(live, b"EHLO c.example\r\n", b"VRFY <<\xff\r\n")[-1] is not None
    assert not (problems := _settled(live, before)), describe(problems)


_NUL_CHARSET = (b"From: <a@labo.example>\r\nTo: <docteur@cabinet.test>\r\n"
                b"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <nul@labo.example>\r\n"
                b'Subject: x\r\nContent-Type: text/plain; charset="utf-8\x00"\r\n\r\n'
                b"bonjour https://example.org/\r\n")


def test_part_text_with_nul_in_charset_is_none() -> None:
    """Part.text is documented to return None for an unknown charset; with a NUL (or an
    8-bit byte, decoded as a surrogate) in the charset, codecs.lookup raises ValueError
    ('embedded null character') out of text_codec."""
    parsed = parse_message(_NUL_CHARSET)
    assert parsed.parts[0].text(_NUL_CHARSET) is None
    latin = _NUL_CHARSET.replace(b"utf-8\x00", b"utf-8\xe9")
    # Unreadable as a charset parameter, it is no charset at all (us-ascii): no error either.
    assert parse_message(latin).parts[0].text(latin) in (None, "bonjour https://example.org/\r\n")


_BROKEN_REPLY_TO = (b"From: <a@labo.example>\r\nTo: <docteur@cabinet.test>\r\n"
                   b"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <rt@labo.example>\r\n"
                   b"Reply-To: =?utf-8?B?=ZZw6k=?= <x@evil.example>\r\nSubject: x\r\n\r\nbonjour\r\n")


@pytest.mark.parametrize("msg", [_NUL_CHARSET, _BROKEN_REPLY_TO], ids=["nul-charset", "reply-to"])
def test_hostile_fields_do_not_disable_checks(live: Live, msg: bytes) -> None:
    """nul-charset: through the gateway, Part.text's ValueError stops the impersonation check
    (its link extraction reads the text). reply-to: decode_words raises HeaderParseError (not
    the ValueError/LookupError it documents) on a broken base64 word, which the impersonation
    check's Reply-To reading does not expect. Either way: 'check impersonation failed' with a
    traceback, and the message goes on with IMPERSONATION_ERROR (score 0): unchecked."""
    before = _start(live)
    with smtplib.SMTP("127.0.0.1", live.port, timeout=REPLY_TIMEOUT_S) as smtp:
        smtp.sendmail("a@labo.example", [f"docteur@{DOMAIN}"], msg)
    problems = _settled(live, before)
    message_id = re.search(rb"Message-ID: (<[^>]+>)", msg)
    assert message_id is not None
    received = [d for d in live.drain_sink() if message_id[1] in d]
    assert len(received) == 1
    assert not problems, describe(problems)
    head = re.sub(rb"\r\n[ \t]+", b" ", received[0].split(b"\r\n\r\n")[0])
    assert not re.search(rb"X-Gateway-Symbols:.*_ERROR", head), head


def test_decode_words_on_broken_base64_raises_documented_errors() -> None:
    """decode_words is documented to raise ValueError/LookupError on broken words; on bad
    base64 it raises email.errors.HeaderParseError, which its callers (banner.tag_subject,
    the impersonation check) do not catch."""
    with contextlib.suppress(ValueError, LookupError):
        decode_words("=?utf-8?B?=ZZw6k=?=")


def test_suspect_message_with_broken_encoded_subject_is_delivered(live: Live) -> None:
    """A message scored 'tag' (here: no From, Date nor Message-ID: 5.0) whose Subject holds a
    broken base64 word: banner.apply raises HeaderParseError from tag_subject, the pipeline's
    fallback calls tag_subject again, which raises again, out of the pipeline: 'SMTP session
    error' with a traceback and 451 4.3.0 on every retry, so the message is never delivered."""
    before = _start(live)
    msg = b"Subject: =?utf-8?B?=ZZw6k=?=\r\nTo: <docteur@cabinet.test>\r\n\r\nbonjour\r\n"
    replies_ = _session(live, b"EHLO c.example\r\n", b"MAIL FROM:<a@labo.example>\r\n",
                        b"RCPT TO:<docteur@" + DOMAIN.encode() + b">\r\n", b"DATA\r\n",
                        msg + b".\r\n")
    assert replies_[-1] is not None and replies_[-1].code == 250, replies_[-1]
    assert not (problems := _settled(live, before)), describe(problems)
    received = live.drain_sink()
    assert len(received) == 1 and b"X-Gateway-Action: tag" in received[0]


def test_unix_from_line_before_boundary_keeps_spans_consistent() -> None:
    """A part whose header block ends with a unix-from line, then the blank line, then the
    boundary: the blank line is both the header gap and the boundary's line break, and the
    part gets spans ((56, 64), (66, 64)): an inverted span, size 6 but payload() 8 bytes
    (b'From x\\r\\n'), where CPython's payload is 'From x'."""
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nX: a\r\nFrom x\r\n\r\n--b--\r\n")
    part = parse_message(raw).parts[1]
    assert all(a <= b for a, b in part.spans), part.spans
    assert part.payload(raw) == b"From x"
    assert part.size == 6


@pytest.mark.parametrize("charset, body", [("utf-7", b"bonjour +\x01\r\n"),
                                           ("hz", b"~{\x01\r\n")])
def test_banner_with_ill_formed_stateful_charset(charset: str, body: bytes) -> None:
    """UTF-7, HZ and ISO-2022 shift into other characters on "+", "~" or an escape: an
    ill-formed shift made banner.apply raise, and the suspect message went out without its
    banner and with a traceback. Such a charset is now not an editable one."""
    raw = (b"From: <a@labo.example>\r\nSubject: x\r\nContent-Type: text/plain; charset="
           + charset.encode() + b"\r\n\r\n" + body)
    # Now such a charset is not one whose text can be edited (text_codec): the part is left
    # as it is, like one in an unknown charset, and the subject carries the warning.
    result = banner.apply(raw, parse_message(raw), _WARNING, _TEMPLATES, _MARK)
    assert not result.body_changed
    assert b"Subject: [SUSPECT] x" in result.raw
