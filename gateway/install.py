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
import sys
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


def render(a: Answers, path: Path) -> str:
    relay = (f"address = {_toml(a.next_hop)}          # the practice's mailbox server"
             if a.next_hop else
             'address = ""                  # none yet: mail is kept in <data_dir>/maildir')
    return f"""# Written by `gateway init`. Every key and its default: docker/gateway.example.toml
# (or the project's README). Check a change with: gateway check-config {path}

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
    answer = read(shown).strip()
    return answer or default


def answers_from(args: object, *, interactive: bool,
                 read: Callable[[str], str] = input) -> Answers:
    """The flags given, the rest asked at a terminal (or defaults)."""
    domains = tuple(d.lower().rstrip(".") for d in (getattr(args, "domains", None) or ()))
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
    """Check, then write the file and make the data folder; returns the configuration."""
    from gateway.service import prepare  # the rules, folder, key and index as `serve` does
    path = path.expanduser().absolute()
    if path.exists() and not force:
        raise ConfigError(f"{path} existe déjà (--forcer pour le remplacer)")
    text = render(a, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by an interrupted run
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    umask = os.umask(0o077)  # `prepare` sets it for a serving process: put back after
    try:
        cfg = config.load(tmp)
        prepare(cfg)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.umask(umask)
    os.replace(tmp, path)
    if a.owner:
        _give(cfg.data_dir, a.owner)
        with contextlib.suppress(KeyError, PermissionError):
            os.chown(path, 0, pwd.getpwnam(a.owner).pw_gid)
    return cfg


def _give(folder: Path, owner: str) -> None:
    """The data folder and all in it to the service's account (root only)."""
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise ConfigError(f"le compte {owner!r} n'existe pas (créez-le : "
                          f"adduser --system --group {owner})") from None
    # Never through a link: a link the service's account left in its folder must not give
    # it, through root, a file elsewhere (os.walk does not descend into linked folders).
    for root, dirs, files in os.walk(folder):
        for name in (root, *(os.path.join(root, d) for d in dirs),
                     *(os.path.join(root, f) for f in files)):
            os.chown(name, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def guidance(cfg: config.Config, path: Path) -> str:
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
              f"     gateway admin --config {path} add-user NOM --role admin", "",
              "4. Démarrer :", f"     gateway serve --config {path}"]
    if not cfg.web.public_url:
        lines += ["", "Sans [web] public_url, les rapports de quarantaine et les avis "
                  "d'envoi n'ont pas de liens."]
    return "\n".join(lines)


def interactive() -> bool:
    return sys.stdin.isatty()
