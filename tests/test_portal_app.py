"""The Blocks factory and a launched portal driven through gradio_client (upload -> answer -> mask)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from portal_helpers import REPO, load_test_engine, portal_context
from pydicom.data import get_testdata_file

from portal import texts
from portal.app import TEACHING_TABS, banner_markdown, build_app, launch_kwargs, optional_tab_builder


@pytest.fixture(scope="module")
def engine():
    return load_test_engine()


@pytest.fixture(scope="module")
def served(engine):
    """A launched portal (small upload limit so the 413 test stays fast) and a client session on it."""
    ctx = portal_context(engine, max_file_size="200kb")
    demo = build_app(ctx)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_kwargs(ctx.settings))
    try:
        yield demo, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_banner_always_warns_and_flags_demo_models(engine):
    real = banner_markdown(replace(engine.info, is_demo_model=False))
    demo = banner_markdown(replace(engine.info, is_demo_model=True))
    assert texts.NOT_FOR_CLINICAL_USE in real and texts.NOT_FOR_CLINICAL_USE in demo
    assert texts.DEMO_MODEL_NOTICE not in real and texts.DEMO_MODEL_NOTICE in demo
    assert engine.info.name in real and engine.info.device in real and engine.info.dtype in real


def test_app_has_bounded_queue_shared_model_queue_and_cache_cleanup(engine):
    ctx = portal_context(engine, queue_max_size=7)
    demo = build_app(ctx)
    assert demo._queue.max_size == 7
    assert demo.delete_cache == texts.DELETE_CACHE and demo.analytics_enabled is False
    model_events = [fn for fn in demo.fns.values() if fn.api_name in ("ask", "segment")]
    assert len(model_events) == 2
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in model_events} == {
        (texts.MODEL_CONCURRENCY_ID, 1)
    }
    shown = " ".join(str(block.value) for block in demo.blocks.values() if isinstance(block, gr.Markdown))
    assert "not for clinical use" in shown and "one region per question" in shown


def test_launch_settings_cap_uploads(engine):
    kwargs = launch_kwargs(portal_context(engine).settings)
    assert kwargs["max_file_size"] == texts.MAX_FILE_SIZE and kwargs["show_error"] is False


def test_missing_teaching_tab_is_skipped_but_broken_imports_are_loud():
    assert optional_tab_builder("portal.no_such_tab", "build_no_such_tab") is None
    with pytest.raises(AttributeError):
        optional_tab_builder("portal.texts", "build_texts_tab")


def test_client_upload_segment_and_mask(served):
    _, client = served
    view = client.predict(handle_file(get_testdata_file("CT_small.dcm")), False, api_name="/load_image")
    assert "CT" in view[0]  # gradio_client leaves the gr.State out of the outputs
    chat, _, overlay, area, files, plot = client.predict(
        "Please segment the spine.", "None", None, 0.5, "fill", "orange", api_name="/segment"
    )
    assert chat[0]["role"] == "user" and chat[1]["role"] == "assistant"
    assert "pixels" in area and "mm²" in area
    mask_file = next(f for f in files if f.endswith("mask.png"))
    mask = np.asarray(Image.open(mask_file)) > 0
    assert mask.shape == (128, 128) and mask.any()
    assert np.asarray(Image.open(overlay)).shape[:2] == (128, 128)
    assert plot is not None


def _refused_with(client: Client, caplog, message: str, *args, api_name: str) -> None:
    """The request is refused with one warning (not an error), every output unchanged, one log line."""
    caplog.clear()
    outputs = client.predict(*args, api_name=api_name)
    assert all(value == {"__type__": "update"} for value in outputs)
    refusals = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refusals) == 1 and message in refusals[0].getMessage() and refusals[0].exc_info is None


def test_client_errors_are_clear_and_the_server_keeps_serving(served, caplog):
    """Bug: a mistake covered the page in red Error labels (chat, question, overlay, downloads) that stayed;
    now it is one warning and every output stays as it was."""
    demo, _ = served
    fresh = Client(demo.local_url, verbose=False)  # a new session: no image yet
    caplog.set_level("INFO", logger="portal")
    look = (0.5, "fill", "orange")
    _refused_with(fresh, caplog, "Upload an image", "Describe the image.", "None", None, *look, api_name="/ask")
    toml = handle_file(str(REPO / "pyproject.toml"))
    _refused_with(fresh, caplog, "not a supported", toml, False, api_name="/load_image")
    fresh.predict(handle_file(get_testdata_file("MR_small.dcm")), False, api_name="/load_image")
    _refused_with(fresh, caplog, "Type a question", "  ", "None", None, *look, api_name="/ask")
    chat = fresh.predict("Describe the image.", "None", None, 0.5, "fill", "orange", api_name="/ask")[0]
    assert len(chat) == 2


def test_uploads_over_the_size_limit_get_413(served):
    demo, _ = served
    response = httpx.post(
        f"{demo.local_url}gradio_api/upload", files={"files": ("big.png", b"\0" * 300_000, "image/png")}
    )
    assert response.status_code == 413


def test_app_entry_point_arguments(monkeypatch):
    import app

    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "MEDPLIB_MODEL", "MEDPLIB_DEVICE", "MEDPLIB_QUANT"):
        monkeypatch.delenv(name, raising=False)  # the defaults without a Space's environment

    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.model, args.db) == ("127.0.0.1", 7860, False, None, None)
    args = app.parse_args(["--model", "m", "--port", "9000", "--db", "sqlite:///x.db", "--device", "cpu"])
    assert (args.model, args.port, args.db, args.device) == ("m", 9000, "sqlite:///x.db", "cpu")

    class Store:
        url = "sqlite:///var/cases.sqlite"

    database = str(Path("var/cases.sqlite").resolve())  # only the file and its -wal / -shm, not the folder
    assert app.blocked_paths(Store()) == (database, f"{database}-wal", f"{database}-shm")


def test_library_handoff_fills_the_ask_tab(tmp_path):
    from types import SimpleNamespace

    from portal.app import open_handoff

    handoff = SimpleNamespace(image_path=tmp_path / "case-3.png", question="Please segment the liver.")
    upload, question, tabs = open_handoff(handoff)
    assert upload == str(tmp_path / "case-3.png") and question == "Please segment the liver."
    assert tabs.selected == "ask"
    assert all(isinstance(out, dict) and out.get("__type__") == "update" for out in open_handoff(None))


def test_app_composes_the_teaching_tabs_that_exist(engine):
    demo = build_app(portal_context(engine))
    titles = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
    assert titles[0] == texts.ASK_TAB
    expected = [title for module, fn, title in TEACHING_TABS if optional_tab_builder(module, fn) is not None]
    assert titles[1:] == [*expected, texts.CLASS_TAB]


def test_a_closed_tab_frees_its_session_and_the_raw_upload_is_gone(served):
    """Bugs: Gradio kept a closed session's state (the decoded image) for an hour; the raw upload stayed in
    Gradio's cache, fetchable by URL, for one to two hours."""
    import time

    demo, _ = served
    tab = Client(demo.local_url, verbose=False)
    cached = httpx.post(f"{demo.local_url}gradio_api/upload",
                        files={"files": ("scan.png", (REPO / "assets/medimages/images/ct-pydicom-spine.png").read_bytes())})  # fmt: skip
    server_path = cached.json()[0]
    tab.predict({"path": server_path, "meta": {"_type": "gradio.FileData"}}, False, api_name="/load_image")
    assert httpx.get(f"{demo.local_url}gradio_api/file={server_path}").status_code != 200
    assert not Path(server_path).exists()
    session_id = tab.session_hash
    assert demo.state_holder.session_data[session_id].state_data  # the session holds its image
    tab.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and demo.state_holder.session_data[session_id].state_data:
        time.sleep(0.5)
    assert not demo.state_holder.session_data[session_id].state_data  # the gr.State values are gone
