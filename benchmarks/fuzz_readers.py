"""Fuzz the upload readers with mutated PNG, JPEG, DICOM and NIfTI files and print what went wrong.

    .venv/bin/python -m benchmarks.fuzz_readers            # 10,000 mutated files per format (long)
    .venv/bin/python -m benchmarks.fuzz_readers --n 200    # a quick look

Every mutated file goes through both upload paths: the Ask tab's `engine.imageio.read_image` (which may only
return an image or raise ImageReadError) and the instructor's `portal.instructor_tab.read_upload` (which may
only raise InvalidCaseData). Reads run in a child process, so a crash (segfault, abort) is counted instead
of ending the run; the child is restarted after the crashing file. Printed per format: files, foreign
exceptions (any other type), reads over 2 s, crashes, and the slowest read. Everything is local files and
bounded by --n; the seeds are made here (and pydicom's bundled test files), nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("png", "jpeg", "dicom", "nifti")
SLOW_READ_S = 2.0
EXTREMES = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x01\x00")


# ------------------------------------------------------------------------------------------------- seeds


def seed_files() -> dict[str, list[tuple[str, bytes]]]:
    """Small valid files of every format: (file name suffix, bytes). Deterministic."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    deep = (rng.integers(0, 4000, (20, 16))).astype(np.uint16)

    def encoded(array: np.ndarray, fmt: str, **kw) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    dicoms = ("CT_small.dcm", "MR_small.dcm", "image_dfl.dcm", "SC_rgb_rle.dcm", "MR_small_RLE.dcm")
    return {
        "png": [(".png", encoded(rgb, "PNG")), (".png", encoded(deep, "PNG")),
                (".png", encoded(rgb[..., 0], "PNG", pnginfo=_png_text()))],  # fmt: skip
        "jpeg": [(".jpg", encoded(rgb, "JPEG", quality=80)), (".jpg", encoded(rgb[..., 0], "JPEG"))],
        "dicom": [(".dcm", Path(p).read_bytes()) for p in map(_testdata(get_testdata_file), dicoms) if p],
        "nifti": [(".nii", _nifti(rng, np.int16)), (".nii.gz", gzip.compress(_nifti(rng, np.float32), 1))],
    }


def _testdata(get: Callable) -> Callable[[str], str | None]:
    return lambda name: get(name, download=False)


def _png_text():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("PatientName", "Doe^Jane")
    return info


def _nifti(rng: np.random.Generator, dtype: type) -> bytes:
    import nibabel as nib

    data = rng.integers(-100, 100, (8, 10, 6)).astype(dtype)
    image = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]))
    return image.to_bytes()


# -------------------------------------------------------------------------------------------- mutations


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random edits: byte flips, extreme integers in the header, truncation, repeats, inserts."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out = bytearray(rng.choice(MUTATORS)(bytes(out), rng))
    return bytes(out)


def _flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _extreme(data: bytes, rng: random.Random) -> bytes:
    """An extreme value over a size-like field near the start (headers live there)."""
    if len(data) < 8:
        return data
    at = rng.randrange(min(len(data) - 4, 600))
    value = rng.choice(EXTREMES)
    return data[:at] + value + data[at + len(value):]


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def _repeat(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    start = rng.randrange(len(data))
    piece = data[start: start + rng.randint(1, 256)]
    return data[:start] + piece * rng.randint(2, 20) + data[start:]


def _insert(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]


MUTATORS: tuple[Callable[[bytes, random.Random], bytes], ...] = (_flip, _extreme, _truncate, _repeat, _insert)


def mutated_files(fmt: str, n: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """n mutated files of one format; a gzipped NIfTI is mutated inside the gzip half of the time."""
    seeds, rng = seed_files()[fmt], random.Random(seed)
    for _ in range(n):
        suffix, data = rng.choice(seeds)
        if suffix == ".nii.gz" and rng.random() < 0.5:
            yield suffix, gzip.compress(mutate(gzip.decompress(data), rng), 1)
        else:
            yield suffix, mutate(data, rng)


# ------------------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class ReadOutcome:
    """What one read of one mutated file did, on both upload paths."""

    seconds: float
    foreign: str | None  # "path: ExceptionType: message" for an exception of the wrong type, else None


def check_file(path: Path) -> ReadOutcome:
    """Read path through both upload paths; only the project's own error types may come out."""
    from cases import InvalidCaseData
    from engine.imageio import ImageReadError, read_image, to_rgb
    from portal.instructor_tab import read_upload

    start = time.perf_counter()
    foreign = None
    try:
        to_rgb(read_image(path, spill_dir=path.parent))
    except ImageReadError:
        pass
    except Exception as err:  # noqa: BLE001 - what the fuzzer looks for
        foreign = f"read_image: {type(err).__name__}: {err}"[:300]
    try:
        read_upload(path)
    except InvalidCaseData:
        pass
    except Exception as err:  # noqa: BLE001
        foreign = foreign or f"read_upload: {type(err).__name__}: {err}"[:300]
    return ReadOutcome(time.perf_counter() - start, foreign)


def worker(fmt: str, n: int, seed: int, skip: int) -> None:
    """Child process: read files skip..n-1 and print one JSON line per file."""
    with tempfile.TemporaryDirectory(prefix="medplib-fuzz-") as folder:
        for i, (suffix, data) in enumerate(mutated_files(fmt, n, seed)):
            if i < skip:
                continue
            path = Path(folder) / f"case{suffix}"
            path.write_bytes(data)
            outcome = check_file(path)
            print(json.dumps({"i": i, "s": round(outcome.seconds, 4), "foreign": outcome.foreign}), flush=True)
            path.unlink(missing_ok=True)


@dataclass
class Tally:
    files: int = 0
    foreign: int = 0
    slow: int = 0
    crashes: int = 0
    slowest_s: float = 0.0
    examples: tuple[str, ...] = ()


def run_format(fmt: str, n: int, seed: int, time_limit_s: float) -> Tally:
    """Run workers until n files were read (a crash restarts after the crashing file) or time runs out."""
    tally, next_i, deadline = Tally(), 0, time.monotonic() + time_limit_s
    while next_i < n and time.monotonic() < deadline:
        command = [sys.executable, "-m", "benchmarks.fuzz_readers", "--worker", fmt,
                   "--n", str(n), "--seed", str(seed), "--skip", str(next_i)]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            row = json.loads(line)
            next_i = row["i"] + 1
            _count(tally, row)
            if time.monotonic() > deadline:
                proc.kill()
                break
        if proc.wait() not in (0, -9) and next_i < n:  # died on file next_i: a crash
            tally.crashes += 1
            tally.files += 1
            next_i += 1
    return tally


def _count(tally: Tally, row: dict) -> None:
    tally.files += 1
    tally.slowest_s = max(tally.slowest_s, row["s"])
    tally.slow += row["s"] > SLOW_READ_S
    if row["foreign"]:
        tally.foreign += 1
        if len(tally.examples) < 5:
            tally.examples = (*tally.examples, row["foreign"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="mutated files per format (default 10,000)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds per format at most")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.n, args.seed, args.skip)
        return
    print(f"{'format':7} {'files':>6} {'foreign':>8} {'>2 s':>5} {'crashes':>8} {'slowest':>8}")
    for fmt in args.formats.split(","):
        t = run_format(fmt, args.n, args.seed, args.time_limit)
        print(f"{fmt:7} {t.files:6d} {t.foreign:8d} {t.slow:5d} {t.crashes:8d} {t.slowest_s:7.2f}s", flush=True)
        for example in t.examples:
            print(f"    e.g. {example}")


if __name__ == "__main__":
    main()
