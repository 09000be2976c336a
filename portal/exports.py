"""Downloads for one answer: the mask as PNG and NIfTI, and a JSON record of prompt, answer and model.

Uploaded file names are never written (they may name a patient).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from engine.imageio import LoadedImage, frame_spacing


def mask_png(mask: np.ndarray, folder: Path) -> Path:
    """(H, W) bool mask -> 8-bit PNG, 255 inside, 0 outside."""
    path = folder / "mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def mask_nifti(mask: np.ndarray, image: LoadedImage, plane: str, index: int, folder: Path) -> Path:
    """Mask as NIfTI (uint8 0/1).

    For a NIfTI source the mask is put back into the source's RAS+ voxel grid at the asked slice (a 3-D
    label volume with the source's canonical affine). Otherwise it is a (W, H, 1) grid with the pixel
    spacing on the affine's diagonal (no patient orientation).
    """
    path = folder / "mask.nii.gz"
    if image.kind == "nifti" and image.affine is not None:
        volume = np.zeros(image.volume.shape, np.uint8)
        voxels = mask.T[::-1, ::-1].astype(np.uint8)  # undo slice_nifti's display flip/transpose
        if plane == "axial":
            volume[:, :, index] = voxels
        elif plane == "coronal":
            volume[:, index, :] = voxels
        else:
            volume[index, :, :] = voxels
        nib.save(nib.Nifti1Image(volume, image.affine), path)
        return path
    row, col = frame_spacing(image, plane) or (1.0, 1.0)
    nib.save(nib.Nifti1Image(mask.T[:, :, None].astype(np.uint8), np.diag([col, row, 1.0, 1.0])), path)
    return path


def record_json(record: dict[str, Any], folder: Path) -> Path:
    path = folder / "record.json"
    path.write_text(json.dumps(record, indent=2, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


EXPORT_ROOT_NAME = "medplib-portal-exports"
EXPORT_MAX_AGE_S = 3600  # answer folders older than this are removed when new ones are written


def write_downloads(
    record: dict[str, Any], mask: np.ndarray | None, image: LoadedImage, plane: str, index: int
) -> list[str]:
    """Write record.json (+ mask.png and mask.nii.gz when there is a mask) to a fresh temp folder.

    Gradio copies the files into its own cache (swept by delete_cache); our folders older than an hour go.
    """
    root = private_dir(Path(tempfile.gettempdir()) / EXPORT_ROOT_NAME)
    prune_exports(root, EXPORT_MAX_AGE_S)
    folder = Path(tempfile.mkdtemp(prefix="answer-", dir=root))  # 0700
    paths = [record_json(record, folder)]
    if mask is not None:
        paths = [mask_png(mask, folder), mask_nifti(mask, image, plane, index, folder), *paths]
    for path in paths:  # private to the server's user: 0600 (Gradio's cached copy keeps the mode)
        os.chmod(path, 0o600)
    return [str(p) for p in paths]


def private_dir(path: Path) -> Path:
    """Create (or tighten) a folder only the server's user may enter (0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> Path:
    """Write text to a new file that only the server's user can read (0600), creating it with that mode."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
    return path


def prune_exports(root: Path, max_age_s: float) -> None:
    """Delete answer folders under root whose last change is older than max_age_s seconds."""
    cutoff = time.time() - max_age_s
    for folder in root.glob("answer-*"):
        if folder.is_dir() and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)


SHOWN_ROOT_NAME = "medplib-portal-shown"
SHOWN_MAX_AGE_S = 300  # Gradio copies a shown file into its cache right after the event; ours can go soon


def shown_png(rgb: np.ndarray | None) -> str | None:
    """(H, W, 3) uint8 -> a private PNG file to return as an image output instead of the array, or None.

    Gradio writes an image array it encodes itself in place to a content-hashed cache path, so the same image
    shown to many students at once (one upload handed out to a class) was served half-written to some of them
    ("Response content shorter than Content-Length"); a returned file is copied into the cache atomically.
    """
    if rgb is None:
        return None
    root = private_dir(Path(tempfile.gettempdir()) / SHOWN_ROOT_NAME)
    cutoff = time.time() - SHOWN_MAX_AGE_S
    for old in root.glob("shown-*.png"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()
    fd, name = tempfile.mkstemp(prefix="shown-", suffix=".png", dir=root)  # 0600
    with os.fdopen(fd, "wb") as f:
        Image.fromarray(np.ascontiguousarray(rgb)).save(f, format="PNG", compress_level=1)
    return name


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
