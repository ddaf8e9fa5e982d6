"""Mass mailing sent outside the rules of mass mailing: signs of spam whatever it sells.

- a message with only an HTML body and no text version (rspamd's MIME_HTML_ONLY): mail
  programs and mailing services write both, bulk-sending scripts often only the HTML;
- an HTML message that offers to unsubscribe in its footer but carries no List-Unsubscribe
  field, from a sender whose domain neither sent nor signed it: since 2024 the large mailbox
  providers require that field (RFC 2369, one-click RFC 8058) and that authentication of
  every bulk sender, so mass mail without them is sent by those who do not follow them.

Weak signs, each: they add to the others. Facts from the MIME tree and phase 1's text.
"""

from __future__ import annotations

from typing import ClassVar

from gateway.auth.dmarc import sender_verified
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services, Unavailable
from gateway.checks.content import message_content
from gateway.checks.disguise import mixed_words
from gateway.config import read_toml
from gateway.errors import ConfigError
from gateway.message import Direction, ParsedMessage
from gateway.senders import any_word, fold

FOOTER = 2000  # characters at the end of the text where mass mail offers to unsubscribe
MAX_TEXT = 50_000  # characters of the text read for disguised words


class BulkCheck:
    name: ClassVar[str] = "bulk"
    phase: ClassVar[int] = 2
    produces: ClassVar[type[Facts] | None] = None
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({"MIME_HTML_ONLY", "BULK_NO_UNSUBSCRIBE_HEADER",
                                                   "BODY_DISGUISED_LETTERS"})

    def __init__(self, services: Services) -> None:
        rules = services.cfg.rules_dir
        words = read_toml(rules / "lures.toml")
        try:
            self._unsubscribe = any_word(words["unsubscribe_words"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{rules}/lures.toml: {exc}") from None

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        hits: list[Hit] = []
        bodies = {p.content_type for p in msg.parts
                  if not p.is_multipart and p.disposition != "attachment" and not p.filename}
        if "text/html" in bodies and "text/plain" not in bodies:
            hits.append(Hit(symbol="MIME_HTML_ONLY"))
        # Only mass mail's shape (HTML) and its footer; not a sender whose domain sent or
        # signed it (a practice's software reminding of appointments is transactional, and
        # answerable for what it sends).
        signed = sender_verified(ctx, msg.from_domain)
        if "text/html" in bodies and msg.header("List-Unsubscribe") is None and not signed:
            content = message_content(ctx)
            if not isinstance(content, Unavailable):
                found = self._unsubscribe.search(fold(content.text[-FOOTER:]))
                if found:
                    hits.append(Hit(symbol="BULK_NO_UNSUBSCRIBE_HEADER", detail=found.group(0),
                                    args=(("passage", found.group(0)[:80]),)))
        # Words that mix Latin with letters passing for it ("Micrоsoft" with a Cyrillic о),
        # twice or more in the text: written to slip past filters, never typed so.
        if not signed:
            content = message_content(ctx)
            if not isinstance(content, Unavailable) and not content.text.isascii():
                words = mixed_words(content.text[:MAX_TEXT], 2)
                if len(words) >= 2:
                    shown = words[0][:40]
                    hits.append(Hit(symbol="BODY_DISGUISED_LETTERS", detail=shown,
                                    args=(("word", shown),)))
        return CheckResult(check=self.name, hits=tuple(hits))


CHECKS = (BulkCheck,)
