"""The private parts of dependencies the gateway relies on, checked on the installed versions:
a release that renames or removes one fails here, loudly, before it fails in a mail session.
pyproject.toml pins these dependencies below their next minor (or major) version."""

from __future__ import annotations

import asyncio
import inspect
import re

import aiosmtpd.smtp
import aiosmtplib
import dkim
import pytest

from gateway.deps import aiosmtpd as aiosmtpd_deps
from gateway.deps import aiosmtplib as aiosmtplib_deps
from gateway.deps import dkimpy as dkimpy_deps

# (object, name, what the gateway does with it), as each module of gateway/deps/ lists them
USED = [
    *[(aiosmtpd.smtp.SMTP, n, why) for n, why in aiosmtpd_deps.PRIVATE_METHODS.items()],
    *[(dkim.DKIM, n, why) for n, why in dkimpy_deps.PRIVATE_METHODS.items()],
]

# Attributes set on instances (read from the dependency's source).
INSTANCE_ATTRIBUTES = [*[(aiosmtpd.smtp.SMTP, n) for n in aiosmtpd_deps.PRIVATE_ATTRIBUTES],
                       *[(dkim.DKIM, n) for n in dkimpy_deps.PRIVATE_ATTRIBUTES]]


@pytest.mark.parametrize(("owner", "name", "why"), USED,
                         ids=[f"{o.__module__}.{o.__name__}.{n}" for o, n, _ in USED])
def test_private_names_still_exist(owner: type, name: str, why: str):
    assert hasattr(owner, name), (f"{owner.__module__}.{owner.__name__}.{name} is gone in the "
                                  f"installed version; the gateway uses it: {why}")


@pytest.mark.parametrize(("owner", "name"), INSTANCE_ATTRIBUTES,
                         ids=[f"{o.__module__}.{o.__name__}.{n}" for o, n in INSTANCE_ATTRIBUTES])
def test_instance_attributes_still_exist(owner: type, name: str):
    source = "".join(inspect.getsource(c) for c in owner.__mro__ if c is not object)
    assert f"self.{name} =" in source or f"self.{name}:" in source, (
        f"{owner.__module__}.{owner.__name__} no longer sets self.{name}; gateway/deps/ uses it")


async def test_instance_attributes_of_asyncio_and_aiosmtplib():
    from aiosmtplib.protocol import SMTPProtocol

    # gateway/deps/streams.py puts pipelined commands after DATA back into the buffer.
    assert isinstance(asyncio.StreamReader()._buffer, bytearray)
    # gateway/deps/aiosmtplib.py writes DATA through the client's protocol.
    assert aiosmtplib_deps.PRIVATE == ["SMTP.protocol", "SMTPProtocol.write",
                                       "SMTPProtocol.read_response"]
    assert "protocol" in vars(aiosmtplib.SMTP(hostname="127.0.0.1"))
    assert callable(getattr(SMTPProtocol, "write", None))
    assert callable(getattr(SMTPProtocol, "read_response", None))


def test_no_private_name_of_a_dependency_outside_gateway_deps():
    """The one place: elsewhere the gateway calls only gateway/deps/ for these names."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    names = [*aiosmtpd_deps.PRIVATE_METHODS, *aiosmtpd_deps.PRIVATE_ATTRIBUTES,
             *dkimpy_deps.PRIVATE_METHODS, "_buffer", ".protocol", "read_response"]
    names = [n for n in names if n.startswith(("_", "."))
             or n in dkimpy_deps.PRIVATE_METHODS or n == "read_response"]
    found = []
    for path in [*root.glob("gateway/**/*.py"), *root.glob("quarantine/**/*.py")]:
        if "deps" in path.relative_to(root).parts:
            continue
        text = path.read_text()
        found += [f"{path.relative_to(root)}: {n}" for n in names
                  if re.search(rf"(\.|def ){re.escape(n.lstrip('.'))}\b", text)]
    assert not found


@pytest.mark.parametrize("arg", [
    "<docteur@cabinet.test>", "<docteur@cabinet.test> SIZE=1000 BODY=8BITMIME", "<>",
    "docteur@cabinet.test", " <docteur@cabinet.test>", "<@relais.example:docteur@cabinet.test>",
    '<"un docteur"@cabinet.test>', "<docteur@[192.0.2.1]>", "<docteur>", "<docteur@",
    "pas une adresse", "<a@b> <c@d>", "", "<" + "x" * 70 + "@cabinet.test>",
    "<médecin@cabinet.test> SMTPUTF8"])
def test_our_reading_of_a_path_is_aiosmtpd_s(arg: str):
    """get_path replaces aiosmtpd's _getaddr for speed: same answers, limit on or off; where
    aiosmtpd's crashes (the stdlib parser's IndexError), a path that cannot be read."""
    for limit in (0, 64):
        theirs = aiosmtpd.smtp.SMTP.__new__(aiosmtpd.smtp.SMTP)
        theirs.local_part_limit = limit
        try:
            expected = theirs._getaddr(arg)
        except IndexError:
            expected = (None, None)
        assert aiosmtpd_deps.get_path(arg, limit) == expected
