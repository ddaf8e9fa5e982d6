"""Command line: `gateway serve | scan | check-config | quarantine ...`.

What the admin reads here is French; log lines stay English.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from gateway import __version__, backup, config, digest, install
from gateway.accounts import AccountFile
from gateway.authstate import AuthState
from gateway.banner import load_templates
from gateway.config import Config
from gateway.errors import ConfigError, DownstreamRejected, Refused, TemporaryError
from gateway.message import Direction, Inbound, header_section_end
from gateway.netaddr import networks, parse_ip, within
from gateway.quarantine_service import QuarantineService
from gateway.service import (
    RELOAD_DIR,
    build_runtime,
    check_rules,
    gateway_pid,
    serve,
)
from gateway.smtp import tls_context
from quarantine.crypto import KeyFileError
from quarantine.store import (
    OUTCOMES_FR,
    RELEASABLE,
    STATES,
    STATES_FR,
    Item,
    NotFound,
    NotQuarantined,
    TrackRecord,
)


class _FrenchFormatter(argparse.HelpFormatter):
    def add_usage(self, usage: str | None, actions: Any, groups: Any,
                  prefix: str | None = None) -> None:
        super().add_usage(usage, actions, groups, "utilisation : " if prefix is None else prefix)


# argparse's own messages, in French (it has no translation of its own installed).
_ARGPARSE_FR = [
    (re.compile(r"argument (.+?): invalid choice: (.+) \(choose from (.+)\)", re.S),
     "argument {0} : choix invalide : {1} (choisir parmi {2})"),
    (re.compile(r"the following arguments are required: (.+)", re.S),
     "arguments obligatoires manquants : {0}"),
    (re.compile(r"unrecognized arguments: (.+)", re.S), "arguments inconnus : {0}"),
    (re.compile(r"argument (.+?): expected one argument", re.S),
     "argument {0} : une valeur est attendue"),
    (re.compile(r"argument (.+?): expected at least one argument", re.S),
     "argument {0} : au moins une valeur est attendue"),
    (re.compile(r"argument (.+?): invalid (\w+) value: (.+)", re.S),
     "argument {0} : valeur invalide : {2}"),
    (re.compile(r"argument (.+?): not allowed with argument (.+)", re.S),
     "argument {0} : incompatible avec {1}"),
    (re.compile(r"argument (.+?): ignored explicit argument (.+)", re.S),
     "argument {0} : valeur inattendue {1}"),
    (re.compile(r"ambiguous option: (.+?) could match (.+)", re.S),
     "option ambiguë : {0} peut désigner {1}"),
]


def french_argparse_error(message: str) -> str:
    for pattern, text in _ARGPARSE_FR:
        if m := pattern.fullmatch(message):
            return text.format(*m.groups())
    return message


class FrenchParser(argparse.ArgumentParser):
    """argparse with French headings, help and errors (the CLI is read by the practice's
    admin); the subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _FrenchFormatter)
        add_help = kwargs.pop("add_help", True)
        kwargs["add_help"] = False  # ours instead, in French
        super().__init__(*args, **kwargs)
        self._positionals.title = "arguments"
        self._optionals.title = "options"
        if add_help:
            self.add_argument("-h", "--help", action="help", default=argparse.SUPPRESS,
                              help="afficher cette aide et quitter")

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog} : erreur : {french_argparse_error(message)}\n")


def _networks(value: str) -> tuple[str, ...]:
    """A comma-separated list of networks (CIDR), checked by the configuration's rules."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FICHIER", help="fichier de configuration TOML")
    p.add_argument("--domain", action="append", metavar="D", dest="domains",
                   help="domaine du cabinet (répétable) ; remplace gateway.domains")
    p.add_argument("--data-dir", metavar="DOSSIER", help="dossier des données (quarantaine, clés)")
    p.add_argument("--dns", metavar="HOTE:PORT", help="serveur DNS utilisé par les vérifications")


def build_parser() -> argparse.ArgumentParser:
    ap = FrenchParser(prog="gateway", description="Passerelle de sécurité mail du cabinet")
    ap.add_argument("--version", action="version", version=f"gateway {__version__}",
                    help="afficher la version et quitter")
    sub = ap.add_subparsers(dest="command", required=True, title="commandes",
                            metavar="COMMANDE")

    p = sub.add_parser("serve", help="relais MX entrant (SMTP)")
    _common(p)
    p.add_argument("--listen", metavar="HOTE:PORT", help="adresse d'écoute SMTP")
    p.add_argument("--next-hop", metavar="HOTE:PORT",
                   help="serveur de messagerie du cabinet ; sans lui : Maildir local")
    p.add_argument("--workers", type=int, metavar="N", help="processus de service (0 = un par cœur)")
    p.add_argument("--submission-listen", metavar="HOTE:PORT",
                   help="port de dépôt (envoi) pour les logiciels de messagerie du cabinet")
    p.add_argument("--submission-tls-listen", metavar="HOTE:PORT",
                   help="port de dépôt chiffré dès la connexion (465), certificat requis")
    p.add_argument("--smarthost", metavar="HOTE:PORT",
                   help="relais d'envoi du fournisseur ; sans lui : Maildir local « outbox »")
    p.add_argument("--metrics-listen", metavar="HOTE:PORT",
                   help="/metrics (Prometheus), /healthz, /readyz (défaut 127.0.0.1:9464 ; "
                   "« » pour aucun)")
    p.add_argument("--proxy-protocol-hosts", metavar="RESEAUX", type=_networks,
                   help="mandataires de confiance (HAProxy, répartiteur) qui donnent l'adresse "
                   "du client par l'en-tête PROXY, ex. 10.0.0.2/32,10.0.1.0/24")
    p.add_argument("--xclient-hosts", metavar="RESEAUX", type=_networks,
                   help="serveurs frontaux (Postfix) autorisés à donner le client par XCLIENT")
    p.add_argument("--web-listen", metavar="HOTE:PORT",
                   help="page web de quarantaine (défaut 127.0.0.1:8080 ; « » pour aucune)")

    p = sub.add_parser("scan", help="analyser des messages hors ligne, sans les relayer")
    _common(p)
    p.add_argument("files", nargs="+", metavar="FICHIER", help="messages (.eml) à analyser")
    p.add_argument("--json", action="store_true", help="un objet JSON par message")
    p.add_argument("--client-ip", default="127.0.0.1", metavar="IP",
                   help="adresse du serveur d'envoi supposé (127.0.0.1)")
    p.add_argument("--helo", default="localhost", metavar="NOM", help="nom annoncé (HELO)")
    p.add_argument("--mail-from", default="", metavar="ADRESSE",
                   help="expéditeur de l'enveloppe (vide : <>)")
    p.add_argument("--rcpt", action="append", default=[], metavar="ADRESSE",
                   help="destinataire (répétable ; par défaut postmaster du cabinet)")
    p.add_argument("--direction", choices=[d.value for d in Direction], default="inbound",
                   help="inbound (reçu, par défaut) ou outbound (envoyé)")
    p.add_argument("--tls", choices=["yes", "no"], default="no",
                   help="la session de dépôt était-elle chiffrée (sens sortant)")

    p = sub.add_parser("submission", help="comptes d'envoi (authentification SMTP)")
    _common(p)
    add = _user_commands(p, "créer un compte d'envoi (mot de passe demandé)", senders=True)
    add.add_argument("--adresse", action="append", default=[], dest="addresses",
                     metavar="ADRESSE", help="adresse d'expéditeur permise (répétable ; "
                     "@domaine pour toutes celles du domaine) ; par défaut l'identifiant")
    p = sub.add_parser("admin", help="comptes de la page web de quarantaine")
    _common(p)
    add = _user_commands(p, "créer un compte (mot de passe demandé, code TOTP affiché)",
                         totp=True)
    add.add_argument("--role", choices=["admin", "lecteur"], default="lecteur",
                     help="admin : toutes les actions ; lecteur : consultation seule")
    add.add_argument("--qr", metavar="FICHIER.svg|png",
                     help="écrire aussi le QR code dans ce fichier")

    p = sub.add_parser("init", help="première configuration : écrit le fichier, crée le "
                       "dossier des données et dit quoi régler dans le DNS et le serveur de "
                       "messagerie")
    p.add_argument("--domaine", action="append", dest="domains", metavar="DOMAINE",
                   help="domaine du cabinet (répétable ; demandé s'il manque)")
    p.add_argument("--nom", dest="hostname", metavar="NOM",
                   help="nom DNS de la passerelle (par défaut mx.<premier domaine>)")
    p.add_argument("--serveur-messagerie", dest="next_hop", metavar="HOTE:PORT",
                   help="serveur de messagerie du cabinet (vide : boîte locale)")
    p.add_argument("--donnees", dest="data_dir", metavar="DOSSIER",
                   help=f"dossier des données (par défaut {install.DEFAULT_DATA})")
    p.add_argument("--ecoute", dest="listen", metavar="HOTE:PORT",
                   help="adresse d'écoute SMTP (par défaut 0.0.0.0:25)")
    p.add_argument("--adresse-web", dest="public_url", metavar="URL",
                   help="adresse de la page web pour le personnel (liens des rapports)")
    p.add_argument("--compte", dest="owner", metavar="COMPTE",
                   help="compte du service, propriétaire du dossier des données (en root)")
    p.add_argument("--fichier", metavar="FICHIER",
                   help=f"fichier à écrire (par défaut $GATEWAY_CONFIG, sinon "
                   f"{install.DEFAULT_FILE})")
    p.add_argument("--forcer", action="store_true", help="remplacer un fichier existant")

    p = sub.add_parser("health", help="la passerelle répond-elle ? (salut SMTP sur son port ; "
                       "code 0 si oui) : sonde d'un conteneur ou d'une supervision")
    _common(p)
    p.add_argument("--listen", metavar="HOTE:PORT", help="adresse d'écoute SMTP à sonder")
    p.add_argument("--delai", type=float, default=5.0, metavar="SECONDES",
                   help="attente maximale de la réponse (5)")

    p = sub.add_parser("reload", help="relire les règles (rules/, YARA, modèles du bandeau, "
                       "certificat TLS) sans arrêt : vérifiées d'abord, gardées si refusées")
    _common(p)
    p.add_argument("--delai", type=float, default=30.0, metavar="SECONDES",
                   help="attente maximale des processus de service (30)")

    p = sub.add_parser("backup", help="sauvegarde cohérente des données (quarantaine, index, "
                       "comptes), même en service ; la clé à part")
    _common(p)
    p.add_argument("dossier", metavar="DOSSIER", help="dossier de sauvegarde, vide ou absent")
    p.add_argument("--cle", metavar="FICHIER", help="où écrire aussi la clé de quarantaine "
                   "(sur un autre support que les données)")
    p = sub.add_parser("restore", help="remettre une sauvegarde dans un dossier de données vide, "
                       "vérifiée, puis relire chaque message retenu")
    _common(p)
    p.add_argument("dossier", metavar="DOSSIER", help="dossier de la sauvegarde")
    p.add_argument("--cle", metavar="FICHIER", help="fichier de la clé de quarantaine (sinon : "
                   "celle déjà en place)")

    p = sub.add_parser("check-config", help="valider un fichier de configuration")
    p.add_argument("file", metavar="FICHIER")

    p = sub.add_parser("track", help="suivi des messages : retrouver ce que la passerelle a "
                       "fait d'un message (accepté, retenu, refusé)")
    _common(p)
    p.add_argument("query", nargs="?", default="", metavar="RECHERCHE",
                   help="identifiant donné dans la réponse SMTP (id=...), identifiant de "
                   "quarantaine, ou mots de l'expéditeur, d'un destinataire ou de l'objet")
    p.add_argument("--depuis", metavar="AAAA-MM-JJ", help="reçus ce jour ou après")
    p.add_argument("--jusqua", metavar="AAAA-MM-JJ", help="reçus ce jour ou avant")
    p.add_argument("--action", choices=list(_ACTION_FR), metavar="ACTION",
                   help="décision : " + ", ".join(f"{k} ({v})" for k, v in _ACTION_FR.items()))
    p.add_argument("--sens", choices=["inbound", "outbound"], dest="direction",
                   help="inbound (reçus) ou outbound (envoyés)")
    p.add_argument("--limit", type=int, default=50, metavar="N",
                   help="nombre de messages au plus (50)")
    p.add_argument("--json", action="store_true", help="un objet JSON par message")

    p = sub.add_parser("digest", help="rapport de quarantaine : qui recevrait quoi, ou "
                       "l'envoyer maintenant (sinon envoyé chaque jour à digest.hour)")
    _common(p)
    p.add_argument("--envoyer", action="store_true",
                   help="envoyer maintenant les rapports de ce qui a été retenu depuis le "
                   "dernier rapport (le rapport suivant repart de maintenant)")
    p.add_argument("--reactiver", metavar="ADRESSE",
                   help="envoyer de nouveau le rapport à une adresse qui l'avait désactivé")

    p = sub.add_parser("quarantine", help="consulter et traiter la quarantaine")
    _common(p)
    qsub = p.add_subparsers(dest="qcommand", required=True, title="commandes",
                            metavar="COMMANDE")
    q = qsub.add_parser("list", help="lister les messages retenus")
    q.add_argument("--state", choices=list(STATES), metavar="ÉTAT",
                   help="état : " + ", ".join(f"{k} ({v})" for k, v in STATES_FR.items()))
    q.add_argument("--limit", type=int, default=50, metavar="N",
                   help="nombre de messages au plus (50)")
    q.add_argument("--json", action="store_true", help="un objet JSON par message")
    for name, text in (("show", "afficher un message"), ("release", "libérer (remettre) un message"),
                       ("delete", "supprimer un message")):
        q = qsub.add_parser(name, help=text)
        q.add_argument("id", metavar="IDENTIFIANT", help="identifiant de quarantaine")
        if name == "show":
            q.add_argument("--raw", action="store_true", help="écrire le message brut (.eml)")
        if name == "release":
            q.add_argument("--confirmer", action="store_true",
                           help="nécessaire pour un message refusé (son expéditeur a reçu un "
                           "refus) ou retenu pour un fichier dangereux")
    q = qsub.add_parser("purge", help="supprimer les messages plus anciens que la rétention")
    q.add_argument("--days", type=float, metavar="JOURS",
                   help="par défaut : quarantine.retention_days")
    return ap


def _user_commands(p: argparse.ArgumentParser, add_help: str, *, totp: bool = False,
                   senders: bool = False) -> argparse.ArgumentParser:
    """add-user / passwd / remove-user / list-users (and reset-totp for web accounts,
    addresses for submission accounts); returns the add-user parser."""
    usub = p.add_subparsers(dest="ucommand", required=True, title="commandes",
                            metavar="COMMANDE")
    add = usub.add_parser("add-user", help=add_help)
    if senders:
        addr = usub.add_parser("addresses", help="adresses d'expéditeur permises à un compte "
                               "(sans adresse : l'identifiant seul)")
        addr.add_argument("name", metavar="IDENTIFIANT")
        addr.add_argument("addresses", nargs="*", metavar="ADRESSE")
    if totp:
        reset = usub.add_parser("reset-totp", help="nouveau second facteur (téléphone perdu)")
        reset.add_argument("name", metavar="IDENTIFIANT")
        reset.add_argument("--qr", metavar="FICHIER.svg|png",
                           help="écrire aussi le QR code dans ce fichier")
    u = usub.add_parser("passwd", help="changer le mot de passe d'un compte")
    for q in (add, u):
        q.add_argument("name", metavar="IDENTIFIANT")
        q.add_argument("--password-stdin", action="store_true",
                       help="lire le mot de passe sur l'entrée standard")
    u = usub.add_parser("remove-user", help="supprimer un compte")
    u.add_argument("name", metavar="IDENTIFIANT")
    usub.add_parser("list-users", help="lister les comptes")
    return add


def config_path(args: argparse.Namespace) -> Path | None:
    """The configuration used: --config, else $GATEWAY_CONFIG, else the file `gateway init`
    writes if it exists, else None (the embedded default)."""
    given = getattr(args, "config", None)
    if given:
        return Path(given)
    if "GATEWAY_CONFIG" in os.environ:  # set and empty: the embedded default (make run, tests)
        return Path(os.environ["GATEWAY_CONFIG"]) if os.environ["GATEWAY_CONFIG"] else None
    return install.DEFAULT_FILE if install.DEFAULT_FILE.exists() else None


def where() -> str:
    """Which configuration and data folder a command used, for messages that found nothing."""
    source = str(_config_file) if _config_file else "défaut intégré (aucun fichier)"
    data = _loaded.data_dir.absolute() if _loaded is not None else "?"
    return f"(configuration : {source} ; données : {data})"


_config_file: Path | None = None  # the file `load_config` read


def load_config(args: argparse.Namespace) -> Config:
    global _config_file
    _config_file = config_path(args)
    cfg = config.load(_config_file)
    return config.override(
        cfg,
        gateway__domains=tuple(args.domains) if getattr(args, "domains", None) else None,
        gateway__data_dir=getattr(args, "data_dir", None),
        gateway__workers=getattr(args, "workers", None),
        smtp__listen=getattr(args, "listen", None),
        next_hop__address=getattr(args, "next_hop", None),
        submission__listen=getattr(args, "submission_listen", None),
        submission__listen_tls=getattr(args, "submission_tls_listen", None),
        submission__smarthost=getattr(args, "smarthost", None),
        web__listen=getattr(args, "web_listen", None),
        metrics__listen=getattr(args, "metrics_listen", None),
        smtp__proxy_protocol_hosts=getattr(args, "proxy_protocol_hosts", None),
        smtp__xclient_hosts=getattr(args, "xclient_hosts", None),
        dns__nameservers=(args.dns,) if getattr(args, "dns", None) else None,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            # The file, then what it points at: symbol table, checks and their rules (sender
            # registry, YARA), banner templates, as `serve` loads them before opening a port.
            checked = config.load(args.file)
            check_rules(checked)
            load_templates(checked.banner_templates)
            print(f"{args.file} : configuration valide (règles comprises)")
            return 0
        if args.command == "init":
            try:
                answers = install.answers_from(args, interactive=install.interactive())
                target = Path(args.fichier or os.environ.get("GATEWAY_CONFIG")
                              or install.DEFAULT_FILE)
                written = install.write(answers, target, force=args.forcer)
            except ConfigError as exc:
                print(f"Initialisation impossible :\n{exc}", file=sys.stderr)
                return 2
            print(install.guidance(written, target.expanduser().absolute(), answers.owner))
            return 0
        cfg = load_config(args)
        global _loaded
        _loaded = cfg
        if args.command == "serve":
            return serve(cfg)
        if args.command == "health":
            return _health(cfg, args.delai)
        if args.command == "reload":
            return _reload(cfg, args.delai)
        if args.command in ("backup", "restore"):
            return _backup(cfg, args)
        if args.command == "scan":
            return asyncio.run(_scan(cfg, args))
        if args.command == "submission":
            return _users(AccountFile(cfg.submission_users_file), args,
                          addresses=tuple(getattr(args, "addresses", ())))
        if args.command == "admin":
            return _admin(cfg, args)
        if args.command == "track":
            return asyncio.run(_track(cfg, args))
        if args.command == "digest":
            return asyncio.run(_digest(cfg, args))
        return asyncio.run(_quarantine(cfg, args))
    except ConfigError as exc:
        print(f"Configuration invalide :\n{exc}", file=sys.stderr)
        return 2
    except KeyFileError as exc:
        print(f"Clé de quarantaine inutilisable : {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])


def _health(cfg: Config, timeout_s: float) -> int:
    """Connect to the SMTP port as a client would and expect its 220 greeting (then QUIT):
    the serving processes accept and answer, not only the port is open."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(cfg.listen.host,
                                                                      cfg.listen.host)
    try:
        with socket.create_connection((host, cfg.listen.port), timeout=timeout_s) as sock:
            if within(parse_ip(sock.getsockname()[0]), networks(cfg.smtp.proxy_protocol_hosts)):
                # From a proxy's address the gateway waits for a PROXY header first: v2's
                # LOCAL command, what a proxy's own health check sends.
                sock.sendall(PROXY_V2_LOCAL)
            greeting = sock.makefile("rb").readline(512)
            if greeting.startswith(b"220"):
                sock.sendall(b"QUIT\r\n")
                print(f"SMTP {cfg.listen} : en service")
                return 0
            reply = greeting.decode("ascii", "replace").strip()[:120] or "connexion fermée"
            print(f"SMTP {cfg.listen} : réponse inattendue : {reply}", file=sys.stderr)
    except OSError as exc:
        why = ("délai dépassé" if isinstance(exc, TimeoutError)
               else "connexion refusée" if isinstance(exc, ConnectionRefusedError)
               else exc.strerror or type(exc).__name__)
        print(f"SMTP {cfg.listen} : pas de réponse ({why})", file=sys.stderr)
    return 1


def _reload(cfg: Config, timeout_s: float) -> int:
    """Check the rules here as the serving processes will, then SIGHUP the running gateway
    and report what each serving process did (it keeps its rules if the new ones fail)."""
    try:
        check_rules(cfg)
        load_templates(cfg.banner_templates)
        tls_context(cfg)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"Règles refusées, rien n'est changé : {exc}", file=sys.stderr)
        return 1
    pid = gateway_pid(cfg)  # only while the gateway holds its pid file's lock
    if pid is None:
        print(f"La passerelle ne tourne pas avec ce dossier de données. {where()}",
              file=sys.stderr)
        return 1
    started = time.time()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"Signal impossible au processus {pid} de la passerelle ({exc.strerror}) : "
              "lancez la commande avec le compte de la passerelle, ou root.", file=sys.stderr)
        return 1
    folder, wanted = cfg.data_dir / RELOAD_DIR, cfg.worker_count
    deadline = time.monotonic() + timeout_s
    while True:
        done = []
        for path in folder.glob("*.json") if folder.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                status = json.loads(path.read_text())
                if status["at"] >= started:
                    done.append(status)
        if len(done) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    failed = [d for d in done if d["error"]]
    for d in failed:
        print(f"Processus {d['pid']} : règles refusées, les précédentes restent en service : "
              f"{d['error']}", file=sys.stderr)
    if len(done) < wanted:
        print(f"{wanted - len(done)} processus sur {wanted} n'ont pas répondu en "
              f"{timeout_s:g} s (voir le journal).", file=sys.stderr)
    if failed or len(done) < wanted:
        return 1
    print(f"Règles relues par les {wanted} processus de service.")
    return 0


def _backup(cfg: Config, args: argparse.Namespace) -> int:
    folder = Path(args.dossier).expanduser().absolute()
    key = Path(args.cle).expanduser().absolute() if args.cle else None
    try:
        if args.command == "backup":
            done = backup.backup(cfg, folder, key)
            print(f"Sauvegarde écrite dans {folder} : {done.items} messages dans l'index, "
                  f"{done.files} fichiers.")
            if key is None:
                print(f"Attention : la clé de quarantaine n'est pas dans la sauvegarde. Gardez "
                      f"une copie de {cfg.key_file} sur un autre support : sans elle, la "
                      "sauvegarde est illisible ; avec elle, qui a les deux lit tout.")
            else:
                print(f"Clé écrite dans {key} (mode 0600).")
                if backup.same_medium(key, folder):
                    print("Attention : la clé et les données sont sur le même support : qui a "
                          "l'un a l'autre. Placez la clé sur un autre support.")
            return 0
        done = backup.restore(cfg, folder, key)
    except backup.BackupError as exc:
        print(f"Impossible : {exc}", file=sys.stderr)
        return 1
    readable, unreadable = asyncio.run(backup.readable_items(cfg))
    print(f"Sauvegarde remise dans {cfg.data_dir.absolute()} : {done.files} fichiers ; "
          f"{readable} messages relus sans erreur.")
    if unreadable:
        print(f"{len(unreadable)} messages illisibles : {', '.join(unreadable[:20])}",
              file=sys.stderr)
        return 1
    if readable < done.held:
        print(f"La sauvegarde comptait {done.held} messages ; {readable} seulement ont été relus.",
              file=sys.stderr)
        return 1
    return 0


# ---- accounts ----------------------------------------------------------------------------


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Mot de passe : ")
    if getpass.getpass("Mot de passe (encore) : ") != first:
        raise Refused("les deux mots de passe diffèrent")
    return first


def _users(accounts: AccountFile, args: argparse.Namespace, **fields: Any) -> int:
    """add-user / passwd / remove-user / list-users on one accounts file."""
    cmd = args.ucommand
    try:
        if cmd == "list-users":
            users = accounts.load()
            if not users:
                print(f"Aucun compte. {where()}")
            for a in users.values():
                role = f"  rôle {a.role}" if a.role else ""
                senders = f"  expéditeur {', '.join(a.addresses)}" if a.addresses else ""
                print(f"{a.name}{role}{senders}  créé le {_when(a.created_at)}")
            return 0
        if cmd == "addresses":
            account = accounts.set_addresses(args.name, tuple(args.addresses))
            print(f"{account.name} peut envoyer comme : "
                  f"{', '.join(account.addresses or (account.name,))}")
            return 0
        if cmd == "remove-user":
            accounts.remove(args.name)
            print(f"Compte {args.name} supprimé.")
            return 0
        password = read_password(args.password_stdin)
        if cmd == "passwd":
            accounts.set_password(args.name, password)
            print(f"Mot de passe de {args.name} changé.")
            return 0
        account = accounts.add(args.name, password, **fields)
        print(f"Compte {account.name} créé ({accounts.path}).")
        if "addresses" in fields and not account.addresses and "@" not in account.name:
            print("Attention : cet identifiant n'est pas une adresse ; donnez les adresses "
                  "d'expéditeur permises avec --adresse, sinon tout envoi sera refusé.")
        return 0
    except KeyError:
        print(f"Compte inconnu : {args.name}", file=sys.stderr)
        return 1
    except Refused as exc:
        print(f"Impossible : {exc}", file=sys.stderr)
        return 1


def _admin(cfg: Config, args: argparse.Namespace) -> int:
    """Web page accounts: as submission users, plus a role and a TOTP secret shown once."""
    from gateway.web.security import enrolment_qr, new_totp_secret

    accounts = AccountFile(cfg.web_users_file)
    if args.ucommand not in ("add-user", "reset-totp"):
        status = _users(accounts, args)
        if status == 0 and args.ucommand in ("passwd", "remove-user"):
            _end_sessions(cfg, args.name)
        return status
    secret = new_totp_secret()
    name = args.name.strip().lower()
    if args.ucommand == "add-user":
        status = _users(accounts, args, role=args.role, totp_secret=secret)
        if status != 0:
            return status
    else:
        try:
            accounts.set_totp(name, secret)
        except KeyError:
            print(f"Compte inconnu : {name}", file=sys.stderr)
            return 1
        print(f"Nouveau second facteur pour {name} : les anciens codes ne marchent plus.")
        _end_sessions(cfg, name)
    qr = enrolment_qr(secret, name, cfg.gateway.hostname)
    print("\nSecond facteur : scannez ce QR code avec une application d'authentification")
    print("(FreeOTP, Google Authenticator, Microsoft Authenticator...) :\n")
    qr.terminal(compact=True)
    print(f"\nOu saisissez cette clé : {secret}")
    print("Elle n'est affichée qu'une fois ; la passerelle la garde dans un fichier que seul "
          "l'administrateur du système peut lire (0600).")
    if args.qr:
        path = Path(args.qr)
        qr.save(str(path), scale=6)
        path.chmod(0o600)
        print(f"QR code écrit dans {path} (à supprimer après l'enrôlement).")
    return 0


def _end_sessions(cfg: Config, name: str) -> None:
    """A credential changed: the account's open sessions on the web page end now."""
    state = AuthState.open(cfg.auth_state_file)
    try:
        n = state.drop_user(name.strip().lower())
    finally:
        state.close()
    if n:
        print(f"{n} session(s) ouverte(s) de {name} fermée(s).")


# ---- scan --------------------------------------------------------------------------------


def to_crlf(raw: bytes) -> bytes:
    """Files on disk usually have LF line ends; SMTP data has CRLF."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def _scan(cfg: Config, args: argparse.Namespace) -> int:
    runtime = await build_runtime(cfg, with_store=False)
    rcpts = tuple(args.rcpt) or (f"postmaster@{sorted(cfg.domains)[0]}",)
    status = 0
    try:
        for name in args.files:
            try:
                raw = to_crlf(await asyncio.to_thread(Path(name).read_bytes))
            except OSError as exc:
                print(json.dumps({"file": name, "error": str(exc)}, ensure_ascii=False)
                      if args.json else f"{name} : illisible ({exc.strerror})")
                status = 1
                continue
            inbound = Inbound(queue_id="scan", peer_ip=args.client_ip, helo=args.helo,
                              mail_from=args.mail_from, rcpts=rcpts, raw=raw,
                              direction=Direction(args.direction), tls=args.tls == "yes")
            analysis = await runtime.pipeline.analyse(inbound)
            v = analysis.verdict
            if args.json:
                print(json.dumps({
                    "file": name, "action": v.action.value, "score": v.score,
                    "symbols": [{"name": s.name, "score": s.score, "description": s.description,
                                 "detail": s.detail} for s in v.symbols],
                }, ensure_ascii=False), flush=True)
            else:
                print(f"{name} : {_ACTION_FR[v.action.value]} (score {v.score:g})")
                for s in v.symbols:
                    print(f"  {s.name} ({s.score:g}) : {s.description}")
    finally:
        await runtime.close()
    return status


_ACTION_FR = {"accept": "accepté", "tag": "marqué comme suspect", "quarantine": "mis en quarantaine",
              "reject": "refusé", "tempfail": "refusé temporairement"}
# ---- message tracking --------------------------------------------------------------------

def _day(text: str, flag: str, *, end: bool = False) -> float:
    try:
        day = time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise Refused(f"{flag} : date attendue sous la forme AAAA-MM-JJ, reçu {text!r}") from None
    return time.mktime(day) + (86400 if end else 0)


async def _track(cfg: Config, args: argparse.Namespace) -> int:
    try:
        since = _day(args.depuis, "--depuis") if args.depuis else None
        until = _day(args.jusqua, "--jusqua", end=True) if args.jusqua else None
    except Refused as exc:
        print(f"Recherche impossible : {exc}", file=sys.stderr)
        return 2
    runtime = await build_runtime(cfg)
    try:
        assert runtime.store is not None
        records, total = await runtime.store.tracking(
            args.query, since=since, until=until, action=args.action,
            direction=args.direction, limit=args.limit)
    finally:
        await runtime.close()
    if args.json:
        for r in records:
            print(json.dumps(_track_json(r), ensure_ascii=False))
        return 0 if records else 1
    if not records:
        print(f"Aucun message trouvé. {where()}")
        return 1
    for r in records:
        what = OUTCOMES_FR.get(r.outcome, r.outcome)
        print(f"{r.queue_id}  {_when(r.received_at)}  "
              f"{'reçu' if r.direction == 'inbound' else 'envoyé'}  {what}"
              + (f" (quarantaine {r.quarantine_id})" if r.quarantine_id else "")
              + (f"  score {r.score:g}" if r.score is not None else ""))
        print(f"    de {r.mail_from or '<>'} à {', '.join(r.rcpts)} ; objet : {r.subject[:70]}")
        print(f"    réponse : {r.reply}")
        reasons = [s for s in r.symbols if s.score > 0][:3]
        if reasons:
            print("    raisons : " + " ; ".join(f"{s.name} ({s.score:g})" for s in reasons))
    if total > len(records):
        print(f"({total} messages trouvés, {len(records)} affichés : précisez la recherche "
              "ou --limit)")
    return 0


def _track_json(r: TrackRecord) -> dict[str, Any]:
    return {
        "queue_id": r.queue_id, "received_at": r.received_at, "direction": r.direction,
        "outcome": r.outcome, "action": r.action, "score": r.score,
        "quarantine_id": r.quarantine_id, "reply": r.reply, "downstream": r.downstream,
        "mail_from": r.mail_from, "rcpts": list(r.rcpts), "delivered_to": list(r.delivered_to),
        "subject": r.subject, "from": r.from_header, "client_ip": r.client_ip, "helo": r.helo,
        "auth_user": r.auth_user, "size": r.size,
        "symbols": [{"name": s.name, "score": s.score, "detail": s.detail,
                     "description": s.description} for s in r.symbols],
    }


# ---- digests -----------------------------------------------------------------------------


async def _digest(cfg: Config, args: argparse.Namespace) -> int:
    runtime = await build_runtime(cfg)
    try:
        assert runtime.digests is not None and runtime.store is not None
        digests = runtime.digests
        store = runtime.store
        if args.reactiver:
            await store.set_digest_optout(store.blind(args.reactiver), False)
            await store.audit(user=f"cli:{getpass.getuser()}", action="digest_optin",
                              detail=args.reactiver)
            print(f"{args.reactiver} recevra de nouveau le rapport de quarantaine.")
            return 0
        if not args.envoyer:
            now = time.time()
            mark = await store.mark(digest.MARK)
            after = await store.mark(digest.ROW_MARK)
            plan = await digests.plan(int(after or 0), await store.last_row(), now)
            print(f"Rapport de quarantaine {'activé' if cfg.digest.enabled else 'DÉSACTIVÉ'}"
                  f" ; prochain envoi le {_when(digests.next_due(mark or now))}.")
            since = f"depuis le {_when(mark)}" if mark else "à ce jour"
            print(f"Retenus {since} : {len(plan)} destinataire(s).")
            for rcpt, entries in sorted(plan.items()):
                print(f"  {rcpt} : {len(entries)} message(s)")
            if not cfg.web.public_url:
                print("Sans web.public_url, le rapport ne contient pas de liens.")
            return 0
        report = await digests.send_now()
    finally:
        await runtime.close()
    if report is None:
        print("Un autre processus envoie les rapports en ce moment.", file=sys.stderr)
        return 1
    print(f"{len(report.sent)} rapport(s) envoyé(s), {len(report.failed)} en échec "
          f"({report.items} message(s) retenu(s)).")
    for rcpt in report.failed:
        print(f"  non remis pour l'instant : {rcpt}", file=sys.stderr)
    return 1 if report.failed else 0


# ---- quarantine --------------------------------------------------------------------------


_loaded: Config | None = None  # the configuration loaded by `main` (dates, `where`)


def _when(ts: float) -> str:
    """A date as the practice reads it: in its time zone (gateway.timezone)."""
    if _loaded is not None:
        return _loaded.when(ts)
    return time.strftime("%d/%m/%Y %H:%M", time.localtime(ts))


async def _quarantine(cfg: Config, args: argparse.Namespace) -> int:
    runtime = await build_runtime(cfg)
    assert runtime.quarantine is not None
    try:
        return await _quarantine_cmd(args, runtime.quarantine)
    except NotFound:
        print(f"Introuvable : aucun message retenu n'a l'identifiant {args.id} (supprimé, "
              "purgé, ou identifiant mal recopié ; gateway quarantine list les donne). "
              f"{where()}", file=sys.stderr)
        return 1
    finally:
        await runtime.close()


async def _quarantine_cmd(args: argparse.Namespace, quarantine: QuarantineService) -> int:
    store = quarantine.store
    by = f"cli:{getpass.getuser()}"
    cmd = args.qcommand
    if cmd == "list":
        items = await store.list_items(state=args.state, limit=args.limit)
        if args.json:
            for it in items:
                print(json.dumps(_item_json(it), ensure_ascii=False))
            return 0
        if not items:
            print(f"Aucun message en quarantaine. {where()}")
        for it in items:
            print(f"{it.id}  {_when(it.received_at)}  {STATES_FR[it.state]:<19} "
                  f"score {it.score:<6g} de {it.mail_from or '<>'}  objet : {it.subject[:60]}")
        return 0
    if cmd == "show":
        item, raw = await store.get(args.id)
        await store.audit(user=by, action="download" if args.raw else "view", target=item.id)
        if args.raw:
            sys.stdout.buffer.write(raw)
            return 0
        print(json.dumps(_item_json(item), ensure_ascii=False, indent=2))
        end = header_section_end(raw)
        print("\n--- en-tête du message ---")
        print(raw[: end if end > 0 else len(raw)].decode("utf-8", "replace").rstrip())
        return 0
    if cmd == "release":
        item = await store.item(args.id)
        if item.state in RELEASABLE and quarantine.needs_confirmation(item) \
                and not args.confirmer:
            why = ("a été refusé (son expéditeur a reçu un refus)" if item.state == "refused"
                   else "contient un fichier dangereux")
            print(f"Ce message {why} ; pour le libérer malgré tout, relancez avec "
                  "--confirmer.", file=sys.stderr)
            return 1
        try:
            item = await quarantine.release(args.id, by=by)
        except NotQuarantined as exc:
            print(f"Impossible : {exc.text_fr}.", file=sys.stderr)
            return 1
        except DownstreamRejected as exc:
            print(f"Remise refusée par le serveur de messagerie : {exc}", file=sys.stderr)
            return 1
        except TemporaryError as exc:  # next hop down, preparation out of time
            print(f"Remise impossible pour le moment ({exc}) ; le message reste en "
                  "quarantaine, réessayez plus tard.", file=sys.stderr)
            return 1
        print(f"{item.id} libéré et remis à {', '.join(item.rcpts)}")
        return 0
    if cmd == "delete":
        try:
            await quarantine.delete(args.id, by=by)
        except NotQuarantined as exc:  # being released right now
            print(f"Impossible : {exc.text_fr}.", file=sys.stderr)
            return 1
        print(f"{args.id} supprimé")
        return 0
    if cmd == "purge":
        days = args.days if args.days is not None else quarantine.retention_days
        if not days >= 1:  # also NaN: 0 or less would remove every held message
            print(f"Purge refusée : --days doit valoir au moins 1 (reçu {days:g}).",
                  file=sys.stderr)
            return 2
        n = await quarantine.purge(by=by, older_than_days=days)
        print(f"{n} message(s) de plus de {days:g} jours supprimé(s)")
        return 0
    raise AssertionError(cmd)


def _item_json(it: Item) -> dict[str, Any]:
    return {
        "id": it.id, "received_at": it.received_at, "state": it.state, "action": it.action,
        "score": it.score, "mail_from": it.mail_from, "rcpts": list(it.rcpts),
        "subject": it.subject, "from": it.from_header, "client_ip": it.client_ip,
        "size": it.size, "symbols": [{"name": s.name, "score": s.score, "detail": s.detail}
                                     for s in it.symbols],
        "state_by": it.state_by, "state_changed_at": it.state_changed_at,
    }
