"""How a sender disguises itself, whoever it claims to be: the signs generic phishing and fraud
share and genuine mail almost never shows (rspamd's header rules do the same work).

- letters that only look like letters (mathematical bold, full-width), Latin words mixed with
  Cyrillic or IPA letters, invisible characters inside words, in the sender's name or subject;
- a sender's name that shows another address or domain than the one it writes from;
- a free-mail address that names itself as an organisation (a bank, a support team, a
  practice, a lab), above all one whose replies go elsewhere (fraud with no link);
- replies sent to a free-mail address by an organisation's address;
- the recipient's own address pasted into the subject;
- random letter-and-digit strings in the sender's name, subject or address (per-recipient
  tokens that defeat filters matching identical mail, throw-away senders);
- a subject that says "Re:" on a message that answers nothing (no In-Reply-To, References
  or Thread-Index: rspamd's FAKE_REPLY), to pass as a conversation already going on;
- a From address whose domain cannot exist on the Internet (one label, characters no host
  name has): written by a bulk-sending script, never by a mail system (rspamd's
  HFILTER_FROMHOST_NOT_FQDN).

Facts from the headers only (no lookup, no body pass): cheap, on the event loop.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import unicodedata
from typing import ClassVar

from gateway.auth.dmarc import org_domain
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.config import read_toml
from gateway.errors import ConfigError
from gateway.message import Direction, ParsedMessage, header_addresses, readable
from gateway.senders import any_word, fold

# Greek capitals that read as Latin ones (ΚYC); lower-case Greek is how lab results are
# written (β-HCG, γGT) and is left alone.
_GREEK_LATIN = frozenset("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ")
_ADDRESS = re.compile(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)")
_TOKEN = re.compile(r"[A-Za-z0-9]{10,}")
# "Re:" as mail programs write it in French, English, German, Spanish/Portuguese, Dutch.
_REPLY = re.compile(r"\s*(?:re|aw|res|rif|antw)\s?(?:\[\d+\])?\s?:", re.IGNORECASE)
_THREAD = ("In-Reply-To", "References", "Thread-Index", "Thread-Topic")
MAX_FIELD = 1000  # characters of a name or subject looked at


class DisguiseCheck:
    name: ClassVar[str] = "disguise"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = None
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({
        "DISGUISED_LETTERS", "FROM_NAME_OTHER_ADDRESS", "FREEMAIL_ORGANISATION_NAME",
        "FREEMAIL_HEALTH_REPLY_ELSEWHERE", "REPLYTO_FREEMAIL", "SUBJECT_HAS_RECIPIENT",
        "RANDOM_TOKEN", "FROM_DOMAIN_INVALID", "FAKE_REPLY",
    })

    def __init__(self, services: Services) -> None:
        self._own = frozenset(d.lower() for d in services.cfg.domains)
        rules = services.cfg.rules_dir
        lists = read_toml(rules / "domain-lists.toml")
        words = read_toml(rules / "lures.toml")
        try:
            self._freemail = frozenset(str(d).lower() for d in lists["freemail"])
            self._org_words = any_word(words["organisation_words"])
            self._health_words = any_word(words["health_words"])
        except (KeyError, TypeError, re.error) as exc:
            raise ConfigError(f"{rules}: domain-lists.toml or lures.toml: {exc}") from None

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        hits: list[Hit] = []
        name = readable(msg.from_display[:MAX_FIELD])
        subject = readable(msg.subject[:MAX_FIELD])
        address = readable(msg.from_addresses[0]).lower() if msg.from_addresses else ""
        domain = address.rpartition("@")[2].rstrip(".>")
        # A copier or a NAS on the practice's own network writes from its device name
        # (scanner@RICOH-MPC3004): not a sign from there.
        if address and not _internet_domain(domain) and not _local_peer(ctx.inbound.peer_ip):
            shown = readable(domain[:100]) or "(vide)"
            hits.append(Hit(symbol="FROM_DOMAIN_INVALID", detail=shown,
                            args=(("domain", shown),)))
        # The address too: a domain written in mathematical bold or mixed scripts shows a
        # brand's name to the reader and is nobody's.
        for field, text in (("From", f"{name} {address}"), ("Subject", subject)):
            how = _disguised(text)
            if how:
                hits.append(Hit(symbol="DISGUISED_LETTERS", detail=f"{field}: {how}",
                                args=(("field", _FIELDS[field]),)))
                break
        # A list server rewrites From ("Marie (marie@x.fr) via liste") and sets Reply-To to
        # the list or the poster: those signs say nothing of list mail.
        listed = msg.header("List-Id") is not None
        shown = "" if listed else _other_address(name, domain)
        if shown:
            hits.append(Hit(symbol="FROM_NAME_OTHER_ADDRESS", detail=f"shows {shown}",
                            args=(("shown", shown), ("domain", domain))))
        reply_to = [] if listed else msg.reply_to()
        elsewhere = [a for a in reply_to if not self._same_person(address, a)]
        freemail = org_domain(domain) in self._freemail if domain else False
        if freemail and name:
            folded = fold(name)
            if self._health_words.search(folded) and elsewhere:
                hits.append(Hit(symbol="FREEMAIL_HEALTH_REPLY_ELSEWHERE",
                                detail=f"{domain}, replies to {elsewhere[0]}",
                                args=(("domain", domain), ("reply", elsewhere[0]))))
            elif self._org_words.search(folded):
                hits.append(Hit(symbol="FREEMAIL_ORGANISATION_NAME", detail=domain,
                                args=(("domain", domain),)))
        if domain and not freemail:
            free = next((a for a in elsewhere
                         if org_domain(a.rpartition("@")[2]) in self._freemail), None)
            if free is not None:
                hits.append(Hit(symbol="REPLYTO_FREEMAIL", detail=free, args=(("reply", free),)))
        recipient = _recipient_in(subject, msg, ctx.inbound.rcpts)
        if recipient:
            hits.append(Hit(symbol="SUBJECT_HAS_RECIPIENT", detail=recipient,
                            args=(("address", recipient),)))
        token = next((t for text in (name, subject) for t in _TOKEN.findall(text)
                      if _random(t)), None)
        local = address.partition("@")[0]
        if token is None and msg.from_addresses and _random_local(
                msg.from_addresses[0].partition("@")[0]):
            token = local
        if token:
            hits.append(Hit(symbol="RANDOM_TOKEN", detail=token[:40], args=(("token", token[:40]),)))
        if _REPLY.match(subject) and not any(msg.header(h) for h in _THREAD):
            hits.append(Hit(symbol="FAKE_REPLY", detail=subject[:60], args=(("subject", subject[:60]),)))
        return CheckResult(check=self.name, hits=tuple(hits))


    def _same_person(self, address: str, reply: str) -> bool:
        """A Reply-To that is the sender's own: the same address (or with a +tag), the same
        name at another provider, a secure health address (MSSanté), or the practice's own
        domains (a secretary's address)."""
        local, _, domain = reply.partition("@")
        if domain in self._own or domain == "mssante.fr" or domain.endswith(".mssante.fr"):
            return True
        mine = address.partition("@")[0].split("+")[0]
        return bool(mine) and local.split("+")[0] == mine


_FIELDS = {"From": "le nom de l'expéditeur", "Subject": "l'objet"}


def _disguised(text: str) -> str:
    """What makes the text's letters a disguise, or ""."""
    if not text or text.isascii():
        return ""
    for ch in text:
        code = ord(ch)
        if 0x1D400 <= code <= 0x1D7FF:
            return "mathematical letters"
        if 0xFF21 <= code <= 0xFF3A or 0xFF41 <= code <= 0xFF5A:
            return "full-width letters"
    # Invisible characters between two Latin letters (Co\U000e0139inbase): never typed so. A
    # variation selector after an emoji, a zero-width non-joiner in a Persian name, are how
    # those are written.
    if any(_invisible(c) for c in text):
        for i in range(1, len(text) - 1):
            if _invisible(text[i]) and _latin(text[i - 1]):
                after = next((c for c in text[i + 1:] if not _invisible(c)), "")
                if _latin(after):
                    return "invisible characters inside a word"
    for word in re.findall(r"\w+", text):
        if word.isascii():
            continue
        # Latin with the letters other scripts share its shapes with, in one word
        # (MetɑMɑsk, Ꮇicrosoft, Micrοsοft, ΚYC). Not CJK or Arabic beside Latin, not µ or
        # º, not lab results' lower-case Greek (β-HCG, γGT).
        if any(_latin(c) for c in word) and any(
                _imitates_latin(word, i) for i in range(len(word))):
            return f"mixed letters in {word[:40]!r}"
    return ""


def mixed_words(text: str, enough: int) -> list[str]:
    """Words of `text` that mix Latin letters with letters of other scripts passing for them
    (as in `_disguised`), different ones, up to `enough` of them."""
    found: list[str] = []
    if not _LOOKALIKE_SCRIPTS.search(text):  # most text (French accents too): one C pass
        return found
    for word in re.findall(r"\w+", text):
        if word.isascii() or word in found:
            continue
        if any(_latin(c) for c in word) and any(
                _imitates_latin(word, i) for i in range(len(word))):
            found.append(word)
            if len(found) >= enough:
                break
    return found


# The scripts `_imitates_latin` reads: IPA, Greek, Cyrillic, Armenian, Cherokee.
_LOOKALIKE_SCRIPTS = re.compile("[\u0250-\u02af\u0370-\u058f\u13a0-\u13ff]")


def _latin(ch: str) -> bool:
    if ch.isascii():
        return ch.isalpha()
    return ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN")


def _invisible(ch: str) -> bool:
    code = ord(ch)
    return (unicodedata.category(ch) == "Cf" or 0xFE00 <= code <= 0xFE0F
            or 0xE0100 <= code <= 0xE01EF)


def _imitates_latin(word: str, i: int) -> bool:
    """The letter at `i` is of a script whose letters pass for Latin ones: Cyrillic, IPA,
    Cherokee, Armenian; a Greek capital that reads as a Latin one; a lower-case Greek letter
    between lower-case Latin letters (an omicron in "Micrοsοft")."""
    ch = word[i]
    code = ord(ch)
    if ch.isascii() or not ch.isalpha():
        return False
    if 0x0250 <= code <= 0x02AF or 0x0400 <= code <= 0x052F or 0x13A0 <= code <= 0x13FF \
            or 0x0531 <= code <= 0x058F:
        return True
    if 0x0370 <= code <= 0x03FF:  # Greek
        if ch in _GREEK_LATIN:
            return True
        around = word[max(i - 1, 0):i] + word[i + 1:i + 2]
        return ch.islower() and any(c.islower() and _latin(c) for c in around)
    return False


def _other_address(name: str, domain: str) -> str:
    """An address the display name shows, of another organisation than the sender's own
    ("support@bank.example <x@gmail.com>"). Not a bare site name: "News.com" or
    "Booking.com" is how many senders name themselves."""
    if not name or not domain:
        return ""
    shown = [m.group(1) for m in _ADDRESS.finditer(name)]
    home = org_domain(domain)
    for other in shown:
        if org_domain(other.lower().rstrip(".")) != home:
            return other.lower()[:100]
    return ""


# The networks of a practice's own devices: private (RFC 1918, RFC 4193), loopback,
# link-local, and the carrier-grade NAT range some office routers use.
_LOCAL = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
    "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10"))


def _local_peer(ip: str) -> bool:
    try:
        peer = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(peer in net for net in _LOCAL)


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _internet_domain(domain: str) -> bool:
    """A name that can be a domain of the Internet: two labels at least, each of letters,
    digits and inner hyphens (a U-label's letters too, for internationalised addresses), and
    a top-level label of letters (or an A-label). Not an address literal ([192.0.2.1])."""
    labels = domain.split(".")
    if len(labels) < 2 or len(domain) > 253:
        return False
    for label in labels:
        if not label.isascii():
            if not all(c.isalnum() or c == "-" for c in label):
                return False
            label = re.sub(r"[^\x00-\x7f]", "a", label)  # a U-label's letters
        if not _LABEL.fullmatch(label):
            return False
    top = labels[-1]
    return top.startswith("xn--") or not any(c.isdigit() or c == "-" for c in top)


def _recipient_in(subject: str, msg: ParsedMessage, rcpts: tuple[str, ...]) -> str:
    """A recipient's address (envelope or To) written in the subject."""
    if "@" not in subject:
        return ""
    lowered = subject.lower()
    addresses = set(r.lower() for r in rcpts)
    to = msg.header("To")
    if to:
        with contextlib.suppress(Exception):
            addresses.update(a.lower() for _, a in header_addresses(to[:MAX_FIELD])
                             if "@" in a)
    for a in addresses:
        at = lowered.find(a)
        # The whole address (not "ta@x" for "a@x"), and not the "(address)" a calendar
        # invitation ends its subject with.
        if at < 0 or (at and (lowered[at - 1].isalnum() or lowered[at - 1] in "._+-")):
            continue
        if lowered[at - 1:at] == "(" and lowered[at + len(a):].strip() == ")":
            continue
        return a
    return ""


def _random(token: str) -> bool:
    """A token of letters and digits mixed the way machines mix them: upper and lower case
    and digits interleaved (fg46qFdZiRVH3jI), not a word, a reference or a hex id."""
    upper = sum(c.isupper() for c in token)
    lower = sum(c.islower() for c in token)
    digits = sum(c.isdigit() for c in token)
    if min(upper, lower) < 3:
        return False
    changes = sum(1 for a, b in zip(token, token[1:], strict=False)
                  if _kind(a) != _kind(b))
    # Without digits, only tokens whose case changes nearly at every letter (WCXwTfAXnG).
    return changes >= (len(token) // 2 if digits else (2 * len(token)) // 3)


def _random_local(local: str) -> bool:
    """A sender's mailbox name of letters in random case (rBEqxqW, dIvuAyIc): upper case
    after lower case twice or more, and not words run together (MarieClaire, McKay)."""
    if not (5 <= len(local) <= 40) or not local.isalpha() or not local.isascii():
        return False
    rises = sum(1 for a, b in zip(local, local[1:], strict=False) if a.islower() and b.isupper())
    return rises >= 2 and not _WORDS.fullmatch(local)


_WORDS = re.compile(
    r"[a-z]*(?:[A-Z][a-z]{2,}|Mc|Mac|De|Di|Du|Da|Dr|Le|La|Van|Von|St)+(?:[A-Z]+[a-z]*)?")


def _kind(c: str) -> int:
    return 0 if c.isdigit() else 1 if c.isupper() else 2


CHECKS = (DisguiseCheck,)
