"""Links and readable text of a message, for the impersonation check (CPU work: worker pool).

HTML is read with the standard library's HTML parser (a real tokenizer, not regexes): each
<a href> with the text it shows. Text parts are searched for URLs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html.parser
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from gateway.message import ParsedMessage

MAX_TEXT = 200_000  # characters of readable text looked at per message
MAX_LINKS = 500
PAGE_NAMES = (".html", ".htm", ".shtml", ".xhtml", ".svg")

_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()]+", re.IGNORECASE)
_DOMAINISH = re.compile(r"^(?:https?://)?(?:www\.)?([a-z0-9.-]+\.[a-z]{2,})(?:[/:?#].*)?$",
                        re.IGNORECASE)


_SCRIPT_SCHEMES = frozenset({"data", "javascript", "vbscript"})
_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*):", re.IGNORECASE)
_BREAKS = str.maketrans("", "", "\t\r\n")
_AROUND = "".join(chr(c) for c in range(33))  # C0 controls and space
_SLASHES = "/\\"
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_NO_OP = re.compile(r"javascript:\s*(void\s*\(?\s*0\s*\)?\s*;?|;|)\s*$", re.IGNORECASE)
MAX_HREF = 2048  # characters of an address kept (the host is at its start)


def normalise(href: str) -> str:
    """An address as a browser reads it: spaces and control characters around it dropped,
    tabs and line breaks inside removed, and for http(s) the slashes after the scheme taken
    whatever they are (https:\\host and https:host go to host)."""
    href = href[:MAX_HREF].strip(_AROUND)
    if "\t" in href or "\n" in href or "\r" in href:
        href = href.translate(_BREAKS)
    scheme = scheme_of(href)
    if scheme in ("http", "https"):
        rest = href[len(scheme) + 1:]
        if not rest.startswith("//") or rest[2:3] in ("/", "\\"):
            href = scheme + "://" + rest.lstrip(_SLASHES)
    return href


def scheme_of(href: str) -> str:
    m = _SCHEME.match(href)
    return m.group(1).lower() if m else ""


def _with_scheme(url: str) -> str:
    return url if scheme_of(url) else "http://" + url


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    href: str
    host: str  # lower case, no port; "" when the URL has none
    text: str  # what the reader sees ("" for text-part URLs and QR codes)
    qr: bool = False  # read from a QR code in an image or a PDF

    @staticmethod
    def from_qr(url: str) -> Link:
        return Link(href=url, host=host_of(url), text="", qr=True)

    @property
    def is_script(self) -> bool:
        """A page or a script in the link itself (data:, javascript:), not a site."""
        return scheme_of(self.href) in _SCRIPT_SCHEMES

    @property
    def userinfo(self) -> str:
        """What stands before an "@" in the address's site part (https://www.ameli.fr@x.example/):
        a reader takes it for the site, the browser goes to what follows."""
        try:
            netloc = urllib.parse.urlsplit(_with_scheme(self.href)).netloc
        except ValueError:
            return ""
        user, sep, _ = netloc.rpartition("@")
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
    """The host an address leads to, as a browser resolves it: backslashes are slashes,
    percent escapes and Unicode full stops decoded, IDNA form, lower case."""
    return _host(_with_scheme(normalise(url)))


def _host(url: str) -> str:
    """host_of for an address already normalised, with its scheme."""
    scheme = scheme_of(url)
    if scheme not in ("http", "https"):
        return ""
    if "\\" in url:
        url = url.replace("\\", "/")
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return ""
    if not host.isascii() or "%" in host:  # the common case skips the decoding
        host = urllib.parse.unquote(host).translate(_DOTS).lower()
        with contextlib.suppress(UnicodeError):
            host = host.encode("idna").decode("ascii")
    host = host.rstrip(".")
    return host[-253:] if len(host) > 253 else host  # not a DNS name: kept short


class _Html(html.parser.HTMLParser):
    """Text and links of an HTML part. A link is taken at its opening tag (a missing </a>
    does not hide it): <a> and <area> href, <form> action, <button>/<input> formaction,
    <iframe>/<frame> src, and a <meta> refresh; an <a>'s text is added at its </a>."""

    _TARGETS = {"a": "href", "area": "href", "form": "action", "iframe": "src", "frame": "src",
                "button": "formaction", "input": "formaction",
                # Outlook's VML shapes (a button drawn for Outlook): a click opens their href.
                "v:roundrect": "href", "v:rect": "href", "v:oval": "href", "v:shape": "href"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.links: list[Link] = []
        self._open: int | None = None  # index in links of the <a> being read
        self._anchor: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
            return
        if tag not in self._TARGETS and tag != "meta":  # most tags: nothing to read
            return
        values = {k: v for k, v in attrs if v}
        if tag == "meta" and values.get("http-equiv", "").lower() == "refresh":
            _, _, target = values.get("content", "").partition("=")
            self._add(target.strip(" '\""))
            return
        attr = self._TARGETS.get(tag)
        if attr is not None and attr not in values and "xlink:href" in values:
            attr = "xlink:href"  # SVG 1.1's <a xlink:href>
        if attr is None or attr not in values or len(self.links) >= MAX_LINKS:
            return
        added = self._add(values[attr])
        if tag == "a":
            self._open = len(self.links) - 1 if added else None
            self._anchor = []

    def _add(self, href: str) -> bool:
        href = normalise(href)
        scheme = scheme_of(href)
        if scheme in ("http", "https") or (not scheme and href.lower().startswith("www.")):
            self.links.append(Link(href=href, host=_host(_with_scheme(href)), text=""))
            return True
        if scheme in _SCRIPT_SCHEMES and not _NO_OP.match(href):
            self.links.append(Link(href=href[:200], host="", text=""))
            return True
        return False

    def handle_comment(self, data: str) -> None:
        # Outlook shows what a conditional comment holds (<!--[if mso]> ... <![endif]-->):
        # its links count, the button drawn there in VML for Outlook alone included (other
        # readers, and filters that skip comments, never see where that one goes).
        if self._skip or data[:3].lower() != "[if" or len(self.links) >= MAX_LINKS:
            return
        inner = _Html()
        with contextlib.suppress(AssertionError, ValueError):
            inner.feed(data.partition("]>")[2])
            inner.close()
        self.links += inner.links[:MAX_LINKS - len(self.links)]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        elif tag == "a" and self._open is not None:
            text = " ".join("".join(self._anchor).split())
            self.links[self._open] = dataclasses.replace(self.links[self._open], text=text)
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text.append(data)
        if self._open is not None:
            self._anchor.append(data)


def extract(raw: bytes, parsed: ParsedMessage) -> Content:
    texts: list[str] = []
    links: list[Link] = []
    size = 0
    for part in parsed.parts:
        if part.is_multipart or size > MAX_TEXT:
            continue
        # HTML and SVG files are pages the reader opens in a browser: their links count as
        # the body's (whatever type they are sent as: .html attachments often come as
        # application/octet-stream). Plain text attachments are documents, not read here.
        page = part.content_type in ("text/html", "image/svg+xml") or \
            (part.filename or "").lower().endswith(PAGE_NAMES)
        if not page and (part.content_type != "text/plain" or part.disposition == "attachment"):
            continue
        text = part.text(raw)
        if text is None:
            continue
        text = text[:MAX_TEXT]
        if page:
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
