"""One quiz attempt in a real headless Chromium: start a case, pick the drawing question, draw, submit.

Needs Debian's `chromium` and the `playwright` package (no `playwright install`); skipped without them.
The screenshot goes to test-artifacts/quiz_tab.png.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]  # fmt: skip
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def quiz(tmp_path_factory: pytest.TempPathFactory):
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    import gradio as gr

    from cases import CaseStore
    from cases.samples import sample_draft
    from portal.quiz_tab import build_quiz_tab

    store = CaseStore(str(tmp_path_factory.mktemp("quiz") / "quiz.sqlite"), seed_starter=False)
    store.create_case(store.operator_session(), sample_draft("Browser lesion", size=(160, 200)))

    class Ctx:
        engine, settings = None, None

    Ctx.store = store
    with gr.Blocks(analytics_enabled=False) as demo, gr.Tab("Quiz"):
        build_quiz_tab(Ctx)
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(demo.local_url)
            yield page, store
            browser.close()
    finally:
        demo.close()


def test_one_quiz_attempt_is_scored_and_revealed(quiz) -> None:
    page, store = quiz
    page.locator("#quiz-start").click()
    page.locator("#quiz-header").get_by_text("Unknown case").wait_for()
    page.locator("#quiz-question").get_by_text("segmentation: Draw the lesion.").click()
    page.locator("#quiz-prompt").get_by_text("Draw the lesion.").wait_for()
    canvas = page.locator("#quiz-editor canvas").first
    canvas.wait_for()
    page.wait_for_timeout(500)  # the background image is painted into the canvas
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 0.42 * box["width"], box["y"] + 0.45 * box["height"])
    page.mouse.down()
    for fx in (0.46, 0.50, 0.54, 0.58):
        page.mouse.move(box["x"] + fx * box["width"], box["y"] + 0.5 * box["height"], steps=4)
    page.mouse.up()
    page.locator("#quiz-submit").click()
    page.locator("#quiz-result").get_by_text("Dice").wait_for()
    page.locator("#quiz-compare img").wait_for()
    page.locator("#quiz-discussion").get_by_text("Browser lesion").wait_for()
    [attempt] = store.all_attempts(store.operator_session())
    assert attempt.dice is not None and 0.0 < attempt.dice <= 1.0
    shot = page.screenshot(full_page=True)
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "quiz_tab.png").write_bytes(shot)


def test_a_quiz_mistake_is_one_warning_and_the_reveal_stays(quiz) -> None:
    """Bug (issue 16): a mistake (here submitting twice) raised gr.Error, which painted red "Error" labels over
    the result, the comparison image and the discussion. Now one warning toast, and the reveal stays."""
    page, _store = quiz
    page.locator("#quiz-result").get_by_text("Dice").wait_for()  # runs after the attempt above
    page.locator("#quiz-submit").click()
    page.get_by_text("Already submitted").first.wait_for()
    page.wait_for_timeout(500)
    assert page.get_by_text("Error", exact=True).count() == 0
    assert page.locator("#quiz-result").get_by_text("Dice").count() == 1
    page.locator("#quiz-discussion").get_by_text("Browser lesion").wait_for()
