"""Bounded memory for the Ask tab's sessions: a time to live, a total budget, and closed tabs freed at once.

Each Ask session (its `gr.State`) holds the upload it read: small once volumes are memory-mapped
(engine.imageio), but a large photo, the RGB view and the engine's image embeddings still cost memory. The
`SessionBudget` keeps, per browser session, the bytes its state holds and when it was last used:

- a session idle for longer than `ttl_s` is dropped (Gradio's `gr.State(time_to_live=...)` deletes the value;
  the budget forgets its bytes);
- a closed tab (Gradio's `unload` event) is dropped at once instead of after Gradio's hour for closed sessions;
- when the total is over `budget_bytes`, the least recently used *other* sessions give way, oldest first,
  until it fits; the server itself never refuses an upload for memory.

Dropping a session is done by `close_session`, which asks Gradio's own state sweep (once a second, on its
event loop) to delete the session's `gr.State` values; a student whose idle session was dropped finds an
empty Ask tab and is told to upload again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CLOSED_TTL_S = 3600  # Gradio's own time to live of a closed session's state (restored when a session returns)


@dataclass
class _Entry:
    nbytes: int
    last_used: float


class SessionBudget:
    """Least-recently-used accounting of session memory with a time to live. Thread-safe."""

    def __init__(
        self, *, budget_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if budget_bytes < 1 or ttl_s <= 0:
            raise ValueError("budget_bytes and ttl_s must be positive")
        self.budget_bytes, self.ttl_s, self._clock = budget_bytes, ttl_s, clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._close: Callable[[str], None] = lambda _session_id: None
        self._reopen: Callable[[str], None] = lambda _session_id: None
        self._dropped: set[str] = set()

    def attach(self, close: Callable[[str], None], reopen: Callable[[str], None]) -> None:
        """How to drop a session's state (close) and to keep a dropped session's new state (reopen)."""
        self._close, self._reopen = close, reopen

    def touch(self, session_id: str | None, nbytes: int) -> list[str]:
        """Record that session_id now holds nbytes; returns the sessions dropped to stay within budget."""
        if not session_id:
            return []
        now = self._clock()
        with self._lock:
            came_back = session_id in self._dropped
            self._dropped.discard(session_id)
            self._entries[session_id] = _Entry(int(nbytes), now)
            self._entries.move_to_end(session_id)
            self._expire(now)
            dropped = self._over_budget(session_id)
            self._dropped.update(dropped)
        if came_back:
            self._reopen(session_id)
        for other in dropped:
            logger.info("session memory budget full: the least recently used session gives way")
            self._close(other)
        return dropped

    def release(self, session_id: str | None) -> None:
        """The tab was closed: forget its bytes and drop its state now."""
        if not session_id:
            return
        with self._lock:
            known = self._entries.pop(session_id, None) is not None
        if known:
            self._close(session_id)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _expire(self, now: float) -> None:
        """Forget sessions idle past the time to live (gr.State's own time_to_live deletes their values)."""
        for session_id in [s for s, e in self._entries.items() if now - e.last_used > self.ttl_s]:
            del self._entries[session_id]

    def _over_budget(self, keep: str) -> list[str]:
        dropped = []
        total = sum(e.nbytes for e in self._entries.values())
        for session_id in list(self._entries):  # oldest first
            if total <= self.budget_bytes:
                break
            if session_id != keep:
                total -= self._entries.pop(session_id).nbytes
                dropped.append(session_id)
        return dropped


def nbytes_of(*parts: Any) -> int:
    """Bytes held in memory by numpy arrays, torch tensors, LoadedImages and objects made of them (one level)."""
    total = 0
    for part in parts:
        if part is None:
            continue
        if hasattr(part, "nbytes_in_memory"):
            total += int(part.nbytes_in_memory)
        elif isinstance(part, np.ndarray):
            total += 0 if isinstance(part, np.memmap) or part.base is not None else int(part.nbytes)
        elif hasattr(part, "element_size") and hasattr(part, "nelement"):
            total += int(part.element_size() * part.nelement())
        elif hasattr(part, "__dict__"):
            total += nbytes_of(*(v for v in vars(part).values() if not hasattr(v, "__dict__")))
    return total


def close_session(blocks: Any, session_id: str) -> None:
    """Have Gradio's state sweep delete session_id's gr.State values within a second (not after an hour)."""
    state = _session_state(blocks, session_id)
    if state is not None:
        state.STATE_TTL_WHEN_CLOSED = 0
        state.is_closed = True


def reopen_session(blocks: Any, session_id: str) -> None:
    """A dropped session is used again: its new state lives by the normal rules."""
    state = _session_state(blocks, session_id)
    if state is not None:
        state.STATE_TTL_WHEN_CLOSED = CLOSED_TTL_S
        state.is_closed = False


def _session_state(blocks: Any, session_id: str) -> Any:
    holder = getattr(blocks, "state_holder", None)
    return None if holder is None else holder.session_data.get(session_id)
