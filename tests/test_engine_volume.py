"""DICOM SEG and whole-volume masks (issue 21), with the shipped small model on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from engine.dicomseg import read_seg_mask, write_seg_for_dicom, write_seg_for_display
from engine.imageio import read_image, slice_nifti
from engine.volume import assemble_ras, from_canonical, segment_label

BRAIN = "Please segment the brain in this image."


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lps_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small brain-like volume stored L-P-S (not RAS+), so the source grid differs from the display grid."""
    x, y, z = np.meshgrid(np.arange(40), np.arange(48), np.arange(6), indexing="ij")
    data = 40.0 + 160.0 * (((x - 22) / 14.0) ** 2 + ((y - 20) / 17.0) ** 2 < 1) * (z >= 1)
    affine = np.diag([-1.5, -1.2, 4.0, 1.0])
    affine[:3, 3] = (30.0, 25.0, -10.0)
    path = tmp_path_factory.mktemp("vol") / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_slice_masks_go_back_to_the_source_grid(lps_volume: Path, plane: str) -> None:
    """Thresholding each displayed slice and assembling it must give the source's own voxels back."""
    image = read_image(lps_volume)
    from engine.imageio import n_slices

    masks = [slice_nifti(image, plane, i) > 100 for i in range(n_slices(image, plane))]
    source = nib.load(str(lps_volume))
    mask = from_canonical(assemble_ras(masks, image.volume.shape, plane), source.affine)
    assert mask.shape == source.shape and np.array_equal(mask, source.get_fdata() > 100)


def test_segment_volume_cli_keeps_shape_and_affine(lps_volume: Path, tmp_path: Path) -> None:
    out = tmp_path / "mask.nii.gz"
    proc = _run("segment-volume", "--image", str(lps_volume), "--question", BRAIN, "--save-mask", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    source, mask = nib.load(str(lps_volume)), nib.load(str(out))
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert record["n_slices"] == 6 and record["seconds_per_slice"] > 0
    assert record["volume_ml"] == pytest.approx(int(np.asarray(mask.dataobj).sum()) * 1.5 * 1.2 * 4.0 / 1000)


def test_segment_label_reads_the_structure() -> None:
    assert segment_label(BRAIN) == "brain" and segment_label("Segment the liver.") == "liver"


def test_dicom_seg_references_the_source_instance(tmp_path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(source)
    mask = np.zeros((ds.Rows, ds.Columns), bool)
    mask[20:70, 30:90] = True
    files = write_seg_for_dicom(source, mask, tmp_path / "seg.dcm", label="bone")
    seg = pydicom.dcmread(files.seg)
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID and files.secondary_capture is None
    assert (seg.Rows, seg.Columns) == (ds.Rows, ds.Columns) and seg.Modality == "SEG"
    assert np.array_equal(read_seg_mask(files.seg)[0], mask)


def test_dicom_seg_of_a_png_references_a_secondary_capture(tmp_path: Path) -> None:
    rgb = np.zeros((30, 44, 3), np.uint8)
    rgb[5:25, 10:30] = 200
    mask = rgb[..., 0] > 0
    files = write_seg_for_display(rgb, mask, tmp_path / "seg.dcm", label="square")
    sc = pydicom.dcmread(files.secondary_capture)
    seg = pydicom.dcmread(files.seg)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
    assert np.array_equal(sc.pixel_array, rgb) and np.array_equal(read_seg_mask(files.seg)[0], mask)


def test_ask_cli_writes_a_dicom_seg_for_a_dicom_input(tmp_path: Path) -> None:
    source = get_testdata_file("CT_small.dcm")
    out = tmp_path / "ask.dcm"
    proc = _run("ask", "--image", source, "--question", "Please segment the bone in this image.",
                "--force-answer", "<SEG>", "--save-mask", str(out), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seg = pydicom.dcmread(out)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        pydicom.dcmread(source).SOPInstanceUID
    )
    assert read_seg_mask(out)[0].sum() == json.loads(proc.stdout)["mask_area"]


def test_segment_volume_on_a_dicom_series_writes_a_seg(tmp_path: Path) -> None:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = tmp_path / "series"
    series.mkdir()
    for k in range(3):
        ds = base.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(5 * k)]
        ds.SliceThickness = 5.0
        ds.save_as(series / f"slice{2 - k}.dcm")
    out = tmp_path / "series-seg.dcm"
    proc = _run("segment-volume", "--image", str(series), "--question", "Please segment the body in this image.",
                "--save-mask", str(out), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seg = pydicom.dcmread(out)
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 3
    assert json.loads(proc.stdout)["shape"] == [3, base.Rows, base.Columns]
