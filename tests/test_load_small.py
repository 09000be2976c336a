"""`benchmarks/load.py --small`: a few students against a launched portal; every figure is printed.

Speed and memory figures are printed, never asserted (a shared CPU makes them noisy); what is asserted is
behaviour: no upload is refused, every question is answered, and a raw upload is not served after it was read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_small_class_replay_prints_every_figure():
    command = [sys.executable, "-m", "benchmarks.load", "--small", "--port", str(_free_port())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    for figure in ("1. memory kept per session", "2. peak memory while reading", "3. 4 sessions",
                   "4. 3 students at once", "5. raw upload with patient data"):  # fmt: skip
        assert figure in out, out
    assert "after it was read not served" in out
    assert "0 uploads refused; 3 questions answered" in out
    assert "0 tracebacks; 'Queue is full' 0 times" in out
