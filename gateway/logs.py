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
from typing import Any

queue_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("queue_id", default=None)



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
