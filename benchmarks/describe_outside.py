"""Print how a model describes images outside its corpus, and how many answers are empty or cut off (issue 20).

    .venv/bin/python -m benchmarks.describe_outside [--model M]

The images: pydicom's CT_small, MR_small, examples_rgb_color and examples_palette read as files (the corpus holds
only resized, windowed cuts of the first two), and scikit-image's camera, astronaut, coffee, chelsea and Hubble deep
field photographs, which no corpus record holds. Each gets the portal's chip "Describe the image." and "What does
this image show?"; `engine.results.answer_is_unfinished` decides what is unfinished (empty, or ending on a word that
cannot end a sentence). The last line is the figure: `unfinished K of N`.
"""

from __future__ import annotations

import argparse

import numpy as np

QUESTIONS = ("Describe the image.", "What does this image show?")
DICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm", "examples_palette.dcm")
PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "hubble_deep_field")


def outside_images() -> dict[str, np.ndarray]:
    """Name -> (H, W, 3) uint8 of every image above, as the portal would read it."""
    from pydicom.data import get_testdata_file
    from skimage import data

    from engine import imageio

    images = {name: imageio.to_rgb(imageio.read_image(get_testdata_file(name, download=False)))
              for name in DICOM_FILES}
    for name in PHOTOS:
        photo = getattr(data, name)()
        images[name] = np.stack([photo] * 3, axis=-1) if photo.ndim == 2 else photo
    return images


def main(argv: list[str] | None = None) -> None:
    from engine import load_engine
    from engine.results import answer_is_unfinished

    parser = argparse.ArgumentParser(prog="python -m benchmarks.describe_outside", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or id (default: the shipped medplib-tiny)")
    args = parser.parse_args(argv)
    eng = load_engine(args.model)
    unfinished = total = 0
    for name, rgb in outside_images().items():
        image = eng.set_image(rgb)
        for question in QUESTIONS:
            text = eng.ask(image, question).text
            bad = answer_is_unfinished(text)
            unfinished, total = unfinished + bad, total + 1
            print(f"{'UNFINISHED ' if bad else ''}{name} | {question} | {text!r}")
    print(f"unfinished {unfinished} of {total}")


if __name__ == "__main__":
    main()
