"""Links and readable text of a message, for the impersonation check (CPU work: worker pool).

HTML is read with the standard library's HTML parser (a real tokenizer, not regexes): each
<a href> with the text it shows. Text parts are searched for URLs.
"""

from __future__ import annotations

import html.parser
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from gateway.message import ParsedMessage

MAX_TEXT = 200_000  # characters of readable text looked at per message
MAX_LINKS = 500

_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()]+", re.IGNORECASE)
_DOMAINISH = re.compile(r"^(?:https?://)?(?:www\.)?([a-z0-9.-]+\.[a-z]{2,})(?:[/:?#].*)?$",
                        re.IGNORECASE)


_SCRIPT_SCHEMES = ("data:", "javascript:", "vbscript:")


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    href: str
    host: str  # lower case, no port; "" when the URL has none
    text: str  # what the reader sees ("" for text-part URLs)

    @property
    def is_script(self) -> bool:
        """A page or a script in the link itself (data:, javascript:), not a site."""
        return self.href.lstrip().lower().startswith(_SCRIPT_SCHEMES)

    @property
    def userinfo(self) -> str:
        """What stands before an "@" in the address's site part (https://www.ameli.fr@evil.example/):
        a reader takes it for the site, the browser goes to what follows."""
        try:
            parts = urllib.parse.urlsplit(self.href if "//" in self.href
                                          else "http://" + self.href)
        except ValueError:
            return ""
        user, sep, _ = parts.netloc.rpartition("@")
        return user if sep else ""

    @property
    def shown_host(self) -> str:
        """The domain the visible text shows, when it looks like one."""
        m = _DOMAINISH.match(self.text.strip())
        return m.group(1).lower().rstrip(".") if m else ""

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host.strip("[]"))
        except ValueError:
            return False
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Content:
    text: str  # readable text of the body parts (HTML without its tags), bounded
    links: tuple[Link, ...]


def host_of(url: str) -> str:
    if url.lower().startswith("www."):
        url = "http://" + url
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return ""
    return host.lower().rstrip(".")


class _Html(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.links: list[Link] = []
        self._href: str | None = None
        self._anchor: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "a":
            self._href = next((v for k, v in attrs if k == "href" and v), None)
            self._anchor = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        elif tag == "a" and self._href is not None:
            href = self._href.strip()
            text = " ".join("".join(self._anchor).split())
            if href.lower().startswith(("http://", "https://", "www.")):
                self.links.append(Link(href=href, host=host_of(href), text=text))
            elif href.lower().startswith(_SCRIPT_SCHEMES):
                self.links.append(Link(href=href[:200], host="", text=text))
            self._href = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text.append(data)
        if self._href is not None:
            self._anchor.append(data)


def extract(raw: bytes, parsed: ParsedMessage) -> Content:
    texts: list[str] = []
    links: list[Link] = []
    size = 0
    for part in parsed.parts:
        if part.is_multipart or part.disposition == "attachment" or size > MAX_TEXT:
            continue
        if part.content_type not in ("text/plain", "text/html"):
            continue
        text = part.text(raw)
        if text is None:
            continue
        text = text[:MAX_TEXT]
        if part.content_type == "text/html":
            doc = _Html()
            try:
                doc.feed(text)
                doc.close()
            except (AssertionError, ValueError):  # the stdlib parser's own limits
                pass
            text = " ".join("".join(doc.text).split())
            links += doc.links
        else:
            links += [Link(href=u, host=host_of(u), text="") for u in _URL.findall(text)]
        texts.append(text)
        size += len(text)
    return Content(text="\n".join(texts)[:MAX_TEXT], links=tuple(links[:MAX_LINKS]))
