"""How instructor-only UI outside the Instructor tab gets its session: the login cookie, never gr.State.

The Class sessions tab and the Ask tab's "save as a case draft" wrap their instructor handlers with
`InstructorGate.bind` (portal.instructor_auth): each call receives the session of the request's HttpOnly
cookie (or, on a Space, an allowed Hugging Face login), so a client that reuses an instructor's Gradio
`session_hash` gets nothing. Instructors log in once, on the Instructor tab. The store still checks the
session on every action (rights are never decided by the UI alone).
"""

from __future__ import annotations

from typing import Any

from cases import CaseStore, InstructorSession, PermissionDenied
from portal.instructor_auth import InstructorGate


def instructor_gate(ctx: Any) -> InstructorGate | None:
    """The gate for the portal context's store and settings; None without a case store."""
    if ctx.store is None:
        return None
    settings = ctx.settings
    return InstructorGate(ctx.store, hf_oauth=settings.hf_oauth, hf_allowlist=settings.instructor_allowlist)


def require_instructor(
    store: CaseStore | None, session: InstructorSession | None, message: str
) -> InstructorSession:
    """The session the gate resolved, or PermissionDenied(message) for anyone not logged in as an instructor."""
    if store is None or session is None or not store.is_instructor(session):
        raise PermissionDenied(message)
    return session
