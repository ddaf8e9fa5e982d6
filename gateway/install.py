"""`gateway init`: a first configuration for a practice, its data folder, and what to set
elsewhere (DNS, the mailbox server) for the gateway to be the practice's MX relay.

The file is written from flags or, at a terminal, from answers; it is checked exactly as
`serve` would check it (rules included) before it replaces anything, written with mode 0640
(no secret in it: the keys live in the data folder), and never overwrites an existing file
without `--forcer`. Every path in it is absolute. The data folder is created with mode 0700,
its quarantine key and index made (mode 0600), and given to the service's account when run
as root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import socket
import stat
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway import config
from gateway.errors import ConfigError

DEFAULT_FILE = Path("/etc/gateway/gateway.toml")
DEFAULT_DATA = Path("/var/lib/gateway")


@dataclass(frozen=True, slots=True, kw_only=True)
class Answers:
    domains: tuple[str, ...]
    hostname: str
    next_hop: str  # "" = the embedded Maildir
    data_dir: Path
    listen: str = "0.0.0.0:25"
    public_url: str = ""
    web_listen: str = "127.0.0.1:8080"
    owner: str = ""  # the service's account, given the data folder (as root)


def _toml(value: object) -> str:
    """A TOML value: JSON's strings, lists and numbers are TOML's too."""
    return json.dumps(value, ensure_ascii=False)


def render(a: Answers, path: Path) -> str:  # noqa: ARG001 - kept for the callers' symmetry
    relay = (f"address = {_toml(a.next_hop)}          # the practice's mailbox server"
             if a.next_hop else
             'address = ""                  # none yet: mail is kept in <data_dir>/maildir')
    return f"""# Écrit par `gateway init`. Toutes les clés et leurs valeurs par défaut :
# docker/gateway.example.toml. Vérifier une modification : gateway check-config FICHIER

[gateway]
hostname = {_toml(a.hostname)}
domains = {_toml(list(a.domains))}
data_dir = {_toml(str(a.data_dir))}
timezone = "Europe/Paris"

[smtp]
listen = {_toml(a.listen)}

[next_hop]
{relay}
starttls = "opportunistic"

[web]
listen = {_toml(a.web_listen)}
public_url = {_toml(a.public_url)}
"""


def ask(prompt: str, default: str = "", *, read: Callable[[str], str] = input) -> str:
    shown = f"{prompt} [{default}] : " if default else f"{prompt} : "
    try:
        answer = read(shown).strip()
    except EOFError:
        raise ConfigError("réponse attendue (ou donnez les options : gateway init --help)"
                          ) from None
    return answer or default


def answers_from(args: object, *, interactive: bool,
                 read: Callable[[str], str] = input) -> Answers:
    """The flags given, the rest asked at a terminal (or defaults)."""
    domains = tuple(d.strip().lower().rstrip(".") for given in (getattr(args, "domains", None)
                                                                or ()) for d in given.split(",")
                    if d.strip())
    if not domains and interactive:
        domains = tuple(d.strip().lower() for d in ask(
            "Domaine(s) du cabinet, séparés par des virgules (ex. cabinet-dupont.fr)",
            read=read).split(",") if d.strip())
    if not domains:
        raise ConfigError("indiquez au moins un domaine du cabinet (--domaine)")
    hostname = getattr(args, "hostname", None) or ""
    if not hostname:
        guess = f"mx.{domains[0]}"
        hostname = ask("Nom de la passerelle (son enregistrement DNS)", guess, read=read) \
            if interactive else guess
    next_hop = getattr(args, "next_hop", None)
    if next_hop is None:
        next_hop = ask("Serveur de messagerie du cabinet (HOTE:PORT ; vide : boîte locale)",
                       read=read) if interactive else ""
    data_dir = Path(getattr(args, "data_dir", None) or DEFAULT_DATA).expanduser().absolute()
    return Answers(domains=domains, hostname=hostname, next_hop=next_hop, data_dir=data_dir,
                   listen=getattr(args, "listen", None) or "0.0.0.0:25",
                   public_url=getattr(args, "public_url", None) or "",
                   owner=getattr(args, "owner", None) or "")


def write(a: Answers, path: Path, *, force: bool = False) -> config.Config:
    """Check, then write the file and make the data folder; returns the configuration.
    Everything is checked (the account, the text, the folder's path) before anything is
    written."""
    from gateway.service import prepare  # the rules, folder, key and index as `serve` does
    path = path.expanduser().absolute()
    if path.exists() and not force:
        raise ConfigError(f"{path} existe déjà (--forcer pour le remplacer)")
    account = _account(a.owner) if a.owner else None
    text = render(a, path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("une valeur donnée n'est pas du texte UTF-8") from None
    try:
        cfg = config.build(tomllib.loads(text), source=str(path))
    except tomllib.TOMLDecodeError as exc:  # a control character in a flag's value
        raise ConfigError(f"{path} : une valeur donnée contient un caractère interdit "
                          f"({config.toml_position(exc)})") from None
    if account is not None:
        _safe_folder(cfg.data_dir)
    before = path.lstat() if path.exists() else None
    _make_parents(path)
    _make_parents(cfg.data_dir)  # 0755 whatever the umask: the service crosses them
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by an interrupted run
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        os.fchmod(fd, 0o640)  # whatever the umask: the service's group reads it
        if account is not None:
            os.fchown(fd, 0, account.pw_gid)
        elif before is not None:  # replaced: the service still reads it
            os.fchown(fd, before.st_uid, before.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    umask = os.umask(0o077)  # `prepare` sets it for a serving process: put back after
    try:
        prepare(cfg)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.umask(umask)
    os.replace(tmp, path)
    if account is not None:
        _give(cfg.data_dir, account)
    return cfg


def _make_parents(path: Path) -> None:
    """The missing folders above `path`, each 0755."""
    missing = [p for p in path.parents if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir()
        os.chmod(folder, 0o755)


def _account(owner: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(owner)
    except KeyError:
        raise ConfigError(f"le compte {owner!r} n'existe pas (créez-le : "
                          f"adduser --system --group {owner})") from None


def _safe_folder(folder: Path) -> None:
    """Refuse a data folder that is a link, or under a folder another account than root can
    change (it could swap a part of the path for a link while root works in it): root
    would then create or give away files elsewhere."""
    if folder.is_symlink():
        raise ConfigError(f"{folder} est un lien : indiquez le dossier lui-même")
    for parent in folder.parents:
        if not parent.exists():
            continue
        st = parent.lstat()
        loose = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
        if stat.S_ISLNK(st.st_mode) or st.st_uid != 0 or loose:
            raise ConfigError(f"{parent} peut être modifié par un autre compte que root : "
                              "choisissez un dossier des données sous des dossiers de root "
                              "(par exemple /var/lib/gateway)")


def _give(folder: Path, account: pwd.struct_passwd) -> None:
    """The data folder and all in it to the service's account (root only), through file
    descriptors, never a link: nothing the account could swap in meanwhile is followed."""
    uid, gid = account.pw_uid, account.pw_gid
    for _root, dirs, files, rootfd in os.fwalk(folder, follow_symlinks=False):
        os.fchown(rootfd, uid, gid)
        for name in (*dirs, *files):
            os.chown(name, uid, gid, dir_fd=rootfd, follow_symlinks=False)


def guidance(cfg: config.Config, path: Path, owner: str = "") -> str:
    """What to set elsewhere, in French, for the practice's admin or IT provider."""
    host = cfg.gateway.hostname
    address = "<adresse publique de cette machine>"
    with contextlib.suppress(OSError, ValueError):
        found = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(found).is_loopback:
            address = found
    lines = [f"Configuration écrite : {path}",
             f"Dossier des données : {cfg.data_dir} (clé de quarantaine : {cfg.key_file}, à "
             "sauvegarder)", "",
             "1. DNS du cabinet (chez le fournisseur du domaine) :"]
    lines.append(f"     {host}.  A  {address}   (l'adresse publique de la passerelle)")
    for d in sorted(cfg.domains):
        lines.append(f"     {d}.  MX  10 {host}.")
    lines += ["   Gardez les enregistrements SPF, DKIM et DMARC de vos envois tels quels : "
              "la passerelle reçoit, elle n'envoie pas à votre place.", "",
              "2. Serveur de messagerie du cabinet :"]
    if cfg.next_hop.address:
        lines += [f"   il reçoit le courrier de la passerelle ({cfg.next_hop.address}) ; "
                  "n'acceptez sur son port 25 que la passerelle (pare-feu, ou par exemple "
                  "pour Postfix : smtpd_client_restrictions = permit_mynetworks, reject avec "
                  "l'adresse de la passerelle dans mynetworks), sinon on peut la contourner."]
    else:
        lines += [f"   aucun pour l'instant : le courrier est gardé dans {cfg.data_dir}/maildir ; "
                  "indiquez-le plus tard dans [next_hop] address."]
    lines += ["", "3. Premier compte de la page de quarantaine :",
              f"     {f'sudo -u {owner} ' if owner else ''}gateway admin --config {path} "
              "add-user NOM --role admin", "",
              "4. Démarrer :", f"     gateway serve --config {path}"]
    if not cfg.web.public_url:
        lines += ["", "Sans [web] public_url, les rapports de quarantaine et les avis "
                  "d'envoi n'ont pas de liens."]
    return "\n".join(lines)


def interactive() -> bool:
    return sys.stdin.isatty()
