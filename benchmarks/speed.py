"""Print load time, peak memory and per-stage latency of the engine on one model.

    .venv/bin/python -m benchmarks.speed [--model M] [--device cpu] [--repeats 3]

Uses a bundled image and three requests: a grounding question (forced `<SEG>`), a greedy answer, and a
follow-up on the same image (its CLIP/SAM embeddings are reused).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from engine import load_engine
from engine.results import GenerationSettings

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "medimages"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bundled_image() -> np.ndarray:
    record = json.loads((ASSETS / "index.json").read_text())[0]
    return np.asarray(Image.open(ASSETS / record["image"]).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    t0 = time.perf_counter()
    eng = load_engine(args.model, device=args.device)
    print(f"model {eng.info.name} on {eng.info.device} ({eng.info.dtype}), {eng.info.n_parameters:,} parameters")
    print(f"load: {time.perf_counter() - t0:.2f} s, peak RSS after load {peak_rss_mb():.0f} MB")
    rgb = bundled_image()
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        image = eng.set_image(rgb)
        rows.setdefault("set_image (CLIP) ms", []).append((time.perf_counter() - t) * 1000)
        seg = eng.ask(image, "Please segment the brain in this image.", settings=GenerationSettings(force_answer="<SEG>"))
        rows.setdefault("forced <SEG> answer + mask ms (incl. SAM encoder)", []).append(seg.timings_ms["total"])
        t = time.perf_counter()
        ans = eng.ask(image, "What modality is this image?", settings=GenerationSettings(max_new_tokens=32))
        dt = time.perf_counter() - t
        rows.setdefault("greedy answer ms", []).append(dt * 1000)
        rows.setdefault("decode tokens/s", []).append(len(ans.token_ids) / max(ans.timings_ms.get("decode", 1) / 1000, 1e-6))
        follow = eng.ask(image, "Please segment the brain in this image.", settings=GenerationSettings(force_answer="<SEG>"))
        rows.setdefault("follow-up <SEG> ms (embeddings reused)", []).append(follow.timings_ms["total"] - follow.timings_ms.get("clip", 0))
    for name, values in rows.items():
        print(f"{name:<52} median {statistics.median(values):9.1f}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
