"""A private Postfix instance on loopback, as the practice's mailbox server would be.

It relays the practice's domain to a sink and knows its users (relay_recipient_maps), so it
refuses unknown recipients at RCPT time as a real mailbox server does. Needs Debian's `postfix`
package; `make test` installs it.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MASTER_CF = Path("/etc/postfix/master.cf")


def available() -> bool:
    return shutil.which("postfix") is not None and MASTER_CF.is_file()


class Postfix:
    def __init__(self, *, port: int, domain: str, users: list[str], relay_port: int,
                 foreign_port: int | None = None) -> None:
        """With `foreign_port`, the practice's domain is local to this Postfix (mydestination,
        as on a mailbox server; its mailboxes are handed to `relay_port`) and it routes any
        other domain to `foreign_port`: the Internet, as far as relaying goes. Postfix's other
        settings stay at their defaults (allow_percent_hack, swap_bangpath: yes)."""
        self.port = port
        # Postfix daemons run as the `postfix` user: the tree must be traversable (not pytest's
        # 0700 tmp folder).
        self.root = Path(tempfile.mkdtemp(prefix="gw-postfix-"))
        self.root.chmod(0o755)
        self.etc = self.root / "etc"
        for sub in ("etc", "spool", "data"):
            (self.root / sub).mkdir(mode=0o755)
        shutil.chown(self.root / "data", "postfix")
        (self.etc / "recipients").write_text("".join(f"{u}@{domain} ok\n" for u in users))
        (self.etc / "local").write_text("".join(f"{u} ok\n" for u in users))
        if foreign_port is None:
            routing = f"""\
mydestination =
relay_domains = {domain}
relay_recipient_maps = texthash:{self.etc}/recipients
relay_transport = smtp:[127.0.0.1]:{relay_port}
"""
        else:
            routing = f"""\
mydestination = {domain}
local_recipient_maps = texthash:{self.etc}/local
local_transport = smtp:[127.0.0.1]:{relay_port}
default_transport = smtp:[127.0.0.1]:{foreign_port}
"""
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.root}/spool
data_directory = {self.root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mailbox.{domain}
mydomain = {domain}
{routing}mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
biff = no
maillog_file_prefixes = {self.root}
maillog_file = {self.root}/maillog
smtp_tls_security_level = none
smtpd_tls_security_level = none
""")
        master = MASTER_CF.read_text()
        master = re.sub(r"(?m)^smtp(\s+)inet\s+n\s+-\s+\S+", f"127.0.0.1:{port} inet n - n", master)
        # No chroot: the private spool has none of the files a chroot needs.
        master = re.sub(r"(?m)^(\S+\s+(?:unix|inet|fifo|pass|unix-dgram)\s+\S+\s+\S+\s+)y\b",
                        r"\1n", master)
        (self.etc / "master.cf").write_text(master)

    def start(self) -> None:
        done = subprocess.run(["postfix", "-c", str(self.etc), "start"], capture_output=True,
                              timeout=60, check=False)
        if done.returncode != 0:  # say why (a port taken meanwhile by another test run...)
            raise RuntimeError(f"postfix start failed ({done.returncode}):\n"
                               f"{done.stdout.decode(errors='replace')}"
                               f"{done.stderr.decode(errors='replace')}\n{self.log()}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"postfix did not start:\n{self.log()}")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else "(no log)"
