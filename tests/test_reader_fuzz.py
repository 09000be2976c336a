"""Property-based fuzzing of both upload paths (Ask: engine.imageio; Instructor: portal.instructor_tab).

Bug pinned: about 2.6 % of mutated PNG/JPEG/DICOM/NIfTI files made `read_image` raise zlib.error,
pydicom's BytesLengthException, NotImplementedError, TypeError... instead of ImageReadError (13 % on the
instructor path). Bounded to about a minute on 2 cores; `python -m benchmarks.fuzz_readers` is the long run.
"""

from __future__ import annotations

import contextlib
import gzip
import time
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_readers import EXTREMES, FORMATS, seed_files
from cases import InvalidCaseData
from engine.imageio import ImageReadError, LoadedImage, read_image, to_rgb
from portal.instructor_tab import read_upload

EXAMPLES_PER_FORMAT = 500
SLOW_READ_S = 2.0


@cache
def _seeds() -> dict[str, list[tuple[str, bytes]]]:
    return seed_files()


edit = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("extreme"), st.integers(0, 600), st.sampled_from(EXTREMES)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.none()),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=32)),
)


def _apply(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        at = int(where * max(len(out) - 1, 0)) if isinstance(where, float) else min(where, max(len(out) - 4, 0))
        if kind == "flip" and out:
            out[at] ^= 1 << value
        elif kind == "extreme":
            out[at : at + len(value)] = value
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = value
    return bytes(out)


def _read_both(path: Path) -> None:
    start = time.perf_counter()
    try:
        image = read_image(path, spill_dir=path.parent)
        assert isinstance(image, LoadedImage)
        rgb = to_rgb(image)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3
    except ImageReadError as err:
        assert path.name not in str(err)  # messages (and so logs) never carry the file name
    with contextlib.suppress(InvalidCaseData):
        read_upload(path)
    assert time.perf_counter() - start < SLOW_READ_S


def _fuzz(fmt: str, tmp_path_factory, choice: int, edits: list[tuple], inside_gzip: bool) -> None:
    suffix, data = _seeds()[fmt][choice % len(_seeds()[fmt])]
    if suffix == ".nii.gz" and inside_gzip:
        mutated = gzip.compress(_apply(gzip.decompress(data), edits), 1)
    else:
        mutated = _apply(data, edits)
    path = tmp_path_factory.mktemp("fuzz") / f"patient-doe-jane{suffix}"
    path.write_bytes(mutated)
    _read_both(path)


def _property(fmt: str):
    @settings(max_examples=EXAMPLES_PER_FORMAT, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
    @given(choice=st.integers(0, 7), edits=st.lists(edit, min_size=1, max_size=3), inside_gzip=st.booleans())
    def check(tmp_path_factory, choice, edits, inside_gzip):
        _fuzz(fmt, tmp_path_factory, choice, edits, inside_gzip)

    return check


test_png_readers_fail_cleanly = _property("png")
test_jpeg_readers_fail_cleanly = _property("jpeg")
test_dicom_readers_fail_cleanly = _property("dicom")
test_nifti_readers_fail_cleanly = _property("nifti")
assert set(FORMATS) == {"png", "jpeg", "dicom", "nifti"}


def test_unmutated_seeds_read(tmp_path):
    """The fuzz seeds themselves are valid files on the Ask path (otherwise the fuzz proves little)."""
    for fmt, seeds in _seeds().items():
        for i, (suffix, data) in enumerate(seeds):
            path = tmp_path / f"{fmt}{i}{suffix}"
            path.write_bytes(data)
            assert to_rgb(read_image(path, spill_dir=tmp_path)).dtype == np.uint8
