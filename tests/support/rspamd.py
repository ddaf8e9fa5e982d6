"""A real rspamd (Debian's package) and its Redis, on loopback ports of their own, with the
configuration shipped in docker/rspamd/ plus the test's: its ports, the tests' DNS server, a
controller password that loopback does not bypass. Tests skip when rspamd is not installed.

rspamd compiles its regular expressions with hyperscan at start (10 s); the compiled
databases are kept between runs in a cache folder, so later starts take under a second."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "docker" / "rspamd"
RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
HS_CACHE = Path(tempfile.gettempdir()) / "gateway-tests-rspamd-hs"
PASSWORD = "mot-de-passe-du-controleur"


def require_rspamd() -> None:
    for program, package in ((RSPAMD, "rspamd"), (REDIS, "redis-server")):
        if not Path(program).is_file():
            pytest.skip(f"{package} not installed (apt-get install rspamd redis-server)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RspamdServer:
    def __init__(self, folder: Path, dns: str) -> None:
        self.folder = folder
        self.dns = dns
        self.port = _free_port()
        self.controller_port = _free_port()
        self.redis_port = _free_port()
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def _configure(self) -> Path:
        conf = self.folder / "etc"
        shutil.copytree(SHIPPED / "local.d", conf / "local.d", dirs_exist_ok=True)
        override = conf / "override.d"
        override.mkdir(exist_ok=True)
        (override / "worker-normal.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n')
        # 192.0.2.1 (TEST-NET): no loopback client is trusted without the password.
        (override / "worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.controller_port}";\ncount = 1;\n'
            f'password = "{PASSWORD}";\nenable_password = "{PASSWORD}";\n'
            'secure_ip = "192.0.2.1";\nstatic_dir = "${WWWDIR}";\n')
        (override / "worker-proxy.inc").write_text("count = -1;\n")
        (override / "redis.conf").write_text(f'servers = "127.0.0.1:{self.redis_port}";\n')
        HS_CACHE.mkdir(exist_ok=True)
        (override / "options.inc").write_text(
            f'hs_cache_dir = "{HS_CACHE}/";\n'
            f'dns {{ nameserver = ["{self.dns}"]; timeout = 1s; retransmits = 1; }}\n')
        return conf

    async def start(self) -> None:
        require_rspamd()
        for d in ("run", "db", "log"):
            (self.folder / d).mkdir(parents=True, exist_ok=True)
        conf = self._configure()
        out = (self.folder / "log" / "out.log").open("wb")
        self._procs.append(subprocess.Popen(
            [REDIS, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder / "db")],
            stdout=out, stderr=subprocess.STDOUT))
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        self._procs.append(subprocess.Popen(
            [RSPAMD, "-f", "-i", "-u", user, "-g", group, "-c", "/etc/rspamd/rspamd.conf",
             "--var", f"LOCAL_CONFDIR={conf}", "--var", f"RUNDIR={self.folder / 'run'}",
             "--var", f"DBDIR={self.folder / 'db'}", "--var", f"LOGDIR={self.folder / 'log'}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        out.close()
        async with asyncio.timeout(120), aiohttp.ClientSession() as http:
            while True:
                for p in self._procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"{p.args[0]} exited: "
                                           f"{(self.folder / 'log' / 'out.log').read_text()[-3000:]}")
                try:
                    async with http.get(f"{self.url}/ping") as r1, \
                            http.get(f"{self.controller_url}/ping") as r2:
                        if r1.status == r2.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

    async def learned(self, kind: str) -> int:
        """How many messages Bayes learnt as "spam" or "ham": the counter rspamd keeps in
        Redis (hash RS, field learns_<kind>), read with a plain RESP command."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        try:
            field = f"learns_{kind}"
            writer.write(f"*3\r\n$4\r\nHGET\r\n$2\r\nRS\r\n${len(field)}\r\n{field}\r\n"
                         .encode())
            head = (await reader.readline()).decode().strip()
            if head == "$-1":  # never learnt
                return 0
            assert head.startswith("$"), head
            return int((await reader.readline()).decode().strip())
        finally:
            writer.close()

    @property
    def pids(self) -> list[int]:
        """Redis, and rspamd's main process (its workers are its children)."""
        return [p.pid for p in self._procs]

    async def stop(self) -> None:
        """rspamd (its main process and workers, one process group), then Redis."""
        for p in reversed(self._procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if p.args[0] == RSPAMD:
                        os.killpg(p.pid, signal.SIGTERM)
                    else:
                        p.terminate()
        for p in self._procs:
            try:
                await asyncio.to_thread(p.wait, 30)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs.clear()

