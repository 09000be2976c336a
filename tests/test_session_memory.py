"""Bounded session memory (portal/session_memory.py) and raw uploads leaving Gradio's cache (portal/uploads.py).

Bugs pinned: each session kept its decoded image as float32 (~490 MB for a CT volume) for as long as Gradio
kept the session (an hour after the tab closed), with no total budget; raw uploads stayed in Gradio's cache,
fetchable by URL, for one to two hours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gradio.utils import get_upload_folder

from portal import uploads
from portal.session_memory import SessionBudget, nbytes_of

MB = 2**20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _budget(budget_mb: int = 100, ttl_s: float = 60.0) -> tuple[SessionBudget, Clock, list[str]]:
    clock, closed = Clock(), []
    budget = SessionBudget(budget_bytes=budget_mb * MB, ttl_s=ttl_s, clock=clock)
    budget.attach(closed.append, lambda _session: None)
    return budget, clock, closed


def test_the_least_recently_used_session_gives_way_when_the_budget_is_full():
    budget, clock, closed = _budget(100)
    for i, session in enumerate(("a", "b", "c")):
        clock.now = i
        assert budget.touch(session, 40 * MB) == ([] if session != "c" else ["a"])
    assert closed == ["a"] and budget.total_bytes == 80 * MB
    clock.now = 10
    budget.touch("b", 40 * MB)  # b is used again: c is now the oldest
    budget.touch("d", 40 * MB)
    assert closed == ["a", "c"]


def test_a_single_session_over_the_budget_is_kept_and_the_server_keeps_serving():
    budget, _, closed = _budget(10)
    assert budget.touch("big", 50 * MB) == [] and closed == []


def test_a_closed_tab_is_released_at_once_and_idle_sessions_expire():
    budget, clock, closed = _budget(100, ttl_s=60)
    budget.touch("open", 10 * MB)
    budget.touch("closed", 10 * MB)
    budget.release("closed")
    assert closed == ["closed"] and len(budget) == 1
    budget.release("never-seen")  # an unload without any upload: nothing to do
    assert closed == ["closed"]
    clock.now = 61
    budget.touch("new", 1 * MB)
    assert len(budget) == 1 and budget.total_bytes == 1 * MB  # "open" expired (its gr.State has the same TTL)


def test_memory_mapped_volumes_cost_no_session_memory():
    from engine.imageio import LoadedImage

    in_ram = LoadedImage(np.zeros((1, 100, 100, 3), np.uint8), "photo", None, None, 1)
    assert nbytes_of(in_ram) == 30_000
    assert nbytes_of(in_ram, np.zeros((10, 10), np.uint8), None) == 30_100


def test_memory_mapped_volume_counts_nothing(tmp_path):
    from engine.imageio import LoadedImage

    path = tmp_path / "v.raw"
    np.zeros((64, 64, 8), np.int16).tofile(path)
    mapped = LoadedImage(np.memmap(path, np.int16, "r", shape=(64, 64, 8)), "nifti", None, None, 8)
    assert nbytes_of(mapped) == 0


@pytest.fixture
def cached_upload(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    folder = Path(get_upload_folder()) / "abc123"
    folder.mkdir(parents=True)
    path = folder / "Doe_Jane.png"
    path.write_bytes(b"raw upload with a tEXt chunk")
    return path


def test_raw_upload_is_deleted_from_the_gradio_cache(cached_upload):
    assert uploads.discard(cached_upload) and not cached_upload.exists() and not cached_upload.parent.exists()


def test_files_outside_the_cache_and_example_copies_are_kept(cached_upload, tmp_path):
    outside = tmp_path / "mine.png"
    outside.write_bytes(b"x")
    assert not uploads.discard(outside) and outside.exists()
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "Doe_Jane.png").write_bytes(cached_upload.read_bytes())
    assert not uploads.discard(cached_upload, keep_under=examples) and cached_upload.exists()


# ------------------------------------------------------------------------------------ private files


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_sqlite_database_is_private(tmp_path):
    """Bug: the SQLite file (student answers) was created world-readable (0644)."""
    from cases import CaseStore

    store = CaseStore(f"sqlite:///{tmp_path / 'new' / 'cases.sqlite'}", seed_starter=False)
    store.list_cases()
    assert _mode(tmp_path / "new") == 0o700
    for name in ("cases.sqlite", "cases.sqlite-wal", "cases.sqlite-shm"):
        if (tmp_path / "new" / name).exists():
            assert _mode(tmp_path / "new" / name) == 0o600, name


def test_answer_downloads_and_csv_exports_are_private(tmp_path, monkeypatch):
    """Bug: exports were written world-readable (folder 0755, files 0644)."""
    import tempfile

    from engine.imageio import LoadedImage
    from portal import exports

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    image = LoadedImage(np.zeros((1, 8, 8, 3), np.uint8), "photo", None, None, 1)
    files = [Path(p) for p in exports.write_downloads({"a": 1}, np.ones((8, 8), bool), image, "axial", 0)]
    assert len(files) == 3 and all(_mode(p) == 0o600 for p in files)
    assert _mode(files[0].parent) == 0o700 and _mode(files[0].parent.parent) == 0o700
    csv = exports.write_private(tmp_path / "exports" / "results.csv", "student,answer\n")
    assert _mode(csv) == 0o600 and _mode(csv.parent) == 0o700
