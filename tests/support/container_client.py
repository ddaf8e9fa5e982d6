"""docker/test.sh's SMTP client, with the host's python3 (standard library only):

    python3 -m tests.support.container_client direct PORT OUT   the image run alone
    python3 -m tests.support.container_client compose PORT IMAP_PORT  compose, trial mailbox
    python3 -m tests.support.container_client engines PORT IMAP_PORT  and ClamAV, rspamd

OUT is the folder where the peer container's sink writes what it receives (n.eml).
"""

from __future__ import annotations

import imaplib
import pathlib
import smtplib
import sys
import time


def greeted(port: int, within_s: float = 60) -> smtplib.SMTP:
    """A session with the gateway. Docker's port proxy accepts before the gateway listens
    and then closes: the 220 greeting is what says it is up."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return smtplib.SMTP("127.0.0.1", port, timeout=20)
        except (OSError, smtplib.SMTPException):
            if time.monotonic() > deadline:
                sys.exit(f"no SMTP greeting on 127.0.0.1:{port} within {within_s:g} s")
            time.sleep(0.5)


def received(out: pathlib.Path, n: int, within_s: float = 30) -> str:
    path = out / f"{n}.eml"
    deadline = time.monotonic() + within_s
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"the sink got no message {n} within {within_s:g} s")
        time.sleep(0.2)
    return path.read_bytes().decode()


def direct(port: int, out: pathlib.Path) -> None:
    with greeted(port) as client:
        client.ehlo("client.expediteur.test")
        code, _ = client.mail("alice@expediteur.test")
        assert code == 250, code
        code, reply = client.rcpt("ailleurs@exemple.org")  # not the practice's domain
        assert code == 550 and "relais" in reply.decode().lower(), (code, reply)
        code, _ = client.rcpt("secretariat@cabinet.test")
        assert code == 250, code
        code, reply = client.data(
            b"From: Alice <alice@expediteur.test>\r\nTo: secretariat@cabinet.test\r\n"
            b"Subject: Compte rendu\r\nMessage-ID: <c1@expediteur.test>\r\n"
            b"Date: Tue, 01 Dec 2026 09:00:00 +0100\r\n\r\nBonjour,\r\nci-joint.\r\n")
        assert code == 250, (code, reply)
    head = received(out, 1).split("\r\n\r\n", 1)[0]
    assert "X-Peer-Rcpt-To: secretariat@cabinet.test\r\n" in head, head
    assert "ailleurs@exemple.org" not in head, head
    assert "Authentication-Results: mx.cabinet.test;" in head, head
    # SPF evaluated on the client's address (the peer's zone allows the test network), and
    # aligned with From: DMARC passes under p=reject.
    assert "spf=pass" in head and "dmarc=pass" in head, head
    assert "X-Gateway-Action: accept" in head and "Subject: Compte rendu" in head, head
    print("docker/test.sh: relayed, with",
          [line for line in head.split("\r\n") if line.startswith("X-Gateway-")])


def compose(port: int, imap_port: int) -> None:
    """Through the compose service into the trial mailbox server (profile "essai"), read
    back over IMAP as a mail client would."""
    # SPF neutral for compose.test: the client comes from the compose network's gateway.
    # The mailbox server may still be starting: 4xx, and the client retries, as an MTA does.
    _send_retrying(port, "essai compose", within_s=60)
    head = _first_header(imap_port)
    assert "Subject: essai compose\r\n" in head and "X-Gateway-Action: " in head, head
    print("docker/test.sh: in the trial mailbox (IMAP):",
          [line for line in head.split("\r\n") if line.startswith("X-Gateway-Action")])


def engines(port: int, imap_port: int) -> None:
    """Compose with the engine profiles (antivirus, antispam) too: until clamd and rspamd
    answer, the gateway answers 451 and the client retries; then a file clamd's signature
    names is refused, and clean mail reaches the mailbox with rspamd's score."""
    from email.message import EmailMessage

    from tests.support.clamd import SAMPLE
    signed = EmailMessage()
    signed["From"] = "bob@compose.test"
    signed["To"] = "secretariat@cabinet.test"
    signed["Subject"] = "Rapport"
    signed.set_content("Ci-joint le rapport.")
    signed.add_attachment(SAMPLE, maintype="application", subtype="octet-stream",
                          filename="rapport.dat")
    _send_retrying(port, "essai moteurs", within_s=180)
    with greeted(port) as client:
        try:
            client.sendmail("bob@compose.test", ["secretariat@cabinet.test"],
                            signed.as_bytes())
            sys.exit("the file clamd's signature names was accepted")
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 550 and b"logiciel malveillant" in exc.smtp_error, exc
    head = _first_header(imap_port)
    assert "Subject: essai moteurs" in head and "RSPAMD_SCORE(" in head, head
    print("docker/test.sh: engines: malware refused (550); in the mailbox with",
          [line for line in head.split("\r\n") if line.startswith("X-Gateway-Symbols")])


def _send_retrying(port: int, subject: str, *, within_s: float) -> None:
    """A short message to the trial mailbox, retried on 4xx as an MTA does (a mailbox server
    or an engine still starting), at RCPT or at the end of DATA."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with greeted(port) as client:
                client.sendmail("bob@compose.test", ["secretariat@cabinet.test"],
                                b"From: bob@compose.test\r\nTo: secretariat@cabinet.test\r\n"
                                + f"Subject: {subject}\r\n\r\nBonjour\r\n".encode())
            return
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPDataError) as exc:
            codes = ([code for code, _ in exc.recipients.values()]
                     if isinstance(exc, smtplib.SMTPRecipientsRefused) else [exc.smtp_code])
            if not all(400 <= c < 500 for c in codes) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def _first_header(imap_port: int, within_s: float = 30) -> str:
    deadline = time.monotonic() + within_s
    while True:
        try:
            with imaplib.IMAP4("127.0.0.1", imap_port, timeout=10) as box:
                box.login("secretariat@cabinet.test", "essai-compose")
                _, [count] = box.select("INBOX")
                if count and int(count) >= 1:
                    _, data = box.fetch("1", "(BODY.PEEK[HEADER])")
                    return str(data[0][1].decode())
        except (OSError, imaplib.IMAP4.error):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"nothing in the trial mailbox within {within_s:g} s")
        time.sleep(0.5)


if __name__ == "__main__":
    if sys.argv[1] == "direct":
        direct(int(sys.argv[2]), pathlib.Path(sys.argv[3]))
    elif sys.argv[1] == "engines":
        engines(int(sys.argv[2]), int(sys.argv[3]))
    else:
        compose(int(sys.argv[2]), int(sys.argv[3]))
