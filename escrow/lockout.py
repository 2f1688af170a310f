"""How failed sign-in attempts slow an attacker down.

Two defences, both applied by :mod:`escrow.recipients`:

* Per recipient, in the database (shared by every replica): after
  :data:`LOCK_AFTER_FAILURES` consecutive failures the recipient is locked
  for :data:`LOCK_BASE`, and every further failure doubles the lock, up to
  :data:`LOCK_MAX`. Only a success, or staff (``escrow recipient unlock`` /
  ``reset``), clears the count. While locked even the right passphrase is
  refused.
* Per remote address, **in this process only** (:class:`AddressThrottle`):
  an address that fails :data:`ADDRESS_MAX_FAILURES` times within
  :data:`ADDRESS_WINDOW` is refused for the rest of that window, whichever
  recipient it tries. With several replicas each keeps its own count, so an
  address gets at most that many tries per replica; the per-recipient lock
  above is the defence that holds across replicas and restarts.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from datetime import datetime, timedelta

LOCK_AFTER_FAILURES = 5
LOCK_BASE = timedelta(minutes=1)
LOCK_MAX = timedelta(hours=24)
ADDRESS_MAX_FAILURES = 30
ADDRESS_WINDOW = timedelta(minutes=15)
# Bounded memory: the least recently failing addresses are forgotten first.
ADDRESS_TABLE_SIZE = 10_000


def lock_delay(failures: int) -> timedelta | None:
    """How long to lock after ``failures`` consecutive failures (None: not yet)."""
    if failures < LOCK_AFTER_FAILURES:
        return None
    doublings = min(failures - LOCK_AFTER_FAILURES, 20)
    delay: timedelta = LOCK_BASE * (2**doublings)
    return min(delay, LOCK_MAX)


def is_locked(locked_until: datetime | None, now: datetime) -> bool:
    return locked_until is not None and locked_until > now


class AddressThrottle:
    """Counts recent failures per remote address (in-process; see the module docstring)."""

    def __init__(
        self, max_failures: int = ADDRESS_MAX_FAILURES, window: timedelta = ADDRESS_WINDOW
    ) -> None:
        self.max_failures = max_failures
        self.window = window.total_seconds()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and now - times[0] >= self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def blocked(self, address: str, now: float | None = None) -> bool:
        """True while ``address`` has used up its failures for the current window."""
        times = self._recent(address, time.monotonic() if now is None else now)
        return times is not None and len(times) >= self.max_failures

    def failed(self, address: str, now: float | None = None) -> None:
        """Count one failure from ``address``."""
        moment = time.monotonic() if now is None else now
        times = self._recent(address, moment)
        if times is None:
            times = deque()
            self._failures[address] = times
        times.append(moment)
        self._failures.move_to_end(address)
        while len(self._failures) > ADDRESS_TABLE_SIZE:
            self._failures.popitem(last=False)

    def clear(self) -> None:
        self._failures.clear()
