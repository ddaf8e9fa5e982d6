"""The readable text and the links of an inbound message, read once for the checks of phase 2
that judge them (impersonation and brands, link reputation): gateway/links.py does the work,
in a thread of the worker pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gateway.checks.attachments import AttachmentFacts
from gateway.checks.base import CheckContext, CheckResult, Facts, Services, Unavailable
from gateway.links import Content, Link, extract, host_of
from gateway.message import Direction, ParsedMessage


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
        content = await self._workers.run(extract, ctx.inbound.raw, msg, limit_s=self._limit_s)
        return CheckResult(check=self.name, facts=ContentFacts(content=content))


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
