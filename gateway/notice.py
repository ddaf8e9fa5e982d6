"""The French notice to a member of the practice whose outgoing mail carried health data in clear.

Sent when the outbound guard held the message (policy "hold") or let it go with a warning
("warn"). It names the recipients that were not secure and what was found, with the NIR masked
(the symbols' descriptions already are), never the data itself. It goes to the sender's own
mailbox through the inbound next hop (the practice's mailbox server), with a null reverse path
and `Auto-Submitted: auto-generated` (RFC 3834) so that it never loops.

Sending is in the background: the notice never delays or changes the reply to the mail client,
and its failure is logged (the held message itself is already safe in the quarantine).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid

from gateway.config import Config
from gateway.errors import DownstreamRejected, DownstreamUnavailable
from gateway.message import Inbound
from gateway.relay import NextHop, deliver

log = logging.getLogger(__name__)



def build(cfg: Config, inbound: Inbound, subject: str, *, findings: tuple[str, ...], held: bool,
          exposed: tuple[str, ...], reference: str, release_url: str = "",
          delivered_to: tuple[str, ...] = ()) -> bytes:
    """The notice as wire bytes (CRLF). `exposed`: the recipients the outbound guard found the
    health data would reach in clear; `findings`: the French explanations of the symbols the
    table lists in notices (`notice = "list"`)."""
    domain = inbound.mail_from.rpartition("@")[2] or sorted(cfg.domains)[0]
    clear = [r for r in exposed if r not in delivered_to]
    found = list(findings)
    when = time.strftime("%d/%m/%Y à %H:%M", time.localtime(inbound.received_at))
    lines = [
        "Bonjour,",
        "",
        f"Votre message « {subject or '(sans objet)'} » du {when} contient des données de santé "
        "et partait sans protection vers :",
        *[f"  - {r}" for r in clear],
        "",
        "Ce que la passerelle a trouvé :",
        *[f"  - {f}" for f in dict.fromkeys(found)],
        "",
    ]
    if held and delivered_to:
        lines += ["Le message a été envoyé aux destinataires de la messagerie sécurisée "
                  f"({', '.join(delivered_to)}) ; il est RETENU pour les autres.", ""]
    elif held:
        lines += ["Le message est RETENU : il n'a pas été envoyé.", ""]
    else:
        lines += ["Le message a été envoyé, mais sans protection.", ""]
    lines += [
        "Pourquoi : une messagerie ordinaire (Gmail, Orange, Outlook...) ne protège pas les données "
        "de santé ; le secret médical et le RGPD imposent un canal sécurisé. Ce canal est la "
        "messagerie sécurisée de santé (MSSanté) : les adresses des professionnels de santé se "
        "terminent par « mssante.fr », et chaque patient a la sienne dans Mon espace santé "
        "(adresse en « @patient.mssante.fr »).",
        "",
        "Que faire :",
        "  - pour un professionnel de santé, envoyez le message à son adresse MSSanté ;",
        "  - pour un patient, utilisez sa messagerie Mon espace santé ;",
        "  - sinon, chiffrez le document ou le message avant l'envoi.",
    ]
    if held:
        lines.append("")
        if release_url:
            lines += ["Si cet envoi est vraiment voulu (par exemple à la demande écrite du patient), "
                      "vous pouvez le libérer vous-même ici :", f"  {release_url}"]
        else:
            lines.append("Si cet envoi est vraiment voulu (par exemple à la demande écrite du "
                         "patient), demandez à la personne qui administre la passerelle de le "
                         "libérer.")
        lines.append(f"Référence du message retenu : {reference}")
    lines += ["", "-- ", "Passerelle de sécurité mail du cabinet (message automatique)"]
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"Passerelle de sécurité <postmaster@{domain}>"
    msg["To"] = inbound.mail_from
    msg["Subject"] = ("Message retenu : données de santé sans protection" if held
                      else "Message envoyé sans protection : données de santé")
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=cfg.gateway.hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Gateway-Notice"] = reference
    msg.set_content("\n".join(lines) + "\n", charset="utf-8", cte="quoted-printable")
    return msg.as_bytes()


def release_token(secret: bytes, item_id: str, mail_from: str) -> str:
    """The capability in a sender's release link (outbound notice): HMAC of the item and its
    sender, under a key derived from the installation's secret."""
    key = hmac.new(secret, b"sender-release", hashlib.sha256).digest()
    return hmac.new(key, f"{item_id}\0{mail_from.lower()}".encode(), hashlib.sha256).hexdigest()[:32]


class Notifier:
    """Sends notices through `hop` in background tasks; `close` waits for those in flight."""

    def __init__(self, cfg: Config, hop: NextHop,
                 release_url: Callable[[str, str], str] | None = None) -> None:
        self._cfg = cfg
        self._hop = hop
        self._release_url = release_url
        self._tasks: set[asyncio.Task[None]] = set()

    def after(self, inbound: Inbound, subject: str, *, findings: tuple[str, ...],
              exposed: tuple[str, ...], delivered: bool, quarantine_id: str | None,
              delivered_to: tuple[str, ...] = (), sender_may_release: bool = False) -> None:
        """A notice for a message whose chain has the NOTICE step and whose verdict has a
        symbol asking for one (`notice = "send"`): held, or sent without protection. The
        release link only when the sender may use it (held for exposure only)."""
        held = quarantine_id is not None
        if not self._cfg.outbound.notify_sender or not (held or delivered) \
                or "@" not in inbound.mail_from:
            return
        reference = quarantine_id or inbound.queue_id
        url = (self._release_url(reference, inbound.mail_from)
               if held and sender_may_release and self._release_url else "")
        raw = build(self._cfg, inbound, subject, findings=findings, held=held, exposed=exposed,
                    reference=reference, release_url=url, delivered_to=delivered_to)
        task = asyncio.get_running_loop().create_task(self._send(inbound.mail_from, raw, reference))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, to: str, raw: bytes, reference: str) -> None:
        try:
            await deliver(self._hop, "", (to,), b"", raw)
        except (DownstreamUnavailable, DownstreamRejected, OSError) as exc:
            log.warning("sender notice not delivered", extra={"fields": {
                "reference": reference, "error": str(exc)}})
        else:
            log.info("sender notice delivered", extra={"fields": {"reference": reference}})

    async def close(self, timeout_s: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
