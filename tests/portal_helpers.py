"""Shared fixtures for the portal tests: the real engine on the golden tiny checkpoint, sample files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "tiny-medplib-ref"
EXAMPLES = REPO / "assets" / "medimages"


def load_test_engine():
    """The golden tiny checkpoint when it is at hand, else the shipped small model (load_engine())."""
    from engine import load_engine

    return load_engine(str(GOLDEN), device="cpu") if GOLDEN.is_dir() else load_engine(device="cpu")


def load_screenshot_engine():
    """The shipped small model when it is present (readable answers for the README screenshot), else golden."""
    from engine import load_engine
    from engine.loading import ModelNotFoundError

    try:
        return load_engine(device="cpu")
    except ModelNotFoundError:
        return load_test_engine()


def portal_context(engine, **settings):
    """A PortalContext with short answers (fast tests) and the bundled examples when present."""
    from portal.context import PortalContext, PortalSettings

    settings.setdefault("max_new_tokens", 6)
    settings.setdefault("examples_dir", EXAMPLES if EXAMPLES.is_dir() else None)
    return PortalContext(engine=engine, settings=PortalSettings(**settings))


def write_png(path: Path, height: int = 90, width: int = 120) -> Path:
    """A synthetic RGB photo: dark background with a bright disc."""
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 4) ** 2
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[disc] = (220, 200, 180)
    Image.fromarray(rgb).save(path)
    return path
