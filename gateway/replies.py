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
SENDER_NOT_OWNED = Reply(
    code=553, status="5.7.1",
    text="Adresse d'expediteur non autorisee pour ce compte : envoyez avec votre propre "
         "adresse (enveloppe et en-tete From)",
)
AUTH_OK = Reply(code=235, status="2.7.0", text="Authentification reussie")
AUTH_FAILED = Reply(code=535, status="5.7.8", text="Identifiant ou mot de passe incorrect")
AUTH_LOCKED = Reply(code=454, status="4.7.0",
                    text="Trop d'essais d'authentification recents, reessayez plus tard")
AUTH_TOO_MANY = Reply(code=421, status="4.7.0",
                      text="Trop d'essais d'authentification, connexion fermee")
TOO_MANY_RCPTS = Reply(code=452, status="4.5.3", text="Trop de destinataires pour ce message")
BAD_RCPT_SYNTAX = Reply(code=501, status="5.1.3", text="Adresse de destinataire mal formee")
BAD_SENDER_SYNTAX = Reply(code=501, status="5.1.7", text="Adresse d'expediteur mal formee")
CONTROL_CHARACTERS = Reply(code=501, status="5.5.2",
                           text="Caracteres de controle interdits dans la commande")
INVALID_UTF8 = Reply(code=501, status="5.5.2",
                     text="Octets invalides dans la commande (UTF-8 attendu)")
NON_ASCII_ADDRESS = Reply(
    code=553, status="5.6.7",
    text="Adresse non ASCII refusee : annoncez SMTPUTF8 dans MAIL FROM pour l'utiliser",
)
ROUTED_ADDRESS = Reply(
    code=550, status="5.7.1",
    text="Relais refuse : les adresses de routage (%, ! ou @ entre guillemets) sont interdites",
)
SOURCE_ROUTE = Reply(code=553, status="5.1.3",
                     text="Routage par la source refuse : donnez l'adresse du destinataire seule")
BUSY_CLIENT = Reply(
    code=451, status="4.7.1",
    text="Trop de messages en cours depuis votre adresse, merci de reessayer plus tard",
)
BUSY_NEXT_HOP = Reply(
    code=451, status="4.3.2",
    text="Serveur de messagerie du cabinet tres sollicite, merci de reessayer plus tard",
)
TOO_MANY_ABANDONED = Reply(
    code=421, status="4.7.0",
    text="Trop de transactions abandonnees sur cette connexion, connexion fermee",
)
TIMEOUT = Reply(code=421, status="4.4.2", text="Delai d'attente depasse, connexion fermee")
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
MALWARE_REJECT = Reply(
    code=550, status="5.7.1",
    text="Message refuse : il contient un logiciel malveillant connu de l'antivirus",
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

# Front proxies and MTAs (smtp.proxy_protocol_hosts, smtp.xclient_hosts).
PROXY_REFUSED = Reply(code=554, status="5.7.1",
                      text="En-tete PROXY refuse : cette adresse n'est pas un mandataire de confiance")
XCLIENT_REFUSED = Reply(code=550, status="5.7.1",
                        text="XCLIENT refuse : cette adresse n'y est pas autorisee")
XCLIENT_IN_TRANSACTION = Reply(code=503, status="5.5.1",
                               text="XCLIENT impossible pendant un envoi (RSET d'abord)")
XCLIENT_SYNTAX = Reply(code=501, status="5.5.4",
                       text="XCLIENT : attribut=valeur attendu (ADDR, NAME, HELO, PROTO, PORT, "
                            "LOGIN, DESTADDR, DESTPORT)")
