"""Deploying on a host: the systemd unit (checked by systemd itself) and the readiness
protocol it relies on (sd_notify), with the real `gateway serve`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DNS, DOMAIN
from tests.test_cli import free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "docker" / "gateway.service"


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (make system-deps installs systemd)")
    text = UNIT.read_text()
    # Where this checkout's gateway is, instead of /opt/gateway/venv (verify checks that the
    # commands exist and are executable).
    here = Path(sys.executable).parent / "gateway"
    assert here.exists()
    unit = tmp_path / "gateway.service"
    unit.write_text(text.replace("/opt/gateway/venv/bin/gateway", str(here)))
    res = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                         text=True, timeout=60)
    # Any unknown key or bad value is a warning on stderr, with status 0: none allowed.
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    service = dict(line.split("=", 1) for line in text.split("[Service]")[1].split("[Install]")[0]
                   .splitlines() if "=" in line and not line.startswith("#"))
    assert service["Type"] == "notify" and service["User"] == "gateway"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/gateway"
    assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].endswith("serve --config /etc/gateway/gateway.toml")


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_tells_systemd_when_ready_and_when_stopping(tmp_path: Path, workers: int):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    notify.bind(str(path))
    notify.settimeout(30)
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
         "--domain", DOMAIN, "--data-dir", str(tmp_path / "data"), "--workers", str(workers),
         "--dns", DNS.address, "--web-listen", ""],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        assert notify.recv(4096) == b"READY=1"
        wait_port(port, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            assert client.makefile("rb").readline().startswith(b"220 ")
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        _, stderr = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        notify.close()
    assert proc.returncode == 0, stderr
