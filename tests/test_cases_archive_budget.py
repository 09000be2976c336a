"""`python -m cases import` of hostile bundles: one line on stderr, exit 2, nothing imported (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks.hostile_bundles import HOSTILE, png_bytes, valid
from cases import ArchiveError, CaseStore
from cases.archive import ArchiveBudget, check_json_depth, read_archive
from cases.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "target.sqlite")
    CaseStore(path, seed_starter=False).close()
    return path


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_bundle_is_one_line_exit_2_and_imports_nothing(
    kind: str, db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug: amplified/size-lying bundles reached 2.1-2.3 GB; a bomb PNG and a deep manifest gave tracebacks."""
    bundle = HOSTILE[kind](tmp_path / f"{kind}.zip")
    assert main(["--db", db, "--no-starter", "import", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert CaseStore(db, seed_starter=False).list_cases(include_unpublished=True) == ()


def test_valid_bundle_still_imports(db: str, tmp_path: Path) -> None:
    assert main(["--db", db, "--no-starter", "import", str(valid(tmp_path / "ok.zip"))]) == 0
    assert len(CaseStore(db, seed_starter=False).list_cases(include_unpublished=True)) == 2


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_inflated_bytes_are_counted_while_reading_not_taken_from_the_header(tmp_path: Path) -> None:
    """A member over the per-member limit is stopped after the limit, whatever its header claims."""
    bundle = valid(tmp_path / "big-member.zip", n_cases=1)
    with zipfile.ZipFile(bundle, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("c0/img.png", png_bytes(np.zeros((64, 64, 3), np.uint8)) + b"\0" * 3_000_000)
    with pytest.raises(ArchiveError, match="inflates past 1000000 bytes"):
        read_archive(bundle, ArchiveBudget(max_member_bytes=1_000_000))


def test_json_depth_scan_ignores_brackets_inside_strings() -> None:
    check_json_depth(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[[[["}', 2)
    with pytest.raises(ArchiveError):
        check_json_depth(b"[[[[]]]]", 3)


def test_cli_subprocess_prints_no_traceback(tmp_path: Path, db: str) -> None:
    bundle = HOSTILE["reference-amplified"](tmp_path / "amp.zip")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cases", "--db", db, "--no-starter", "import", str(bundle)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert time.perf_counter() - start < 120
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
