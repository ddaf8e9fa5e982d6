"""The private parts of dependencies the gateway relies on, checked on the installed versions:
a release that renames or removes one fails here, loudly, before it fails in a mail session.
pyproject.toml pins these dependencies below their next minor (or major) version."""

from __future__ import annotations

import asyncio
import inspect

import aiosmtpd.smtp
import aiosmtplib
import dkim
import pytest

# (object, name, what the gateway does with it)
USED = [
    (aiosmtpd.smtp.SMTP, "_authenticate", "SubmissionSMTP keeps the decoded credentials"),
    (aiosmtpd.smtp.SMTP, "_call_handler_hook", "GatewaySMTP.smtp_DATA calls the DATA hook"),
    (aiosmtpd.smtp.SMTP, "_reset_timeout", "DATA read and transaction deadlines"),
    (aiosmtpd.smtp.SMTP, "_timeout_cb", "421 4.4.2 said before a timeout closes"),
    (aiosmtpd.smtp.SMTP, "_set_rset_state", "RSET/EHLO/STARTTLS drop the next-hop transaction"),
    (aiosmtpd.smtp.SMTP, "_set_post_data_state", "the envelope reset after DATA"),
    (aiosmtpd.smtp.SMTP, "_create_session", "GatewaySession"),
    (aiosmtpd.smtp.SMTP, "check_helo_needed", "command order before our path checks"),
    (aiosmtpd.smtp.SMTP, "check_auth_needed", "command order before our path checks"),
    (dkim.DKIM, "verify_headerprep", "body-hash mismatch told apart from a bad signature"),
    (dkim.DKIM, "verify_sig", "body-hash mismatch told apart from a bad signature"),
]

# Attributes aiosmtpd sets on the protocol instance (read from its source).
INSTANCE_ATTRIBUTES = ["_reader", "_original_transport", "_auth_require_tls"]


@pytest.mark.parametrize(("owner", "name", "why"), USED,
                         ids=[f"{o.__module__}.{o.__name__}.{n}" for o, n, _ in USED])
def test_private_names_still_exist(owner: type, name: str, why: str):
    assert hasattr(owner, name), (f"{owner.__module__}.{owner.__name__}.{name} is gone in the "
                                  f"installed version; the gateway uses it: {why}")


@pytest.mark.parametrize("name", INSTANCE_ATTRIBUTES)
def test_aiosmtpd_instance_attributes_still_exist(name: str):
    source = inspect.getsource(aiosmtpd.smtp.SMTP)
    assert f"self.{name} =" in source or f"self.{name}:" in source, (
        f"aiosmtpd no longer sets SMTP.{name}; gateway/smtp.py reads it")


async def test_instance_attributes_of_asyncio_and_aiosmtplib():
    from aiosmtplib.protocol import SMTPProtocol

    # gateway/smtp.py puts pipelined commands after DATA back into the reader's buffer.
    assert isinstance(asyncio.StreamReader()._buffer, bytearray)
    # gateway/relay.py writes DATA through the client's protocol.
    assert "protocol" in vars(aiosmtplib.SMTP(hostname="127.0.0.1"))
    assert callable(getattr(SMTPProtocol, "write", None))
    assert callable(getattr(SMTPProtocol, "read_response", None))
