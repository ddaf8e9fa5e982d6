"""TOML configuration -> frozen dataclasses. The only code that reads the config file.

Validation (types, unknown keys) is done by pydantic over plain stdlib dataclasses; the checks
that span several keys (thresholds order, addresses, files) follow. Every error names its key
path, and everything is checked before any port opens.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from gateway.errors import ConfigError

_STRICT = ConfigDict(extra="forbid")

DEFAULT_RULES_DIR = Path(__file__).resolve().parent.parent / "rules"


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: str, *, key: str) -> HostPort:
    """`host:port`, `[v6]:port`; raises ConfigError naming `key`."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key} : HOTE:PORT attendu (ex. 127.0.0.1:2525), reçu {value!r}")
    return HostPort(host=host, port=int(port))


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySection:
    __pydantic_config__ = _STRICT
    hostname: str = "gateway.localdomain"  # name in the banner, EHLO and Received headers
    domains: tuple[str, ...] = ()  # the practice's own domains: mail is accepted only for these
    data_dir: str = "./gateway-data"  # quarantine, keys, embedded Maildir
    rules_dir: str = ""  # default: the rules/ folder shipped beside the code
    workers: int = 0  # serving processes on the SMTP port; 0 = one per core
    # Worker processes of each serving process for the jobs hostile input can make run away
    # (MIME, archives, PDF text), killed past their limit; 0 = cores / serving processes.
    job_processes: int = 0
    job_memory_mb: int = 2048  # address-space limit of each of them; 0 = none
    # The practice's time zone: dates on the web page, the CLI and the digests, the digest hour.
    timezone: str = "Europe/Paris"


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpSection:
    __pydantic_config__ = _STRICT
    listen: str = "127.0.0.1:2525"
    max_message_bytes: int = 50 * 1024 * 1024  # advertised as SIZE and enforced
    max_recipients: int = 100
    idle_timeout_s: float = 300.0  # between commands (RFC 5321: 5 minutes)
    data_timeout_s: float = 180.0  # without any DATA bytes arriving
    tls_cert: str = ""  # PEM; STARTTLS is offered when set
    tls_key: str = ""
    max_connections: int = 200  # per serving process; above it new clients get 421
    data_deadline_s: float = 600.0  # a whole DATA, however slowly it trickles; then 421
    # From the first RCPT (a transaction opened with the next hop) to the DATA command; then
    # 421: a client cannot hold the mailbox server's connections with NOOPs.
    transaction_timeout_s: float = 120.0
    # Transactions opened with the next hop and dropped before DATA (RSET, new MAIL) on one
    # connection; past it: 421 and close (MAIL/RCPT/RSET churn against the mailbox server).
    max_abandoned_transactions: int = 10
    # Accept `user%other@our.domain` and `other!user@our.domain`: only if the mailbox server
    # is set not to route them (Postfix: allow_percent_hack = no, swap_bangpath = no).
    allow_percent_hack: bool = False
    # A front proxy (HAProxy, a load balancer) whose connections start with a PROXY protocol
    # header (v1 or v2) naming the real client: its networks, as CIDR. Its connections must
    # start with one (within proxy_protocol_timeout_s); nobody else may send one.
    proxy_protocol_hosts: tuple[str, ...] = ()
    proxy_protocol_timeout_s: float = 10.0
    # Front MTAs (a provider's Postfix) that may name the real client with XCLIENT.
    xclient_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class NextHopSection:
    __pydantic_config__ = _STRICT
    address: str = ""  # HOST:PORT of the practice's mailbox server; empty = embedded Maildir
    starttls: Literal["opportunistic", "required", "off"] = "opportunistic"
    tls_verify: bool = True  # verify the next hop's certificate when STARTTLS is used
    tls_ca_file: str = ""
    timeout_s: float = 60.0  # per command to the next hop
    # Transactions open with the next hop at once (each is a connection to it), for the whole
    # gateway (shared out between the serving processes) and per client address; beyond, the
    # recipient gets 451 and the client retries. The next hop's own limit (Postfix:
    # default_process_limit = 100) must stay above max_transactions.
    max_transactions: int = 50
    max_transactions_per_client: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsSection:
    __pydantic_config__ = _STRICT
    nameservers: tuple[str, ...] = ()  # HOST or HOST:PORT; empty = /etc/resolv.conf
    timeout_s: float = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoringSection:
    __pydantic_config__ = _STRICT
    tag: float = 5.0  # score >= tag: banner and subject tag
    quarantine: float = 10.0  # score >= quarantine: held in the encrypted quarantine
    reject: float = 20.0  # score >= reject: 550 at end of DATA
    message_budget_s: float = 45.0  # all checks of one message; past it: 451


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsSection:
    """One limit per phase of work in the worker pool, in seconds. What a check's timeout
    leads to (retry or hold) is declared in rules/symbols.toml (`fail`)."""

    __pydantic_config__ = _STRICT
    parse_s: float = 20.0  # reading the MIME structure of a message (past it: 451)
    dkim_s: float = 20.0  # verifying the DKIM signatures of one message
    arc_s: float = 20.0  # validating its ARC chain
    attachments_s: float = 20.0  # true types, archives, PDF, HTML, YARA of all its parts
    impersonation_s: float = 20.0  # links and text read for lures
    outbound_s: float = 20.0  # health data search in an outgoing message (PDF/DOCX text)
    banner_s: float = 20.0  # adding the warning banner
    release_s: float = 20.0  # preparing a released message (banner, note)
    preview_s: float = 20.0  # the web page's safe preview of a held message

    def for_check(self, name: str) -> float:
        return float(getattr(self, f"{name}_s"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ReputationSection:
    """DNS block lists (rules/reputation.toml says what their answers mean)."""

    __pydantic_config__ = _STRICT
    # On unless the resolver is a public one (the lists refuse those: README).
    enabled: bool = True
    ip_lists: tuple[str, ...] = ("zen.spamhaus.org",)  # the sending server's address
    domain_lists: tuple[str, ...] = ("dbl.spamhaus.org", "multi.surbl.org")  # links, senders
    max_queries: int = 30  # per message, all lists together


@dataclass(frozen=True, slots=True, kw_only=True)
class ClamavSection:
    """ClamAV's daemon as a check (gateway/checks/antivirus.py)."""

    __pydantic_config__ = _STRICT
    enabled: bool = False
    # clamd's socket: a path (its LocalSocket) or HOST:PORT (its TCPSocket).
    address: str = "/var/run/clamav/clamd.ctl"
    timeout_s: float = 20.0  # all the streams of one message; then on_failure
    connections: int = 4  # sessions kept open to clamd by each serving process
    # The largest stream clamd takes (its StreamMaxLength); 0 = read it from clamd_conf, or
    # clamd's default (25 MiB). A larger message is sent file by file.
    stream_max_bytes: int = 0
    clamd_conf: str = "/etc/clamav/clamd.conf"
    # clamd down or out of time: "retry" answers 451 (the sender retries later); "open"
    # judges the message on the other checks (ANTIVIRUS_UNCHECKED says so).
    on_failure: Literal["retry", "open"] = "retry"
    on_malware: Literal["reject", "quarantine"] = "reject"  # a known malware signature


# rspamd's own checks of what the gateway checks itself (SPF, DKIM, DMARC, ARC), and the
# client's name, which the gateway does not look up: not counted twice, nor against everyone.
RSPAMD_IGNORED = ("R_SPF_*", "R_DKIM_*", "DKIM_*", "DMARC_*", "ARC_*", "AUTH_NA",
                  "R_DMARC_*", "RDNS_*", "HFILTER_HOSTNAME_UNKNOWN", "SPF_*")


@dataclass(frozen=True, slots=True, kw_only=True)
class RspamdSection:
    """rspamd as a check (gateway/checks/rspamd.py), and what the admin's decisions teach it."""

    __pydantic_config__ = _STRICT
    enabled: bool = False
    url: str = "http://127.0.0.1:11333"  # its normal worker (/checkv2)
    controller_url: str = "http://127.0.0.1:11334"  # its controller (/learnspam, /learnham)
    # The controller's password, alone in a file only the gateway's user reads (0600);
    # empty: no password sent (a controller that trusts the gateway's address).
    password_file: str = ""
    timeout_s: float = 15.0  # one message; then on_failure
    connections: int = 8  # HTTP connections to rspamd per serving process
    # RSPAMD_SCORE = weight x rspamd's score (its symbols added up, `ignore` left out), capped
    # at max_score; never below 0: rspamd adds suspicion, it never clears ours.
    weight: float = 1.0
    max_score: float = 10.0
    ignore: tuple[str, ...] = RSPAMD_IGNORED
    on_failure: Literal["retry", "open"] = "retry"  # as [engines.clamav]
    learn: bool = True  # the admin's "spam" / "pas un spam" decisions are sent to rspamd


@dataclass(frozen=True, slots=True, kw_only=True)
class EnginesSection:
    """Outside engines the gateway can ask (each off by default)."""

    __pydantic_config__ = _STRICT
    clamav: ClamavSection = field(default_factory=ClamavSection)
    rspamd: RspamdSection = field(default_factory=RspamdSection)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuarantineSection:
    __pydantic_config__ = _STRICT
    key_file: str = ""  # default: <data_dir>/quarantine.key, created at first start (0600)
    retention_days: int = 30
    # A copy of each refused message kept sealed for the retention period, so that the admin
    # can see why and release a false positive (the sender was told no: with a confirmation).
    keep_rejected: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSection:
    __pydantic_config__ = _STRICT
    authserv_id: str = ""  # in Authentication-Results; default: gateway.hostname
    dkim_min_key_bits: int = 1024  # smaller RSA keys do not count as a DKIM pass
    dmarc_reject_action: Literal["reject", "quarantine"] = "reject"  # for failing p=reject
    trusted_arc_sealers: tuple[str, ...] = ()  # forwarders/lists whose ARC results we accept


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundSection:
    __pydantic_config__ = _STRICT
    # Health data leaving in clear (not to *.mssante.fr, not encrypted): "hold" keeps it in
    # quarantine, "reject" refuses it (550), "warn" lets it go.
    policy: Literal["hold", "reject", "warn"] = "hold"
    notify_sender: bool = True  # a French notice to the sender when held or warned


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmissionSection:
    __pydantic_config__ = _STRICT
    # The practice's mail clients send here; empty = no submission listener.
    listen: str = ""  # STARTTLS offered (port 587)
    listen_tls: str = ""  # TLS from the first byte (port 465, RFC 8314); needs smtp.tls_cert
    # Clients that may send without AUTH (the practice's own mail server), as CIDR.
    trusted_networks: tuple[str, ...] = ()
    # AUTH is offered only after STARTTLS, except to clients in these networks.
    cleartext_auth_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    users_file: str = ""  # default: <data_dir>/submission-users.json (0600, argon2 hashes)
    # The practice's provider relay; empty = embedded Maildir under <data_dir>/outbox.
    smarthost: str = ""
    smarthost_starttls: Literal["required", "opportunistic", "off"] = "required"
    smarthost_tls_verify: bool = True
    smarthost_ca_file: str = ""
    smarthost_username: str = ""  # AUTH towards the smarthost, when it asks for it
    smarthost_password_file: str = ""  # 0600 file holding only the password
    max_auth_failures: int = 3  # per connection; then 421 and close
    # Failed logins per account and client address within lockout_minutes before each try
    # waits longer (4 s, 8 s, 16 s... 1 min); four times that from one address (any
    # accounts) refuse AUTH (454) from it for lockout_minutes.
    lockout_failures: int = 10
    lockout_minutes: int = 15


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSection:
    __pydantic_config__ = _STRICT
    listen: str = "127.0.0.1:8080"  # the quarantine web page; empty = no web page
    tls_cert: str = ""  # PEM; HTTPS when set (needed beyond loopback)
    tls_key: str = ""
    users_file: str = ""  # default: <data_dir>/web-users.json (gateway admin add-user)
    public_url: str = ""  # how staff reach the page, e.g. https://passerelle.cabinet.fr:8443
    session_idle_minutes: int = 30
    session_max_hours: int = 10
    # As submission.lockout_failures: per account and address, then growing delays; four
    # times that per address, then that address is locked out for lockout_minutes.
    max_login_failures: int = 5
    lockout_minutes: int = 15
    header_timeout_s: float = 15.0  # from connection (or last answer) to a whole request head
    body_timeout_s: float = 20.0  # to read a form once its head is in


@dataclass(frozen=True, slots=True, kw_only=True)
class AttachmentsSection:
    __pydantic_config__ = _STRICT
    yara_dirs: tuple[str, ...] = ()  # extra YARA rule folders (third-party sets), besides rules/yara
    yara_timeout_s: int = 5  # per scanned file
    max_depth: int = 3  # archives inside archives
    max_members: int = 1000  # files in one archive
    max_total_mb: int = 200  # uncompressed bytes opened per message
    max_ratio: int = 150  # uncompressed / compressed size of one member
    macro_timeout_s: float = 15.0  # Office macro analysis of one document (then held)


@dataclass(frozen=True, slots=True, kw_only=True)
class PracticeSection:
    __pydantic_config__ = _STRICT
    names: tuple[str, ...] = ()  # the practice's names, e.g. "Cabinet médical Dupont"
    colleagues: tuple[str, ...] = ()  # names as they appear in From, e.g. "Dr Claire Martin"


@dataclass(frozen=True, slots=True, kw_only=True)
class BannerSection:
    __pydantic_config__ = _STRICT
    enabled: bool = True  # banner and subject tag on suspect ("tag") and released mail
    templates: str = ""  # wording and colours; default: <rules_dir>/banner.toml
    external_mark: bool = False  # mark outside mail that uses a colleague's name


@dataclass(frozen=True, slots=True, kw_only=True)
class DigestSection:
    __pydantic_config__ = _STRICT
    # "Rapport de quarantaine": each recipient with newly held mail gets a French list of it
    # once a day, with links to ask for a release (web.public_url needed for the links).
    enabled: bool = True
    domains: tuple[str, ...] = ()  # the practice's domains that get digests; empty = all
    hour: int = 8  # local time, in gateway.timezone
    link_days: int = 7  # a digest's links expire after this many days
    # Groups of reasons (rules/symbols.toml) for which a recipient may release a message
    # herself from the digest instead of asking the admin: e.g. ["bulk", "disguise",
    # "reputation"]. Never "attachments" or "runner" (a file, an analysis that failed).
    direct_release_groups: tuple[str, ...] = ()


NEVER_DIRECT_RELEASE = ("attachments", "runner")


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSection:
    __pydantic_config__ = _STRICT
    # /metrics (Prometheus), /healthz and /readyz; empty = none. Plain HTTP: keep it on
    # loopback or a management network.
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSection:
    __pydantic_config__ = _STRICT
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    __pydantic_config__ = _STRICT
    gateway: GatewaySection = field(default_factory=GatewaySection)
    smtp: SmtpSection = field(default_factory=SmtpSection)
    next_hop: NextHopSection = field(default_factory=NextHopSection)
    dns: DnsSection = field(default_factory=DnsSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    timeouts: TimeoutsSection = field(default_factory=TimeoutsSection)
    quarantine: QuarantineSection = field(default_factory=QuarantineSection)
    reputation: ReputationSection = field(default_factory=ReputationSection)
    attachments: AttachmentsSection = field(default_factory=AttachmentsSection)
    engines: EnginesSection = field(default_factory=EnginesSection)
    outbound: OutboundSection = field(default_factory=OutboundSection)
    submission: SubmissionSection = field(default_factory=SubmissionSection)
    web: WebSection = field(default_factory=WebSection)
    practice: PracticeSection = field(default_factory=PracticeSection)
    auth: AuthSection = field(default_factory=AuthSection)
    banner: BannerSection = field(default_factory=BannerSection)
    digest: DigestSection = field(default_factory=DigestSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    # Derived values, read by the rest of the code.
    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.gateway.timezone)

    def when(self, ts: float) -> str:
        """A date and time as the practice reads it (its time zone)."""
        return dt.datetime.fromtimestamp(ts, self.zone).strftime("%d/%m/%Y %H:%M")

    @property
    def data_dir(self) -> Path:
        return Path(self.gateway.data_dir)

    @property
    def rules_dir(self) -> Path:
        return Path(self.gateway.rules_dir) if self.gateway.rules_dir else DEFAULT_RULES_DIR

    @property
    def authserv_id(self) -> str:
        return self.auth.authserv_id or self.gateway.hostname

    @property
    def banner_templates(self) -> Path:
        return Path(self.banner.templates) if self.banner.templates else self.rules_dir / "banner.toml"

    @property
    def key_file(self) -> Path:
        if self.quarantine.key_file:
            return Path(self.quarantine.key_file)
        return self.data_dir / "quarantine.key"

    @property
    def listen(self) -> HostPort:
        return parse_host_port(self.smtp.listen, key="smtp.listen")

    @property
    def next_hop_address(self) -> HostPort | None:
        if not self.next_hop.address:
            return None
        return parse_host_port(self.next_hop.address, key="next_hop.address")

    @property
    def submission_listen(self) -> HostPort | None:
        if not self.submission.listen:
            return None
        return parse_host_port(self.submission.listen, key="submission.listen")

    @property
    def submission_listen_tls(self) -> HostPort | None:
        if not self.submission.listen_tls:
            return None
        return parse_host_port(self.submission.listen_tls, key="submission.listen_tls")

    @property
    def smarthost(self) -> HostPort | None:
        if not self.submission.smarthost:
            return None
        return parse_host_port(self.submission.smarthost, key="submission.smarthost")

    @property
    def submission_users_file(self) -> Path:
        if self.submission.users_file:
            return Path(self.submission.users_file)
        return self.data_dir / "submission-users.json"

    @property
    def correspondents_file(self) -> Path:
        """Who the practice exchanged mail with, as keyed digests (gateway/correspondents.py)."""
        return self.data_dir / "correspondents.sqlite3"

    @property
    def auth_state_file(self) -> Path:
        """Login counters, web sessions, TOTP steps used (gateway/authstate.py)."""
        return self.data_dir / "auth-state.sqlite3"

    @property
    def web_listen(self) -> HostPort | None:
        return parse_host_port(self.web.listen, key="web.listen") if self.web.listen else None

    @property
    def metrics_listen(self) -> HostPort | None:
        return parse_host_port(self.metrics.listen, key="metrics.listen") \
            if self.metrics.listen else None

    @property
    def web_users_file(self) -> Path:
        return Path(self.web.users_file) if self.web.users_file else self.data_dir / "web-users.json"

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(d.lower().rstrip(".") for d in self.gateway.domains)

    @property
    def worker_count(self) -> int:
        return self.gateway.workers or (os.cpu_count() or 1)

    @property
    def job_process_count(self) -> int:
        return self.gateway.job_processes or max(1, (os.cpu_count() or 1) // self.worker_count)


_ADAPTER = TypeAdapter(Config)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not isinstance(p, int)) or "(top level)"


def build(data: dict[str, Any], *, source: str = "config") -> Config:
    """Validate a parsed TOML document; raise ConfigError naming every bad key."""
    try:
        cfg = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            lines.append(f"{source} : {_loc(err['loc'])} : {_pydantic_fr(err)}")
        raise ConfigError("\n".join(lines)) from None
    validate(cfg, source=source)
    return cfg


# pydantic's error types, in French (its messages are English); the value given follows.
_TYPES_FR = {
    "unexpected_keyword_argument": "clé inconnue",
    "missing": "clé obligatoire absente",
    "int_parsing": "un nombre entier est attendu", "int_type": "un nombre entier est attendu",
    "int_from_float": "un nombre entier est attendu",
    "float_parsing": "un nombre est attendu", "float_type": "un nombre est attendu",
    "bool_parsing": "true ou false est attendu", "bool_type": "true ou false est attendu",
    "string_type": "un texte entre guillemets est attendu",
    "list_type": "une liste [..] est attendue", "tuple_type": "une liste [..] est attendue",
    "dict_type": "une section [..] est attendue", "dataclass_type": "une section [..] est attendue",
    "literal_error": "valeur non prévue",
}


def _pydantic_fr(err: Any) -> str:
    text = _TYPES_FR.get(err["type"], "valeur invalide")
    if err["type"] == "literal_error" and err.get("ctx", {}).get("expected"):
        text += f" (possibles : {err['ctx']['expected'].replace(' or ', ', ')})"
    if err["type"] not in ("unexpected_keyword_argument", "missing") and "input" in err:
        text += f", reçu {err['input']!r}"[:200]
    return text


def validate(cfg: Config, *, source: str = "config") -> None:
    """Checks that span keys or touch the file system."""
    problems: list[str] = []

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            problems.append(f"{source} : {key} : {msg}")

    s = cfg.scoring
    check(0 < s.tag < s.quarantine < s.reject, "scoring",
          f"les seuils doivent être dans l'ordre 0 < tag < quarantine < reject ; reçu "
          f"tag={s.tag} quarantine={s.quarantine} reject={s.reject}")
    check(s.message_budget_s > 0, "scoring.message_budget_s", "doit être > 0")
    check(cfg.reputation.max_queries >= 0, "reputation.max_queries", "doit être >= 0")
    av = cfg.engines.clamav
    check(av.timeout_s > 0, "engines.clamav.timeout_s", "doit être > 0")
    check(av.connections >= 1, "engines.clamav.connections", "doit être >= 1")
    check(av.stream_max_bytes >= 0, "engines.clamav.stream_max_bytes",
          "doit être >= 0 (0 = la valeur de clamd)")
    rs = cfg.engines.rspamd
    check(rs.timeout_s > 0, "engines.rspamd.timeout_s", "doit être > 0")
    check(rs.connections >= 1, "engines.rspamd.connections", "doit être >= 1")
    check(rs.weight >= 0 and rs.max_score >= 0, "engines.rspamd",
          "weight et max_score doivent être >= 0")
    for key, url in (("url", rs.url), ("controller_url", rs.controller_url)):
        check(not url or re.fullmatch(r"https?://[^/\s@]+/?", url) is not None,
              f"engines.rspamd.{key}", "http://HOTE:PORT attendu (le mot de passe va dans "
              f"password_file, jamais dans l'adresse), reçu {url.partition('@')[2] or url!r}")
    if rs.password_file:
        try:
            mode = Path(rs.password_file).stat().st_mode
        except OSError:
            problems.append(f"{source} : engines.rspamd.password_file : fichier introuvable : "
                            f"{rs.password_file}")
        else:
            check(mode & 0o077 == 0, "engines.rspamd.password_file",
                  "ce fichier contient un mot de passe : il doit être lisible par son seul "
                  f"propriétaire (chmod 600 {rs.password_file})")
    if av.enabled and not av.address.startswith("/"):
        try:
            parse_host_port(av.address, key="engines.clamav.address")
        except ConfigError:
            problems.append(f"{source} : engines.clamav.address : chemin de socket (/…) ou "
                            f"HOTE:PORT attendu, reçu {av.address!r}")
    check(s.message_budget_s < cfg.smtp.idle_timeout_s, "scoring.message_budget_s",
          "doit rester sous smtp.idle_timeout_s, sinon les clients abandonnent avant le verdict")
    for key in ("parse_s", "dkim_s", "arc_s", "attachments_s", "impersonation_s", "outbound_s",
                "banner_s", "release_s", "preview_s"):
        check(getattr(cfg.timeouts, key) > 0, f"timeouts.{key}", "doit être > 0")
    for key, value in (("smtp.listen", cfg.smtp.listen), ("next_hop.address", cfg.next_hop.address),
                       ("submission.listen", cfg.submission.listen),
                       ("submission.listen_tls", cfg.submission.listen_tls),
                       ("submission.smarthost", cfg.submission.smarthost),
                       ("web.listen", cfg.web.listen), ("metrics.listen", cfg.metrics.listen)):
        if value:
            try:
                parse_host_port(value, key=key)
            except ConfigError as exc:
                problems.append(f"{source} : {exc}")
    for i, ns in enumerate(cfg.dns.nameservers):
        try:
            _nameserver(ns)
        except ConfigError:
            problems.append(f"{source} : dns.nameservers[{i}] : IP ou IP:PORT attendu, reçu {ns!r}")
    check(cfg.dns.timeout_s > 0, "dns.timeout_s", "doit être > 0")
    check(cfg.smtp.max_message_bytes >= 1024, "smtp.max_message_bytes", "doit être >= 1024")
    check(cfg.smtp.max_recipients >= 1, "smtp.max_recipients", "doit être >= 1")
    check(cfg.smtp.max_connections >= 1, "smtp.max_connections", "doit être >= 1")
    check(cfg.smtp.data_deadline_s >= cfg.smtp.data_timeout_s, "smtp.data_deadline_s",
          "doit être >= smtp.data_timeout_s")
    check(cfg.smtp.transaction_timeout_s > 0, "smtp.transaction_timeout_s", "doit être > 0")
    check(cfg.smtp.proxy_protocol_timeout_s > 0, "smtp.proxy_protocol_timeout_s", "doit être > 0")
    check(cfg.smtp.max_abandoned_transactions >= 1, "smtp.max_abandoned_transactions",
          "doit être >= 1")
    check(cfg.next_hop.max_transactions >= cfg.next_hop.max_transactions_per_client >= 1,
          "next_hop.max_transactions",
          "doit être >= next_hop.max_transactions_per_client, lui-même >= 1")
    check(cfg.gateway.workers >= 0, "gateway.workers", "doit être >= 0 (0 = un par cœur)")
    check(cfg.quarantine.retention_days >= 1, "quarantine.retention_days", "doit être >= 1")
    check(bool(cfg.domains), "gateway.domains",
          "il faut au moins un domaine (celui du cabinet) : le courrier pour les autres est refusé")
    for d in cfg.domains:
        check(_HOSTNAME.fullmatch(d) is not None, "gateway.domains",
              f"pas un nom de domaine : {d!r}")
    check(_HOSTNAME.fullmatch(cfg.gateway.hostname) is not None, "gateway.hostname",
          f"pas un nom DNS : {cfg.gateway.hostname!r} (il figure dans EHLO et Received)")
    check(bool(cfg.smtp.tls_cert) == bool(cfg.smtp.tls_key), "smtp.tls_cert",
          "tls_cert et tls_key vont ensemble")
    for key, path in (("smtp.tls_cert", cfg.smtp.tls_cert), ("smtp.tls_key", cfg.smtp.tls_key),
                      ("next_hop.tls_ca_file", cfg.next_hop.tls_ca_file)):
        check(not path or Path(path).is_file(), key, f"fichier introuvable : {path}")
    sub = cfg.submission
    for key, nets in (("submission.trusted_networks", sub.trusted_networks),
                      ("submission.cleartext_auth_networks", sub.cleartext_auth_networks),
                      ("smtp.proxy_protocol_hosts", cfg.smtp.proxy_protocol_hosts),
                      ("smtp.xclient_hosts", cfg.smtp.xclient_hosts)):
        for i, net in enumerate(nets):
            try:
                network = ipaddress.ip_network(net, strict=False)
            except ValueError:
                problems.append(f"{source} : {key}[{i}] : pas un réseau (CIDR) : {net!r}")
                continue
            # Whoever is in these lists names the client SPF and DMARC judge: never everyone.
            if key.startswith("smtp.") and network.prefixlen == 0:
                problems.append(f"{source} : {key}[{i}] : {net!r} désigne tout Internet ; "
                                "donnez les adresses des seuls serveurs frontaux")
    for key, path in (("submission.smarthost_ca_file", sub.smarthost_ca_file),
                      ("submission.smarthost_password_file", sub.smarthost_password_file)):
        check(not path or Path(path).is_file(), key, f"fichier introuvable : {path}")
    check(bool(sub.smarthost_username) == bool(sub.smarthost_password_file),
          "submission.smarthost_username",
          "smarthost_username et smarthost_password_file vont ensemble")
    check(not sub.listen_tls or bool(cfg.smtp.tls_cert), "submission.listen_tls",
          "il faut un certificat : renseignez smtp.tls_cert et smtp.tls_key")
    check(sub.max_auth_failures >= 1, "submission.max_auth_failures", "doit être >= 1")
    check(sub.lockout_failures >= 1, "submission.lockout_failures", "doit être >= 1")
    check(sub.lockout_minutes >= 1, "submission.lockout_minutes", "doit être >= 1")
    check(not cfg.submission.listen or cfg.submission.listen != cfg.smtp.listen
          or cfg.listen.port == 0, "submission.listen", "doit différer de smtp.listen")
    web = cfg.web
    check(bool(web.tls_cert) == bool(web.tls_key), "web.tls_cert", "tls_cert et tls_key vont ensemble")
    for key, path in (("web.tls_cert", web.tls_cert), ("web.tls_key", web.tls_key)):
        check(not path or Path(path).is_file(), key, f"fichier introuvable : {path}")
    if cfg.web.listen and not web.tls_cert:
        try:
            host = cfg.web_listen.host if cfg.web_listen else ""
        except ConfigError:  # reported above
            host = "127.0.0.1"
        try:
            exposed = not ipaddress.ip_address(host).is_loopback
        except ValueError:
            exposed = host != "localhost"
        check(not exposed, "web.listen", "une page web joignable au-delà de cette machine exige HTTPS : "
              "renseignez web.tls_cert et web.tls_key, ou écoutez sur 127.0.0.1")
    check(not web.public_url or web.public_url.startswith(("https://", "http://")),
          "web.public_url", "doit commencer par https:// (ou http:// en local)")
    check(not any(c.isspace() or not c.isprintable() for c in web.public_url),
          "web.public_url", "une adresse web sans espace ni caractère de contrôle est attendue")
    dg = cfg.digest
    check(0 <= dg.hour <= 23, "digest.hour", f"doit être entre 0 et 23, reçu {dg.hour}")
    check(dg.link_days >= 1, "digest.link_days", "doit être >= 1")
    check(_zone_ok(cfg.gateway.timezone), "gateway.timezone",
          f"fuseau horaire inconnu {cfg.gateway.timezone!r} (ex. Europe/Paris)")
    for group in dg.direct_release_groups:
        check(group not in NEVER_DIRECT_RELEASE, "digest.direct_release_groups",
              f"{group!r} : un destinataire ne libère jamais lui-même un message retenu pour "
              "un fichier ou une analyse qui a échoué")
    for domain in dg.domains:
        check(domain.lower() in cfg.domains, "digest.domains",
              f"{domain!r} n'est pas un des gateway.domains")
    for key in ("session_idle_minutes", "session_max_hours", "max_login_failures",
                "lockout_minutes", "header_timeout_s", "body_timeout_s"):
        check(getattr(web, key) >= 1, f"web.{key}", "doit être >= 1")
    check(cfg.rules_dir.is_dir(), "gateway.rules_dir", f"dossier introuvable : {cfg.rules_dir}")
    for i, d in enumerate(cfg.attachments.yara_dirs):
        check(Path(d).is_dir(), f"attachments.yara_dirs[{i}]", f"dossier introuvable : {d}")
    check(cfg.banner_templates.is_file(), "banner.templates",
          f"fichier introuvable : {cfg.banner_templates}")
    check(not cfg.banner.external_mark or bool(cfg.practice.colleagues), "practice.colleagues",
          "banner.external_mark demande les noms des collègues")
    key_file = cfg.key_file
    if key_file.exists():
        mode = key_file.stat().st_mode & 0o777
        check(mode == 0o600, "quarantine.key_file",
              f"le fichier de clé {key_file} a le mode {mode:04o} ; 0600 attendu (chmod 600 {key_file})")
    if problems:
        raise ConfigError("\n".join(problems))


# A DNS name of at least two labels (letters, digits, hyphens; an IDN in its A-label form).
_HOSTNAME = re.compile(r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
                       r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


def _zone_ok(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _nameserver(value: str) -> tuple[str, int]:
    try:
        return str(ipaddress.ip_address(value)), 53
    except ValueError:
        hp = parse_host_port(value, key="dns.nameservers")
        return str(ipaddress.ip_address(hp.host)), hp.port


def nameservers(cfg: Config) -> list[tuple[str, int]]:
    return [_nameserver(ns) for ns in cfg.dns.nameservers]


def read_toml(path: Path, what: str = "fichier") -> dict[str, Any]:
    """A TOML file (the config or one under rules/); missing or invalid is a ConfigError
    naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} introuvable : {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} : {path} est un dossier, pas un fichier") from None
    except PermissionError:
        raise ConfigError(f"{what} illisible pour ce compte : {path} (droits du fichier)"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"{what} illisible : {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} : le fichier n'est pas en UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} : TOML invalide ({toml_position(exc)})") from None


def toml_position(exc: tomllib.TOMLDecodeError) -> str:
    """Where tomllib stopped, in French (its message is English)."""
    m = re.search(r"at line (\d+), column (\d+)", str(exc))
    if m:
        return f"ligne {m[1]}, colonne {m[2]}"
    return "fin du fichier atteinte : un crochet ou des guillemets non fermés ?" \
        if "end of document" in str(exc) else "syntaxe"


# The few keys a container sets from its environment rather than a file (docker/README.md).
# They apply over the file, or over the embedded default, before validation; the command
# line's flags win over them. An empty variable counts as unset.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "GATEWAY_HOSTNAME": ("gateway", "hostname"),
    "GATEWAY_DOMAINS": ("gateway", "domains"),  # separated by commas or spaces
    "GATEWAY_NEXT_HOP": ("next_hop", "address"),
    "GATEWAY_PUBLIC_URL": ("web", "public_url"),
    # The engines (docker/compose.yaml's profiles): set, they turn the engine on.
    "GATEWAY_CLAMAV": ("engines.clamav", "address"),
    "GATEWAY_RSPAMD": ("engines.rspamd", "url"),
    "GATEWAY_RSPAMD_CONTROLLER": ("engines.rspamd", "controller_url"),
    "GATEWAY_RSPAMD_PASSWORD_FILE": ("engines.rspamd", "password_file"),
}
_TURNS_ON = {"GATEWAY_CLAMAV", "GATEWAY_RSPAMD"}


def from_environment(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Put the ENVIRONMENT variables set in `environ` into `data`; their names, in order."""
    used = []
    for name, (section, key) in ENVIRONMENT.items():
        value = environ.get(name, "").strip()
        if not value:
            continue
        table: Any = data
        for part in section.split("."):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{section} : une section [..] est attendue")
        table[key] = [d for d in re.split(r"[\s,]+", value) if d] \
            if key == "domains" else value
        if name in _TURNS_ON:
            table["enabled"] = True
        used.append(name)
    return used


def load(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate a TOML file (None: the embedded default), with the ENVIRONMENT
    variables of `environ` (default: the process's) over it."""
    if path is None:
        data: dict[str, Any] = {"gateway": {"domains": ["cabinet.localhost"]}}
        source = "(default)"
    else:
        data = read_toml(Path(path), "fichier de configuration")
        source = str(path)
    used = from_environment(data, os.environ if environ is None else environ)
    if used:
        source += f" + variables d'environnement ({', '.join(used)})"
    return build(data, source=source)


def override(cfg: Config, **changes: Any) -> Config:
    """Apply command-line overrides given as `section__key=value`, then re-validate."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in changes.items():
        if value is None or value == () or value == []:
            continue
        section, _, key = name.partition("__")
        sections.setdefault(section, {})[key] = value
    new = cfg
    for section, values in sections.items():
        new = replace(new, **{section: replace(getattr(new, section), **values)})
    validate(new, source="command line")
    return new
