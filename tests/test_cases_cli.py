"""`python -m cases` end to end, in-process (fast) plus one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cases import CaseStore
from cases.cli import main
from cases.samples import sample_draft

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path: Path) -> str:
    store = CaseStore(str(tmp_path / "cli.sqlite"), seed_starter=False)
    op = store.operator_session()
    store.create_case(op, sample_draft("First case", slug="first-case"))
    store.create_case(op, sample_draft("Second case", published=False, slug="second-case"))
    store.close()
    return str(tmp_path / "cli.sqlite")


def test_list_json_has_the_documented_fields(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", db, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["title"] for r in rows] == ["First case", "Second case"]
    assert {"id", "title", "modality", "anatomy", "n_masks", "n_questions", "published"} <= set(rows[0])
    assert (rows[0]["n_masks"], rows[0]["n_questions"], rows[1]["published"]) == (1, 3, False)


def test_show_export_import_backup(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", db, "show", "first-case"]) == 0
    assert "Findings: A bright round lesion" in capsys.readouterr().out
    archive = tmp_path / "out.zip"
    assert main(["--db", db, "export", "--out", str(archive)]) == 0
    other = str(tmp_path / "other.sqlite")
    assert main(["--db", other, "--no-starter", "import", str(archive)]) == 0
    assert "imported 2 cases" in capsys.readouterr().out
    assert main(["--db", other, "import", str(archive)]) == 2  # duplicate
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "already exist" in err
    assert main(["--db", db, "backup", "--out", str(tmp_path / "bk.sqlite")]) == 0
    assert len(CaseStore(str(tmp_path / "bk.sqlite")).list_cases(include_unpublished=True)) == 2


def test_errors_are_one_line_and_exit_2(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--db", db, "show", "999"]) == 2
    assert main(["--db", db, "import", str(tmp_path / "nope.zip")]) == 2
    assert main(["--db", "postgresql+psycopg://u:p@127.0.0.1:1/none", "backup", "--out", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)


class _FakeEngine:
    """Stands in for engine.Engine to inject a known answer (the real model is tested by the engine)."""

    class info:  # noqa: N801 - mimics ModelInfo attributes
        name, revision = "fake-model", "r0"

    def set_image(self, rgb: np.ndarray) -> tuple[int, ...]:
        return rgb.shape[:2]

    def ask(self, image: tuple[int, ...], question: str, **_: object) -> object:
        mask = np.zeros(image, bool)
        mask[:4, :4] = True
        return type("A", (), {"text": f"answer to {question}", "mask": mask})()


def test_precompute_stores_one_output_per_question_and_skips_cached(tmp_path: Path, db: str) -> None:
    pytest.importorskip("engine.results")
    from cases.precompute import precompute_outputs

    store = CaseStore(db)
    assert precompute_outputs(store, engine=_FakeEngine()) == 6
    assert precompute_outputs(store, engine=_FakeEngine()) == 0  # cached
    case = store.get_case("first-case")
    [output] = store.model_outputs(case.questions[1].id)
    assert output.answer == f"answer to {case.questions[1].prompt}" and output.mask().sum() == 16
    assert output.parameters["temperature"] == 0.0


def test_module_entry_point_runs_in_a_subprocess(db: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "cases", "--db", db, "list"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "2 cases" in done.stdout


def test_cases_package_never_imports_torch_or_gradio() -> None:
    """cases/ sits below the portal and beside the engine: importing it must not pull in either."""
    code = (
        "import sys, cases, cases.cli, cases.deid, cases.archive, cases.starter, cases.precompute; "
        "bad = [m for m in ('torch', 'gradio') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
