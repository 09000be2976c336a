"""`python -m engine ask`: bad input gives one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", "ask", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "img.png"
    Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(path)
    return path


def _assert_clean_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert needle in lines[0]


def test_missing_image(tiny_checkpoint: Path) -> None:
    _assert_clean_error(_run("--model", str(tiny_checkpoint), "--image", "nope.png"), "image not found")


def test_not_an_image(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is text")
    _assert_clean_error(_run("--model", str(tiny_checkpoint), "--image", str(bad)), "cannot read image")


def test_unknown_model(png: Path, tmp_path: Path) -> None:
    _assert_clean_error(_run("--model", str(tmp_path / "nowhere"), "--image", str(png)), "unknown model")


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--point", "12", "malformed point"),
    ("--point", "a,b", "malformed point"),
    ("--point", "500,10", "outside"),
    ("--box", "1,2,3", "malformed box"),
])
def test_malformed_region(tiny_checkpoint: Path, png: Path, flag: str, value: str, needle: str) -> None:
    _assert_clean_error(_run("--model", str(tiny_checkpoint), "--image", str(png), flag, value), needle)


def test_point_question_json(tiny_checkpoint: Path, png: Path) -> None:
    proc = _run("--model", str(tiny_checkpoint), "--image", str(png), "--point", "40,30", "--seed", "3",
                "--question", "What is in the marked region?", "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) >= {"answer", "token_ids", "mask_area", "mask_png", "experts", "timings_ms"}
    assert 1 <= len(out["token_ids"]) <= 4
