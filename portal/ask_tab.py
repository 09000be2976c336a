"""The Ask tab: upload an image, mark a region, ask MedPLIB, see the streamed answer and the mask.

Layout and wiring live in `build_ask_tab`; `AskHandlers` holds one short method per event (a user mistake
shows one `gr.Warning` and leaves every output as it was); the steps themselves are in portal/ask_session.py (no gradio there).
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr

from engine import imageio
from engine.results import Answer, GenerationSettings, answer_is_unfinished
from portal import ask_session as steps
from portal import exports, texts, uploads
from portal.ask_session import AskSession, UserInputError
from portal.context import PortalContext
from portal.refusals import refuse
from portal.regions import RegionMarks
from portal.routing_plot import routing_figure
from portal.safe_text import plain

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 8
WINDOW_CHOICES = [imageio.AUTO, *imageio.WINDOW_PRESETS]
N_VIEW_OUTPUTS = 14  # session, info, slider, plane, window, preview, editor, model input, chat, overlay, ...
N_TALK_OUTPUTS = 7  # session, chat, question, overlay, area, downloads, routing plot


def model_queue_length(blocks: Any) -> int:
    """Events waiting in the model's concurrency group (0 before launch or when unknown)."""
    queue = getattr(blocks, "_queue", None)
    waiting = getattr(queue, "event_queue_per_concurrency_id", {}).get(texts.MODEL_CONCURRENCY_ID)
    return len(waiting.queue) if waiting is not None else 0


class AskHandlers:
    """Event handlers of the Ask tab for one portal (engine and settings from the context)."""

    def __init__(self, ctx: PortalContext, blocks: Any = None) -> None:
        self.ctx = ctx
        self.blocks = blocks  # the gr.Blocks being built, for the model queue's length

    # ---- image and view ---------------------------------------------------------------------------
    def load(self, path: str | None, show_input: bool, request: gr.Request | None = None) -> tuple:
        """A new upload (or example): read it and reset everything that belonged to the old image.

        The raw upload is deleted from Gradio's cache as soon as it is read (or refused): its metadata may
        identify a patient, and it must not stay fetchable by URL. A bad file leaves the old image in place.
        """
        if not path:
            return self._view(AskSession(), show_input)
        try:
            session = steps.load(path, spill_dir=self.ctx.settings.spill_dir)
        except (imageio.ImageReadError, UserInputError) as err:
            return refuse(str(err), N_VIEW_OUTPUTS)
        finally:
            uploads.discard(path, keep_under=self.ctx.settings.examples_dir)
        self._account(request, session)
        return self._view(session, show_input)

    def change_view(
        self,
        session: AskSession,
        position: int,
        plane: str,
        window: str,
        show_input: bool,
        request: gr.Request | None = None,
    ) -> tuple:
        """Frame / slice slider (1-based), plane or window changed: a new image for the model."""
        if session.image is None:
            return refuse(texts.ERR_NO_IMAGE, N_VIEW_OUTPUTS)
        index = int(position) - 1
        if plane != session.plane:  # a new plane starts in its middle
            index = imageio.n_slices(session.image, plane) // 2
        session = steps.with_view(session, index=index, plane=plane, preset=window)
        self._account(request, session)
        return self._view(session, show_input)

    def _account(self, request: gr.Request | None, session: AskSession) -> None:
        """Tell the session memory budget what this browser session now holds (may drop idle others)."""
        if request is not None:
            self.ctx.sessions.touch(request.session_hash, steps.memory_bytes(session))

    def model_gate(self, *inputs: Any) -> tuple:
        """Validator of model events (one verdict per input): refuse before queueing when the model's own
        queue is full; the message is shown at the question box (input 1). Other events never wait for it."""
        waiting = model_queue_length(self.blocks)
        if waiting < self.ctx.settings.model_queue_max_size:
            return tuple(gr.validate(True, "") for _ in inputs)
        logger.info("model queue full (%d waiting): a question was refused", waiting)
        message = texts.ERR_MODEL_QUEUE_FULL.format(n=waiting)
        return tuple(gr.validate(i != 1, message if i == 1 else "") for i in range(len(inputs)))

    def _view(self, session: AskSession, show_input: bool) -> tuple:
        count = imageio.n_slices(session.image, session.plane) if session.image else 1
        is_nifti = session.image is not None and session.image.kind == "nifti"
        greyscale = session.image is not None and not session.image.is_color
        shown = exports.shown_png(session.rgb)  # a new view has no marks: the preview is the image itself
        return (
            session,
            steps.describe(session) if session.has_image else "",
            gr.update(minimum=1, maximum=max(count, 2), value=session.index + 1, visible=count > 1,
                      label=texts.SLICE_LABEL if is_nifti else texts.FRAME_LABEL),
            gr.update(value=session.plane, visible=is_nifti),
            gr.update(value=steps.window_choice(session), visible=greyscale),
            shown,
            shown,
            gr.update(value=exports.shown_png(steps.model_input(session)) if show_input else None,
                      visible=bool(show_input)),  # fmt: skip
            [],
            None,
            "",
            None,
            None,
            texts.NOTE_NO_MARK if session.has_image else "",
        )

    def show_model_input(self, session: AskSession, show: bool) -> Any:
        return gr.update(value=exports.shown_png(steps.model_input(session)) if show else None, visible=bool(show))

    # ---- region marks -----------------------------------------------------------------------------
    def click(self, session: AskSession, tool: str, evt: gr.SelectData) -> tuple:
        """A click on the image: evt.index is [x, y] in image pixels."""
        if tool not in ("Point", "Box"):
            return session, gr.skip(), texts.NOTE_PICK_TOOL.format(tool=tool)
        x, y = (int(v) for v in evt.index[:2])
        try:
            session = steps.click(session, tool, x, y)
        except UserInputError as err:
            return refuse(str(err), 3)
        return session, steps.preview(session), steps.region_note(session, tool, None)

    def mark_region(self, session: AskSession, tool: str, x1: float, y1: float, x2: float, y2: float) -> tuple:
        """Scripts' stand-in for clicks (API /mark_region): a point at (x1, y1) or a box (x1, y1)-(x2, y2) in pixels."""
        if tool not in ("Point", "Box"):
            raise gr.Error(texts.ERR_SCRIPT_TOOL)
        corners = [(x1, y1)] if tool == "Point" else [(x1, y1), (x2, y2)]
        try:
            for x, y in corners:
                session = steps.click(session, tool, int(x), int(y))
        except UserInputError as err:
            raise gr.Error(str(err)) from err
        return session, steps.preview(session), steps.region_note(session, tool, None)

    def undo(self, session: AskSession, tool: str, sketch: dict | None) -> tuple:
        session = replace(session, marks=session.marks.undo())
        return session, steps.preview(session), steps.region_note(session, tool, sketch)

    def clear(self, session: AskSession, tool: str) -> tuple:
        """Drop every clicked mark and the sketch strokes (the editor goes back to the bare image)."""
        session = replace(session, marks=RegionMarks())
        return session, steps.preview(session), session.rgb, steps.region_note(session, tool, None)

    @staticmethod
    def choose_tool(session: AskSession, tool: str, sketch: dict | None) -> tuple:
        """Show the click image or the sketch editor, and say which region the tool will send."""
        is_sketch = tool == "Sketch"
        note = steps.region_note(session, tool, sketch)
        return gr.update(visible=not is_sketch), gr.update(visible=is_sketch), note

    @staticmethod
    def sketched(session: AskSession, tool: str, sketch: dict | None) -> str:
        """A brush stroke was drawn or erased: the note now counts the sketch pixels that will be sent."""
        return steps.region_note(session, tool, sketch)

    # ---- questions ----------------------------------------------------------------------------------
    def ask(
        self,
        session: AskSession,
        question: str,
        tool: str,
        sketch: dict | None,
        opacity: float,
        style: str,
        color: str,
        request: gr.Request | None = None,
    ) -> Iterator[tuple]:
        """Stream an answer: yields (session, chat, question box, overlay, area, downloads, routing plot)."""
        yield from self._answer(session, question, tool, sketch, (opacity, style, color), None, request)

    def segment(
        self,
        session: AskSession,
        question: str,
        tool: str,
        sketch: dict | None,
        opacity: float,
        style: str,
        color: str,
        request: gr.Request | None = None,
    ) -> Iterator[tuple]:
        """Like ask, but the answer is forced to `<SEG>`, so a mask is always decoded.

        An empty question box re-asks the last question (the box is cleared after every answer, and
        "ask, then press Segment" is how users ask for the mask of what they just asked about); with a
        region tool chosen it asks for the structure under the region instead (`steps.segment_request`).
        """
        question, force = steps.segment_request(session, question, tool)
        yield from self._answer(session, question, tool, sketch, (opacity, style, color), force, request)

    def _answer(
        self,
        session: AskSession,
        question: str,
        tool: str,
        sketch: dict | None,
        look: tuple[float, str, str],
        force: str | None,
        request: gr.Request | None = None,
    ) -> Iterator[tuple]:
        """A mistake (no image, empty question, <region> without a mark...) or a model failure shows one
        message and leaves the chat, question, overlay and downloads as they were."""
        if not session.has_image:  # before the question: "type a question" would be the wrong advice
            yield refuse(texts.ERR_NO_IMAGE, N_TALK_OUTPUTS)
            return
        try:
            region, region_desc = steps.region_for(session, tool, sketch)
            text = steps.prepare_question(question, region is not None, self.ctx.settings.max_question_chars)
            session = steps.with_handle(session, self.ctx.engine)
            settings = GenerationSettings(max_new_tokens=self.ctx.settings.max_new_tokens, force_answer=force)
            stream = self.ctx.engine.stream(
                session.handle, text, region=region, history=session.history, settings=settings
            )
        except (UserInputError, ValueError) as err:
            yield refuse(str(err), N_TALK_OUTPUTS)
            return
        except Exception as err:  # the UI boundary: report a model failure, keep serving
            logger.exception("encoding the image or starting the answer failed")
            yield refuse(texts.ERR_MODEL.format(kind=type(err).__name__), N_TALK_OUTPUTS)
            return
        asked = [*render_chat(session.history, areas=session.mask_areas), _user_message(text)]
        skip = gr.skip()
        partial = ""
        yield session, [*asked, _assistant(partial)], "", skip, skip, skip, skip
        try:
            for piece in stream:
                partial += piece
                yield session, [*asked, _assistant(partial)], skip, skip, skip, skip, skip
        except Exception as err:  # the UI boundary: the server must keep serving after a model failure
            logger.exception("generation failed")
            gr.Warning(html.escape(texts.ERR_MODEL.format(kind=type(err).__name__)))
            yield session, render_chat(session.history, session.answer, session.mask_areas), text, skip, skip, skip, skip
            return
        session = steps.after_answer(session, text, stream.result, region_desc, settings)
        self._account(request, session)
        yield (session, render_chat(session.history, session.answer, session.mask_areas), skip,
               *self._outputs(session, look))  # fmt: skip

    def _outputs(self, session: AskSession, look: tuple[float, str, str]) -> tuple:
        """(overlay image, area text, download files, routing figure) for the last answer."""
        answer = session.answer
        assert answer is not None and session.image is not None
        record = steps.record(session, self.ctx.engine.info, exports.utc_now())
        files = exports.write_downloads(record, answer.mask, session.image, session.plane, session.index)
        overlay = exports.shown_png(steps.mask_overlay(session, *look))
        return (overlay, steps.mask_summary(session), files, self._routing(answer))

    def _routing(self, answer: Answer) -> Any:
        if not answer.experts or not answer.experts[0]:
            return None
        n_tokens = len(answer.experts[0])
        ids = list(answer.token_ids)[:n_tokens]
        labels = [self.ctx.engine.tokenizer.decode([i]) for i in ids] + ["?"] * (n_tokens - len(ids))
        return routing_figure(answer.experts, labels, self.ctx.engine.info.n_experts)

    def new_chat(self, session: AskSession) -> tuple:
        return steps.new_conversation(session), [], None, "", None, None

    def restyle(self, session: AskSession, opacity: float, style: str, color: str) -> Any:
        return exports.shown_png(steps.mask_overlay(session, opacity, style, color))


# --------------------------------------------------------------------------------------------- chat


def _shown(text: str) -> str:
    """User and model text shown literally; region tags as code (the chatbot renders Markdown/HTML)."""
    return plain(text).replace(plain(texts.REGION_TOKEN), "`<region>`")


def _user_message(question: str) -> dict[str, str]:
    return {"role": "user", "content": _shown(question)}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": _shown(text)}


def render_chat(
    history: tuple[tuple[str, str], ...], last: Answer | None = None, areas: tuple[int | None, ...] = ()
) -> list[dict[str, str]]:
    """Chatbot messages; every mask-only turn keeps its mask size (`areas`), the last notes its mask."""
    messages: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(history):
        content = _shown(answer) if answer.strip() else texts.CHAT_NO_TEXT
        area = areas[i] if i < len(areas) else None
        if not answer.strip() and area is not None:
            content = texts.CHAT_MASK_ONLY.format(pixels=area)
        if last is not None and i == len(history) - 1:
            if last.has_mask and not answer.strip():
                empty = last.mask_area == 0
                content = texts.CHAT_EMPTY_MASK if empty else texts.CHAT_MASK_ONLY.format(pixels=last.mask_area)
            else:
                if answer_is_unfinished(answer):
                    content += "\n\n" + texts.CHAT_UNFINISHED
                content += (
                    f"\n\n*(mask: {last.mask_area:,} px)*" if last.has_mask else "\n\n*(no `<SEG>`, no mask)*"
                )
        messages += [_user_message(question), {"role": "assistant", "content": content}]
    return messages


# ------------------------------------------------------------------------------------------ examples


def example_rows(examples_dir: Path | None, limit: int = MAX_EXAMPLES) -> tuple[list[list[str]], list[str]]:
    """One bundled image per source (assets/medimages/index.json): ([[path], ...], [label, ...])."""
    if examples_dir is None or not (examples_dir / "index.json").is_file():
        return [], []
    seen: set[str] = set()
    rows, labels = [], []
    for entry in json.loads((examples_dir / "index.json").read_text()):
        group, path = entry.get("source_group", entry["id"]), examples_dir / entry["image"]
        if group in seen or entry.get("synthetic") or not path.is_file():
            continue
        seen.add(group)
        rows.append([str(path)])
        labels.append(" · ".join(str(v) for v in (entry.get("modality"), entry.get("organ")) if v))
        if len(rows) == limit:
            break
    return rows, labels


# ------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class AskTabInputs:
    """Components other tabs may fill (e.g. the case library's "Open in the Ask tab")."""

    upload: gr.File
    question: gr.Textbox
    session: gr.State | None = None  # the AskSession state (read by portal.ask_extras)


def build_ask_tab(ctx: PortalContext) -> AskTabInputs:
    """Lay out the Ask tab inside the current `gr.Tab`, wire its events, return its fillable inputs."""
    h = AskHandlers(ctx, blocks=gr.context.Context.root_block)
    session = gr.State(AskSession(), time_to_live=ctx.settings.session_ttl_s)
    with gr.Row():
        with gr.Column(scale=1):
            view = _image_controls(ctx)
        with gr.Column(scale=2):
            region = _region_controls()
    talk = _talk_row()
    view_outputs = [
        session,
        view["info"],
        view["position"],
        view["plane"],
        view["window"],
        region["preview"],
        region["editor"],
        view["model_input"],
        talk["chat"],
        talk["overlay"],
        talk["area"],
        talk["downloads"],
        talk["plot"],
        region["note"],
    ]
    view["upload"].change(h.load, [view["upload"], view["show_input"]], view_outputs, api_name="load_image")
    view_inputs = [session, view["position"], view["plane"], view["window"], view["show_input"]]
    # input, not release: typing a number + Enter and the arrow keys change the image too (issue 21)
    view["position"].input(h.change_view, view_inputs, view_outputs, api_visibility="private",
                           trigger_mode="always_last")  # fmt: skip
    for control in (view["plane"], view["window"]):
        control.input(h.change_view, view_inputs, view_outputs, api_visibility="private")
    view["show_input"].change(
        h.show_model_input, [session, view["show_input"]], view["model_input"], api_visibility="private"
    )
    _wire_regions(h, session, region)
    _wire_talk(ctx, h, session, region, talk)
    return AskTabInputs(upload=view["upload"], question=talk["question"], session=session)


def _image_controls(ctx: PortalContext) -> dict[str, Any]:
    c: dict[str, Any] = {}
    # no file_types filter: DICOM files often have no extension; read_image checks the content instead
    c["upload"] = gr.File(label=texts.UPLOAD_LABEL, type="filepath", elem_id="ask-upload")
    rows, labels = example_rows(ctx.settings.examples_dir)
    if rows:
        gr.Examples(rows, inputs=[c["upload"]], example_labels=labels, label=texts.EXAMPLES_LABEL)
    c["info"] = gr.Markdown(elem_id="ask-info")
    c["position"] = gr.Slider(1, 2, value=1, step=1, label=texts.FRAME_LABEL, visible=False)
    c["plane"] = gr.Radio(list(imageio.PLANES), value="axial", label=texts.PLANE_LABEL, visible=False)
    c["window"] = gr.Dropdown(WINDOW_CHOICES, value=imageio.AUTO, label=texts.WINDOW_LABEL, visible=False)
    c["show_input"] = gr.Checkbox(False, label=texts.SHOW_MODEL_INPUT)
    c["model_input"] = gr.Image(label=texts.MODEL_INPUT_LABEL, format="png", interactive=False, visible=False)
    return c


def _region_controls() -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["tool"] = gr.Radio(list(texts.TOOLS), value="None", label=texts.TOOL_LABEL, elem_id="ask-tool")
    gr.Markdown(texts.ONE_REGION_NOTE)
    c["preview"] = gr.Image(
        label=texts.PREVIEW_LABEL, type="numpy", format="png", interactive=False, elem_id="ask-preview"
    )
    c["editor"] = gr.ImageEditor(
        label=texts.SKETCH_LABEL,
        type="numpy",
        format="png",
        visible=False,
        sources=(),
        transforms=(),
        elem_id="ask-sketch",
        brush=gr.Brush(colors=["#E69F00"], color_mode="fixed", default_size=8),
        layers=gr.LayerOptions(allow_additional_layers=False, layers=["region"]),
    )
    with gr.Row():
        c["undo"] = gr.Button(texts.UNDO_BUTTON, size="sm")
        c["clear"] = gr.Button(texts.CLEAR_BUTTON, size="sm")
    c["note"] = gr.Markdown(texts.NOTE_NO_MARK, elem_id="ask-mark-note")
    with gr.Row(visible=False):  # filled only by scripts through /mark_region (clicks can't be scripted)
        c["script_mark"] = gr.Button()
        c["script_xy"] = [gr.Number(label=name) for name in ("x1", "y1", "x2", "y2")]
    return c


def _talk_row() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            c["chat"] = gr.Chatbot(label=texts.CHAT_LABEL, height=360, elem_id="ask-chat")
            c["question"] = gr.Textbox(
                label=texts.QUESTION_LABEL,
                placeholder=texts.QUESTION_PLACEHOLDER,
                lines=2,
                elem_id="ask-question",
            )
            with gr.Row():
                c["chips"] = [
                    gr.Button(chip.format(organ=texts.CHIP_ORGAN), size="sm", variant="secondary")
                    for chip in texts.TASK_CHIPS
                ]
            with gr.Row():
                c["ask"] = gr.Button(texts.ASK_BUTTON, variant="primary", elem_id="ask-button")
                c["segment"] = gr.Button(texts.SEGMENT_BUTTON, elem_id="segment-button")
                c["new_chat"] = gr.Button(texts.NEW_CHAT_BUTTON)
            gr.Markdown(texts.SEGMENT_HELP)
        with gr.Column(scale=1):
            c["overlay"] = gr.Image(
                label=texts.OVERLAY_LABEL, format="png", interactive=False, elem_id="ask-overlay"
            )
            with gr.Row():
                c["opacity"] = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label=texts.OPACITY_LABEL)
                c["style"] = gr.Radio(
                    list(texts.MASK_STYLES), value="fill + outline", label=texts.STYLE_LABEL
                )
                c["color"] = gr.Dropdown(list(texts.MASK_COLORS), value="orange", label=texts.COLOR_LABEL)
            c["area"] = gr.Markdown(elem_id="ask-area")
            c["downloads"] = gr.File(label=texts.DOWNLOADS_LABEL, file_count="multiple", interactive=False)
            with gr.Accordion(texts.ROUTING_TITLE, open=False):
                gr.Markdown(texts.ROUTING_EXPLANATION)
                c["plot"] = gr.Plot()
    return c


def _wire_regions(h: AskHandlers, session: gr.State, c: dict[str, Any]) -> None:
    private = {"api_visibility": "private"}
    region_state = [session, c["tool"], c["editor"]]
    c["preview"].select(h.click, [session, c["tool"]], [session, c["preview"], c["note"]], **private)
    c["undo"].click(h.undo, region_state, [session, c["preview"], c["note"]], **private)
    c["clear"].click(
        h.clear, [session, c["tool"]], [session, c["preview"], c["editor"], c["note"]], **private
    )
    c["tool"].change(h.choose_tool, region_state, [c["preview"], c["editor"], c["note"]], **private)
    c["editor"].input(h.sketched, region_state, c["note"], **private)
    c["script_mark"].click(
        h.mark_region, [session, c["tool"], *c["script_xy"]], [session, c["preview"], c["note"]], api_name="mark_region"
    )


def _wire_talk(
    ctx: PortalContext, h: AskHandlers, session: gr.State, r: dict[str, Any], t: dict[str, Any]
) -> None:
    inputs = [session, t["question"], r["tool"], r["editor"], t["opacity"], t["style"], t["color"]]
    outputs = [session, t["chat"], t["question"], t["overlay"], t["area"], t["downloads"], t["plot"]]
    model = {**ctx.model_queue(), "validator": h.model_gate}
    t["ask"].click(h.ask, inputs, outputs, api_name="ask", **model)
    t["question"].submit(h.ask, inputs, outputs, api_visibility="private", **model)
    t["segment"].click(h.segment, inputs, outputs, api_name="segment", **model)
    t["new_chat"].click(
        h.new_chat,
        session,
        [session, t["chat"], t["overlay"], t["area"], t["downloads"], t["plot"]],
        api_visibility="private",
    )
    look = [session, t["opacity"], t["style"], t["color"]]
    t["opacity"].release(h.restyle, look, t["overlay"], api_visibility="private")
    for control in (t["style"], t["color"]):
        control.input(h.restyle, look, t["overlay"], api_visibility="private")
    for button, chip in zip(t["chips"], texts.TASK_CHIPS, strict=True):
        text = chip.format(organ=texts.CHIP_ORGAN)
        button.click(lambda text=text: text, None, t["question"], api_visibility="private", queue=False)
