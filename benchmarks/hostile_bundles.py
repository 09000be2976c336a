"""Hostile case archives for `python -m cases import`: each must be refused with one line and exit 2.

Used by tests/test_cases_archive_budget.py and benchmarks/security_check.py. Everything is synthetic and
written to a folder you choose; no bundle is larger than a few hundred KiB on disk.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

BIG_SIDE = 4096  # the largest side a case image may have: the amplification unit


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height 8-bit gray, with a tiny IDAT (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def case_entry(slug: str, image_file: str, mask_file: str) -> dict[str, Any]:
    """The case file of a minimal valid case (one image, one mask, one segmentation question); file names
    are relative to its case folder (cases.casefolder)."""
    return {
        "format": "medplib-case", "schema_version": 1,
        "slug": slug, "title": slug, "modality": "MR", "anatomy": "phantom", "plane": "axial",
        "difficulty": "medical student", "vignette": "", "findings": "", "discussion": "", "key_points": [],
        "tags": [], "window_preset": None, "source": "synthetic", "provenance": "benchmarks.hostile_bundles",
        "licence": "CC0-1.0", "synthetic": True, "published": False,
        "images": [{"file": image_file, "description": "", "spacing_mm": None,
                    "masks": [{"label": "lesion", "file": mask_file}]}],
        "questions": [{"kind": "segmentation", "prompt": "Draw the lesion.", "reference_answer": "lesion",
                       "synonyms": [], "choices": [], "target_label": "lesion", "region_file": None,
                       "model_outputs": []}],
    }  # fmt: skip


def _write(
    path: Path, cases: list[tuple[str, dict[str, Any]]], members: dict[str, bytes], manifest: bytes | None = None
) -> Path:
    """A bundle: `members` by archive name, each (folder, case file) once, and a manifest listing the folders
    in order (a folder listed twice is read twice: that is how a bundle amplifies references)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for folder, entry in dict(cases).items():
            archive.writestr(f"{folder}/case.json", json.dumps(entry))
        body = {"schema_version": 2, "format": "medplib-cases", "cases": [folder for folder, _ in cases]}
        archive.writestr("manifest.json", manifest if manifest is not None else json.dumps(body))
    return path


def valid(path: Path, n_cases: int = 2, side: int = 64) -> Path:
    """A small valid bundle (the control: it imports)."""
    members, cases = {}, []
    for i in range(n_cases):
        members[f"c{i}/img.png"] = png_bytes(np.full((side, side, 3), 40 + i, np.uint8))
        members[f"c{i}/mask.png"] = png_bytes(np.pad(np.full((8, 8), 255, np.uint8), side // 2 - 4))
        cases.append((f"c{i}", case_entry(f"valid-case-{i}", "img.png", "mask.png")))
    return _write(path, cases, members)


def reference_amplified(path: Path, n_refs: int = 400) -> Path:
    """One 4096² image (and mask) referenced by `n_refs` cases: a few KiB that once decoded to GBs."""
    members = {
        "c/big.png": png_bytes(np.zeros((BIG_SIDE, BIG_SIDE, 3), np.uint8)),
        "c/mask.png": png_bytes(np.zeros((BIG_SIDE, BIG_SIDE), np.uint8)),
    }
    entry = case_entry("amplified", "big.png", "mask.png")
    entry["images"] *= n_refs  # one case file naming the image n_refs times...
    return _write(path, [("c", entry)] * n_refs, members)  # ...and listed n_refs times in the manifest


def distinct_large_images(path: Path, n_cases: int = 12) -> Path:
    """`n_cases` different 4096² images, each referenced once: only the pixel budget stops this one.

    The members are headers with a token IDAT: the budget must refuse them before decoding anything.
    """
    members, cases = {}, []
    for i in range(n_cases):
        members[f"c{i}/img.png"] = png_header_only(BIG_SIDE, BIG_SIDE)
        members[f"c{i}/mask.png"] = png_header_only(BIG_SIDE, BIG_SIDE)
        cases.append((f"c{i}", case_entry(f"large-{i}", "img.png", "mask.png")))
    return _write(path, cases, members)


def size_lying(path: Path, real_bytes: int = 1 << 30) -> Path:
    """A member whose zip headers say 1 KiB while its deflate stream inflates to `real_bytes`."""
    valid(path, n_cases=1)
    lie, name = 1024, b"c0/padding.png"
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = b"\0" * (1 << 20)
    head = compressor.compress(png_bytes(np.zeros((64, 64, 3), np.uint8)))  # a valid header first
    stream = head + b"".join(compressor.compress(block) for _ in range(real_bytes >> 20)) + compressor.flush()
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo(name.decode())
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, b"\0" * lie)
    raw = bytearray(path.read_bytes())
    _replace_member_stream(raw, name, stream)
    entry = json.loads(zipfile.ZipFile(io.BytesIO(bytes(raw))).read("c0/case.json"))
    entry["images"][0]["file"] = "padding.png"
    path.write_bytes(bytes(raw))
    return _rewrite_member(path, "c0/case.json", entry)


def _replace_member_stream(raw: bytearray, name: bytes, stream: bytes) -> None:
    """Swap a member's compressed bytes, keeping its (now lying) sizes and CRC; fix the offsets after it."""
    local = raw.find(b"PK\x03\x04" + raw[4:4])  # first local header
    while local >= 0:
        name_len, extra_len = struct.unpack_from("<HH", raw, local + 26)
        if raw[local + 30 : local + 30 + name_len] == name:
            break
        local = raw.find(b"PK\x03\x04", local + 4)
    name_len, extra_len = struct.unpack_from("<HH", raw, local + 26)
    old_size = struct.unpack_from("<I", raw, local + 18)[0]
    start = local + 30 + name_len + extra_len
    raw[start : start + old_size] = stream
    struct.pack_into("<I", raw, local + 18, len(stream))
    shift = len(stream) - old_size
    central = raw.find(b"PK\x01\x02", start + len(stream))
    while central >= 0 and raw[central : central + 4] == b"PK\x01\x02":
        n, e, c = struct.unpack_from("<HHH", raw, central + 28)
        if raw[central + 46 : central + 46 + n] == name:
            struct.pack_into("<I", raw, central + 20, len(stream))
        offset = struct.unpack_from("<I", raw, central + 42)[0]
        if offset > local:
            struct.pack_into("<I", raw, central + 42, offset + shift)
        central += 46 + n + e + c
    end = raw.rfind(b"PK\x05\x06")
    struct.pack_into("<I", raw, end + 16, struct.unpack_from("<I", raw, end + 16)[0] + shift)


def _rewrite_member(path: Path, name: str, body: dict[str, Any]) -> Path:
    """Append a newer JSON member `name` (zipfile reads the last entry of a name)."""
    with zipfile.ZipFile(path, "a") as archive:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive.writestr(name, json.dumps(body))
    return path


def pixel_bomb(path: Path, side: int = 30_000) -> Path:
    """A case whose image header claims side x side pixels (once a DecompressionBombError traceback)."""
    members = {"c/bomb.png": png_header_only(side, side), "c/mask.png": png_header_only(side, side)}
    return _write(path, [("c", case_entry("bomb", "bomb.png", "mask.png"))], members)


def deep_manifest(path: Path, depth: int = 200_000) -> Path:
    """A manifest nested `depth` levels deep (once a RecursionError traceback)."""
    nested = (
        b'{"schema_version": 2, "format": "medplib-cases", "cases": [' + b"[" * depth + b"]" * depth + b"]}"
    )
    return _write(path, [], {}, manifest=nested)


HOSTILE: dict[str, Callable[[Path], Path]] = {
    "reference-amplified": reference_amplified,
    "distinct-large-images": distinct_large_images,
    "size-lying": size_lying,
    "pixel-bomb-30000": pixel_bomb,
    "deep-manifest": deep_manifest,
}
