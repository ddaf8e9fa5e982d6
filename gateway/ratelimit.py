"""Failed logins counted per key (`user:NAME`, `ip:ADDRESS`), for the web page and the
submission port: a key past its limit within the window is locked for the window's length,
right password or not. A client address gets four times the account limit: the staff of a
practice share one address, and one person's typos must not lock everyone out.

In memory, per process; bounded (old keys are dropped), so that guessing with endless new
names cannot grow it without end.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

MAX_KEYS = 10_000


@dataclass(slots=True)
class _Failures:
    times: collections.deque[float] = field(default_factory=collections.deque)
    locked_until: float = 0.0


class LoginLimiter:
    def __init__(self, *, max_failures: int, window_s: float) -> None:
        self._max = max_failures
        self._window = window_s
        self._keys: dict[str, _Failures] = {}

    def locked(self, *keys: str) -> float:
        """Seconds left of the longest lockout among `keys` (0: none)."""
        now = time.time()
        return max((self._keys[k].locked_until - now for k in keys if k in self._keys),
                   default=0.0)

    def failed(self, *keys: str) -> bool:
        """Record a failure; True when it locked one of the keys."""
        now = time.time()
        if len(self._keys) >= MAX_KEYS:
            self._prune(now)
        locked = False
        for k in keys:
            f = self._keys.setdefault(k, _Failures())
            f.times.append(now)
            while f.times and f.times[0] < now - self._window:
                f.times.popleft()
            if len(f.times) >= (self._max * 4 if k.startswith("ip:") else self._max):
                f.locked_until = now + self._window
                f.times.clear()
                locked = True
        return locked

    def succeeded(self, *keys: str) -> None:
        for k in keys:
            self._keys.pop(k, None)

    def _prune(self, now: float) -> None:
        self._keys = {k: f for k, f in self._keys.items()
                      if f.locked_until > now or (f.times and f.times[-1] > now - self._window)}
        if len(self._keys) >= MAX_KEYS:  # all recent: keep the locked ones and the newest
            ranked = sorted(self._keys.items(), key=lambda kv: (
                kv[1].locked_until <= now, -(kv[1].times[-1] if kv[1].times else 0)))
            self._keys = dict(ranked[:MAX_KEYS // 2])
