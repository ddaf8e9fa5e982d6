"""Attachments and content: true types, names, archives, Office macros, PDF actions, HTML
smuggling, YARA (gateway/attachments.py does the work, in the worker pool)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from gateway.attachments import PDF_LINK, QR_LINK, YARA, Policy, analyse, analyse_job
from gateway.checks.base import CheckContext, CheckResult, Facts, Hit, Services
from gateway.message import ParsedMessage
from gateway.symbols import Symbol, rule_symbol
from gateway.yara_rules import YaraRules, compile_rules


@dataclass(frozen=True, slots=True, kw_only=True)
class AttachmentFacts(Facts):
    """What the files hold that later checks read: the web addresses QR codes and PDF links
    lead to (the impersonation check judges them as links)."""
    qr_links: tuple[str, ...] = ()
    links: tuple[str, ...] = ()


class AttachmentsCheck:
    name: ClassVar[str] = "attachments"
    phase: ClassVar[int] = 1
    produces: ClassVar[type[Facts] | None] = AttachmentFacts
    fixed_symbols: ClassVar[frozenset[str]] = frozenset({
        "ATTACH_DANGEROUS_TYPE", "ATTACH_TYPE_MISMATCH", "ATTACH_DOUBLE_EXTENSION",
        "ATTACH_RTLO_NAME", "ATTACH_EXEC_IN_ARCHIVE", "ATTACH_ARCHIVE_BOMB",
        "ATTACH_NESTED_ARCHIVE", "ATTACH_ENCRYPTED_ARCHIVE", "ATTACH_ARCHIVE_UNSCANNED",
        "ATTACH_ARCHIVE_CORRUPT", "ATTACH_OFFICE_MACRO", "ATTACH_MACRO_AUTOEXEC",
        "ATTACH_REMOTE_TEMPLATE", "ATTACH_PDF_JAVASCRIPT", "ATTACH_PDF_LAUNCH",
        "ATTACH_PDF_EMBEDDED_FILE", "ATTACH_PDF_AUTO_ACTION", "ATTACH_HTML_SCRIPT",
        "ATTACH_HTML_SMUGGLING", "ATTACH_HTML_CREDENTIAL_FORM", "ATTACH_ANALYSIS_TIMEOUT",
        "ATTACH_QR_LINK", "ATTACH_PDF_LINK", "ATTACH_IMAGE_UNREAD", "YARA_MATCH", "YARA_TIMEOUT",
    })  # and the symbols the compiled YARA rules name (their metadata), see __init__

    def __init__(self, services: Services) -> None:
        cfg = services.cfg
        a = cfg.attachments
        self._workers = services.workers
        self._limit_s = cfg.timeouts.attachments_s
        self._policy = Policy.load(
            cfg.rules_dir / "attachments.toml", max_depth=a.max_depth,
            max_members=a.max_members, max_total_bytes=a.max_total_mb * 1024 * 1024,
            max_ratio=a.max_ratio, macro_timeout_s=a.macro_timeout_s)
        self._folders = [cfg.rules_dir / "yara", *(Path(d) for d in a.yara_dirs)]
        self._timeout = a.yara_timeout_s
        self._lock = threading.Lock()
        # Installed in the worker processes by `install`, when the pipeline takes this check
        # (at start, or once a reload is accepted): building it changes nothing in use.
        self.yara: YaraRules = compile_rules(self._folders, timeout_s=self._timeout)
        # Instance-wide: the fixed set, and whatever symbols the rules name (a third-party
        # folder adds its own, their policy in the rule's metadata: rule_symbols()).
        self.symbols: frozenset[str] = self.fixed_symbols | self.yara.symbols

    def rule_symbols(self) -> dict[str, Symbol]:
        """Symbols whose score and French text the rules' metadata declare."""
        return {name: rule_symbol(name, meta, where=f"YARA rule {meta.get('rule')}")
                for name, meta in self.yara.declared.items()}

    def broken_since(self, before: object) -> list[str]:
        """Rule files that compiled in the set `before` (the check in use) and no longer do:
        a reload that would drop rules the gateway relies on is refused."""
        was = getattr(getattr(before, "yara", None), "report", None)
        previously = set(was.rejected) if was is not None else set()
        return [f"{path}: {error}" for path, error in self.yara.report.rejected.items()
                if path not in previously]

    def install(self) -> None:
        """Give the worker processes this check's rules (the pipeline calls it when it
        takes the check: at start, and when a reload is accepted)."""
        with self._lock:
            self._workers.provide(YARA, self.yara)

    async def run(self, msg: ParsedMessage, ctx: CheckContext) -> CheckResult:
        if msg.has_files:
            # In a worker process: an archive walk or a PDF that runs away is killed past
            # the limit (ATTACHMENTS_TIMEOUT: the message is held), and the process replaced.
            findings = await self._workers.run_killable(analyse_job, ctx.inbound.raw, msg,
                                                        self._policy, limit_s=self._limit_s)
        else:  # the bodies only: YARA, all scans within the limit (a thread is enough)
            findings = await self._workers.run(analyse, ctx.inbound.raw, msg, self._policy,
                                               self.yara, self._limit_s, limit_s=self._limit_s)
        return CheckResult(check=self.name, hits=tuple(
            Hit(symbol=f.symbol, detail=f"{f.name}: {f.detail[:200]}".strip(": ")[:200],
                args=(("name", f.name.rsplit("/", 1)[-1] or f.name), ("file", f.name),
                      *((("rule", f.rule),) if f.rule else ()), *f.args))
            for f in findings), facts=AttachmentFacts(
                qr_links=tuple(f.detail for f in findings if f.symbol == QR_LINK),
                links=tuple(f.detail for f in findings if f.symbol == PDF_LINK)))


CHECKS = (AttachmentsCheck,)
