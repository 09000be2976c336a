"""Parity with the original MedPLIB code: the golden tiny checkpoint through our public loader, fp32 CPU.

Tolerances are the golden README's §7: ids and pixels exact, hidden states / logits / router logits 1e-4,
mask logits 1e-4, binary masks exact except the pixels it lists as within 1e-4 of the threshold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import load_engine
from engine.results import GenerationSettings

ATOL = 1e-4
GROUNDING_Q = "Please segment the liver in this image."
VQA_Q = "What modality is used to take this image?"
LOGIT_THRESHOLD = float(np.log(0.1 / 0.9))


@pytest.fixture(scope="module")
def engine(golden_dir: Path):
    return load_engine(golden_dir / "tiny-medplib-ref", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def npz_a(golden_dir: Path):
    return np.load(golden_dir / "a_grounding.npz")


@pytest.fixture(scope="module")
def npz_c(golden_dir: Path):
    return np.load(golden_dir / "c_vqa.npz")


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _masks_agree(mask: np.ndarray, ref_binary: np.ndarray, ref_logits: np.ndarray) -> None:
    near = np.abs(ref_logits - LOGIT_THRESHOLD) < ATOL
    assert mask.shape == ref_binary.shape
    assert np.array_equal(mask[~near], ref_binary.astype(bool)[~near])


def test_greedy_grounding_reproduces_ids_and_mask(engine, npz_a, golden_dir: Path) -> None:
    image = engine.set_image(_rgb(golden_dir / "inputs" / "a_grounding_300x200.png"))
    answer = engine.ask(image, GROUNDING_Q, settings=GenerationSettings(template="vicuna_v1", max_new_tokens=8))
    expected = json.loads((golden_dir / "a_grounding.json").read_text())["eval_generated_ids"]
    assert list(answer.token_ids) == expected == [1000, 2]
    assert answer.text == ""  # the answer is only <SEG></s>; the user-facing text hides <SEG>
    np.testing.assert_allclose(answer.low_res_logits, npz_a["eval_low_res_masks"][0, 0], atol=ATOL)
    np.testing.assert_allclose(answer.mask_logits, npz_a["eval_pred_mask_logits"][0], atol=ATOL)
    _masks_agree(answer.mask, npz_a["eval_pred_mask_binary"][0], npz_a["eval_pred_mask_logits"][0])


def test_greedy_vqa_reproduces_ids(engine, npz_c, golden_dir: Path) -> None:
    image = engine.set_image(_rgb(golden_dir / "inputs" / "c_vqa_320x320.png"))
    answer = engine.ask(image, VQA_Q, settings=GenerationSettings(template="vicuna_v1", max_new_tokens=8))
    expected = json.loads((golden_dir / "c_vqa.json").read_text())["generated_ids"]
    assert list(answer.token_ids) == expected
    assert answer.mask is None  # no <SEG> → no mask


def test_prefill_tensors_match(engine, npz_a, npz_c) -> None:
    """CLIP features, projected image tokens, post-norm hidden states, router logits and step logits."""
    model = engine.model
    for npz, prefix, n_prefill in ((npz_a, "eval_", 620), (npz_c, "", 621)):
        with torch.inference_mode():
            feats = model.clip_features(torch.from_numpy(npz["images_clip"]))
            tokens = model.project_image(feats)
            hidden, _ = model.llm(model.embed_prompt(npz["input_ids"][0].tolist(), tokens[0]))
            logits = model.logits(hidden[0, -1])
        np.testing.assert_allclose(feats.numpy(), npz[f"{prefix}clip_patch_features"], atol=ATOL)
        np.testing.assert_allclose(tokens.numpy(), npz[f"{prefix}image_features_projected"], atol=ATOL)
        ref_hidden = npz[f"{prefix}final_hidden_concat"][0, :n_prefill]
        np.testing.assert_allclose(hidden[0].numpy(), ref_hidden, atol=ATOL)
        np.testing.assert_allclose(logits.numpy(), npz[f"{prefix}step_logits"][0, 0], atol=ATOL)
        for i, (router, choice) in enumerate(zip(model.llm.router_logits(), model.llm.routing(), strict=True)):
            np.testing.assert_allclose(router[0].numpy(), npz[f"{prefix}router_logits_L{i}"][:n_prefill], atol=ATOL)
            assert np.array_equal(choice[0].numpy(), npz[f"{prefix}router_expert_L{i}"][:n_prefill])


def test_teacher_forced_forward_matches(engine, npz_a) -> None:
    """The training-style forward on prompt + `<SEG></s>`: per-layer outputs, final hidden, routing."""
    model = engine.model
    with torch.inference_mode():
        tokens = model.project_image(model.clip_features(torch.from_numpy(npz_a["images_clip"])))
        ids = npz_a["full_conversation_input_ids"][0].tolist()
        hidden, layers = model.llm(model.embed_prompt(ids, tokens[0]), return_layers=True)
    np.testing.assert_allclose(hidden.numpy(), npz_a["tf_final_hidden"], atol=ATOL)
    for i, out in enumerate(layers):
        np.testing.assert_allclose(out.numpy(), npz_a[f"tf_layer_out_L{i}"], atol=ATOL)
        assert np.array_equal(model.llm.routing()[i][0].numpy(), npz_a[f"tf_router_expert_L{i}"])


def test_forced_seg_answer_matches_teacher_forced_mask(engine, npz_a, golden_dir: Path) -> None:
    image = engine.set_image(_rgb(golden_dir / "inputs" / "a_grounding_300x200.png"))
    settings = GenerationSettings(template="vicuna_v1", force_answer="<SEG>")
    answer = engine.ask(image, GROUNDING_Q, settings=settings)
    assert list(answer.token_ids) == [1000, 2]
    np.testing.assert_allclose(answer.mask_logits, npz_a["tf_pred_mask_logits"][0, 0], atol=ATOL)
    _masks_agree(answer.mask, npz_a["tf_pred_mask_binary"][0, 0], npz_a["tf_pred_mask_logits"][0, 0])
    # experts[layer][t] is the routing at the position that predicted token t (619 predicts <SEG>)
    for i, per_layer in enumerate(answer.experts):
        assert list(per_layer) == npz_a[f"tf_router_expert_L{i}"][619:621].tolist()


def test_cli_forced_seg_json_gives_fixture_ids_and_mask(golden_dir: Path, tmp_path: Path, npz_a) -> None:
    out_png = tmp_path / "mask.png"
    cmd = [sys.executable, "-m", "engine", "ask", "--model", str(golden_dir / "tiny-medplib-ref"),
           "--image", str(golden_dir / "inputs" / "a_grounding_300x200.png"), "--question", GROUNDING_Q,
           "--force-answer", "<SEG>", "--json", "--save-mask", str(out_png),
           "--template", "vicuna_v1"]  # the fixture's template (the CLI's default is the portal's llava_v1)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["token_ids"] == [1000, 2]
    assert "<SEG>" not in result["answer"]
    mask = np.asarray(Image.open(out_png)) > 0
    _masks_agree(mask, npz_a["tf_pred_mask_binary"][0, 0], npz_a["tf_pred_mask_logits"][0, 0])
    assert result["mask_area"] == int(mask.sum()) > 0
    assert result["mask_png"] == str(out_png)
    assert len(result["experts"]) == 2 and all(len(e) == 2 for e in result["experts"])


def test_bf16_run_gives_the_reference_bf16_ids(golden_dir: Path) -> None:
    """Informative in the README (loose tolerance); the generated ids must still agree."""
    eng = load_engine(golden_dir / "tiny-medplib-ref", device="cpu", dtype="bfloat16")
    image = eng.set_image(_rgb(golden_dir / "inputs" / "a_grounding_300x200.png"))
    answer = eng.ask(image, GROUNDING_Q, settings=GenerationSettings(template="vicuna_v1", max_new_tokens=8))
    expected = json.loads((golden_dir / "a_grounding_bf16.json").read_text())["eval_generated_ids"]
    assert list(answer.token_ids) == expected
    ref = np.load(golden_dir / "a_grounding_bf16.npz")["eval_pred_mask_binary"][0].astype(bool)
    assert (answer.mask == ref).mean() > 0.95
