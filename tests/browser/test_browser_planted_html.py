"""HTML planted in DICOM tags, a file name, case fields and a question reaches Chromium as text (issue 17).

Bug: `<img src=…>` from a DICOM tag (Ask tab), case text (library) and file names survived Gradio's
sanitiser, so any page view could call a tracking host. Here every planted string points at a listener
on 127.0.0.1:LISTENER_PORT; after the pages have rendered it must have received 0 requests. A control
`<img>` inserted at the end proves the listener would have seen one.

Prints `planted-html requests: N` (read by benchmarks/security_check.py).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/portal_helpers.py
from portal_helpers import load_test_engine, portal_context  # noqa: E402

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
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]  # fmt: skip
PORTAL_PORT, LISTENER_PORT = 7873, 7879
HOST = f"127.0.0.1:{LISTENER_PORT}"
PASSWORD = "correct horse battery"


def planted(where: str) -> str:
    """An img tag, a Markdown image, a link and a password form, all pointing at the listener."""
    return (f"<img src=http://{HOST}/{where}-img> ![x](http://{HOST}/{where}-md) "
            f"<a href=http://{HOST}/{where}-a>link</a> <form action=http://{HOST}/{where}-form>"
            "<input type=password></form>")  # fmt: skip


class Listener:
    """Counts every request to 127.0.0.1:LISTENER_PORT (bounded: it only runs during the module)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                outer.paths.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", LISTENER_PORT), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _planted_store(folder: Path):
    from cases import CaseStore
    from cases.samples import sample_draft

    store = CaseStore(str(folder / "planted.sqlite"), seed_starter=False)
    draft = sample_draft("placeholder")
    fields = {name: planted(name) for name in ("title", "vignette", "findings", "discussion", "source",
                                                "provenance", "licence", "anatomy", "modality")}  # fmt: skip
    question = dataclasses.replace(draft.questions[0], prompt=planted("prompt"))
    draft = dataclasses.replace(draft, **fields, key_points=(planted("keypoint"),), tags=(planted("tag"),),
                                questions=(question, *draft.questions[1:]))  # fmt: skip
    store.create_case(store.operator_session(), draft)
    store.create_instructor(store.operator_session(), "teacher", PASSWORD)
    return store


def _planted_dicom(folder: Path) -> Path:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    for keyword in ("Modality", "StudyDescription", "SeriesDescription", "InstitutionName", "BodyPartExamined",
                    "PatientName", "Manufacturer"):  # fmt: skip
        setattr(ds, keyword, planted(f"dicom-{keyword}"))
    name = f"<img src=\\\\{HOST}\\filename>.dcm"  # backslashes become slashes in a browser URL
    path = folder / name
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def portal(tmp_path_factory, listener):
    from portal.app import build_app, launch_kwargs

    folder = tmp_path_factory.mktemp("planted")
    store = _planted_store(folder)
    ctx = dataclasses.replace(portal_context(load_test_engine(), max_new_tokens=4), store=store)
    demo = build_app(ctx)
    demo.launch(server_name="127.0.0.1", server_port=PORTAL_PORT, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(ctx.settings, store))  # fmt: skip
    yield demo.local_url, folder
    demo.close()
    store.close()


def test_planted_html_makes_no_request(portal, listener):
    url, folder = portal
    dicom = _planted_dicom(folder)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.locator("#ask-upload input[type=file]").set_input_files(dicom)
        page.locator("#ask-info").get_by_text("px").wait_for()
        page.locator("#ask-question textarea").fill(planted("question"))
        page.locator("#ask-button").click()
        page.wait_for_function(  # the question and the model's answer are both shown
            "() => document.querySelectorAll('#ask-chat .message-row, #ask-chat [data-testid=\"bot\"]').length >= 2"
        )
        page.get_by_role("tab", name="Case library").click()
        page.locator("#library-card").get_by_text("Clinical vignette").wait_for()
        page.get_by_role("tab", name="Quiz").click()
        page.wait_for_timeout(2000)
        counted = len(listener.paths)
        print(f"planted-html requests: {counted}")
        page.evaluate(
            f"() => {{ const i = new Image(); i.src = 'http://{HOST}/control'; document.body.append(i); }}"
        )
        page.wait_for_timeout(1000)
        browser.close()
    assert counted == 0, listener.paths
    assert listener.paths[-1:] == ["/control"]  # the listener does see a real request


def test_instructor_login_in_the_browser_sets_a_cookie_scripts_cannot_read(portal):
    """The Log in button posts the password with fetch; the session cookie is HttpOnly; Log out ends it."""
    url, _folder = portal
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.get_by_role("tab", name="Instructor").click()
        page.locator("#instructor-user textarea, #instructor-user input").first.fill("teacher")
        page.locator("#instructor-password input").fill("wrong password!")
        page.get_by_role("button", name="Log in").click()
        page.get_by_text("Wrong instructor username or password").wait_for()
        page.locator("#instructor-password input").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.get_by_text("Logged in as").wait_for()
        cookies = {c["name"]: c for c in page.context.cookies()}
        assert (
            cookies["medplib_instructor"]["httpOnly"]
            and cookies["medplib_instructor"]["sameSite"] == "Strict"
        )
        assert "medplib_instructor" not in page.evaluate("() => document.cookie")
        page.get_by_role("button", name="Log out").click()
        page.get_by_text("Not logged in").wait_for()
        assert "medplib_instructor" not in {c["name"] for c in page.context.cookies()}
        browser.close()
