"""Image readers: photos, DICOM, NIfTI, windowing, and refusal of bad files (engine/imageio.py)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from engine import imageio
from engine.imageio import (
    AUTO,
    MAX_IMAGE_PIXELS,
    WINDOW_PRESETS,
    ImageReadError,
    auto_contrast,
    frame_spacing,
    get_frame,
    n_slices,
    read_image,
    slice_nifti,
    to_rgb,
    window,
)

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _dicom(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path, f"pydicom test file {name} is missing"
    return path


def _png_header_claiming(tmp_path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR declares width x height (a decompression bomb header, no real pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    )
    payload = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path = tmp_path / "bomb.png"
    path.write_bytes(payload + chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------------------------- photos


def test_png_colour_is_read_as_one_rgb_frame(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[5:10, 5:25] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.kind == "photo" and image.n_frames == 1 and image.is_color
    np.testing.assert_array_equal(to_rgb(image), rgb)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "BMP"])
def test_other_photo_formats_decode(tmp_path, fmt):
    grey = np.tile(np.arange(64, dtype=np.uint8)[None, :] * 4, (40, 1))
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(grey).save(path, format=fmt)
    out = to_rgb(read_image(path))
    assert out.shape == (40, 64, 3) and out.dtype == np.uint8
    assert abs(int(out[0, -1, 0]) - 252) < 6  # grey values survive (JPEG within a few levels)


def test_16bit_png_is_contrast_stretched(tmp_path):
    values = np.tile(np.linspace(1000, 3000, 50, dtype=np.uint16)[None, :], (10, 1))
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.volume.dtype == np.uint16 and not image.is_color  # kept in its narrowest dtype
    out = to_rgb(image)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = _png_header_claiming(tmp_path, 14000, 14000)
    assert bomb.stat().st_size < 200
    with pytest.raises(ImageReadError, match="too large"):
        read_image(bomb)


def test_image_just_over_the_limit_is_refused(tmp_path):
    side = int(MAX_IMAGE_PIXELS**0.5) + 10  # between the limit and Pillow's own 2x error threshold
    with pytest.raises(ImageReadError, match="Mpx"):
        read_image(_png_header_claiming(tmp_path, side, side))


def test_corrupt_png_is_a_clear_error(tmp_path):
    good = tmp_path / "g.png"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="damaged|truncated|not a supported"):
        read_image(broken)


def test_text_file_and_gif_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not an image")
    with pytest.raises(ImageReadError, match="not a supported image"):
        read_image(tmp_path / "notes.txt")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.gif")
    with pytest.raises(ImageReadError, match="not a supported image"):
        read_image(tmp_path / "a.gif")


def test_missing_file_and_fake_dcm(tmp_path):
    with pytest.raises(ImageReadError, match="No such file"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "x.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(ImageReadError, match="DICM"):
        read_image(tmp_path / "x.dcm")


# ------------------------------------------------------------------------------------------------ DICOM


def test_ct_is_in_hounsfield_units_with_spacing():
    image = read_image(_dicom("CT_small.dcm"))
    raw = pydicom.dcmread(_dicom("CT_small.dcm")).pixel_array
    assert image.kind == "dicom" and image.modality == "CT" and image.is_ct
    np.testing.assert_allclose(get_frame(image, 0), raw.astype(np.float32) - 1024)  # slope 1, intercept -1024
    assert image.spacing_mm == pytest.approx((0.661468, 0.661468))


def test_ct_default_display_uses_soft_tissue_window():
    image = read_image(_dicom("CT_small.dcm"))
    soft = WINDOW_PRESETS["soft tissue"]
    np.testing.assert_array_equal(to_rgb(image)[..., 0], window(get_frame(image, 0), soft.center, soft.width))
    assert not np.array_equal(to_rgb(image, preset="bone"), to_rgb(image, preset="lung"))


def test_mr_uses_auto_contrast():
    image = read_image(_dicom("MR_small.dcm"))
    assert image.modality == "MR"
    np.testing.assert_array_equal(to_rgb(image)[..., 0], auto_contrast(get_frame(image, 0)))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    normal = get_frame(read_image(_dicom("MR_small.dcm")), 0)
    inverted = get_frame(read_image(tmp_path / "m1.dcm"), 0)
    np.testing.assert_allclose(inverted, normal.max() + normal.min() - normal)


def test_multiframe_colour_ultrasound_gives_rgb_frames():
    image = read_image(_dicom("examples_ybr_color.dcm"))
    assert image.n_frames == 30 and image.is_color and image.modality == "US"
    assert image.volume.shape == (30, 240, 320, 3)
    assert get_frame(image, 29).shape == (240, 320, 3)
    assert not np.array_equal(to_rgb(image, 0), to_rgb(image, 15))  # the heart moves between frames
    with pytest.raises(ValueError, match="outside"):
        get_frame(image, 30)


def test_dicom_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    ds = pydicom.dcmread(_dicom("CT_small.dcm"))
    ds.Rows, ds.Columns = 20000, 20000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(ImageReadError, match="too large"):
        read_image(tmp_path / "huge.dcm")


def test_truncated_dicom_is_a_clear_error(tmp_path):
    data = Path(_dicom("CT_small.dcm")).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError):
        read_image(tmp_path / "cut.dcm")


# ------------------------------------------------------------------------------------------------ NIfTI


def test_real_nifti_has_three_planes_with_spacing():
    image = read_image(NIBABEL_DATA / "anatomical.nii")
    assert image.kind == "nifti" and image.volume.shape == (33, 41, 25)
    assert [n_slices(image, p) for p in ("axial", "coronal", "sagittal")] == [25, 41, 33]
    assert to_rgb(image, 12, "axial").shape == (41, 33, 3)
    assert to_rgb(image, 20, "coronal").shape == (25, 33, 3)
    assert to_rgb(image, 16, "sagittal").shape == (25, 41, 3)
    assert frame_spacing(image, "coronal") == (2.0, 2.0)


def test_nifti_slices_are_in_radiological_orientation(tmp_path):
    """A voxel at the patient's right-anterior-superior corner shows top-left (axial) on screen."""
    data = np.zeros((10, 12, 8), np.float32)
    data[9, 11, 7] = 100.0  # RAS+: max x = right, max y = anterior, max z = superior
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), tmp_path / "ras.nii.gz")
    image = read_image(tmp_path / "ras.nii.gz")
    assert np.unravel_index(slice_nifti(image, "axial", 7).argmax(), (12, 10)) == (0, 0)
    assert np.unravel_index(slice_nifti(image, "coronal", 11).argmax(), (8, 10)) == (0, 0)
    assert np.unravel_index(slice_nifti(image, "sagittal", 9).argmax(), (8, 12)) == (0, 0)
    assert frame_spacing(image, "axial") == (3.0, 2.0) and frame_spacing(image, "sagittal") == (4.0, 3.0)


def test_nifti_in_other_orientation_is_reoriented(tmp_path):
    data = np.zeros((10, 12, 8), np.float32)
    data[0, 11, 7] = 100.0  # LAS: index 0 along x is the patient's right
    nib.save(nib.Nifti1Image(data, np.diag([-2.0, 3.0, 4.0, 1.0])), tmp_path / "las.nii")
    image = read_image(tmp_path / "las.nii")
    assert np.unravel_index(slice_nifti(image, "axial", 7).argmax(), (12, 10)) == (0, 0)


def test_nifti_header_claiming_huge_volume_is_refused(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.float32)
    with open(tmp_path / "huge.nii", "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 4 + b"\0" * 1024)
    with pytest.raises(ImageReadError, match="too large"):
        read_image(tmp_path / "huge.nii")


def test_corrupt_nifti_is_a_clear_error(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageReadError, match="NIfTI"):
        read_image(tmp_path / "bad.nii.gz")


# ---------------------------------------------------------------------------------------------- windows


def test_window_presets_match_the_ohif_table():
    table = {name: (p.width, p.center) for name, p in WINDOW_PRESETS.items()}
    assert table == {
        "soft tissue": (400, 40),
        "lung": (1500, -600),
        "liver": (150, 90),
        "bone": (2500, 480),
        "brain": (80, 40),
    }


def test_window_maps_edges_to_black_and_white():
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    out = window(hu, center=40, width=400)
    assert out.tolist() == [[0, 0, 128, 255, 255]]
    with pytest.raises(ValueError, match="positive"):
        window(hu, 0, 0)


def test_auto_contrast_ignores_outliers():
    frame = np.full((100, 100), 100.0)
    frame[:50] = 200.0
    frame[0, 0] = 1e6  # one hot pixel must not flatten the image
    out = auto_contrast(frame)
    assert out[10, 10] == 255 and out[90, 90] == 0


def test_unknown_preset_is_refused():
    image = read_image(_dicom("CT_small.dcm"))
    with pytest.raises(ValueError, match="unknown window preset"):
        to_rgb(image, preset="sinus")
    assert to_rgb(image, preset=AUTO).shape == (128, 128, 3)


def test_imageio_does_not_import_gradio():
    """The engine CLI reads images with this module; it must not pull in the UI stack."""
    import subprocess
    import sys

    code = "import engine.imageio, sys; print('gradio' in sys.modules)"
    root = Path(imageio.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.split() == ["False"]


# ------------------------------------------------------------------------------- bounded, clean readers


def test_reading_changes_no_process_wide_state(tmp_path):
    """Bug: the photo reader set Pillow's global MAX_IMAGE_PIXELS and the warning filters (not thread-safe;
    it broke the sketch editor's layers)."""
    import warnings

    limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    read_image(tmp_path / "a.png")
    with pytest.raises(ImageReadError):
        read_image(_png_header_claiming(tmp_path, 9000, 9000))
    assert limit == Image.MAX_IMAGE_PIXELS and warnings.filters == filters


def _nifti_header_only(path: Path, shape: tuple[int, ...], dtype=np.int16) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 4 + b"\0" * 64)
    return path


@pytest.mark.parametrize("shape", [(8000, 6000, 2), (8000, 2, 6000), (2, 8000, 6000)])
def test_nifti_slices_over_the_pixel_limit_are_refused_in_every_plane(tmp_path, shape):
    """Bug: a NIfTI whose slices exceeded the 40 Mpx photo limit got through; every question then failed."""
    with pytest.raises(ImageReadError, match="Mpx"):
        read_image(_nifti_header_only(tmp_path / "wide.nii", shape))


def test_ct_sized_nifti_is_memory_mapped_in_its_stored_dtype(tmp_path):
    """Bug: a 512x512x500 CT kept ~490 MB of float32 per session; now int16 on disk, one slice decoded."""
    data = np.full((512, 512, 500), -1000, np.int16)
    data[200:300, 200:300, 240:260] = 40
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 1.0, 1.0])), tmp_path / "ct.nii.gz")
    image = read_image(tmp_path / "ct.nii.gz", spill_dir=tmp_path)
    assert image.volume.dtype == np.int16 and image.volume.shape == (512, 512, 500)
    assert image.nbytes_in_memory == 0
    assert list(tmp_path.glob("medplib-volume-*")) == []  # the spilled file is unlinked at once
    middle = get_frame(image, 250)
    assert middle.dtype == np.float32 and middle.max() == 40 and middle.min() == -1000


def test_nifti_scaling_is_applied_per_slice(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, -10.0)
    nib.save(img, tmp_path / "scaled.nii")
    image = read_image(tmp_path / "scaled.nii")
    expected = nib.load(tmp_path / "scaled.nii").get_fdata()[::-1, ::-1, 1].T
    np.testing.assert_allclose(slice_nifti(image, "axial", 1), expected)


def test_deflated_dicom_is_inflated_within_a_budget(monkeypatch):
    """Bug: a deflated DICOM was inflated whole by pydicom (over 1 GB peak for a deflate bomb)."""
    assert read_image(_dicom("image_dfl.dcm")).kind == "dicom"
    monkeypatch.setattr(imageio, "MAX_DECODED_BYTES", 1000)
    with pytest.raises(ImageReadError, match="inflates to over"):
        read_image(_dicom("image_dfl.dcm"))


def test_messages_and_logs_never_name_the_file(tmp_path, caplog):
    """Bug: the uploaded file name (which may name a patient) was written to the log and to messages."""
    caplog.set_level("DEBUG")
    good = tmp_path / "Doe_Jane_1970.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    read_image(good)
    bad = tmp_path / "Doe_Jane_1970.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 40)
    with pytest.raises(ImageReadError) as info:
        read_image(bad)
    assert "Doe_Jane" not in str(info.value) and "Doe_Jane" not in caplog.text


@pytest.mark.parametrize("value", [0.0, 3e30, -3e38])
def test_flat_frames_far_from_zero_get_a_valid_auto_contrast(value):
    """Bug (found by benchmarks.fuzz_readers): a NIfTI slice of huge equal values made auto contrast ask for a
    window of width 0 (low + 1 == low in float32) and the Ask path raised a foreign ValueError."""
    out = auto_contrast(np.full((4, 5), value, np.float32))
    assert out.shape == (4, 5) and out.dtype == np.uint8
