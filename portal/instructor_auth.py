"""Instructor sessions bound to a secret the browser cannot choose.

Gradio's `session_hash` is picked by the client (and travels in URLs), so it never proves anything.
Instead `POST /instructor/login` (JSON {username, password}) checks the password in the case store and
sets an HttpOnly cookie holding the store's random session token; every instructor event handler
resolves its session from that cookie in the `gr.Request` (`InstructorGate.session`). `POST
/instructor/logout` forgets the token. The password never passes through Gradio's queue: the Log in
button posts it with `fetch` (LOGIN_JS) and the Python handler only reads the resulting cookie.

On a Hugging Face Space (settings.hf_oauth) instructors may also sign in with `gr.LoginButton`; Gradio
keeps that identity in its signed session cookie, and users on the allow-list get a store session.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cases import InstructorSession, PermissionDenied
from cases.errors import LoginThrottled
from portal import texts

logger = logging.getLogger(__name__)

COOKIE_NAME = "medplib_instructor"
LOGIN_PATH = "/instructor/login"
LOGOUT_PATH = "/instructor/logout"
MAX_LOGIN_BODY = 4096
LOGIN_JS = """async (username, password) => {
  const reply = await fetch("instructor/login", {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({username, password})});
  const body = await reply.json().catch(() => ({}));
  return [username, body.message || ""];
}"""
LOGOUT_JS = """async () => {
  await fetch("instructor/logout", {method: "POST", credentials: "same-origin"});
  return [];
}"""


class InstructorGate:
    """Resolves the instructor session of a request: our cookie, else (on Spaces) an allowed HF login."""

    def __init__(self, store: Any, *, hf_oauth: bool = False, hf_allowlist: tuple[str, ...] = ()) -> None:
        self.store = store
        self.hf_oauth = hf_oauth
        self.hf_allowlist = frozenset(name.lower() for name in hf_allowlist)
        self._hf_sessions: dict[str, InstructorSession] = {}
        self._lock = threading.Lock()

    def session(self, request: Any, profile: Any = None) -> InstructorSession | None:
        """The live session for this request; None for anyone else (session_hash is ignored)."""
        cookies = getattr(request, "cookies", None) or {}
        session = self.store.session_for_token(cookies.get(COOKIE_NAME))
        if session is not None or not self.hf_oauth or profile is None:
            return session
        return self._hf_session(str(getattr(profile, "username", "") or ""))

    def _hf_session(self, username: str) -> InstructorSession | None:
        if not username or username.lower() not in self.hf_allowlist:
            return None
        with self._lock:
            known = self._hf_sessions.get(username)
            if known is None or not self.store.is_instructor(known):
                known = self.store.external_session(username, "huggingface")
                self._hf_sessions[username] = known
            return known

    def bind(
        self, fn: Callable[..., Any], n_inputs: int, name: str | None = None, params: Sequence[str] = ()
    ) -> Callable[..., Any]:
        """A Gradio handler taking `n_inputs` component values and calling fn(session, *values).

        The session comes from the request (see `session`); the handler keeps fn's name (or `name`), so
        the event's default api_name does not change. `params` names the inputs in the public API
        (value_0, value_1, ... without it).
        """
        if params and len(params) != n_inputs:
            raise ValueError(f"bind: {len(params)} parameter names for {n_inputs} inputs")
        oauth = self.hf_oauth

        def handler(*values: Any) -> Any:
            if oauth:
                *inputs, request, profile = values
            else:
                *inputs, request = values
                profile = None
            return fn(self.session(request, profile), *inputs)

        params = [
            inspect.Parameter(param, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for param in (params or [f"value_{i}" for i in range(n_inputs)])
        ]
        params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD))
        handler.__annotations__ = {"request": gr.Request}
        if oauth:
            params.append(inspect.Parameter("profile", inspect.Parameter.POSITIONAL_OR_KEYWORD))
            handler.__annotations__["profile"] = gr.OAuthProfile | None
        handler.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        handler.__name__ = name or getattr(fn, "__name__", "handler")
        return handler


def instructor_routes(store: Any, *, cookie_secure: bool = False, same_site: str = "strict") -> list[Route]:
    """The login/logout routes; pass them to demo.launch(app_kwargs={"routes": ...})."""

    async def login(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_LOGIN_BODY or not request.headers.get("content-type", "").startswith(
            "application/json"
        ):
            return JSONResponse({"ok": False, "message": texts.LOGIN_BAD_REQUEST}, status_code=400)
        try:
            data = json.loads(body)
            username, password = str(data["username"]).strip(), str(data["password"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"ok": False, "message": texts.LOGIN_BAD_REQUEST}, status_code=400)
        client = request.client.host if request.client else "unknown"
        try:
            session = await run_in_threadpool(store.login, username, password, client)
        except LoginThrottled as error:
            wait = max(1, round(error.retry_after_s))
            return JSONResponse({"ok": False, "message": texts.LOGIN_THROTTLED.format(seconds=wait)},
                                status_code=429, headers={"Retry-After": str(wait)})  # fmt: skip
        except PermissionDenied:
            return JSONResponse({"ok": False, "message": texts.LOGIN_WRONG}, status_code=401)
        response = JSONResponse({"ok": True, "message": ""})
        max_age = int((session.expires_at - store_now()).total_seconds())
        response.set_cookie(COOKIE_NAME, session.token, max_age=max_age, httponly=True, secure=cookie_secure,
                            samesite=same_site, path="/")  # fmt: skip
        return response

    async def logout(request: Request) -> Response:
        session = store.session_for_token(request.cookies.get(COOKIE_NAME))
        if session is not None:
            await run_in_threadpool(store.logout, session)
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE_NAME, path="/", secure=cookie_secure, httponly=True, samesite=same_site)
        return response

    return [Route(LOGIN_PATH, login, methods=["POST"]), Route(LOGOUT_PATH, logout, methods=["POST"])]


def store_now() -> Any:
    from cases.models import utc_now

    return utc_now()
