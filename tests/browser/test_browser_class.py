"""A class session in a real headless Chromium (issue 21): the instructor logs in on the Instructor tab
(the HttpOnly cookie of issue 17; the Class tab has no login of its own), creates the session on the
Class sessions tab, 20 students join with the code and answer, the instructor reads the dashboard and
downloads the CSV.

Needs Debian's `chromium` and the `playwright` package; skipped without them. Screenshot:
test-artifacts/class_dashboard.png.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]  # fmt: skip
TIMEOUT_MS = 30_000
PORT = 7893
N_STUDENTS = 20
PASSWORD = "class-session-test-pw"


@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory):
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    import gradio as gr

    from cases import CaseStore
    from cases.samples import sample_draft
    from portal.app import launch_kwargs
    from portal.class_tab import build_class_tab
    from portal.context import PortalSettings
    from portal.instructor_access import instructor_gate
    from portal.instructor_tab import build_instructor_tab

    store = CaseStore(str(tmp_path_factory.mktemp("class") / "class.sqlite"), seed_starter=False)
    op = store.operator_session()
    store.create_case(op, sample_draft("Class lesion", size=(120, 160)))
    store.create_instructor(op, "teacher", PASSWORD)

    class Ctx:
        engine, settings = None, PortalSettings()

    Ctx.store = store
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tab("Class sessions"):  # first: the students' landing tab
            build_class_tab(Ctx, instructor_gate(Ctx))
        with gr.Tab("Instructor"):
            build_instructor_tab(Ctx)
    demo.launch(prevent_thread_lock=True, quiet=True, server_port=PORT, **launch_kwargs(Ctx.settings, store))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            yield browser, demo.local_url, store
            browser.close()
    finally:
        demo.close()


def _page(browser, url: str):
    context = browser.new_context(viewport={"width": 1300, "height": 1500})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return context, page


def test_create_20_students_answer_dashboard_and_csv(classroom) -> None:
    browser, url, store = classroom
    teacher_context, teacher = _page(browser, url)
    teacher.get_by_role("tab", name="Instructor").click()
    teacher.locator("#instructor-user textarea, #instructor-user input").first.fill("teacher")
    teacher.locator("#instructor-password input").fill(PASSWORD)
    teacher.get_by_role("button", name="Log in").click()
    teacher.get_by_text("Logged in as").first.wait_for()
    teacher.get_by_role("tab", name="Class sessions").click()
    teacher.locator("#class-instructor").get_by_text("Instructor: run a class session").click()  # refreshes
    teacher.locator("#class-status").get_by_text("Logged in as").wait_for()
    teacher.locator("#class-title textarea, #class-title input").first.fill("Week 1")
    teacher.locator("#class-cases input").click()
    teacher.get_by_role("option", name=re.compile("Class lesion")).click()
    teacher.locator("#class-create").click()
    status = teacher.locator("#class-status").get_by_text("is open")
    status.wait_for()
    code = re.search(r"Session (\w{6}) is open", status.inner_text()).group(1)

    for k in range(N_STUDENTS):
        context, page = _page(browser, url)
        page.locator("#class-code input, #class-code textarea").first.fill(code)
        page.locator("#class-pseudonym input, #class-pseudonym textarea").first.fill(f"student-{k:02d}")
        page.locator("#class-join").click()
        page.locator("#class-joined").get_by_text("Joined").wait_for()
        page.locator("#class-questions").get_by_text("1. closed: Is a lesion present?").click()
        page.locator("#class-choice").get_by_text("no" if k % 4 == 0 else "yes", exact=True).click()
        page.locator("#class-submit").click()
        page.locator("#class-result").get_by_text("Reference answer").wait_for()
        context.close()

    teacher.locator("#class-dashboard").click()
    teacher.locator("#class-summary").get_by_text(f"{N_STUDENTS} students").wait_for()
    n_wrong = (N_STUDENTS + 3) // 4  # every fourth student answers "no"
    teacher.wait_for_function(
        "n => { const t = document.querySelector('#class-wrong table:not(.header-table)') || "
        "document.querySelector('#class-wrong'); return /\\bno\\b/.test(t.innerText) && t.innerText.includes(String(n)); }",
        arg=n_wrong,
    )
    teacher.locator("#class-csv a").first.wait_for()
    for plot in ("#class-share", "#class-progress"):
        teacher.locator(f"{plot} .js-plotly-plot").first.wait_for()
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "class_dashboard.png").write_bytes(teacher.screenshot(full_page=True))
    with teacher.expect_download() as download:
        teacher.locator("#class-csv a").first.click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text(encoding="utf-8"))))
    assert len(rows) == N_STUDENTS
    assert sum(r["verdict"] == "correct" for r in rows) == N_STUDENTS - n_wrong and {r["answer"] for r in rows} == {"yes", "no"}
    teacher_context.close()
