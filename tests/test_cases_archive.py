"""Export/import archives: lossless round trip and refusals that write nothing."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cases import ArchiveError, CaseStore, DuplicateCase, PermissionDenied
from cases.archive import export_archive, import_archive
from cases.samples import disc_mask, sample_draft


@pytest.fixture
def source(tmp_path: Path) -> CaseStore:
    store = CaseStore(str(tmp_path / "source.sqlite"), seed_starter=False)
    op = store.operator_session()
    case = store.create_case(op, sample_draft("Exported one", size=(30, 40)))
    store.create_case(op, sample_draft("Hidden draft", published=False))
    store.save_model_output(
        op, case.questions[1].id, model_id="tiny-medplib", revision="abc", parameters={"temperature": 0.0},
        answer="Sure, it is [SEG].", mask=disc_mask(30, 40, (15, 20), 5),
    )  # fmt: skip
    return store


def _comparable(store: CaseStore) -> list[tuple]:
    op = store.operator_session()
    rows = []
    for summary in store.list_cases(include_unpublished=True):
        case = store.get_case(summary.id, op)
        images = [(i.rgb().tobytes(), i.spacing_mm, [(m.label, m.array().tobytes()) for m in i.masks])
                  for i in case.images]  # fmt: skip
        questions = [(q.kind, q.prompt, q.reference_answer, q.synonyms, q.choices, q.target_label,
                      [(o.model_id, o.revision, dict(o.parameters), o.answer, o.mask_png, o.created_at)
                       for o in store.model_outputs(q.id)]) for q in case.questions]  # fmt: skip
        s = summary
        rows.append((s.slug, s.title, s.modality, s.anatomy, s.plane, s.difficulty, s.tags, s.published,
                     case.vignette, case.findings, case.discussion, case.key_points, case.provenance,
                     case.licence, case.source, case.synthetic, case.window_preset, images, questions))  # fmt: skip
    return rows


def test_round_trip_is_lossless(source: CaseStore, tmp_path: Path) -> None:
    archive = tmp_path / "library.zip"
    assert export_archive(source, source.operator_session(), archive) == 2
    target = CaseStore(str(tmp_path / "target.sqlite"), seed_starter=False)
    slugs = import_archive(target, target.operator_session(), archive)
    assert len(slugs) == 2
    assert _comparable(target) == _comparable(source)
    again = tmp_path / "again.zip"
    export_archive(target, target.operator_session(), again)
    with zipfile.ZipFile(archive) as a, zipfile.ZipFile(again) as b:
        assert json.loads(a.read("manifest.json")) == json.loads(b.read("manifest.json"))
        assert sorted(a.namelist()) == sorted(b.namelist())


def test_duplicate_import_writes_nothing(source: CaseStore, tmp_path: Path) -> None:
    archive = tmp_path / "library.zip"
    export_archive(source, source.operator_session(), archive)
    before = source.list_cases(include_unpublished=True)
    with pytest.raises(DuplicateCase, match="already exist"):
        import_archive(source, source.operator_session(), archive)
    assert source.list_cases(include_unpublished=True) == before


def _rewrite(archive: Path, out: Path, *, manifest_edit=None, drop: str | None = None) -> Path:
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "manifest.json" and manifest_edit is not None:
                manifest = json.loads(data)
                manifest_edit(manifest)
                data = json.dumps(manifest).encode()
            if name != drop:
                dst.writestr(name, data)
    return out


def test_bad_archives_are_refused_and_nothing_is_written(source: CaseStore, tmp_path: Path) -> None:
    archive = tmp_path / "library.zip"
    export_archive(source, source.operator_session(), archive)
    target = CaseStore(str(tmp_path / "target.sqlite"), seed_starter=False)
    op = target.operator_session()
    wrong_version = _rewrite(archive, tmp_path / "v9.zip", manifest_edit=lambda m: m.update(schema_version=9))
    with pytest.raises(ArchiveError, match="version 9 is not supported"):
        import_archive(target, op, wrong_version)
    folders = json.loads(zipfile.ZipFile(archive).read("manifest.json"))["cases"]
    missing = _rewrite(archive, tmp_path / "missing.zip", drop=f"{folders[1]}/image-0.png")
    with pytest.raises(ArchiveError, match="missing|lacks"):
        import_archive(target, op, missing)
    small = zipfile.ZipFile(archive).read(f"{folders[1]}/image-0--mask-0.png")  # a mask of another size
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tmp_path / "size.zip", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, small if name == f"{folders[0]}/image-0--mask-0.png" else src.read(name))
    with pytest.raises(ArchiveError, match="image's size"):
        import_archive(target, op, tmp_path / "size.zip")
    escape = _rewrite(archive, tmp_path / "escape.zip", manifest_edit=lambda m: m.update(cases=["../x"]))
    with pytest.raises(ArchiveError, match="relative path"):
        import_archive(target, op, escape)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ArchiveError, match="not a zip"):
        import_archive(target, op, tmp_path / "junk.zip")
    with pytest.raises(PermissionDenied):
        import_archive(target, None, archive)  # type: ignore[arg-type]
    assert target.list_cases(include_unpublished=True) == ()


def test_export_refuses_to_overwrite(source: CaseStore, tmp_path: Path) -> None:
    archive = tmp_path / "x.zip"
    archive.write_bytes(b"")
    with pytest.raises(ArchiveError, match="already exists"):
        export_archive(source, source.operator_session(), archive)
    assert np.asarray([1]).size == 1
