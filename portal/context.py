"""What every tab of the portal receives: the engine, the case store and the serving settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portal import texts
from portal.session_memory import SessionBudget


@dataclass(frozen=True)
class PortalSettings:
    """Limits and queue sizes. Defaults come from portal/texts.py; app.py may override them."""

    max_file_size: str = texts.MAX_FILE_SIZE
    queue_max_size: int | None = texts.QUEUE_MAX_SIZE  # None: cheap events are never refused
    model_queue_max_size: int = texts.MODEL_QUEUE_MAX_SIZE
    model_concurrency_limit: int = texts.MODEL_CONCURRENCY_LIMIT
    ui_concurrency_limit: int = texts.UI_CONCURRENCY_LIMIT
    delete_cache: tuple[int, int] = texts.DELETE_CACHE
    max_question_chars: int = texts.MAX_QUESTION_CHARS
    max_new_tokens: int = texts.MAX_NEW_TOKENS
    examples_dir: Path | None = None  # assets/medimages (with index.json), or None for no examples
    blocked_paths: tuple[str, ...] = ()  # e.g. the SQLite database folder
    hf_oauth: bool = False  # running as a Hugging Face Space: offer "Sign in with Hugging Face"
    instructor_allowlist: tuple[str, ...] = ()  # Hugging Face usernames that are instructors
    cookie_secure: bool = False  # HTTPS only (Spaces): the login cookie gets Secure and SameSite=None
    session_ttl_s: float = texts.SESSION_TTL_S
    session_budget_mb: int = texts.SESSION_MEMORY_BUDGET_MB
    spill_dir: Path | None = None  # memory-mapped volumes (default: the system temp folder)

    def __post_init__(self) -> None:
        sizes = (self.model_queue_max_size, self.model_concurrency_limit, self.ui_concurrency_limit)
        if min(sizes) < 1 or (self.queue_max_size is not None and self.queue_max_size < 1):
            raise ValueError("queue sizes and the concurrency limits must be at least 1")
        if self.session_ttl_s <= 0 or self.session_budget_mb < 1:
            raise ValueError("session_ttl_s and session_budget_mb must be positive")
        if self.max_new_tokens < 1 or self.max_question_chars < 1:
            raise ValueError("max_new_tokens and max_question_chars must be at least 1")


@dataclass(frozen=True)
class PortalContext:
    """engine: a loaded `engine` object (load_engine); store: a cases.CaseStore, or None without a database."""

    engine: Any
    store: Any | None = None
    settings: PortalSettings = field(default_factory=PortalSettings)
    sessions: SessionBudget = field(init=False)  # the Ask sessions' memory budget, made from the settings

    def __post_init__(self) -> None:
        budget = SessionBudget(
            budget_bytes=self.settings.session_budget_mb * 2**20, ttl_s=self.settings.session_ttl_s
        )
        object.__setattr__(self, "sessions", budget)

    def model_queue(self) -> dict[str, Any]:
        """Event kwargs for every handler that runs the model: one shared queue, bounded concurrency."""
        return {
            "concurrency_id": texts.MODEL_CONCURRENCY_ID,
            "concurrency_limit": self.settings.model_concurrency_limit,
        }
