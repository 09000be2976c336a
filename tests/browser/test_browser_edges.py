"""Issue 21 in a real headless Chromium: the slider (label, typed number + Enter, arrow keys), the whole-volume
button with its volume in mL, and an instructor tab that shows no editor to a logged-out visitor.

Needs Debian's `chromium` and the `playwright` package; skipped without them. Screenshot:
test-artifacts/ask_volume.png.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/portal_helpers.py
from portal_helpers import REPO, load_test_engine, portal_context  # noqa: E402

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")]
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no `playwright install`)")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]  # fmt: skip
TIMEOUT_MS = 60_000
PORT = 7894


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):
    from cases import CaseStore
    from portal.app import build_app, launch_kwargs

    folder = tmp_path_factory.mktemp("edges")
    base = portal_context(load_test_engine())
    ctx = type(base)(engine=base.engine, store=CaseStore(str(folder / "e.sqlite"), seed_starter=False),
                     settings=base.settings)  # fmt: skip
    demo = build_app(ctx)
    demo.launch(prevent_thread_lock=True, quiet=True, server_port=PORT, **launch_kwargs(ctx.settings))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(demo.local_url)
            yield page, folder
            browser.close()
    finally:
        demo.close()


def _volume(folder: Path) -> Path:
    data = np.zeros((40, 40, 6), np.float32)
    data[10:30, 12:28, 1:5] = 400
    path = folder / "volume.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 2.5, 1.0])), str(path))
    return path


def test_slider_keys_and_the_volume_button(page) -> None:
    page, folder = page
    page.locator("#ask-upload input[type=file]").set_input_files(_volume(folder))
    info = page.locator("#ask-info")
    info.get_by_text("axial slice 4/6").wait_for()
    slider = page.locator("input[type=range]").first
    block = page.locator(".block", has=slider).first
    assert block.get_by_text("Slice", exact=True).is_visible()  # not "Frame" for NIfTI slices
    number = block.locator("input[type=number]")
    number.fill("2")
    number.press("Enter")
    info.get_by_text("axial slice 2/6").wait_for()
    slider.focus()
    slider.press("ArrowRight")
    info.get_by_text("axial slice 3/6").wait_for()
    page.locator("#ask-question textarea").fill("Please segment the lesion in this image.")
    page.locator("#ask-extras").get_by_text("Whole volume").first.click()
    page.locator("#ask-volume-button").click()
    note = page.locator("#ask-volume-note")
    note.get_by_text(re.compile(r"mL.*s per slice")).wait_for()
    assert "6 slices" in note.inner_text() or "of 6 slices" in note.inner_text()
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "ask_volume.png").write_bytes(page.screenshot(full_page=True))


def test_logged_out_visitors_see_no_delete_or_publish(page) -> None:
    page, _ = page
    page.get_by_role("tab", name="Instructor").click()
    page.get_by_text("Log in", exact=True).first.wait_for()
    assert not page.get_by_role("button", name="Delete").is_visible()
    assert not page.get_by_role("button", name="Publish", exact=True).is_visible()
