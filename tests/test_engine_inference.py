"""The Engine on a tiny random checkpoint: streaming, caching, regions, forced answers, sampling, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import load_engine
from engine.processing import box_mask, point_mask, sketch_mask
from engine.results import GenerationSettings

RNG = np.random.default_rng(3)
IMAGE = RNG.integers(0, 255, size=(120, 200, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    return load_engine(tiny_checkpoint, device="cpu")


def test_stream_pieces_join_to_the_answer_text(engine) -> None:
    image = engine.set_image(IMAGE)
    stream = engine.stream(image, "What is shown?", settings=GenerationSettings(max_new_tokens=12))
    pieces = list(stream)
    assert stream.result is not None
    assert "".join(pieces) == stream.result.text
    assert len(stream.result.token_ids) <= 12
    assert all(len(layer) == len(stream.result.token_ids) for layer in stream.result.experts)
    assert set(stream.result.timings_ms) >= {"clip", "prefill", "decode", "total"}


def test_image_embeddings_are_computed_once_per_image(engine, monkeypatch) -> None:
    image = engine.set_image(IMAGE)
    calls = []
    original = engine.model.sam.encode_image
    monkeypatch.setattr(engine.model.sam, "encode_image", lambda px: calls.append(1) or original(px))
    forced = GenerationSettings(force_answer="<SEG>")
    first = engine.ask(image, "Segment the lesion.", settings=forced)
    second = engine.ask(image, "Segment it again.", history=[("Segment the lesion.", first.text)], settings=forced)
    assert calls == [1]
    assert first.mask is not None and second.mask is not None
    assert first.mask.shape == IMAGE.shape[:2]


def test_forced_seg_always_gives_a_mask_and_plain_answers_may_not(engine) -> None:
    image = engine.set_image(IMAGE)
    forced = engine.ask(image, "Segment the lesion.", settings=GenerationSettings(force_answer="<SEG>"))
    assert forced.token_ids == (engine.tokenizer.seg_token_id, engine.tokenizer.eos_id)
    assert forced.mask is not None and forced.mask.dtype == bool
    assert forced.mask_logits.shape == IMAGE.shape[:2] and forced.low_res_logits.shape == (64, 64)
    plain = engine.ask(image, "Describe.", settings=GenerationSettings(max_new_tokens=4))
    if engine.tokenizer.seg_token_id not in plain.token_ids:
        assert plain.mask is None and plain.mask_area == 0


@pytest.mark.parametrize("region", [
    point_mask(50, 60, IMAGE.shape[:2]),
    box_mask(10, 20, 90, 100, IMAGE.shape[:2]),
    sketch_mask(np.pad(np.ones((10, 40), bool), ((40, 70), (60, 100)))),
])
def test_region_prompts_give_reproducible_answers(engine, region) -> None:
    image = engine.set_image(IMAGE)
    settings = GenerationSettings(max_new_tokens=6, seed=1)
    with_region = engine.ask(image, "What is in <region>?", region=region, settings=settings)
    again = engine.ask(image, "What is in <region>?", region=region, settings=settings)
    assert with_region.token_ids == again.token_ids
    assert with_region.experts == again.experts


def test_sampling_is_reproducible_with_a_seed(engine) -> None:
    image = engine.set_image(IMAGE)
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, seed=11)
    a = engine.ask(image, "Describe.", settings=settings)
    b = engine.ask(image, "Describe.", settings=settings)
    assert a.token_ids == b.token_ids


def test_bad_requests_fail_before_generation(engine) -> None:
    image = engine.set_image(IMAGE)
    with pytest.raises(ValueError, match="empty"):
        engine.stream(image, "   ")
    with pytest.raises(ValueError, match="region mask"):
        engine.stream(image, "What is this?", region=np.ones((5, 5), bool))
    with pytest.raises(ValueError):
        engine.set_image(IMAGE[..., 0])


def test_model_info_describes_what_is_loaded(engine) -> None:
    info = engine.info
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.n_layers == 2 and info.n_experts == 2
    assert info.n_parameters == sum(p.numel() for p in engine.model.parameters())
