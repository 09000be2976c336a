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


def _source_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    source = nib.load(str(path))
    return source.get_fdata() > 100, np.asarray(source.affine, float)


def _sc_series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber))


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_nifti_volume_seg_references_a_secondary_capture_series(lps_volume: Path, tmp_path: Path, plane: str) -> None:
    """SEG of a NIfTI volume: one SC per displayed slice, frame k on SC k, and the 3-D mask comes back exactly."""
    import highdicom as hd

    from engine.imageio import n_slices, to_rgb
    from engine.volume import VolumeMask, display_slices, write_nifti_seg

    mask, affine = _source_mask(lps_volume)
    image = read_image(lps_volume)
    result = VolumeMask(mask=mask, affine=affine, voxel_ml=None, n_slices=n_slices(image, plane), slices_with_mask=0,
                        seconds_per_slice=0.0, plane=plane, label="brain")  # fmt: skip
    files = write_nifti_seg(image, result, tmp_path / "brain.dcm")
    series = _sc_series(files.secondary_capture)
    assert len(series) == n_slices(image, plane) and files.referenced_sop_instance_uids == tuple(
        str(ds.SOPInstanceUID) for ds in series
    )
    seg = hd.seg.segread(str(files.seg))
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in series
    }
    shown = display_slices(mask, affine, plane)
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame derives from the SC of its own slice
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = [str(ds.SOPInstanceUID) for ds in series].index(uid)
        assert np.array_equal(series[k].pixel_array, to_rgb(image, k, plane))  # the windowing the model saw
    planes = read_seg_mask(files.seg)
    assert np.array_equal(planes, shown)
    back = from_canonical(assemble_ras(list(planes), image.volume.shape, plane), affine)
    assert back.shape == mask.shape and np.array_equal(back, mask)


def test_secondary_capture_geometry_lands_on_the_nifti_voxels(lps_volume: Path, tmp_path: Path) -> None:
    """Every SC pixel's patient position (IPP + IOP × spacing), mapped through the NIfTI affine, is the voxel
    whose mask value the SEG holds there: the geometry written is the source's, not a made-up one."""
    from engine.volume import VolumeMask, write_nifti_seg

    mask, affine = _source_mask(lps_volume)
    image = read_image(lps_volume)
    result = VolumeMask(mask=mask, affine=affine, voxel_ml=None, n_slices=40, slices_with_mask=0,
                        seconds_per_slice=0.0, plane="sagittal", label="brain")  # fmt: skip
    files = write_nifti_seg(image, result, tmp_path / "brain.dcm")
    planes = read_seg_mask(files.seg)
    for k, ds in enumerate(_sc_series(files.secondary_capture)):
        rows, cols = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        iop, (dr, dc) = np.asarray(ds.ImageOrientationPatient, float), (float(v) for v in ds.PixelSpacing)
        lps = (np.asarray(ds.ImagePositionPatient, float)[:, None, None] + iop[:3, None, None] * cols * dc
               + iop[3:, None, None] * rows * dr)  # fmt: skip
        ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None]
        ijk = np.tensordot(np.linalg.inv(affine)[:3, :3], ras, axes=1) + np.linalg.inv(affine)[:3, 3, None, None]
        voxels = np.rint(ijk).astype(int)
        assert np.allclose(ijk, voxels, atol=1e-3)
        assert np.array_equal(mask[voxels[0], voxels[1], voxels[2]], planes[k])
        assert ds.PatientOrientation == ["P", "F"]  # sagittal display: columns go posterior, rows go down


def test_sheared_nifti_is_refused_with_a_way_out(tmp_path: Path) -> None:
    """DICOM pixel grids are orthogonal: a sheared NIfTI gets a clear refusal, not a SEG with invented geometry."""
    from engine.volume import VolumeError, VolumeMask, write_nifti_seg

    affine = np.array([[1.0, 0.4, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    data = np.zeros((12, 10, 3), np.float32)
    data[3:8, 2:6, 1] = 100
    path = tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    result = VolumeMask(mask=data > 50, affine=affine, voxel_ml=None, n_slices=3, slices_with_mask=1,
                        seconds_per_slice=0.0, plane="axial", label="box")  # fmt: skip
    with pytest.raises(VolumeError, match="sheared.*nii.gz"):
        write_nifti_seg(read_image(path), result, tmp_path / "box.dcm")
    assert not (tmp_path / "box.dcm").exists()


def test_segment_volume_cli_writes_a_seg_for_a_nifti_volume(lps_volume: Path, tmp_path: Path) -> None:
    """Issue 21: `segment-volume --save-mask OUT.dcm` on a NIfTI volume was refused; it writes a SEG over SCs."""
    out = tmp_path / "brain.dcm"
    proc = _run("segment-volume", "--image", str(lps_volume), "--question", BRAIN, "--save-mask", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    series = _sc_series(Path(record["secondary_capture"]))
    seg = pydicom.dcmread(out)
    assert len(series) == 6 and seg.NumberOfFrames == 6 and record["seconds_per_slice"] > 0
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 6
    image = read_image(lps_volume)
    back = from_canonical(assemble_ras(list(read_seg_mask(out)), image.volume.shape, "axial"), _source_mask(lps_volume)[1])
    assert back.shape == nib.load(str(lps_volume)).shape and int(back.sum()) == record["voxels"]
