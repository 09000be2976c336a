"""Instructor sessions ride on an HttpOnly cookie, never on Gradio's session_hash (issue 17).

Bug: instructor rights were kept in gr.State, i.e. keyed by the client-chosen session_hash; a second
client reusing that hash could export quiz results or unpublish cases.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client import Client

from cases import CaseStore
from cases.samples import sample_draft
from cases.throttle import LoginThrottle
from portal.app import launch_kwargs
from portal.context import PortalSettings
from portal.instructor_auth import COOKIE_NAME, LOGIN_PATH, LOGOUT_PATH, InstructorGate
from portal.instructor_tab import build_instructor_tab
from portal.safe_text import formatted, plain

PASSWORD = "correct horse battery"
PORT = 7872


class Ctx:
    def __init__(self, store: CaseStore, settings: PortalSettings) -> None:
        self.store, self.engine, self.settings = store, None, settings


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, CaseStore]]:
    store = CaseStore(str(tmp_path_factory.mktemp("auth") / "auth.sqlite"), seed_starter=False)
    op = store.operator_session()
    store.create_instructor(op, "teacher", PASSWORD)
    store.create_case(op, sample_draft("Published one"))
    settings = PortalSettings()
    with gr.Blocks() as demo:
        build_instructor_tab(Ctx(store, settings))
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=PORT, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(settings, store))  # fmt: skip
    yield f"http://127.0.0.1:{PORT}", store
    demo.close()
    store.close()


def _login(url: str, password: str = PASSWORD, client: httpx.Client | None = None) -> httpx.Response:
    http = client or httpx.Client()
    return http.post(url + LOGIN_PATH, json={"username": "teacher", "password": password})


def test_login_sets_an_httponly_samesite_cookie(served: tuple[str, CaseStore]) -> None:
    url, store = served
    assert _login(url, "wrong password!").status_code == 401
    reply = _login(url)
    assert reply.status_code == 200
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    token = reply.cookies[COOKIE_NAME]
    assert store.session_for_token(token) is not None
    with httpx.Client(cookies={COOKIE_NAME: token}) as http:
        assert http.post(url + LOGOUT_PATH).status_code == 200
    assert store.session_for_token(token) is None


def _refused_without_a_login(caplog: pytest.LogCaptureFixture, client: Client, api_name: str) -> None:
    """Refused as a user mistake (issue 16): one warning, no output (every one a skip), one log line."""
    caplog.clear()
    outputs = client.predict(api_name=api_name)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert all(value == {"__type__": "update"} for value in outputs)
    refusals = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refusals) == 1 and "instructor action" in refusals[0]


def test_reusing_the_instructors_session_hash_gives_no_rights(
    served: tuple[str, CaseStore], caplog: pytest.LogCaptureFixture
) -> None:
    url, _store = served
    caplog.set_level("INFO", logger="portal")
    token = _login(url).cookies[COOKIE_NAME]
    teacher = Client(url, headers={"Cookie": f"{COOKIE_NAME}={token}"}, verbose=False)
    exported = teacher.predict(api_name="/export_csv")
    assert Path(exported).read_text().startswith("attempt_id,")
    intruder = Client(url, verbose=False)
    intruder.session_hash = teacher.session_hash  # the value seen in /queue/data?session_hash=...
    _refused_without_a_login(caplog, intruder, "/export_csv")


def test_gate_ignores_everything_but_the_cookie(served: tuple[str, CaseStore]) -> None:
    _url, store = served
    gate = InstructorGate(store)

    class Req:
        cookies: dict[str, str] = {}
        session_hash = "stolen"

    assert gate.session(Req()) is None
    Req.cookies = {COOKIE_NAME: "guessed-token"}
    assert gate.session(Req()) is None


def test_hf_allowlist_gives_a_session_only_to_listed_users(served: tuple[str, CaseStore]) -> None:
    _url, store = served
    gate = InstructorGate(store, hf_oauth=True, hf_allowlist=("Dr-Lee",))

    class Profile:
        def __init__(self, username: str) -> None:
            self.username = username

    class Req:
        cookies: dict[str, str] = {}

    assert gate.session(Req(), Profile("someone-else")) is None
    assert gate.session(Req(), None) is None
    session = gate.session(Req(), Profile("dr-lee"))
    assert session is not None and session.username == "huggingface:dr-lee"
    assert gate.session(Req(), Profile("dr-lee")) == session  # reused, not one per request


def test_case_text_keeps_only_bold_italics_and_lists() -> None:
    """Bug: case text, DICOM tags and file names reached the page as HTML (img beacons, forms)."""
    planted = "<img src=http://127.0.0.1:7879/x> ![b](http://127.0.0.1:7879/y) [l](http://e) <form><input type=password>"
    for render in (plain, formatted):
        out = render(planted)
        assert "<" not in out and "](" not in out and "![" not in out
    assert formatted("**key** *point*\n- one\n1. two") == "**key** *point*\n- one\n1. two"
    assert plain("**key**") == "\\*\\*key\\*\\*"


def test_monitoring_is_off(served: tuple[str, CaseStore]) -> None:
    """Bug: /monitoring was reachable by anyone and made the server print its dashboard URL."""
    url, _store = served
    for path in ("/monitoring", "/monitoring/summary"):
        assert httpx.get(url + path).status_code in (403, 404)
    assert launch_kwargs(PortalSettings())["enable_monitoring"] is False


def test_audit_export_needs_the_cookie_and_lists_actions(
    served: tuple[str, CaseStore], caplog: pytest.LogCaptureFixture
) -> None:
    url, _store = served
    caplog.set_level("INFO", logger="portal")
    token = _login(url).cookies[COOKIE_NAME]
    teacher = Client(url, headers={"Cookie": f"{COOKIE_NAME}={token}"}, verbose=False)
    path, table = teacher.predict(api_name="/export_audit")
    assert Path(path).read_text().startswith("id,at,actor,action,case_id,case_slug,detail")
    assert "login" in [row[3] for row in table["data"]]
    _refused_without_a_login(caplog, Client(url, verbose=False), "/export_audit")


def test_space_mode_offers_hf_sign_in_with_oauth_typed_handlers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Space the tab shows gr.LoginButton and every instructor handler receives gr.OAuthProfile.

    Offline stand-in for a Space: SYSTEM, SPACE_ID and the OAuth settings a Space with `hf_oauth: true` provides.
    """
    from gradio import oauth, utils

    monkeypatch.setenv("SPACE_ID", "medplib/portal-test")
    monkeypatch.setenv("SYSTEM", "spaces")
    for name, value in (
        ("OAUTH_CLIENT_ID", "test-client"),
        ("OAUTH_CLIENT_SECRET", "test-secret"),
        ("OAUTH_SCOPES", "openid profile"),
        ("OPENID_PROVIDER_URL", "https://huggingface.co"),
    ):
        monkeypatch.setattr(oauth, name, value)  # fmt: skip

    store = CaseStore(str(tmp_path / "space.sqlite"), seed_starter=False)
    settings = PortalSettings(hf_oauth=True, instructor_allowlist=("dr-lee",), cookie_secure=True)
    with gr.Blocks() as demo:
        build_instructor_tab(Ctx(store, settings))
    assert any(isinstance(block, gr.LoginButton) for block in demo.blocks.values())
    export = next(fn for fn in demo.fns.values() if fn.name == "export_csv")
    hints = utils.get_type_hints(export.fn)
    assert hints["request"] is gr.Request and hints["profile"] == (gr.OAuthProfile | None)
    routes = launch_kwargs(settings, store)["app_kwargs"]["routes"]
    assert {r.path for r in routes} == {LOGIN_PATH, LOGOUT_PATH}
    store.close()


def test_login_route_on_a_space_sets_a_secure_cross_site_cookie_and_says_when_to_retry(
    tmp_path: Path,
) -> None:
    """Spaces run in an iframe on huggingface.co: the cookie must be Secure + SameSite=None there.

    Repeated wrong passwords get 429 with Retry-After (seconds), not a lock-out.
    """
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from portal.instructor_auth import instructor_routes

    store = CaseStore(str(tmp_path / "route.sqlite"), seed_starter=False)
    store.create_instructor(store.operator_session(), "teacher", PASSWORD)
    store.throttle = LoginThrottle(clock=lambda: 1000.0)  # frozen time: no back-off elapses mid-test
    http = TestClient(Starlette(routes=instructor_routes(store, cookie_secure=True, same_site="none")))
    reply = http.post(LOGIN_PATH, json={"username": "teacher", "password": PASSWORD})
    cookie = reply.headers["set-cookie"]
    assert (
        reply.status_code == 200 and "Secure" in cookie and "SameSite=none" in cookie and "HttpOnly" in cookie
    )
    assert http.post(LOGIN_PATH, content=b"username=teacher").status_code == 400  # JSON only
    codes = [http.post(LOGIN_PATH, json={"username": "teacher", "password": "guess-guess"}).status_code
             for _ in range(5)]  # fmt: skip
    assert codes == [401, 401, 401, 429, 429]
    throttled = http.post(LOGIN_PATH, json={"username": "teacher", "password": "guess-guess"})
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    store.close()
