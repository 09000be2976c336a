"""Cases as data (issue 21): the starter library is case folders, `cases validate`, bundles use the format."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cases import CaseStore
from cases.archive import export_archive, read_archive
from cases.casefolder import (
    ASSETS_DIR,
    CASE_FILE,
    LIBRARY_DIR,
    case_folders,
    nifti_mask_bytes,
    nifti_mask_from_bytes,
    read_case_folder,
    write_case_folder,
)
from cases.cli import main
from cases.samples import sample_draft

needs_assets = pytest.mark.skipif(not (ASSETS_DIR / "index.json").is_file(), reason="assets/medimages missing")


@needs_assets
def test_the_starter_library_validates(capsys) -> None:
    assert main(["validate", str(LIBRARY_DIR)]) == 0
    assert "32 case folders valid" in capsys.readouterr().out


def test_no_case_text_is_left_in_python() -> None:
    """Issue 21: teaching text lived in cases/starter_text.py; it must only be in the case files."""
    sources = "".join(p.read_text(encoding="utf-8") for p in (LIBRARY_DIR.parent).glob("*.py"))
    assert not (LIBRARY_DIR.parent / "starter_text.py").exists()
    for folder in case_folders(LIBRARY_DIR):
        entry = json.loads((folder / CASE_FILE).read_text(encoding="utf-8"))
        for text in (entry["vignette"], entry["findings"], entry["discussion"], *entry["key_points"]):
            assert text[:60] not in sources, f"{folder.name}: case text found in Python"


@needs_assets
def test_a_teacher_adds_a_case_by_adding_a_folder(tmp_path: Path, capsys) -> None:
    library = tmp_path / "library"
    shutil.copytree(LIBRARY_DIR / "starter-mri-mni152-axial-069-brain", library / "my-new-case")
    path = library / "my-new-case" / CASE_FILE
    entry = json.loads(path.read_text(encoding="utf-8"))
    entry.update(slug="my-new-case", title="My own brain case")
    path.write_text(json.dumps(entry), encoding="utf-8")
    assert main(["validate", str(library)]) == 0
    store = CaseStore(str(tmp_path / "t.sqlite"), seed_starter=False)
    from cases.starter import seed_starter_library

    assert seed_starter_library(store, ASSETS_DIR, library) == 1
    assert store.get_case("my-new-case").title == "My own brain case"


@needs_assets
def test_validate_names_each_broken_folder(tmp_path: Path, capsys) -> None:
    library = tmp_path / "library"
    for name in ("starter-ct-pydicom-spine-bone", "starter-ct-pydicom-spine-body"):
        shutil.copytree(LIBRARY_DIR / name, library / name)
    bone = library / "starter-ct-pydicom-spine-bone" / CASE_FILE
    entry = json.loads(bone.read_text(encoding="utf-8"))
    del entry["questions"][2]["answer_key"]
    entry["images"][0]["masks"][0]["file"] = "asset:../../etc/passwd"
    bone.write_text(json.dumps(entry), encoding="utf-8")
    (library / "starter-ct-pydicom-spine-body" / CASE_FILE).write_text("{not json", encoding="utf-8")
    assert main(["validate", str(library)]) == 2
    err = capsys.readouterr().err
    assert "starter-ct-pydicom-spine-bone: " in err and "relative path" in err
    assert "starter-ct-pydicom-spine-body: " in err and "2 problems in 2 case folders" in err


def test_a_stored_case_round_trips_through_a_folder(tmp_path: Path) -> None:
    store = CaseStore(str(tmp_path / "s.sqlite"), seed_starter=False)
    case = store.create_case(store.operator_session(), sample_draft("Folder trip", slug="folder-trip"))
    write_case_folder(tmp_path / "lib" / "folder-trip", case)
    draft = read_case_folder(tmp_path / "lib" / "folder-trip")
    assert draft.slug == "folder-trip" and draft.title == "Folder trip"
    assert np.array_equal(draft.images[0].masks[0].mask, case.images[0].masks[0].array())
    assert [q.prompt for q in draft.questions] == [q.prompt for q in case.questions]
    assert main(["validate", str(tmp_path / "lib")]) == 2  # the sample's open question has no answer key


def test_bundles_hold_case_folders_and_can_carry_nifti_masks(tmp_path: Path) -> None:
    store = CaseStore(str(tmp_path / "s.sqlite"), seed_starter=False)
    case = store.create_case(store.operator_session(), sample_draft("Bundle", slug="bundle", size=(30, 40)))
    out = tmp_path / "b.zip"
    export_archive(store, store.operator_session(), out, nifti_masks=True)
    with zipfile.ZipFile(out) as archive:
        assert json.loads(archive.read("manifest.json"))["cases"] == ["cases/bundle"]
        entry = json.loads(archive.read("cases/bundle/case.json"))
        nifti = archive.read("cases/bundle/" + entry["images"][0]["masks"][0]["nifti"])
        archive.extractall(tmp_path / "unzipped")
    assert np.array_equal(nifti_mask_from_bytes(nifti), case.images[0].masks[0].array())
    assert read_archive(out)[0].title == "Bundle"
    assert read_case_folder(tmp_path / "unzipped" / "cases" / "bundle").title == "Bundle"  # same reader


def test_nifti_masks_keep_spacing_and_shape() -> None:
    import gzip

    import nibabel as nib

    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    data = nifti_mask_bytes(mask, (0.5, 0.8))
    image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    assert image.shape == (5, 7, 1) and np.allclose(image.header.get_zooms(), (0.5, 0.8, 1.0))
    assert np.array_equal(nifti_mask_from_bytes(data), mask)
