"""The portal's Blocks app, built by a factory (no globals, nothing happens at import).

`build_app(ctx)` composes the Ask tab and, when their modules exist, the teaching tabs (case library, quiz,
instructor), each exposing `build_<name>_tab(ctx)`. `launch_kwargs(settings)` gives the serving limits that
`demo.launch` needs (app.py and the tests use the same ones).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from portal import texts
from portal.ask_extras import build_ask_extras
from portal.ask_tab import AskTabInputs, build_ask_tab
from portal.class_tab import build_class_tab
from portal.context import PortalContext, PortalSettings
from portal.instructor_access import instructor_gate
from portal.instructor_auth import instructor_routes
from portal.session_memory import close_session, reopen_session

logger = logging.getLogger(__name__)

ASK_TAB_ID = "ask"
CSS_PATH = Path(__file__).resolve().parents[1] / "static" / "portal.css"
# (module, builder function, tab title): optional tabs written by other engineers.
TEACHING_TABS = (
    ("portal.library_tab", "build_library_tab", "Case library"),
    ("portal.quiz_tab", "build_quiz_tab", "Quiz"),
    ("portal.instructor_tab", "build_instructor_tab", "Instructor"),
)


def banner_markdown(info: Any) -> str:
    """Model name, device and dtype; the demo-model notice when it applies; always the clinical notice."""
    lines = [
        texts.MODEL_LINE.format(
            name=info.name,
            device=info.device,
            dtype=info.dtype,
            n_parameters=info.n_parameters,
            n_experts=info.n_experts,
        )
    ]
    if info.is_demo_model:
        lines.append(f"<span id='portal-demo-notice'>{texts.DEMO_MODEL_NOTICE}</span>")
    lines.append(texts.NOT_FOR_CLINICAL_USE)
    return "\n\n".join(lines)


def optional_tab_builder(module_name: str, function_name: str) -> Callable[[PortalContext], None] | None:
    """The tab builder if its module exists; None when the module itself is missing (not its imports)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return None
    return getattr(module, function_name)


def build_app(ctx: PortalContext) -> gr.Blocks:
    """The whole portal as a queued gr.Blocks; launch it with `demo.launch(**launch_kwargs(ctx.settings))`."""
    settings = ctx.settings

    def release_session(request: gr.Request) -> None:
        """A closed tab frees its session's memory now, not after Gradio's hour for closed sessions."""
        ctx.sessions.release(request.session_hash)

    with gr.Blocks(title=texts.TITLE, analytics_enabled=False, delete_cache=settings.delete_cache) as demo:
        gr.Markdown(f"# {texts.TITLE}")
        gr.Markdown(banner_markdown(ctx.engine.info), elem_id="portal-banner")
        gate = instructor_gate(ctx)  # the Class tab and the Ask tab's draft saving read the login cookie
        with gr.Tabs() as tabs:
            with gr.Tab(texts.ASK_TAB, id=ASK_TAB_ID):
                ask_inputs = build_ask_tab(ctx)
                build_ask_extras(ctx, ask_inputs.session, ask_inputs.upload, ask_inputs.question, gate)
            for module_name, function_name, title in TEACHING_TABS:
                builder = optional_tab_builder(module_name, function_name)
                if builder is None:
                    logger.info("tab %r not built: %s is not installed", title, module_name)
                    continue
                with gr.Tab(title):
                    returned = builder(ctx)
                if isinstance(returned, gr.State):  # the case library's hand-off to the Ask tab
                    wire_handoff(returned, ask_inputs, tabs)
            with gr.Tab(texts.CLASS_TAB):
                build_class_tab(ctx, gate)
        demo.unload(release_session)
        ctx.sessions.attach(
            lambda session_id: close_session(demo, session_id),
            lambda session_id: reopen_session(demo, session_id),
        )
    demo.queue(max_size=settings.queue_max_size, default_concurrency_limit=settings.ui_concurrency_limit)
    return demo


def open_handoff(handoff: Any) -> tuple:
    """A library case opened in the Ask tab: its image file, its suggested question, and the tab switch."""
    if handoff is None:
        return gr.skip(), gr.skip(), gr.skip()
    return str(handoff.image_path), handoff.question, gr.Tabs(selected=ASK_TAB_ID)


def wire_handoff(handoff: gr.State, ask_inputs: AskTabInputs, tabs: gr.Tabs) -> None:
    handoff.change(
        open_handoff, handoff, [ask_inputs.upload, ask_inputs.question, tabs], api_visibility="private"
    )


def launch_kwargs(settings: PortalSettings, store: Any | None = None) -> dict[str, Any]:
    """Serving limits for demo.launch: upload size cap, blocked paths, the portal's CSS, no /monitoring,
    and (with a case store) the instructor login/logout routes that set the session cookie."""
    routes = []
    if store is not None:
        routes = instructor_routes(
            store, cookie_secure=settings.cookie_secure, same_site="none" if settings.cookie_secure else "strict"
        )
    return {
        "app_kwargs": {"routes": routes},
        "enable_monitoring": False,  # /monitoring was open to anyone and printed its URL to the log
        "max_file_size": settings.max_file_size,
        "blocked_paths": list(settings.blocked_paths) or None,
        "css_paths": [CSS_PATH],
        "show_error": False,  # gr.Error messages are shown anyway; other exceptions stay server-side
    }
