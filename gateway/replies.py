"""Every SMTP reply the gateway sends, as a named constant.

The text is French for the person who reads a bounce, written without accents because SMTP
replies are ASCII (RFC 5321 section 4.2) unless SMTPUTF8 was negotiated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    code: int
    status: str  # enhanced status code, RFC 3463
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def with_text(self, extra: str) -> Reply:
        return Reply(code=self.code, status=self.status, text=f"{self.text} ({extra})")


DELIVERED = Reply(code=250, status="2.0.0", text="Message accepte et transmis")
QUARANTINED = Reply(code=250, status="2.0.0", text="Message accepte et mis en quarantaine")
PARTLY_HELD = Reply(
    code=250, status="2.0.0",
    text="Message transmis aux destinataires MSSante, retenu en quarantaine pour les autres",
)
RCPT_OK = Reply(code=250, status="2.1.5", text="Destinataire accepte")
RELAY_DENIED = Reply(
    code=550, status="5.7.1",
    text="Relais refuse : ce serveur n'accepte que le courrier destine a ses propres domaines",
)
AUTH_REQUIRED = Reply(
    code=530, status="5.7.0",
    text="Authentification requise : configurez l'identifiant et le mot de passe d'envoi",
)
SENDER_DENIED = Reply(
    code=553, status="5.7.1",
    text="Adresse d'expediteur refusee : seules les adresses du cabinet peuvent envoyer ici",
)
AUTH_OK = Reply(code=235, status="2.7.0", text="Authentification reussie")
AUTH_FAILED = Reply(code=535, status="5.7.8", text="Identifiant ou mot de passe incorrect")
AUTH_LOCKED = Reply(code=454, status="4.7.0",
                    text="Trop d'essais d'authentification recents, reessayez plus tard")
AUTH_TOO_MANY = Reply(code=421, status="4.7.0",
                      text="Trop d'essais d'authentification, connexion fermee")
TOO_MANY_RCPTS = Reply(code=452, status="4.5.3", text="Trop de destinataires pour ce message")
BAD_ADDRESS = Reply(code=553, status="5.1.3", text="Adresse de destinataire invalide")
TOO_LARGE = Reply(code=552, status="5.3.4", text="Message trop volumineux")
POLICY_REJECT = Reply(
    code=550, status="5.7.1",
    text="Message refuse par la politique de securite du destinataire",
)
OUTBOUND_POLICY_REJECT = Reply(
    code=550, status="5.7.1",
    text="Envoi refuse par la passerelle de securite du cabinet (piece jointe ou contenu "
         "dangereux) ; contactez la personne qui administre la messagerie",
)
DMARC_REJECT = Reply(
    code=550, status="5.7.1",
    text="Message refuse : il n'a pas ete envoye par les serveurs du domaine de l'expediteur, "
         "qui demande de refuser ces messages (DMARC)",
)
HEALTH_DATA_REJECT = Reply(
    code=550, status="5.7.1",
    text="Message refuse : il contient des donnees de sante et partait sans protection. "
         "Envoyez-le par la messagerie securisee de sante (MSSante) ou chiffrez-le",
)
TEMPFAIL_SCAN = Reply(
    code=451, status="4.7.1",
    text="Analyse du message impossible pour le moment, merci de reessayer plus tard",
)
TEMPFAIL_DOWNSTREAM = Reply(
    code=451, status="4.4.1",
    text="Serveur de messagerie du destinataire injoignable, merci de reessayer plus tard",
)
TEMPFAIL_QUARANTINE = Reply(
    code=451, status="4.3.0",
    text="Enregistrement du message impossible pour le moment, merci de reessayer plus tard",
)
TEMPFAIL_INTERNAL = Reply(
    code=451, status="4.3.0",
    text="Erreur temporaire du serveur, merci de reessayer plus tard",
)
TOO_BUSY = Reply(
    code=421, status="4.7.0", text="Trop de connexions simultanees, merci de reessayer plus tard",
)
SHUTTING_DOWN = Reply(
    code=421, status="4.3.2", text="Service en cours d'arret, merci de reessayer plus tard",
)


def downstream_reply(code: int, text: str) -> str:
    """A 4xx or 5xx from the next hop, passed back with its own code and text (kept ASCII)."""
    clean = " ".join(text.split()).encode("ascii", "replace").decode("ascii")
    if not clean[:1].isdigit():
        clean = f"{code // 100}.0.0 {clean}"
    return f"{code} {clean}"
