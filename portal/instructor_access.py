"""How the teaching features added for issue 21 get the instructor's session: ONE place to rewire.

Today the session is a `cases.InstructorSession` kept in a `gr.State` after `CaseStore.login`; the
store checks it on every instructor action (rights are never decided by the UI alone). When logins move
to cookie sessions, only these two functions change.
"""

from __future__ import annotations

from typing import Any

from cases import CaseStore, InstructorSession, PermissionDenied


def instructor_session(store: CaseStore | None, value: Any) -> InstructorSession | None:
    """The valid instructor session held in `value` (the shared gr.State), or None."""
    if store is None or not isinstance(value, InstructorSession) or not store.is_instructor(value):
        return None
    return value


def require_instructor(store: CaseStore | None, value: Any, message: str) -> InstructorSession:
    """The session, or PermissionDenied(message) for visitors who are not logged in as an instructor."""
    session = instructor_session(store, value)
    if session is None:
        raise PermissionDenied(message)
    return session
