"""`python -m engine ask ...`: the researchers' quick check and the contract other parts rely on.

Bad input (missing file, not an image, unknown model, malformed point) → one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.conversation import DEFAULT_TEMPLATE, TEMPLATES
from engine.results import Answer, GenerationSettings, answer_is_unfinished

EXIT_BAD_INPUT = 2
DEFAULT_QUESTION = "Please describe this image."
UNFINISHED_NOTICE = "[the model gave no complete sentence: a small demo model outside what it was trained on]"
log = logging.getLogger("engine.cli")


class UsageError(ValueError):
    """Bad command-line input: reported as one line and exit code 2."""


def _pair(text: str, n: int, what: str) -> tuple[int, ...]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(int(round(float(p))) for p in parts)
    except ValueError:
        raise UsageError(f"malformed {what} {text!r}: expected {n} comma-separated numbers") from None
    if len(values) != n:
        raise UsageError(f"malformed {what} {text!r}: expected {n} comma-separated numbers")
    return values


def add_ask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask one question about one image (optionally with a region)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the shipped small model)")
    p.add_argument("--revision", default=None, help="hub revision (with a hub id)")
    p.add_argument("--image", required=True, help="PNG/JPEG/TIFF/BMP, DICOM or NIfTI file")
    p.add_argument("--frame", type=int, default=None,
                   help="frame (DICOM) or slice (NIfTI, axial) index (default: the middle one, as the portal)")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--point", action="append", default=[], metavar="X,Y", help="point prompt (repeatable)")
    p.add_argument("--box", default=None, metavar="X1,Y1,X2,Y2", help="box prompt in pixels")
    p.add_argument("--sketch", default=None, metavar="MASK.png", help="free-form region: nonzero pixels")
    p.add_argument("--force-answer", default=None, help='teacher-force this answer, e.g. "<SEG>"')
    p.add_argument("--template", default=DEFAULT_TEMPLATE, choices=sorted(TEMPLATES),
                   help=f"default {DEFAULT_TEMPLATE}: the portal's, training's and `engine evaluate`'s; "
                        "vicuna_v1: MedPLIB's evaluation scripts")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-mask", default=None, metavar="OUT.png|OUT.dcm",
                   help="PNG mask, or .dcm: a DICOM SEG referencing the source (DICOM) or a Secondary Capture of it")
    p.add_argument("--postprocess", default=None, choices=("medplib", "crop"),
                   help="mask post-processing (default: the model's config.json `mask_postprocess`, else medplib)")
    p.add_argument("--quantization", default=None, choices=("8bit", "4bit"),
                   help="bitsandbytes 8-/4-bit decoder layers (CUDA; pip install -r requirements-cuda.txt)")
    p.add_argument("--decode", default="fast", choices=("fast", "plain"),
                   help="decoding loop: fast (static cache, sync-free step, CUDA graphs on CUDA) or plain (reference)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def read_rgb(path: str, frame: int | None = None) -> np.ndarray:
    """The image the model receives; `frame` None: the middle slice/frame (`imageio.default_index`, as the portal)."""
    from engine.imageio import ImageReadError, default_index, read_image, to_rgb

    if not Path(path).is_file():
        raise UsageError(f"image not found: {path}")
    try:
        image = read_image(path)
        return to_rgb(image, index=default_index(image) if frame is None else frame)
    except (ImageReadError, IndexError, ValueError) as err:
        raise UsageError(f"cannot read image {path}: {err}") from None


def region_from_args(args: argparse.Namespace, shape: tuple[int, int]) -> np.ndarray | None:
    """Union of the given point squares, box and sketch as one (H, W) bool region mask, or None."""
    from engine.processing import box_mask, point_mask, sketch_mask

    masks: list[np.ndarray] = []
    try:
        for text in args.point:
            x, y = _pair(text, 2, "point")
            masks.append(point_mask(x, y, shape))
        if args.box:
            masks.append(box_mask(*_pair(args.box, 4, "box"), shape))
        if args.sketch:
            masks.append(sketch_mask(_read_sketch(args.sketch, shape)))
    except ValueError as err:
        raise UsageError(str(err)) from None
    return np.logical_or.reduce(masks) if masks else None


def _read_sketch(path: str, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"sketch mask not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L")) > 0
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"cannot read sketch mask {path}: {err}") from None
    if arr.shape != shape:
        raise UsageError(f"sketch mask is {arr.shape[1]}x{arr.shape[0]} but the image is {shape[1]}x{shape[0]}")
    return arr


def answer_json(answer: Answer, mask_png: str | None) -> dict:
    return {
        "answer": answer.text,
        "unfinished": answer_is_unfinished(answer.text),
        "token_ids": list(answer.token_ids),
        "has_mask": answer.has_mask,
        "mask_area": answer.mask_area,
        "mask_png": mask_png,
        "experts": [list(e) for e in answer.experts],
        "timings_ms": dict(answer.timings_ms),
    }


def save_mask(mask: np.ndarray, path: str, *, image: str = "", frame: int = 0, rgb: np.ndarray | None = None,
              question: str = "", model_name: str = "") -> str:  # fmt: skip
    """PNG (0/255), or DICOM SEG for `.dcm` (on the source grid for DICOM input, else over a Secondary Capture)."""
    if path.lower().endswith(".dcm"):
        from engine.dicomseg import SegExportError, write_seg_for_dicom, write_seg_for_display
        from engine.imageio import sniff_kind
        from engine.volume import segment_label

        label = segment_label(question)
        try:
            if image and sniff_kind(Path(image)) == "dicom":
                write_seg_for_dicom(image, mask, path, label=label, frame=frame, model_name=model_name)
            else:
                write_seg_for_display(rgb, mask, path, label=label, model_name=model_name)
        except SegExportError as err:
            raise UsageError(str(err)) from None
        return path
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)
    return path


def run_ask(args: argparse.Namespace) -> int:
    from engine.loading import ModelNotFoundError, load_engine

    rgb = read_rgb(args.image, args.frame)
    region = region_from_args(args, rgb.shape[:2])
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    try:
        eng = load_engine(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                          postprocess=args.postprocess, decode=args.decode, quantization=args.quantization)
    except ModelNotFoundError as err:
        raise UsageError(str(err)) from None
    except RuntimeError as err:  # quantisation without CUDA or bitsandbytes: the message says what to install
        raise UsageError(str(err)) from None
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  seed=args.seed, force_answer=args.force_answer, template=args.template)
    image = eng.set_image(rgb)
    try:
        stream = eng.stream(image, args.question, region=region, settings=settings)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for piece in stream:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    answer = stream.result
    mask_png = None
    if args.save_mask and answer.has_mask:
        mask_png = save_mask(answer.mask, args.save_mask, image=args.image, frame=args.frame, rgb=rgb,
                             question=args.question, model_name=eng.info.name)  # fmt: skip
    if args.json:
        print(json.dumps(answer_json(answer, mask_png)))
    else:
        print()
        if answer_is_unfinished(answer.text):
            print(UNFINISHED_NOTICE)
        print(f"[mask: {answer.mask_area} px{' → ' + mask_png if mask_png else ''}]" if answer.has_mask
              else "[no <SEG> in the answer: no mask]")
    return 0


def add_volume_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment-volume", help="segment a structure on every slice of a NIfTI volume or DICOM series")
    p.add_argument("--image", required=True, help="NIfTI volume, multi-frame DICOM file, or a folder of one series")
    p.add_argument("--question", required=True, help='e.g. "Please segment the brain in this image."')
    p.add_argument("--plane", default="axial", choices=("axial", "coronal", "sagittal"), help="NIfTI slicing plane")
    p.add_argument("--save-mask", required=True, metavar="OUT.nii.gz|OUT.dcm",
                   help="3-D mask on the source grid; .dcm: a DICOM SEG on the DICOM series, or for NIfTI over a "
                        "Secondary Capture series of the slices written in OUT-source-sc/")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_segment_volume(args: argparse.Namespace) -> int:
    """3-D mask on the source grid; prints slices, time per slice and the volume in mL."""
    from tqdm import tqdm

    from engine.dicomseg import SegExportError, series_folder
    from engine.imageio import ImageReadError, read_image, sniff_kind
    from engine.loading import ModelNotFoundError, load_engine
    from engine.volume import VolumeError, nifti_affine, save_volume_mask, segment_dicom, segment_loaded_nifti

    path = Path(args.image)
    if not path.exists():
        raise UsageError(f"image not found: {args.image}")
    try:
        eng = load_engine(args.model, device=args.device, dtype=args.dtype)
    except ModelNotFoundError as err:
        raise UsageError(str(err)) from None
    bar = tqdm(desc="slices", unit="slice", disable=args.json, leave=False)

    def progress(done: int, total: int) -> bool:
        bar.total = total
        bar.update(done - bar.n)
        return True

    try:
        if path.is_file() and sniff_kind(path) == "nifti":
            image = read_image(path)
            result = segment_loaded_nifti(eng, image, nifti_affine(path), args.question, plane=args.plane,
                                          key=str(path), progress=progress)  # fmt: skip
            sources = None
        else:
            image, (result, sources) = None, segment_dicom(eng, path, args.question, progress=progress)
        out = save_volume_mask(result, args.save_mask, sources=sources, image=image, model_name=eng.info.name)
    except (VolumeError, SegExportError, ImageReadError, ValueError) as err:
        raise UsageError(str(err)) from None
    finally:
        bar.close()
    summary = volume_json(result, str(out))
    if image is not None and out.suffix == ".dcm":
        summary["secondary_capture"] = str(series_folder(out))
    if args.json:
        print(json.dumps(summary))
    else:
        ml = "unknown (no voxel size)" if result.volume_ml is None else f"{result.volume_ml:.2f} mL"
        sc = f" (over the Secondary Captures in {summary['secondary_capture']})" if "secondary_capture" in summary else ""
        print(f"{result.n_slices} slices ({result.slices_with_mask} with mask), shape {list(result.mask.shape)}, "
              f"volume {ml}, {result.seconds_per_slice:.3f} s per slice -> {out}{sc}")  # fmt: skip
    return 0


def volume_json(result: object, out: str) -> dict:
    """The `segment-volume --json` record."""
    return {
        "mask": out, "shape": list(result.mask.shape), "n_slices": result.n_slices,
        "slices_with_mask": result.slices_with_mask, "voxels": int(result.mask.sum()),
        "volume_ml": result.volume_ml, "seconds_per_slice": round(result.seconds_per_slice, 4),
        "plane": result.plane, "label": result.label,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description="MedPLIB inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_ask_parser(sub)
    add_volume_parser(sub)
    try:
        from engine.evaluate import add_evaluate_parser, run_evaluate
    except ImportError:
        add_evaluate_parser = run_evaluate = None
    if add_evaluate_parser is not None:
        add_evaluate_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "ask":
            return run_ask(args)
        if args.command == "segment-volume":
            return run_segment_volume(args)
        return run_evaluate(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
