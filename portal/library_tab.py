"""Case library tab: filter the published teaching cases and read one as a known case.

`build_library_tab(ctx)` is called inside `with gr.Tab(...)`. `ask_handoff(store, case_id)` gives what
the Ask tab needs to open a case (image file + suggested question); the tab shows it and keeps it in
the `gr.State` returned by `build_library_tab` for the app to wire to the Ask tab.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from cases import CaseNotFound, CaseRecord, CaseStore
from portal import texts
from portal.overlay import overlay_mask
from portal.refusals import UserMistake, refusing
from portal.safe_text import formatted, plain

ALL = "All"
NO_STORE = "The case library is not configured (start the portal with a case database)."
NO_MATCH = "No published case matches these filters."
ASK_HINT = "Open the **Ask** tab and load this image file; the suggested question is below."
REFERENCE_COLOR = texts.MASK_COLORS["bluish green"]
MASK_PALETTE = tuple(texts.MASK_COLORS.values())
HANDOFF_DIR = Path(tempfile.gettempdir()) / "medplib-portal-library"  # one PNG per case, overwritten
EXPORT_MAX_AGE_S = 3600  # temp exports (CSV) older than this are deleted on the next export
DISPLAY_WINDOWS = {  # display-only contrast on the stored 8-bit image: (width, level) in grey values
    "as stored": (256.0, 127.5),
    "narrow (more contrast)": (128.0, 127.5),
    "dark areas": (128.0, 64.0),
    "bright areas": (128.0, 192.0),
}


@dataclass(frozen=True)
class AskHandoff:
    """What the Ask tab needs to open a library case: an RGB PNG file and a suggested question."""

    case_id: int
    image_path: Path
    question: str
    spacing_mm: tuple[float, float] | None


def temp_file(folder: Path, name: str, max_age_s: float = EXPORT_MAX_AGE_S) -> Path:
    """`folder/name` in a private temp folder; files there older than `max_age_s` are deleted first."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = time.time()
    for old in folder.iterdir():
        if old.is_file() and now - old.stat().st_mtime > max_age_s:
            old.unlink(missing_ok=True)
    return folder / name


def ask_handoff(store: CaseStore, case_id: int, folder: Path = HANDOFF_DIR) -> AskHandoff:
    """Write the case's first image to `folder/case-<id>.png` (published cases only) for the Ask tab.

    The suggested question is the case's segmentation prompt (MedPLIB style), else its first question.
    """
    case = store.get_case(case_id)
    path = temp_file(Path(folder), f"case-{case.id}.png")
    path.write_bytes(case.images[0].png)
    seg = [q for q in case.questions if q.kind == "segmentation"]
    question = (seg or list(case.questions))[0].prompt if case.questions else "Describe the image."
    return AskHandoff(
        case_id=case.id, image_path=path, question=question, spacing_mm=case.images[0].spacing_mm
    )


def display_window(rgb: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 3) uint8 → contrast-adjusted copy for display only (the stored pixels never change)."""
    width, level = DISPLAY_WINDOWS.get(name, DISPLAY_WINDOWS["as stored"])
    low = level - width / 2
    scaled = (rgb.astype(np.float32) - low) * (255.0 / width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def case_view(case: CaseRecord, labels: list[str], window: str = "as stored") -> np.ndarray:
    """The case's first image with the chosen reference masks outlined in Okabe-Ito colours."""
    image = case.images[0]
    rgb = display_window(image.rgb(), window)
    for k, mask in enumerate(image.masks):
        if mask.label in labels:
            rgb = overlay_mask(rgb, mask.array(), color=MASK_PALETTE[(k + 2) % len(MASK_PALETTE)],
                               opacity=0.35, style="fill + outline")  # fmt: skip
    return rgb


def case_markdown(case: CaseRecord, *, reveal: bool = True) -> str:
    """Teaching text of a case; reveal=False gives the 'unknown case' header only (quiz).

    Every field is escaped (`portal.safe_text`); the teaching text keeps bold, italics and lists only.
    """
    s = case.summary
    meta = f"**{plain(s.modality)}** · {plain(s.anatomy)} · {plain(s.plane)} plane · level: {plain(s.difficulty)}"
    if case.synthetic:
        meta += " · **simulated**"
    if not reveal:
        return f"### Unknown case #{s.id}\n{meta}\n\n{formatted(case.vignette)}"
    spacing = case.images[0].spacing_mm
    window = f" · *window:* {plain(case.window_preset)}" if case.window_preset else ""
    provenance = "<br>".join(plain(line) for line in case.provenance.splitlines())
    lines = [
        f"## {plain(s.title)}", meta, f"**Clinical vignette.** {formatted(case.vignette)}",
        f"**Findings.** {formatted(case.findings)}", f"**Discussion.** {formatted(case.discussion)}",
        "**Key learning points**", *[f"- {formatted(p)}" for p in case.key_points],
        f"*Tags:* {plain(', '.join(s.tags))}" + window,
        f"*Pixel spacing:* {spacing[0]:.3g} × {spacing[1]:.3g} mm" if spacing else "*Pixel spacing:* unknown",
        f"*Source:* {plain(case.source)} · *Licence:* {plain(case.licence)}<br>{provenance}",
    ]  # fmt: skip
    return "\n\n".join(lines)


def case_choices(
    store: CaseStore, modality: str, anatomy: str, difficulty: str, text: str
) -> list[tuple[str, int]]:
    """(label, id) pairs of published cases that pass the filters ('All' = no filter)."""
    summaries = store.list_cases(
        modality=None if modality == ALL else modality, anatomy=None if anatomy == ALL else anatomy,
        difficulty=None if difficulty == ALL else difficulty, text=text or None,
    )  # fmt: skip
    return [(f"{c.title} — {c.modality}", c.id) for c in summaries]


def model_answers_markdown(store: CaseStore, case: CaseRecord) -> str:
    """The model's cached answer to each question of the case (the card showed none before issue 21)."""
    lines = []
    for question in case.questions:
        outputs = store.model_outputs(question.id)
        if not outputs:
            continue
        output = outputs[0]
        text = output.answer.strip() or ("(a mask only)" if output.mask_png is not None else "(empty)")
        mask = ""
        if output.mask_png is not None:
            mask = f" · mask {texts.count_noun(int(output.mask().sum()), 'pixel')}"
        lines.append(f"- *{question.prompt}* → {text}{mask}")
    if not lines:
        return ""
    model = store.model_outputs(case.questions[0].id)[0].model_id if case.questions else ""
    return "\n\n**Model answers**" + (f" ({model})" if model else "") + "\n\n" + "\n".join(lines)


class LibraryHandlers:
    """Event handlers of the library tab (plain methods: tested without a browser)."""

    def __init__(self, store: CaseStore) -> None:
        self.store = store

    @refusing(2)
    def search(self, modality: str, anatomy: str, difficulty: str, text: str) -> tuple[Any, str]:
        choices = case_choices(self.store, modality, anatomy, difficulty, text)
        note = texts.count_noun(len(choices), "case") if choices else NO_MATCH
        return gr.update(choices=choices, value=choices[0][1] if choices else None), note

    @refusing(3)
    def open_case(self, case_id: int | None, window: str) -> tuple[Any, Any, str]:
        if case_id is None:
            return None, gr.update(choices=[], value=[]), ""
        case = self._case(case_id)
        labels = [m.label for m in case.images[0].masks]
        return (
            case_view(case, labels[:1], window),
            gr.update(choices=labels, value=labels[:1]),
            case_markdown(case) + model_answers_markdown(self.store, case),
        )

    @refusing(1)
    def redraw(self, case_id: int | None, labels: list[str], window: str) -> Any:
        return None if case_id is None else case_view(self._case(case_id), labels or [], window)

    @refusing(4)
    def handoff(self, case_id: int | None) -> tuple[AskHandoff | None, str | None, str, str]:
        if case_id is None:
            raise UserMistake("Pick a case first.")
        h = ask_handoff(self.store, case_id)
        return h, str(h.image_path), h.question, ASK_HINT

    def _case(self, case_id: int) -> CaseRecord:
        try:
            return self.store.get_case(int(case_id))
        except CaseNotFound as error:  # e.g. unpublished or deleted meanwhile
            raise UserMistake(str(error)) from None


def build_library_tab(ctx: Any) -> gr.State | None:
    """Library UI inside the current gr.Tab; returns the gr.State holding the last AskHandoff."""
    if ctx.store is None:
        gr.Markdown(NO_STORE)
        return None
    h = LibraryHandlers(ctx.store)
    facets = ctx.store.facets()
    with gr.Row():
        modality = gr.Dropdown([ALL, *facets["modality"]], value=ALL, label="Modality")
        anatomy = gr.Dropdown([ALL, *facets["anatomy"]], value=ALL, label="Anatomy")
        difficulty = gr.Dropdown([ALL, *facets["difficulty"]], value=ALL, label="Training level")
        text = gr.Textbox(label="Search text", placeholder="e.g. nuclei, lesion, window")
    first = case_choices(ctx.store, ALL, ALL, ALL, "")
    picker = gr.Dropdown(first, value=first[0][1] if first else None, label="Case", elem_id="library-case")
    count = gr.Markdown(texts.count_noun(len(first), "case"))
    shown = ctx.store.get_case(first[0][1]) if first else None
    labels = [m.label for m in shown.images[0].masks] if shown else []
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(case_view(shown, labels[:1]) if shown else None, label="Case image", type="numpy",
                             interactive=False, elem_id="library-image")  # fmt: skip
            masks = gr.CheckboxGroup(labels, value=labels[:1], label="Reference masks shown")
            window = gr.Radio(list(DISPLAY_WINDOWS), value="as stored", label="Display contrast")
            to_ask = gr.Button("Open in the Ask tab")
            handoff_file = gr.File(label="Image for the Ask tab", interactive=False)
            question = gr.Textbox(label="Suggested question", interactive=False)
            hint = gr.Markdown()
        with gr.Column(scale=1):
            card = gr.Markdown(case_markdown(shown) + model_answers_markdown(ctx.store, shown) if shown else "",
                               elem_id="library-card")  # fmt: skip
    handoff = gr.State(None)
    filters = [modality, anatomy, difficulty, text]
    text.submit(h.search, filters, [picker, count], api_name="search_cases")
    for trigger in (modality.change, anatomy.change, difficulty.change):
        trigger(h.search, filters, [picker, count], api_visibility="private")
    picker.change(h.open_case, [picker, window], [image, masks, card], api_name="open_case")
    masks.change(h.redraw, [picker, masks, window], image, api_visibility="private")
    window.change(h.redraw, [picker, masks, window], image, api_visibility="private")
    to_ask.click(h.handoff, picker, [handoff, handoff_file, question, hint], api_visibility="private")
    return handoff
