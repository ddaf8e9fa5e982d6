"""Outbound guard: health data leaving in clear instead of through MSSanté.

Only for mail the practice sends (direction outbound). Finds NIRs (valid key), identifiers near
health vocabulary, health document formats (HPRIM, HL7 v2, CDA, DICOM, IHE XDM); then looks at
how the message travels: recipients under *.mssante.fr are the secure channel, S/MIME or PGP
encryption protects the message, an encrypted archive protects only its own content (the
message text and subject around it stay clear, and are searched), anything else is clear text.
Health data in clear gets the policy of `[outbound] policy`: hold (quarantine, default),
reject, or warn.
"""

from __future__ import annotations

import io
import ipaddress
import zipfile
from dataclasses import dataclass
from typing import ClassVar

from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.health_data import (
    analyse_text,
    document_text,
    find_patient_addresses,
    health_format,
    mask,
    mask_address,
)
from gateway.links import extract
from gateway.message import Direction, ParsedMessage, Part, decode_transfer

_ENCRYPTED = {"multipart/encrypted", "application/pgp-encrypted"}
_SMIME = {"application/pkcs7-mime", "application/x-pkcs7-mime"}


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundFacts(Facts):
    exposed: tuple[str, ...]  # recipients health data would reach in clear (empty: none)


def _encrypted_part(part: Part) -> bool:
    """S/MIME enveloped data (RFC 8551; without smime-type, as older clients write it, taken
    as enveloped), or PGP/MIME. Opaque *signed* S/MIME protects nothing: anyone reads it."""
    if part.content_type in _SMIME:
        return part.smime_type in (None, "enveloped-data", "authenveloped-data")
    return part.content_type in _ENCRYPTED


def secure_recipient(address: str) -> bool:
    domain = address.rpartition("@")[2].lower().rstrip(".")
    return domain == "mssante.fr" or domain.endswith(".mssante.fr")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Found:
    nirs: list[str]
    patient_addresses: list[str]  # in the text or the To/Cc header fields
    context: bool
    formats: list[str]
    encrypted: bool
    subject_health: bool  # the subject travels in clear even when the body is encrypted
    encrypted_archives: list[str]  # attachment names: their content is protected, the rest not


def _scan(raw: bytes, msg: ParsedMessage) -> _Found:
    """Worker-pool part: what the message carries."""
    content = extract(raw, msg)
    texts = [msg.subject, content.text]
    addresses = find_patient_addresses(" ".join(
        v for k, v in msg.headers if k.lower() in ("to", "cc")))
    formats: list[str] = []
    archives: list[str] = []
    encrypted = any(_encrypted_part(p) for p in msg.parts) or \
        "-----BEGIN PGP MESSAGE-----" in content.text
    subject_nirs, subject_context = analyse_text(msg.subject)
    subject_health = bool(subject_nirs or subject_context or find_patient_addresses(msg.subject))
    for part in msg.parts:
        if part.is_multipart or not (part.filename or part.disposition == "attachment"):
            continue
        data = decode_transfer(part.payload(raw), part.transfer_encoding)
        if data is None:
            continue
        if _encrypted_zip(data):
            archives.append(part.filename or "(archive)")
            continue
        fmt = health_format(part.filename or "", data)
        if fmt:
            formats.append(fmt)
        if part.content_type.startswith("text/"):
            texts.append(data[:1_000_000].decode(part.charset or "latin-1", "replace"))
        else:
            text = document_text(part.filename or "", data)
            if text:
                texts.append(text)
    text = "\n".join(texts)
    nirs, context = analyse_text(text)
    return _Found(nirs=nirs, patient_addresses=addresses + find_patient_addresses(text),
                  context=context, formats=formats, encrypted=encrypted,
                  subject_health=subject_health, encrypted_archives=archives)


def _encrypted_zip(data: bytes) -> bool:
    """A zip archive whose members are encrypted (general purpose flag bit 0)."""
    if data[:4] != b"PK\x03\x04":
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()[:1000]
            return bool(infos) and all(i.flag_bits & 0x1 for i in infos if not i.is_dir())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


class OutboundHealthCheck:
    name: ClassVar[str] = "outbound"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = OutboundFacts
    directions: ClassVar[frozenset[Direction]] = frozenset({Direction.OUTBOUND})
    symbols: ClassVar[frozenset[str]] = frozenset({
        "OUTBOUND_NIR", "OUTBOUND_HEALTH_CONTEXT", "OUTBOUND_HEALTH_DOCUMENT",
        "OUTBOUND_HEALTH_CLEARTEXT_HOLD", "OUTBOUND_HEALTH_CLEARTEXT_REJECT",
        "OUTBOUND_HEALTH_CLEARTEXT_WARN", "OUTBOUND_CLEARTEXT_SESSION", "OUTBOUND_CLEARTEXT_RELAY",
        "OUTBOUND_PATIENT_ADDRESS", "OUTBOUND_ENCRYPTED_ARCHIVE",
    })

    def __init__(self, services: Services) -> None:
        self._workers = services.workers
        self._limit_s = services.cfg.timeouts.outbound_s
        self._policy = services.cfg.outbound.policy

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        inbound = ctx.inbound
        # Documents (PDF, DOCX text) in a worker process, killed past the limit
        # (OUTBOUND_TIMEOUT: held); the bodies alone in a thread.
        run = self._workers.run_killable if msg.has_files else self._workers.run
        found = await run(_scan, inbound.raw, msg, limit_s=self._limit_s)
        hits: list[Hit] = []
        if found.nirs:
            masked = ", ".join(dict.fromkeys(mask(n) for n in found.nirs))
            hits.append(Hit(symbol="OUTBOUND_NIR", detail=masked, args=(("nir", masked),)))
        if found.patient_addresses:
            masked = ", ".join(dict.fromkeys(mask_address(a) for a in found.patient_addresses))
            hits.append(Hit(symbol="OUTBOUND_PATIENT_ADDRESS", detail=masked,
                            args=(("address", masked),)))
        if found.context:
            hits.append(Hit(symbol="OUTBOUND_HEALTH_CONTEXT"))
        for name in dict.fromkeys(found.encrypted_archives):
            hits.append(Hit(symbol="OUTBOUND_ENCRYPTED_ARCHIVE", detail=name,
                            args=(("name", name),)))
        for fmt in dict.fromkeys(found.formats):
            hits.append(Hit(symbol="OUTBOUND_HEALTH_DOCUMENT", detail=fmt,
                            args=(("format", fmt),)))
        session_clear = not inbound.tls and not _loopback(inbound.peer_ip)
        if session_clear:
            hits.append(Hit(symbol="OUTBOUND_CLEARTEXT_SESSION", detail=inbound.peer_ip,
                            args=(("client", inbound.peer_ip),)))
        if not inbound.next_hop_tls:
            hits.append(Hit(symbol="OUTBOUND_CLEARTEXT_RELAY"))
        clear = [r for r in inbound.rcpts if not secure_recipient(r)]
        # A leg without TLS exposes every recipient's copy, MSSanté ones included.
        exposed = list(inbound.rcpts) if session_clear or not inbound.next_hop_tls else clear
        health = bool(found.nirs or found.patient_addresses or found.context or found.formats)
        if found.encrypted:  # only what travels outside the encryption counts
            health = found.subject_health
        at_risk = exposed if health else []
        if at_risk:
            symbol = f"OUTBOUND_HEALTH_CLEARTEXT_{self._policy.upper()}"
            hits.append(Hit(symbol=symbol, detail=f"{len(at_risk)} recipient(s) in clear",
                            args=(("recipients", ", ".join(at_risk)),)))
        return CheckResult(check=self.name, hits=tuple(hits),
                           facts=OutboundFacts(exposed=tuple(at_risk)))


def _loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


CHECKS = (OutboundHealthCheck,)
