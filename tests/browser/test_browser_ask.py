"""The Ask tab in a real headless Chromium: upload, click a point, draw a sketch, ask, segment, screenshot.

The image is a bundled MNI152 T1 slice (assets/medimages), whose brain mask the shipped small model knows,
so the README screenshot shows a readable answer and a sensible mask.

Needs Debian's `chromium` and the `playwright` package (no `playwright install`); skipped without them.
The screenshot goes to test-artifacts/ask_tab.png, and to docs/screenshots/ask_tab.png (shown in the README)
when UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/portal_helpers.py
from portal_helpers import REPO, load_screenshot_engine, portal_context  # noqa: E402

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)"
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="pip install playwright (no `playwright install`)"
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
BRAIN_SLICE = REPO / "assets" / "medimages" / "images" / "mri-mni152-axial-069.png"
SEGMENT_QUESTION = "Please segment the brain in this image."


@pytest.fixture(scope="module")
def portal_url():
    from portal.app import build_app, launch_kwargs

    ctx = portal_context(load_screenshot_engine(), max_new_tokens=24)
    demo = build_app(ctx)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(ctx.settings))
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(portal_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(portal_url)
        yield page
        browser.close()


def _drag(page, box: dict, start: tuple[float, float], end: tuple[float, float], steps: int = 12) -> None:
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=steps)
    page.mouse.up()


def test_upload_mark_ask_and_see_the_mask(page):
    page.get_by_text("not for clinical use").first.wait_for()
    page.locator("#ask-upload input[type=file]").set_input_files(BRAIN_SLICE)
    page.locator("#ask-info").get_by_text("197×233 px").wait_for()
    preview = page.locator("#ask-preview img")
    preview.wait_for()

    page.locator("#ask-tool").get_by_text("Point", exact=True).click()
    preview.click(
        position={"x": preview.bounding_box()["width"] * 0.6, "y": preview.bounding_box()["height"] * 0.5}
    )
    page.locator("#ask-mark-note").get_by_text("Active region: point").wait_for()

    page.locator("#ask-tool").get_by_text("Sketch", exact=True).click()
    canvas = page.locator("#ask-sketch canvas").first
    canvas.wait_for()
    page.locator("#ask-mark-note").get_by_text("Sketch tool: draw over the region").wait_for()
    _drag(page, canvas.bounding_box(), (0.45, 0.45), (0.6, 0.55))
    # the note names what the model will receive: the sketch, not the earlier point
    page.locator("#ask-mark-note").get_by_text("Active region: sketch").wait_for()

    page.locator("#ask-question textarea").fill("What is in the marked region?")
    page.locator("#ask-button").click()
    chat = page.locator("#ask-chat")
    chat.get_by_text("<region>").first.wait_for()  # the sketch reached the server as the question's region
    page.wait_for_function(
        "() => document.querySelectorAll('#ask-chat .message-row, #ask-chat [data-testid=\"bot\"]').length >= 2"
    )

    page.locator("#ask-tool").get_by_text("None", exact=True).click()  # segment the whole brain
    page.locator("#ask-mark-note").get_by_text("sent without a region").wait_for()
    page.locator("#ask-question textarea").fill(SEGMENT_QUESTION)
    page.locator("#segment-button").click()
    chat.get_by_text(SEGMENT_QUESTION).wait_for()
    page.wait_for_function(  # the forced <SEG> answer has finished streaming: its mask note is shown
        "() => /mask(:| of) [0-9]/.test("
        "document.querySelector('#ask-chat').innerText.split('segment the brain')[1] || '')"
    )
    page.locator("#ask-overlay img").wait_for()
    page.locator("#ask-area").get_by_text("pixels").wait_for()
    page.wait_for_timeout(500)  # let the overlay image paint before the screenshot

    shot = page.screenshot(full_page=True)
    folders = [REPO / "test-artifacts"]
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":  # refresh the README's picture on purpose only
        folders.append(REPO / "docs" / "screenshots")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ask_tab.png").write_bytes(shot)
    assert len(shot) > 10_000


def test_the_suggested_questions_describe_and_segment_a_marked_structure(page, portal_url):
    """Issue 20, as a student tries it: the first chip "Describe the image." gets complete sentences, and a point on
    the brain with an empty question box and Segment asks for "the structure in the marked region" and gets the
    mask of the structure under the point (white matter there, about 10,900 px; v8 gave 1 px)."""
    import re

    page.goto(portal_url)
    page.locator("#ask-upload input[type=file]").set_input_files(BRAIN_SLICE)
    page.locator("#ask-info").get_by_text("197×233 px").wait_for()
    page.get_by_role("button", name="Describe the image.", exact=True).click()
    page.wait_for_function("() => document.querySelector('#ask-question textarea').value === 'Describe the image.'")
    page.locator("#ask-button").click()
    chat = page.locator("#ask-chat")
    chat.get_by_text("MRI image of the brain").first.wait_for()

    preview = page.locator("#ask-preview img")
    page.locator("#ask-tool").get_by_text("Point", exact=True).click()
    box = preview.bounding_box()
    preview.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.45})
    page.locator("#ask-mark-note").get_by_text("Active region: point").wait_for()
    page.locator("#ask-question textarea").fill("")
    page.locator("#segment-button").click()
    chat.get_by_text("Please segment the structure in the marked region.").first.wait_for()
    page.wait_for_function(
        "() => /mask(:| of) [0-9]/.test(document.querySelector('#ask-chat').innerText.split('marked region.')[1] || '')"
    )
    text = chat.inner_text().split("marked region.")[1]
    pixels = int(re.search(r"mask(?::| of) ([0-9,]+)", text).group(1).replace(",", ""))
    assert pixels > 5_000, text  # white matter: about a quarter of the 197×233 slice
    page.locator("#ask-overlay img").wait_for()
    page.wait_for_timeout(500)
    folder = REPO / "test-artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "describe_and_segment_region.png").write_bytes(page.screenshot(full_page=True))
