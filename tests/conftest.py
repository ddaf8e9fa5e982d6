from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway import config
from gateway.runtime import Runtime
from gateway.service import Running, build_runtime, running
from tests.support.dnsserver import ThreadedDnsServer
from tests.support.sink import Sink

CORPUS = Path(os.environ.get("GATEWAY_CORPUS",
                             Path(__file__).resolve().parents[2] / "shared" / "corpus"))
DOMAIN = "cabinet.test"

# The CLI reads /etc/gateway/gateway.toml when it exists and no --config is given: never in
# the tests (a machine with the gateway installed would lend its next hop and files to
# them). Set and empty: the embedded default, for this process and its subprocesses.
os.environ["GATEWAY_CONFIG"] = ""
# Nor the variables a container sets (GATEWAY_DOMAINS...), for the same reason.
for _name in config.ENVIRONMENT:
    os.environ.pop(_name, None)


# Every test talks to this loopback DNS server, never to the machine's resolver. Tests that
# need records load a zone (and get a fresh server state back for the next test).
DNS = ThreadedDnsServer()


@pytest.fixture(autouse=True)
def dns_zone() -> ThreadedDnsServer:
    DNS.load({})
    return DNS


@pytest.fixture
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS} (set GATEWAY_CORPUS)")
    return CORPUS


def make_config(data_dir: Path, **sections: dict) -> config.Config:
    data: dict = {"gateway": {"domains": [DOMAIN], "data_dir": str(data_dir), "workers": 1,
                              "hostname": "mx.cabinet.test"},
                  "smtp": {"listen": "127.0.0.1:0"}, "web": {"listen": ""},
                  "metrics": {"listen": ""},
                  "dns": {"nameservers": [DNS.address], "timeout_s": 0.5}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config.build(data, source="test")


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    """The analysis pipeline alone (no SMTP, no store) on the default configuration; modules
    that need DNS records or other settings define their own."""
    rt = await build_runtime(make_config(tmp_path), with_store=False)
    yield rt
    await rt.close()


@pytest.fixture
async def gateway(tmp_path: Path, sink: Sink) -> AsyncIterator[Running]:
    cfg = make_config(tmp_path / "data", next_hop={"address": sink.address, "starttls": "off"})
    async with running(cfg) as gw:
        yield gw


def pytest_collection_modifyitems(config, items):
    """GATEWAY_PROMISES=a,b (tests/mutation_sample.py): only the tests of those promises."""
    wanted = {p for p in os.environ.get("GATEWAY_PROMISES", "").split(",") if p}
    if not wanted:
        return
    keep, drop = [], []
    for item in items:
        marks = [m.args[0] for m in item.iter_markers("promise") if m.args]
        (keep if wanted.intersection(marks) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    """The RFC 7208 suite's tally, deviations included (tests/test_spf.py lists them)."""
    stats = terminalreporter.stats
    ours = "test_spf_rfc7208_suite["
    passed = sum(1 for r in stats.get("passed", []) if ours in r.nodeid)
    deviations = sum(1 for r in stats.get("xfailed", []) if ours in r.nodeid)
    if passed or deviations:
        terminalreporter.write_line(
            f"RFC 7208 SPF suite: {passed} passed, {deviations} deviations")
