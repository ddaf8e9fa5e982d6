"""The readable text and the links of an inbound message, read once for the checks of phase 2
that judge them (impersonation and brands, link reputation, fraud): gateway/links.py does the
work, in a thread of the worker pool, or a worker process for large HTML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gateway.checks.attachments import AttachmentFacts
from gateway.checks.base import CheckContext, CheckResult, Facts, Services, Unavailable
from gateway.links import PAGE_NAMES, Content, Link, extract, host_of
from gateway.message import Direction, ParsedMessage

KILLABLE_HTML_BYTES = 32_768  # HTML past this size is read in a worker process
UNBALANCED_FROM_BYTES = 2_048  # smaller HTML is read in a thread whatever it holds
UNBALANCED_TAGS = 32  # "<" more than ">": markup the parser may read in quadratic time


@dataclass(frozen=True, slots=True, kw_only=True)
class ContentFacts(Facts):
    content: Content  # the bodies' (and HTML files') text and links


class ContentCheck:
    name: ClassVar[str] = "content"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = ContentFacts
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, services: Services) -> None:
        self._workers = services.workers
        self._limit_s = services.cfg.timeouts.impersonation_s

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        # The standard library's HTML parser is quadratic on some malformed markup (CPython
        # issue 135661): large HTML, or HTML whose "<" outnumber its ">", is read in a worker
        # process killed past the limit, never in a thread of the pool (which cannot be
        # stopped, and holds the interpreter's lock the SMTP sessions need).
        risky = _risky_html(msg, ctx.inbound.raw)
        run = self._workers.run_killable if risky else self._workers.run
        content = await run(extract, ctx.inbound.raw, msg, limit_s=self._limit_s)
        return CheckResult(check=self.name, facts=ContentFacts(content=content))


def _risky_html(msg: ParsedMessage, raw: bytes) -> bool:
    html = [p for p in msg.parts if not p.is_multipart and (
        p.content_type in ("text/html", "image/svg+xml")
        or (p.filename or "").lower().endswith(PAGE_NAMES))]
    if sum(p.size for p in html) > KILLABLE_HTML_BYTES:
        return True
    for part in html:
        if part.size < UNBALANCED_FROM_BYTES:
            continue  # quadratic in its size: small is cheap whatever it holds
        if (part.transfer_encoding or "").lower() == "base64":
            return True  # its markup cannot be counted without decoding it
        payload = part.payload(raw)
        if payload.count(b"<") - payload.count(b">") > UNBALANCED_TAGS:
            return True
    return False


def message_content(ctx: CheckContext) -> Content | Unavailable:
    """What phase 2 judges: the message's text and links, with the links found in its files
    (QR codes in images and PDFs, a PDF's links: a phone or a PDF reader opens them too)."""
    facts = ctx.facts(ContentFacts)
    if isinstance(facts, Unavailable):
        return facts
    content = facts.content
    files = ctx.facts(AttachmentFacts)
    if isinstance(files, AttachmentFacts) and (files.qr_links or files.links):
        content = Content(text=content.text, links=content.links + tuple(
            Link.from_qr(url) for url in files.qr_links) + tuple(
            Link(href=url, host=host_of(url), text="") for url in files.links))
    return content


CHECKS = (ContentCheck,)
