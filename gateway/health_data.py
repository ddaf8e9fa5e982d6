"""French health data in outgoing mail: social security numbers (NIR), identifiers near health
vocabulary, and health document formats. CPU work (regexes over text): worker pool.

NIR: 13 characters and a 2-digit key = 97 - (number mod 97), Corsica's 2A/2B read as 19/18
(python-stdnum's `fr.nir`, a maintained implementation), plus the sex and month rules; spaces or
dots between the groups are accepted. Only a valid key counts: about 1 % of random 15-digit
numbers pass, the key's share.
"""

from __future__ import annotations

import html
import io
import logging
import re
import unicodedata
import zipfile
from dataclasses import dataclass

from pypdf import PdfReader
from stdnum.fr import nir as stdnum_nir

logging.getLogger("pypdf").setLevel(logging.ERROR)  # damaged PDFs are common, not our errors

_NIR = re.compile(
    r"(?<![\dA-Za-z])([1-478])[ .]?(\d{2})[ .]?(\d{2})[ .]?(\d{2}|2[AaBb])[ .]?(\d{3})[ .]?"
    r"(\d{3})[ .]?(\d{2})(?![\dA-Za-z])")
# Patients' MSSanté addresses (Mon espace santé) are built on their INS matricule.
_PATIENT_ADDRESS = re.compile(r"[A-Za-z0-9._%+-]{1,64}@patient\.mssante\.fr\b", re.IGNORECASE)
_DOB = re.compile(r"\bn[ée]e?\s+le\s+\d{1,2}[/.\-]\d{1,2}[/.\-]\d{2,4}|"
                  r"\bdate de naissance\s*:?\s*\d{1,2}[/.\-]\d{1,2}[/.\-]\d{2,4}", re.IGNORECASE)
_CIM10 = re.compile(r"\b[A-TV-Z]\d{2}\.\d{1,2}\b")
_VOCABULARY = [
    "compte rendu", "compte-rendu", "resultats d'analyse", "resultat d'analyse",
    "resultats biologiques", "bilan sanguin", "ordonnance", "diagnostic", "antecedents",
    "traitement", "hospitalisation", "consultation", "examen", "radiographie", "irm", "scanner",
    "biopsie", "anatomopathologie", "serologie", "glycemie", "hba1c", "creatinine", "cim-10",
    "lettre de sortie", "certificat medical", "arret de travail", "dossier medical", "patient",
]
PROXIMITY = 400  # characters around an identifier where health words count
# A lab value with its unit (Hémoglobine 12,1 g/dL, TSH 2,15 mUI/L, créatinine 80 µmol/L):
# two of them near a birth date are clinical results, whatever the analytes are called.
_LAB_VALUE = re.compile(
    r"\d+(?:[.,]\d+)?\s?(?:[gG]/[dD]?[lL]|mg/[dD]?[lL]|[mµu]?mol/[lL]|m?U[Ii]/[mM]?[lL]|"
    r"[nµup]g/[mM]?[lL]|[GgTt](?:iga|era)?/[lL]|/mm3|mm/h|fL|mmHg|mEq/[lL])(?![A-Za-z])")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthFindings:
    nirs: tuple[str, ...]  # masked ("2 95 10 ** *** *** **")
    context: bool  # an identifier with health vocabulary around it
    documents: tuple[str, ...]  # health document formats found ("HPRIM", "HL7 v2", ...)


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def valid_nir(number: str) -> bool:
    """A NIR with a valid key, sex and month (spaces and dots allowed between groups)."""
    compact = re.sub(r"[ .]", "", number).upper()
    if len(compact) != 15 or compact[0] not in "123478":
        return False
    month = int(compact[3:5])
    if not (1 <= month <= 12 or 20 <= month <= 42 or 50 <= month <= 99):
        return False
    return bool(stdnum_nir.is_valid(compact))


def mask(number: str) -> str:
    compact = re.sub(r"[ .]", "", number).upper()
    return f"{compact[0]} {compact[1:3]} {compact[3:5]} ** *** *** **"


def find_patient_addresses(text: str) -> list[str]:
    return [m.group(0) for m in _PATIENT_ADDRESS.finditer(text[:1_000_000])]


def mask_address(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:3]}***@{domain.lower()}"


def mask_identifiers(text: str) -> str:
    """The text with every valid NIR and patient MSSanté address masked (previews)."""
    text = _NIR.sub(lambda m: mask(m.group(0)) if valid_nir(m.group(0)) else m.group(0), text)
    return _PATIENT_ADDRESS.sub(lambda m: mask_address(m.group(0)), text)


def find_nirs(text: str) -> list[str]:
    return [m.group(0) for m in _NIR.finditer(text) if valid_nir(m.group(0))]


def health_format(name: str, data: bytes) -> str | None:
    """The health document format of an attachment, if it is one."""
    head = data[:4096]
    lname = name.lower()
    if lname.endswith("ihe_xdm.zip") or (head[:4] == b"PK\x03\x04" and b"IHE_XDM" in head):
        return "IHE XDM"
    if data[128:132] == b"DICM":
        return "DICOM"
    if b"<ClinicalDocument" in head:
        return "CDA R2"
    if head.startswith(b"MSH|") or b"\rMSH|^~\\&" in head or b"\nMSH|^~\\&" in head:
        return "HL7 v2"
    if head.startswith(b"H|\\^&") or b"****LAB****" in head or b"****FIN****" in data[-200:] \
            or lname.endswith((".hpr", ".hprim")):
        return "HPRIM"
    return None


MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
MAX_PDF_PAGES = 20
MAX_DOCUMENT_TEXT = 500_000


def document_text(name: str, data: bytes) -> str | None:
    """Text of a PDF (pypdf, first pages) or DOCX (its XML) attachment, bounded in size and
    pages; None for other files or when the document cannot be read."""
    if len(data) > MAX_DOCUMENT_BYTES:
        return None
    if data[:5] == b"%PDF-":
        try:
            reader = PdfReader(io.BytesIO(data))
            pages = [p.extract_text() or "" for p in reader.pages[:MAX_PDF_PAGES]]
        except Exception:  # noqa: BLE001 - pypdf raises many kinds on damaged files
            return None
        return "\n".join(pages)[:MAX_DOCUMENT_TEXT]
    if data[:4] == b"PK\x03\x04" and name.lower().endswith((".docx", ".docm", ".odt")):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                member = "word/document.xml" if name.lower().endswith((".docx", ".docm")) \
                    else "content.xml"
                info = z.getinfo(member)
                if info.file_size > MAX_DOCUMENT_BYTES:
                    return None
                xml = z.read(member).decode("utf-8", "replace")
        except (zipfile.BadZipFile, KeyError, OSError, RuntimeError):
            return None
        xml = re.sub(r"</w:p>|</text:p>", "\n", xml)
        return html.unescape(re.sub(r"<[^>]+>", "", xml))[:MAX_DOCUMENT_TEXT]
    return None


def analyse_text(text: str) -> tuple[list[str], bool]:
    """(NIRs found, whether an identifier stands near health vocabulary)."""
    text = text[:1_000_000]
    nirs = list(_NIR.finditer(text))
    valid = [m for m in nirs if valid_nir(m.group(0))]
    anchors = [m.start() for m in valid] + [m.start() for m in _DOB.finditer(text)] + \
        [m.start() for m in _PATIENT_ADDRESS.finditer(text)]
    context = False
    if anchors:
        folded = _fold(text)
        for pos in anchors:
            window = folded[max(0, pos - PROXIMITY):pos + PROXIMITY]
            near = text[max(0, pos - PROXIMITY):pos + 4 * PROXIMITY]  # results follow the header
            if any(word in window for word in _VOCABULARY) or _CIM10.search(
                    text[max(0, pos - PROXIMITY):pos + PROXIMITY]) or \
                    len(_LAB_VALUE.findall(near)) >= 2:
                context = True
                break
    return [m.group(0) for m in valid], context
