"""Deployment: the Space front matter, `python app.py` as a Space starts it, ZeroGPU wiring, the Dockerfile."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from portal_helpers import REPO, load_test_engine, portal_context, write_png

SPACE_PORT = 7883


def front_matter() -> tuple[dict, str]:
    text = (REPO / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, "README.md must open with the Space front matter between --- lines"
    return yaml.safe_load(match.group(1)), match.group(2)


def pinned(package: str) -> str:
    """The version requirements.txt pins for `package` (extras such as gradio[oauth] allowed)."""
    pattern = re.compile(rf"^{re.escape(package)}(\[[\w,]+\])?==(\S+)")
    matches = (pattern.match(li) for li in (REPO / "requirements.txt").read_text().splitlines())
    return next(m.group(2) for m in matches if m)


def test_readme_front_matter_describes_the_space():
    meta, body = front_matter()
    assert (meta["sdk"], str(meta["sdk_version"]), meta["app_file"]) == ("gradio", pinned("gradio"), "app.py")
    assert str(meta["python_version"]).startswith(("3.10", "3.12"))  # the versions ZeroGPU offers
    assert "Huangxs/MedPLIB-7b-2e" in meta["models"]
    assert {"Huangxs/MedPLIB-7b-2e", "openai/clip-vit-large-patch14-336"} <= set(meta["preload_from_hub"])
    assert 0 < len(meta["short_description"]) <= 60
    assert "non-commercial" in body.lower() and "research and teaching" in body.lower()
    # the two quick-start commands stay right after the title
    after_title = body.split("## Quick start", 1)[1].split("## ", 1)[0]
    assert "app.py" in after_title and "bash .ci/run" in after_title
    assert body.lstrip().startswith("# MedPLIB Portal")


def test_app_reads_the_model_device_and_quantisation_from_the_environment(monkeypatch):
    import app

    monkeypatch.setenv("MEDPLIB_MODEL", "Huangxs/MedPLIB-7b-2e")
    monkeypatch.setenv("MEDPLIB_DEVICE", "cuda:1")
    monkeypatch.setenv("MEDPLIB_QUANT", "8bit")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.parse_args([])
    assert (args.model, args.device, args.quant, args.host, args.port) == (
        "Huangxs/MedPLIB-7b-2e", "cuda:1", "8bit", "0.0.0.0", 7999
    )  # fmt: skip
    assert app.parse_args(["--host", "127.0.0.1", "--port", "7000"]).port == 7000  # a flag wins
    assert app.parse_args([]).engine == "local"
    monkeypatch.setenv("MEDPLIB_ENGINE_URL", "ray://head:10001")
    assert (app.parse_args([]).engine, app.parse_args([]).engine_url) == ("ray", "ray://head:10001")


def test_default_model_is_the_shipped_one_without_a_gpu_space():
    import app

    assert app.default_model(None, {}) is None  # not a Space: the shipped small model
    assert app.default_model("m", {"SPACE_ID": "a/b"}) == "m"
    assert app.default_model(None, {"SPACE_ID": "a/b", "SPACES_ZERO_GPU": "true"}) == "Huangxs/MedPLIB-7b-2e"


def _listening_on_all_interfaces(port: int) -> bool:
    """True when /proc/net/tcp lists 0.0.0.0:port in LISTEN state."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if local == f"00000000:{port:04X}" and state == "0A":
            return True
    return False


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="needs Linux /proc/net/tcp")
def test_python_app_with_only_the_space_environment_listens_on_all_interfaces(tmp_path):
    """Regression (issue 19): app.py always passed --host 127.0.0.1 --port 7860, so a Space was unreachable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDPLIB_", "GRADIO_SERVER"))}
    env.update(GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT=str(SPACE_PORT), HF_HUB_OFFLINE="1",
               DATABASE_URL=f"sqlite:///{tmp_path}/cases.sqlite", GRADIO_ANALYTICS_ENABLED="False")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{SPACE_PORT}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert _listening_on_all_interfaces(SPACE_PORT)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class RecordingGPU:
    """Stands in for `spaces.GPU`: records durations and calls, and pickles what crosses the boundary."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.durations: list[object] = []

    def __call__(self, *, duration):
        def decorate(fn):
            self.durations.append(duration)

            def crossing(*args, **kwargs):
                self.calls.append(fn.__name__)
                if callable(duration):
                    assert duration(*args, **kwargs) > 0
                pickle.dumps((args, kwargs))
                result = fn(*args, **kwargs)
                if hasattr(result, "__next__"):
                    return (_checked(item) for item in result)
                return _checked(result)

            return crossing

        return decorate


def _checked(value):
    """Pickle like ZeroGPU does; no tensor may be on a device other than the CPU."""
    pickle.dumps(value)
    for field in getattr(value, "__dataclass_fields__", {}):
        device = getattr(getattr(value, field), "device", None)
        assert device is None or str(device) == "cpu", f"{field} crosses the boundary on {device}"
    return value


@pytest.fixture(scope="module")
def engine():
    return load_test_engine()


def test_spaces_gpu_decorates_the_functions_the_ask_events_call(engine, monkeypatch, tmp_path):
    spaces = pytest.importorskip("spaces")
    recorder = RecordingGPU()
    monkeypatch.setattr(spaces, "GPU", recorder)
    from engine.zerogpu import ZeroGPUEngine
    from portal.ask_tab import AskHandlers

    gpu_engine = ZeroGPUEngine(engine, offload=True)  # decorates with spaces.GPU, as on a Space
    assert len(recorder.durations) == 1 and callable(recorder.durations[0])
    handlers = AskHandlers(portal_context(gpu_engine))
    session = handlers.load(str(write_png(tmp_path / "disc.png")), False)[0]
    outputs = list(handlers.ask(session, "Describe the image.", "None", None, 0.5, "fill", "orange"))
    assert recorder.calls == ["_answer_on_gpu"]  # the first question: image encoded inside the same GPU call
    session = outputs[-1][0]
    list(handlers.segment(session, "Please segment the disc.", "None", None, 0.5, "fill", "orange"))
    assert recorder.calls == ["_answer_on_gpu", "_answer_on_gpu"]
    assert session.handle.cached is not None  # the CPU copy of the embeddings came back for the next turn


def test_zerogpu_answers_match_the_plain_engine(engine):
    from engine.results import GenerationSettings
    from engine.zerogpu import ZeroGPUEngine

    rgb = np.zeros((64, 80, 3), np.uint8)
    rgb[20:40, 30:50] = 200
    settings = GenerationSettings(max_new_tokens=6, force_answer="<SEG>")
    plain = engine.ask(engine.set_image(rgb), "Please segment the square.", settings=settings)
    wrapped_engine = ZeroGPUEngine(engine, gpu=lambda duration: lambda fn: fn, offload=True)
    image = wrapped_engine.set_image(rgb)
    wrapped = wrapped_engine.ask(image, "Please segment the square.", settings=settings)
    assert wrapped.text == plain.text and np.array_equal(wrapped.mask, plain.mask)
    assert image.cached._sam_embedding is not None and image.cached._sam_embedding.device.type == "cpu"


def test_dockerfile_names_the_entry_point_and_requirements():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+", text, re.M), "CUDA base by default"
    assert "--build-arg BASE_IMAGE=" in text  # the CPU image is documented in the file
    assert "requirements.txt" in text and "COPY . " in text
    assert re.search(r'^CMD \["python3?", "app.py"\]', text, re.M)
    assert "GRADIO_SERVER_NAME=0.0.0.0" in text and "EXPOSE 7860" in text
    assert (REPO / ".dockerignore").is_file()


def test_app_wraps_the_engine_for_zerogpu_only_when_spaces_is_installed(monkeypatch):
    import importlib.util

    from portal_helpers import GOLDEN

    import app
    from engine.inference import Engine
    from engine.zerogpu import ZeroGPUEngine

    args = app.parse_args(["--device", "cpu", *(["--model", str(GOLDEN)] if GOLDEN.is_dir() else [])])
    if importlib.util.find_spec("spaces") is not None:
        assert isinstance(app.make_engine(args), ZeroGPUEngine)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "spaces" else real_find_spec(name))
    assert isinstance(app.make_engine(args), Engine)  # without spaces: the plain engine, unchanged
