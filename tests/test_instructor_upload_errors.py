"""Instructor uploads of odd files raise only the case library's errors (issue 17).

Bug: odd uploads raised AttributeError, ValueError and others where a clear message belongs.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from cases import CaseStoreError
from portal.instructor_tab import read_upload

SUFFIXES = (".png", ".jpg", ".dcm", ".nii", ".nii.gz", ".bin")


def _seeds() -> list[bytes]:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, format="PNG")
    return [Path(get_testdata_file("CT_small.dcm")).read_bytes(), buffer.getvalue()]


SEEDS = _seeds()


def _try(tmp_path: Path, data: bytes, suffix: str) -> None:
    path = tmp_path / f"upload{suffix}"
    path.write_bytes(data)
    with contextlib.suppress(CaseStoreError):
        read_upload(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    cut=st.integers(0, 5000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
    suffix=st.sampled_from(SUFFIXES),
)
def test_mutated_uploads_raise_only_case_errors(
    tmp_path: Path, seed: int, cut: int, flips, suffix: str
) -> None:
    data = bytearray(SEEDS[seed])
    for offset, value in flips:
        if offset < len(data):
            data[offset] = value
    if cut:
        data = data[: max(1, len(data) - cut)]
    _try(tmp_path, bytes(data), suffix)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_garbage_and_empty_files_raise_case_errors(tmp_path: Path, suffix: str) -> None:
    for data in (b"", b"\0" * 200, b"\0" * 128 + b"DICM" + b"\xff" * 64, b"\x89PNG\r\n\x1a\n" + b"\0" * 40):
        with pytest.raises(CaseStoreError):
            read_upload(_write(tmp_path, data, suffix))


def _write(tmp_path: Path, data: bytes, suffix: str) -> Path:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(data)
    return path
