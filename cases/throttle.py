"""Login throttling: exponential back-off per client and per account, never a lock-out.

Each failed login adds one to a record keyed by the client address and one keyed by the username.
After FREE_FAILURES, the next attempt from that key must wait BASE_DELAY_S * 2**(extra failures),
capped (CLIENT_CAP_S per client, ACCOUNT_CAP_S per account, so the owner logging in from elsewhere
waits seconds at most). `begin` checks and counts in one step under a lock, so concurrent guesses
cannot slip past the count. Records expire after RECORD_TTL_S and at most MAX_RECORDS are kept
(oldest evicted), so failures cannot grow memory without bound.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

FREE_FAILURES = 3
BASE_DELAY_S = 0.5
CLIENT_CAP_S = 30.0
ACCOUNT_CAP_S = 4.0
RECORD_TTL_S = 15 * 60.0
MAX_RECORDS = 10_000


@dataclass
class _Record:
    failures: int
    last: float


@dataclass(frozen=True)
class Admission:
    """The result of `LoginThrottle.begin`: allowed, or how many seconds to wait."""

    allowed: bool
    retry_after_s: float


class LoginThrottle:
    """Bounded, expiring failure counters with capped exponential back-off (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def begin(self, client: str, account: str) -> Admission:
        """Admit an attempt (and count it as a failure until `succeeded`), or say how long to wait."""
        keys = (("client", client), ("account", account))
        with self._lock:
            now = self._clock()
            self._expire(now)
            wait = max(self._wait(key, now) for key in keys)
            if wait > 0:
                return Admission(False, wait)
            for key in keys:
                record = self._records.pop(key, None) or _Record(0, now)
                record.failures += 1
                record.last = now
                self._records[key] = record  # most recent at the end
            while len(self._records) > MAX_RECORDS:
                self._records.popitem(last=False)
        return Admission(True, 0.0)

    def failed(self, client: str, account: str) -> None:
        """A wrong password: the back-off runs from now (the end of the check), not from its start."""
        with self._lock:
            now = self._clock()
            for key in (("client", client), ("account", account)):
                record = self._records.get(key)
                if record is not None:
                    record.last = now
                    self._records.move_to_end(key)

    def succeeded(self, client: str, account: str) -> None:
        """A correct password: forget the failures of this client and this account."""
        with self._lock:
            self._records.pop(("client", client), None)
            self._records.pop(("account", account), None)

    def _wait(self, key: tuple[str, str], now: float) -> float:
        record = self._records.get(key)
        if record is None or record.failures < FREE_FAILURES:
            return 0.0
        cap = CLIENT_CAP_S if key[0] == "client" else ACCOUNT_CAP_S
        delay = min(BASE_DELAY_S * 2 ** (record.failures - FREE_FAILURES), cap)
        return max(0.0, math.ceil((record.last + delay - now) * 10) / 10)

    def _expire(self, now: float) -> None:
        while self._records:
            key, record = next(iter(self._records.items()))
            if now - record.last < RECORD_TTL_S:
                break
            del self._records[key]
