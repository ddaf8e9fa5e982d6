"""Exception tree of the gateway.

    GatewayError
    ├── TemporaryError            -> 451 4.x.x, the sender retries
    │   ├── DnsTemporaryError
    │   ├── ScanTimeout           (also a TimeoutError)
    │   ├── WorkerCrashed
    │   ├── DownstreamUnavailable (next hop down, timing out, or answering 4xx)
    │   └── QuarantineWriteError
    └── PermanentError            -> 5xx, only for deliberate decisions
        ├── PolicyReject
        ├── MessageTooLarge
        └── DownstreamRejected    (next hop answered 5xx: passed back)
    ├── DnsPermanentError         (a name that cannot be looked up: a fact, not a retry)
    ConfigError                   (stands apart: raised before any port opens)

Only gateway/smtp.py turns these into SMTP replies (through gateway/replies.py).
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class TemporaryError(GatewayError):
    """The message could not be handled now; the sender must retry."""


class PermanentError(GatewayError):
    """The message is refused for good."""


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


class QuarantineWriteError(TemporaryError):
    pass


class PolicyReject(PermanentError):
    pass


class MessageTooLarge(PermanentError):
    pass


class DownstreamRejected(PermanentError):
    """The next hop answered 5xx; its code and text are passed back."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class ConfigError(Exception):
    """Invalid configuration; the message names the key path."""
