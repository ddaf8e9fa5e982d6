"""Fraud that needs no link: extortion ("I filmed you, pay in bitcoin"), callback phishing
(an invoice or a renewal the reader never ordered, and a phone number to call to cancel it,
where a person on the phone does the rest), advance-fee fraud (an inheritance, a donation or
a fund transfer that needs the reader's reply and, later, fees) and crypto-asset lures (an
"airdrop" to claim, a withdrawal to confirm, a wallet to connect: the page empties the
wallet or collects its recovery phrase). Read on the text of phase 1's content check.

All are patterns of the text itself, in French and English; the words are data
(rules/lures.toml: extortion_words, callback_words, advance_fee_core and _words, crypto_core
and _words).
"""

from __future__ import annotations

import re
from typing import ClassVar

from gateway.auth.dmarc import sender_verified
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services, Unavailable
from gateway.checks.content import message_content
from gateway.config import read_toml
from gateway.errors import ConfigError
from gateway.message import Direction, ParsedMessage
from gateway.senders import fold

# Bitcoin addresses: legacy (1..., 3...) and bech32 (bc1...).
_BITCOIN = re.compile(r"\b(?:bc1[02-9ac-hj-np-z]{25,87}|[13][1-9A-HJ-NP-Za-km-z]{25,34})\b")
# A phone number as written in these mails: French (01 23 45 67 89, +33 1 23...), North
# American (+1 (800) 555-0199, 1-888-555-0199).
_PHONE = re.compile(
    r"(?:\+33\s?|\b0)[1-9](?:[\s.-]?\d{2}){4}\b|"
    r"(?:\+?1[\s.-]?)?\(?\b[2-9]\d{2}\)?[\s.-]\d{3}[\s.-]\d{4}\b")
_AMOUNT = re.compile(r"(?:[$€£]\s?\d[\d,.\s]*\d|\d[\d,.\s]*\d\s?(?:€|eur|usd|\$))",
                     re.IGNORECASE)
# A crypto-asset ticker as these mails write it: $BTC, $MEME.
_TICKER = re.compile(r"(?<![\w$])\$[A-Z]{3,6}\b")
MAX_TEXT = 50_000
# Substrings every crypto-asset core phrase (rules/lures.toml crypto_core) contains one of.
_CRYPTO_HINTS = ("airdrop", "crypto", "bitcoin", "btc", "ethereum", "usdt", "tether", "solana",
                 "wallet", "portefeuille", "metamask", "phrase")


class FraudCheck:
    name: ClassVar[str] = "fraud"
    phase: ClassVar[int] = 2
    produces: ClassVar[type[Facts] | None] = None
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.INBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({
        "FRAUD_EXTORTION", "FRAUD_CALLBACK", "FRAUD_ADVANCE_FEE", "FRAUD_CRYPTO",
        "ATTACH_PASSWORD_GIVEN"})

    def __init__(self, services: Services) -> None:
        rules = services.cfg.rules_dir
        words = read_toml(rules / "lures.toml")
        lists = read_toml(rules / "domain-lists.toml")
        try:
            self._freemail = frozenset(str(d).lower() for d in lists["freemail"])
            self._extortion = [re.compile(p) for p in words["extortion_words"]]
            self._callback = [re.compile(p) for p in words["callback_words"]]
            self._advance_fee_core = [re.compile(p) for p in words["advance_fee_core"]]
            self._advance_fee = [re.compile(p) for p in words["advance_fee_words"]]
            self._crypto_core = [re.compile(p) for p in words["crypto_core"]]
            self._crypto = [re.compile(p) for p in words["crypto_words"]]
        except (KeyError, TypeError, re.error) as exc:
            raise ConfigError(f"{rules}/lures.toml or domain-lists.toml: {exc}") from None

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        content = message_content(ctx)
        if isinstance(content, Unavailable):
            return CheckResult(check=self.name)  # the content check's failure decides
        text = f"{msg.subject}\n{content.text}"[:MAX_TEXT]
        hits: list[Hit] = []
        lower = text.lower()
        folded = ""  # the text folded, once, when a pattern set needs it

        def words() -> str:
            nonlocal folded
            folded = folded or fold(text)
            return folded

        wallet = ("bitcoin" in lower or "btc" in lower) and _BITCOIN.search(text)
        if wallet:
            found = _count(self._extortion, words())
            if found >= 2:
                hits.append(Hit(symbol="FRAUD_EXTORTION",
                                detail=f"bitcoin address, {found} extortion phrases",
                                args=(("count", str(found)),)))
        if not content.links:
            phone = _PHONE.search(text)
            if phone and _AMOUNT.search(text):
                found = _count(self._callback, words())
                if found >= 2:
                    number = phone.group(0).strip()
                    hits.append(Hit(symbol="FRAUD_CALLBACK",
                                    detail=f"{number}, {found} callback phrases",
                                    args=(("phone", number), ("count", str(found)))))
        # A notary's, an insurer's or an exchange's own mail comes from its domain's servers
        # or carries its signature.
        signed = sender_verified(ctx, msg.from_domain)
        # Or replies asked to a free-mail address that is not the sender's own (Reply-To, or
        # one written in the text): the "419" letter's way home, with a core phrase or the
        # fortune and two phrases.
        elsewhere = not signed and self._replies_to_free_mail(msg, text)
        if not signed and ("million" in lower or elsewhere):
            core = _count(self._advance_fee_core, words())
            found = core + _count(self._advance_fee, words())
            if (core and found >= 3) or (elsewhere and (core or (
                    "million" in lower and found >= 2))):
                hits.append(Hit(symbol="FRAUD_ADVANCE_FEE", detail=f"{found} advance-fee phrases",
                                args=(("count", str(found)),)))
        # Crypto-asset lures: read only when the text names one (most mail never does).
        if content.links and not signed and any(w in lower for w in _CRYPTO_HINTS):
            core = _count(self._crypto_core, words())
            found = core + _count(self._crypto, words()) + (1 if _TICKER.search(text) else 0)
            if core and found >= 3:
                hits.append(Hit(symbol="FRAUD_CRYPTO", detail=f"{found} crypto-asset phrases",
                                args=(("count", str(found)),)))
        # A file locked with a password given beside it, in the text: filters cannot open it,
        # the reader can (the malware campaigns' way). Not a password's description ("votre
        # date de naissance"): a value with a digit in it.
        if not signed and any(p.filename for p in msg.parts):
            given = _PASSWORD_GIVEN.search(text[:MAX_TEXT])
            if given:
                hits.append(Hit(symbol="ATTACH_PASSWORD_GIVEN", detail=given.group(0)[:80],
                                args=(("passage", given.group(0)[:80]),)))
        return CheckResult(check=self.name, hits=tuple(hits))


    def _replies_to_free_mail(self, msg: ParsedMessage, text: str) -> bool:
        sender = msg.from_addresses[0].lower() if msg.from_addresses else ""
        others = {a.lower() for a in msg.reply_to()}
        if "@" in text:  # the address pattern tries every position: only where one can be
            others |= {m.group(0).lower() for m in _ADDRESS.finditer(text[:MAX_TEXT])}
        return any(a != sender and a.rpartition("@")[2] in self._freemail for a in others)


_PASSWORD_GIVEN = re.compile(
    r"(?i)\b(?:mot de passe|mdp|password|passwort|kennwort|senha|contrase[nñ]a|code d.acc[eè]s)"
    r"(?:\s+[^\W\d_]{1,12}(?:['’][^\W\d_]{1,12})?){0,5}"  # "de l'archive", "de acesso ao PDF"
    r"\s*[:：=]\s*(?=[^\s<>\"']*\d)[^\s<>\"']{3,20}(?=[\s.,;)]|$)")


_ADDRESS = re.compile(r"[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,4}")


def _count(patterns: list[re.Pattern[str]], folded: str) -> int:
    return sum(1 for p in patterns if p.search(folded))


CHECKS = (FraudCheck,)
