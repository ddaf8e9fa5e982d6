"""Structured logging: one JSON object per line, one summary event per message.

Never logged: bodies, subjects, attachments, passwords, TOTP seeds, keys. Addresses appear only
in the per-message summary.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.message import Inbound
    from gateway.pipeline import Outcome

queue_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("queue_id", default=None)

_summary = logging.getLogger("gateway.message")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        qid = queue_id_var.get()
        if qid:
            data["queue_id"] = qid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every peer at INFO: keep its noise at warnings. It also warns, on every
    # successful AUTH, that a field it sets itself is deprecated: not ours to fix, dropped.
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.WARNING)
    mail_log.addFilter(lambda r: "login_data is deprecated" not in r.getMessage())


def log_message(inbound: Inbound, outcome: Outcome, duration_s: float) -> None:
    analysis = outcome.analysis
    fields: dict[str, Any] = {
        "event": "message",
        "queue_id": inbound.queue_id,
        "client": inbound.peer_ip,
        "helo": inbound.helo,
        "mail_from": inbound.mail_from,
        "rcpt_count": len(inbound.rcpts),
        "rcpts": list(inbound.rcpts),
        "size": len(inbound.raw),
        "tls": inbound.tls,
        "direction": inbound.direction.value,
        **({"auth_user": inbound.auth_user} if inbound.auth_user else {}),
        "outcome": outcome.kind.value,
        "duration_ms": round(duration_s * 1000, 1),
    }
    if analysis is not None:
        fields["action"] = analysis.verdict.action.value
        fields["score"] = analysis.verdict.score
        fields["symbols"] = [f"{s.name}({s.score:g})" for s in analysis.verdict.symbols]
        fields["check_ms"] = {k: round(v * 1000, 1) for k, v in analysis.durations.items()}
    if outcome.quarantine_id:
        fields["quarantine_id"] = outcome.quarantine_id
    if outcome.downstream_code:
        fields["downstream_code"] = outcome.downstream_code
    _summary.info("message %s", outcome.kind.value, extra={"fields": fields})
