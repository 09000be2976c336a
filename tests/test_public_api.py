"""The portal's public API: meaningful endpoint and parameter names, and the README's gradio_client example."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from portal_helpers import load_test_engine, portal_context
from pydicom.data import get_testdata_file

from portal.app import build_app, launch_kwargs

PORT = 7884  # this test's port (7881-7889 belong to the deployment tests)
SCRIPTED = {"/load_image", "/mark_region", "/ask", "/segment", "/search_cases", "/open_case", "/quiz_start",
            "/quiz_question", "/quiz_submit", "/mask_dicom_seg", "/segment_volume", "/save_case_draft",
            "/class_join", "/class_answer"}  # fmt: skip


@pytest.fixture(scope="module")
def engine():
    return load_test_engine()


@pytest.fixture(scope="module")
def demo_with_store(engine, tmp_path_factory):
    from cases import CaseStore

    store = CaseStore(f"sqlite:///{tmp_path_factory.mktemp('api')}/cases.sqlite")
    ctx = replace(portal_context(engine), store=store)
    return build_app(ctx), ctx


def test_api_lists_only_named_endpoints_with_named_parameters(demo_with_store):
    """Regression (issue 19): view_api listed /lambda_3, /search_1.., /redraw_1 and parameters param_2..param_26."""
    demo, _ = demo_with_store
    info = demo.get_api_info()
    named = info["named_endpoints"]
    bad_names = [name for name in named if re.fullmatch(r"/(lambda.*|.*_\d+)", name)]
    bad_params = [(name, p["parameter_name"]) for name, ep in named.items() for p in ep["parameters"]
                  if re.fullmatch(r"param_\d+", p["parameter_name"] or "")]  # fmt: skip
    assert bad_names == [] and bad_params == [] and not info["unnamed_endpoints"]
    assert set(named) == SCRIPTED
    assert [p["parameter_name"] for p in named["/mark_region"]["parameters"]] == [
        "tool",
        "x1",
        "y1",
        "x2",
        "y2",
    ]


def test_readme_client_example_uploads_a_dicom_asks_with_a_box_and_saves_the_mask(engine, tmp_path):
    """The README's gradio_client example, step by step, against a launched portal."""
    ctx = portal_context(engine)
    demo = build_app(ctx)
    demo.launch(prevent_thread_lock=True, quiet=True, server_port=PORT, **launch_kwargs(ctx.settings))
    try:
        client = Client(f"http://127.0.0.1:{PORT}/", verbose=False)
        info = client.predict(handle_file(get_testdata_file("CT_small.dcm")), False, api_name="/load_image")[
            0
        ]
        assert "CT" in info
        note = client.predict("Box", 30, 40, 90, 100, api_name="/mark_region")[1]
        assert "box" in note.lower()
        chat = client.predict(
            "What is in the marked region?", "Box", None, 0.5, "fill", "orange", api_name="/ask"
        )[0]
        assert "<region>" in str(chat[0]["content"]) and chat[1]["role"] == "assistant"
        _, _, overlay, area, files, _ = client.predict(
            "Please segment the spine.", "None", None, 0.5, "fill", "orange", api_name="/segment"
        )
        mask_file = next(f for f in files if f.endswith("mask.png"))
        saved = tmp_path / "spine-mask.png"
        saved.write_bytes(Path(mask_file).read_bytes())
        assert (np.asarray(Image.open(saved)) > 0).shape == (128, 128) and "pixels" in area
        with pytest.raises(Exception, match="Point"):
            client.predict("Sketch", 1, 1, 2, 2, api_name="/mark_region")
    finally:
        demo.close()
