"""Exception tree of the gateway: each class is raised somewhere and caught through the tree.

    GatewayError
    ├── TemporaryError            the work can succeed later: 451 to a client, "réessayez
    │   │                         plus tard" on the web page and in the CLI
    │   ├── DnsTemporaryError     (a check turns it into its TEMPERROR symbol)
    │   ├── ScanTimeout           a job past its limit (also a TimeoutError)
    │   ├── WorkerCrashed         a worker process died (a crashing parser, its memory limit)
    │   └── DownstreamUnavailable the next hop is down, timing out, or answered 4xx
    ├── DownstreamRejected        the next hop answered 5xx: its reply is passed back
    ├── DnsPermanentError         a name that cannot be looked up: a fact, not a retry
    └── Refused                   a person's request refused for a reason they can fix; its
                                  text is French and is shown to them (web page, CLI)
    ConfigError                   stands apart: raised before any port opens

The quarantine's own errors (NotFound, NotQuarantined, QuarantineWriteError, RecordError) are
in quarantine/, which knows nothing of the gateway. Only gateway/smtp.py writes SMTP replies.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class TemporaryError(GatewayError):
    """The work could not be done now; it may succeed if tried again."""


class DnsTemporaryError(TemporaryError):
    pass


class DnsPermanentError(GatewayError):
    """The name cannot be a DNS name (empty or over-long label): no lookup is possible."""


class ScanTimeout(TemporaryError, TimeoutError):
    pass


class WorkerCrashed(TemporaryError):
    pass


class DownstreamUnavailable(TemporaryError):
    """The next hop is down, timed out, or answered 4xx."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class DownstreamRejected(GatewayError):
    """The next hop answered 5xx; its code and text are passed back."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class Refused(GatewayError):
    """A request refused for a reason the person can fix (a password too short, an address
    that is not one): the message is French, for them."""


class ConfigError(Exception):
    """Invalid configuration; the message names the key path."""
