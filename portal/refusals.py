"""User mistakes, in every tab: one readable warning, every output unchanged, one log line without a traceback.

A handler (or a helper deep inside it) raises `UserMistake`; `refusing(n)` turns it into `refuse(message, n)`:
an HTML-escaped `gr.Warning` (the toast renders HTML, so `<region>` stays text) and `gr.skip()` for each of the
event's n outputs, so no red "Error" label covers the page. Anything else a handler raises is a server fault:
logged with its traceback, shown as a generic message that names only the exception type. Messages never
contain file names.
"""

from __future__ import annotations

import functools
import html
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr

from portal import texts

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class UserMistake(Exception):
    """Something the user can fix (the message says how); shown as a warning, never as an error."""


def refuse(message: str, n_outputs: int) -> Any:
    """A user mistake: one escaped warning, one log line, and n_outputs skips (a bare skip for one output)."""
    gr.Warning(html.escape(message))
    logger.info("refused a request: %s", message[:160])
    return _skips(n_outputs)


def server_fault(error: Exception, n_outputs: int, where: str) -> Any:
    """A server fault: the traceback in the log, a generic warning (the exception's type only), outputs kept."""
    logger.error("%s failed", where, exc_info=error)
    gr.Warning(html.escape(texts.ERR_SERVER.format(kind=type(error).__name__)), title=texts.SERVER_FAULT_TITLE)
    return _skips(n_outputs)


def refusing(n_outputs: int) -> Callable[[F], F]:
    """Decorate an event handler with n_outputs outputs: UserMistake → `refuse`, other errors → `server_fault`.

    The wrapper keeps the handler's signature (`functools.wraps`), so Gradio still injects `gr.Request`.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def handler(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except UserMistake as mistake:
                return refuse(str(mistake), n_outputs)
            except Exception as error:  # the UI boundary: report, keep the page as it was, keep serving
                return server_fault(error, n_outputs, fn.__qualname__)

        return handler  # type: ignore[return-value]

    return decorate


def _skips(n_outputs: int) -> Any:
    if n_outputs == 0:
        return None
    return gr.skip() if n_outputs == 1 else tuple(gr.skip() for _ in range(n_outputs))
