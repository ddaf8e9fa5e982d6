"""A real clamd (Debian's clamav-daemon) on a Unix socket in a temporary folder, configured
as docker/clamav/clamd.conf says, with a signature database the test writes: EICAR by its
hash, and a byte pattern of our own for a test "malware" file. Nothing is downloaded. Tests
skip when clamd is not installed. Standard library only at import (docker/test.sh's client
reads SAMPLE from here)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import subprocess
from pathlib import Path

CLAMD = shutil.which("clamd") or "/usr/sbin/clamd"
SHIPPED = Path(__file__).resolve().parents[2] / "docker" / "clamav" / "clamd.conf"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# A file no YARA rule, type or name check of the gateway finds anything in; only the
# signature below names it.
MARKER = b"GATEWAY-TEST-SIGNATURE-3c9e1b"
SAMPLE = b"Rapport trimestriel\n" + b"." * 2000 + MARKER + b"\n" + b"-" * 2000 + b"\n"
MARKER_SIGNATURE = "Gateway.Test.Sample"


def require_clamd() -> None:
    import pytest  # here: docker/test.sh's client imports this module with the host's python3
    if not Path(CLAMD).is_file():
        pytest.skip("clamd not installed (apt-get install clamav-daemon)")


class ClamdServer:
    def __init__(self, folder: Path, *, stream_max: str = "25M") -> None:
        self.folder = folder
        self.socket = str(folder / "clamd.sock")
        db = folder / "db"
        db.mkdir(parents=True, exist_ok=True)
        (db / "gateway-test.hdb").write_text(
            f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Gateway.Test.EICAR\n")
        (db / "gateway-test.ndb").write_text(f"{MARKER_SIGNATURE}:0:*:{MARKER.hex()}\n")
        # The configuration shipped for a practice (docker/clamav/clamd.conf), with this
        # test's socket, database, limit and log instead of the container's.
        ours = {"TCPSocket", "TCPAddr", "LocalSocket", "User", "DatabaseDirectory",
                "StreamMaxLength", "LogFile", "Foreground"}
        shipped = [line for line in SHIPPED.read_text().splitlines()
                   if line.split(maxsplit=1)[:1] and line.split()[0] not in ours]
        self.conf = folder / "clamd.conf"
        self.conf.write_text("\n".join(shipped) + (
            f"\nLocalSocket {self.socket}\nDatabaseDirectory {db}\nForeground yes\n"
            f"StreamMaxLength {stream_max}\nLogFile {folder / 'clamd.log'}\n"))
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        require_clamd()
        Path(self.socket).unlink(missing_ok=True)
        output = self.folder / "clamd.out"
        with output.open("wb") as out:
            self._proc = subprocess.Popen([CLAMD, "-c", str(self.conf)], stdout=out,
                                          stderr=subprocess.STDOUT)
        async with asyncio.timeout(30):
            while not await self.pong():
                if self._proc.poll() is not None:
                    raise RuntimeError(f"clamd exited: {output.read_text()[-2000:]}")
                await asyncio.sleep(0.05)

    async def pong(self) -> bool:
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket)
        except OSError:
            return False
        try:
            writer.write(b"zPING\0")
            await writer.drain()
            return await reader.readuntil(b"\0") == b"PONG\0"
        except (OSError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()

    @property
    def pids(self) -> list[int]:
        return [self._proc.pid] if self._proc is not None else []

    async def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self._proc.wait, 30)
        self._proc = None
