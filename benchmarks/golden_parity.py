"""Print how far our engine is from the original MedPLIB code on the golden fixtures (fp32, CPU).

    .venv/bin/python -m benchmarks.golden_parity [--golden ../shared/golden]

Each line: the tensor, the max absolute difference (or "exact"/"N differ" for ids and binary masks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine import load_engine
from engine.processing import clip_preprocess, sam_preprocess
from engine.results import GenerationSettings

GROUNDING_Q = "Please segment the liver in this image."
VQA_Q = "What modality is used to take this image?"
LOGIT_THRESHOLD = float(np.log(0.1 / 0.9))


def row(name: str, value: str) -> None:
    print(f"{name:<42} {value}")


def maxdiff(a: np.ndarray, b: np.ndarray) -> str:
    return f"{float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()):.2e}"


def grounding(eng, golden: Path) -> None:
    npz = np.load(golden / "a_grounding.npz")
    meta = json.loads((golden / "a_grounding.json").read_text())
    rgb = np.asarray(Image.open(golden / "inputs" / "a_grounding_300x200.png").convert("RGB"))
    row("a: CLIP pixels", "exact" if np.array_equal(clip_preprocess(rgb), npz["images_clip"][0]) else "DIFFER")
    row("a: SAM pixels", "exact" if np.array_equal(sam_preprocess(rgb)[0], npz["images_sam"][0]) else "DIFFER")
    model = eng.model
    with torch.inference_mode():
        feats = model.clip_features(torch.from_numpy(npz["images_clip"]))
        hidden, _ = model.llm(model.embed_prompt(npz["input_ids"][0].tolist(), model.project_image(feats)[0]))
    row("a: CLIP patch features", maxdiff(feats.numpy(), npz["eval_clip_patch_features"]))
    row("a: post-norm hidden states (620 rows)", maxdiff(hidden[0].numpy(), npz["eval_final_hidden_concat"][0, :620]))
    for i, logits in enumerate(model.llm.router_logits()):
        row(f"a: router logits L{i}", maxdiff(logits[0].numpy(), npz[f"eval_router_logits_L{i}"][:620]))
    image = eng.set_image(rgb)
    ans = eng.ask(image, GROUNDING_Q, settings=GenerationSettings(template="vicuna_v1", max_new_tokens=8))
    row("a: generated ids", "exact" if list(ans.token_ids) == meta["eval_generated_ids"] else f"{ans.token_ids}")
    row("a: low-res mask logits (64x64)", maxdiff(ans.low_res_logits, npz["eval_low_res_masks"][0, 0]))
    row("a: mask logits at 200x300", maxdiff(ans.mask_logits, npz["eval_pred_mask_logits"][0]))
    ref = npz["eval_pred_mask_binary"][0].astype(bool)
    near = np.abs(npz["eval_pred_mask_logits"][0] - LOGIT_THRESHOLD) < 1e-4
    row("a: binary mask pixels that differ", f"{int((ans.mask != ref).sum())} "
        f"(of which within 1e-4 of the threshold: {int(((ans.mask != ref) & near).sum())})")


def vqa(eng, golden: Path) -> None:
    npz = np.load(golden / "c_vqa.npz")
    meta = json.loads((golden / "c_vqa.json").read_text())
    rgb = np.asarray(Image.open(golden / "inputs" / "c_vqa_320x320.png").convert("RGB"))
    image = eng.set_image(rgb)
    ans = eng.ask(image, VQA_Q, settings=GenerationSettings(template="vicuna_v1", max_new_tokens=8))
    row("c: generated ids (8 greedy steps)", "exact" if list(ans.token_ids) == meta["generated_ids"] else "DIFFER")
    with torch.inference_mode():
        feats = eng.model.clip_features(torch.from_numpy(npz["images_clip"]))
        hidden, _ = eng.model.llm(eng.model.embed_prompt(npz["input_ids"][0].tolist(),
                                                         eng.model.project_image(feats)[0]))
        logits = eng.model.logits(hidden[0, -1])
    row("c: first-step logits", maxdiff(logits.numpy(), npz["first_step_logits"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "golden")
    args = parser.parse_args()
    eng = load_engine(args.golden / "tiny-medplib-ref", device="cpu", dtype="float32")
    grounding(eng, args.golden)
    vqa(eng, args.golden)


if __name__ == "__main__":
    main()
