"""The fast decoding loop: same answers as the plain loop, no host sync in the step, prefix reuse across turns."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import load_engine
from engine.decoding import MAX_CACHE_BUFFERS, FastDecoder, PrefixRecord, reusable_positions
from engine.modeling.static_decode import StaticKV, prefill
from engine.processing import box_mask
from engine.results import GenerationSettings
from engine.tokenizer import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "medimages"
QUESTIONS = ("What modality is this image?", "Please segment the body in this image.", "Is there bone in <region>?")


def _bundled(i: int) -> np.ndarray:
    record = json.loads((ASSETS / "index.json").read_text())[i]
    return np.asarray(Image.open(ASSETS / record["image"]).convert("RGB"))


@pytest.fixture(scope="module")
def fast():
    return load_engine(None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def plain():
    return load_engine(None, device="cpu", dtype="float32", decode="plain")


def _assert_same_answer(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert a.experts == b.experts
    assert a.text == b.text
    assert (a.mask is None) == (b.mask is None)
    if a.mask is not None:
        np.testing.assert_allclose(a.mask_logits, b.mask_logits, atol=1e-4)
        near = np.abs(b.mask_logits - np.log(0.1 / 0.9)) < 1e-4
        assert np.array_equal(a.mask[~near], b.mask[~near])


def test_loading_runs_nothing_on_the_device_until_the_first_answer() -> None:
    """ZeroGPU allows CUDA work only inside its decorated calls: building the engine must not stack experts."""
    eng = load_engine(None, device="cpu", dtype="float32")
    assert eng.fast.expert_path == "" and all(layer.mlp._stacked is None for layer in eng.model.llm.layers)
    eng.ask(eng.set_image(_bundled(0)), "What modality is this image?", settings=GenerationSettings(max_new_tokens=2))
    assert eng.fast.expert_path == "gather"


@pytest.mark.parametrize("image_index", [0, 3])
def test_fast_loop_gives_the_plain_loops_ids_routing_and_mask_on_the_shipped_model(fast, plain, image_index) -> None:
    rgb = _bundled(image_index)
    region = box_mask(20, 20, 90, 90, rgb.shape[:2])
    settings = GenerationSettings(max_new_tokens=40)
    seen_seg = False
    for question in QUESTIONS:
        kwargs = {"region": region} if "<region>" in question else {}
        a = fast.ask(fast.set_image(rgb), question, settings=settings, **kwargs)
        b = plain.ask(plain.set_image(rgb), question, settings=settings, **kwargs)
        _assert_same_answer(a, b)
        seen_seg |= a.mask is not None
    assert seen_seg, "the segmentation question should have produced <SEG> and a mask"


def test_sampled_answers_match_the_plain_loop(fast, plain) -> None:
    settings = GenerationSettings(max_new_tokens=24, temperature=0.8, seed=5)
    rgb = _bundled(1)
    a = fast.ask(fast.set_image(rgb), "Describe the image.", settings=settings)
    b = plain.ask(plain.set_image(rgb), "Describe the image.", settings=settings)
    assert a.token_ids == b.token_ids and a.experts == b.experts


def test_fast_and_plain_loops_reproduce_the_golden_ids_and_mask(golden_dir: Path) -> None:
    rgb = np.asarray(Image.open(golden_dir / "inputs" / "a_grounding_300x200.png").convert("RGB"))
    expected = json.loads((golden_dir / "a_grounding.json").read_text())["eval_generated_ids"]
    answers = []
    for decode in ("fast", "plain"):
        eng = load_engine(golden_dir / "tiny-medplib-ref", device="cpu", dtype="float32", decode=decode)
        settings = GenerationSettings(template="vicuna_v1", max_new_tokens=8)
        answers.append(eng.ask(eng.set_image(rgb), "Please segment the liver in this image.", settings=settings))
    assert list(answers[0].token_ids) == expected
    _assert_same_answer(*answers)


def test_cli_decode_fast_and_plain_print_the_same_answer(golden_dir: Path) -> None:
    outs = []
    for decode in ("fast", "plain"):
        cmd = [sys.executable, "-m", "engine", "ask", "--model", str(golden_dir / "tiny-medplib-ref"), "--image",
               str(golden_dir / "inputs" / "c_vqa_320x320.png"), "--question", "What modality is used to take this image?",
               "--max-new-tokens", "8", "--decode", decode, "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    expected = json.loads((golden_dir / "c_vqa.json").read_text())["generated_ids"]
    assert outs[0]["token_ids"] == outs[1]["token_ids"] == expected
    assert outs[0]["experts"] == outs[1]["experts"]


# ---- no host synchronisation -----------------------------------------------------------------------------
def _step_inputs(fast_decoder: FastDecoder, capacity: int = 768):
    fast_decoder.prepare()
    llm = fast_decoder.model.llm
    kv = StaticKV.allocate(llm, capacity, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    hidden = prefill(llm, torch.randn(1, 600, llm.hf_config.hidden_size), kv, start=0)
    token = fast_decoder.model.logits(hidden[0, -1]).argmax().view(1, 1)
    return token, torch.tensor([600]), kv


def test_decode_step_compiles_with_fullgraph_and_no_graph_breaks(fast) -> None:
    """fullgraph=True fails on any graph break, and `.item()`, `.nonzero()` or a branch on a value break graphs."""
    step = fast.fast.step
    with torch.inference_mode():
        token, pos, kv = _step_inputs(fast.fast)
        explained = torch._dynamo.explain(step)(token.clone(), pos.clone(), kv.keys.clone(), kv.values.clone())
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        keys, values = kv.keys.clone(), kv.values.clone()
        t2, p2 = token.clone(), pos.clone()
        got = compiled(t2, p2, keys, values)
        want = step(token, pos, kv.keys, kv.values)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[2], want[2]) and torch.equal(t2, token) and int(p2) == int(pos) == 601
    torch.testing.assert_close(keys, kv.keys)


@pytest.mark.slow
def test_decode_step_compiles_with_inductor(fast) -> None:
    """The default backend (inductor, C++ on CPU) accepts the step as one graph and gives the same step."""
    torch._dynamo.reset()
    with torch.inference_mode():
        token, pos, kv = _step_inputs(fast.fast, capacity=640)
        compiled = torch.compile(fast.fast.step, fullgraph=True)
        t0 = time.perf_counter()
        got = compiled(token.clone(), pos.clone(), kv.keys.clone(), kv.values.clone())
        want = fast.fast.step(token, pos, kv.keys, kv.values)
    assert time.perf_counter() - t0 < 600
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[2], want[2])


def test_moe_step_never_reads_tensor_values_on_the_host(fast, monkeypatch) -> None:
    """The plain MoE's `.nonzero()` and `int(choice)` were host syncs per layer and token: the step has none."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError("host read of a device value in the decode step")

    with torch.inference_mode():
        token, pos, kv = _step_inputs(fast.fast)
        for name in ("item", "nonzero", "tolist", "__bool__", "__int__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, forbidden)
        for path in ("gather", "grouped", "select"):
            fast.fast.step.expert_path = path
            try:
                fast.fast.step(token.clone(), pos.clone(), kv.keys.clone(), kv.values.clone())
            finally:
                fast.fast.step.expert_path = "gather"


def test_the_grouped_expert_probe_accepts_a_working_grouped_mm_and_graphs_need_cuda(fast) -> None:
    fast.fast.prepare()
    assert fast.fast._grouped_works()
    with pytest.raises(ValueError, match="CUDA"):
        FastDecoder(fast.model, graphs="cuda-graph")


def test_every_expert_path_gives_the_same_step(fast) -> None:
    outs = {}
    with torch.inference_mode():
        token, pos, kv = _step_inputs(fast.fast)
        for path in ("gather", "grouped", "select"):
            fast.fast.step.expert_path = path
            outs[path] = fast.fast.step(token.clone(), pos.clone(), kv.keys.clone(), kv.values.clone())
        fast.fast.step.expert_path = "gather"
    for path in ("grouped", "select"):
        torch.testing.assert_close(outs[path][0], outs["gather"][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(outs[path][2], outs["gather"][2])


# ---- prefix reuse ------------------------------------------------------------------------------------------
def test_a_follow_up_prefills_only_its_new_tokens_and_answers_as_a_full_prefill_does(fast, plain) -> None:
    rgb = _bundled(2)
    settings = GenerationSettings(max_new_tokens=40)
    image = fast.set_image(rgb)
    history: list[tuple[str, str]] = []
    for question in ("What modality is this image?", "Is there bone in this image?", "What organ is shown?"):
        answer = fast.ask(image, question, history=history, settings=settings)
        reused = fast.fast.last_reused
        fresh = plain.ask(plain.set_image(rgb), question, history=history, settings=settings)
        _assert_same_answer(answer, fresh)
        if history:
            # everything up to the previous answer's last fed token is reused: > 576 image rows
            assert reused > 576
        history.append((question, answer.text))


def test_forced_answers_reuse_the_prefix_too_and_give_the_plain_loops_mask(fast, plain) -> None:
    rgb = _bundled(1)
    forced = GenerationSettings(force_answer="<SEG>")
    image = fast.set_image(rgb)
    first = fast.ask(image, "Please segment the body in this image.", settings=forced)
    assert fast.fast.last_reused == 0
    history = [("Please segment the body in this image.", first.text)]
    second = fast.ask(image, "Please segment the bone in this image.", history=history, settings=forced)
    assert fast.fast.last_reused > 576
    fresh = plain.ask(plain.set_image(rgb), "Please segment the bone in this image.", history=history, settings=forced)
    _assert_same_answer(second, fresh)
    third = fast.ask(image, "Is there bone?", history=[*history, ("Please segment the bone in this image.", "")],
                     settings=GenerationSettings(max_new_tokens=12))
    assert fast.fast.last_reused > 576
    _assert_same_answer(third, plain.ask(plain.set_image(rgb), "Is there bone?", settings=GenerationSettings(
        max_new_tokens=12), history=[*history, ("Please segment the bone in this image.", "")]))


def test_a_changed_region_is_a_mismatch_at_the_region_slot(fast, plain) -> None:
    """Same question and image, another region: only the positions before `<region>` may be reused."""
    rgb = _bundled(0)
    settings = GenerationSettings(max_new_tokens=16, seed=0)
    image = fast.set_image(rgb)
    box_a = box_mask(10, 10, 60, 60, rgb.shape[:2])
    box_b = box_mask(60, 60, 120, 120, rgb.shape[:2])
    fast.ask(image, "What is in <region>?", region=box_a, settings=settings)
    answer_b = fast.ask(image, "What is in <region>?", region=box_b, settings=settings)
    prompt_ids = image._prefix.ids[: image._prefix.ids.index(REGION_TOKEN_INDEX) + 1]
    region_position = len(prompt_ids) - 1 + fast.config.n_image_tokens - 1
    assert 576 < fast.fast.last_reused <= region_position
    fresh = plain.ask(plain.set_image(rgb), "What is in <region>?", region=box_b, settings=settings)
    _assert_same_answer(answer_b, fresh)
    again = fast.ask(image, "What is in <region>?", region=box_b, settings=settings)  # same region: reused past it
    assert fast.fast.last_reused > region_position
    _assert_same_answer(again, fresh)


def test_reusable_positions_rules() -> None:
    img, reg = IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
    vec = torch.ones(1, 8)
    record = PrefixRecord(ids=(1, 5, img, 7, reg, 9, 4, 2), region=vec, n_positions=100 + 6, capacity=256, lease=1)
    n_image = 100
    assert reusable_positions(None, [1, 5, img], None, n_image) == 0
    assert reusable_positions(record, [1, 5, 6], None, n_image) == 2  # diverges before the image
    assert reusable_positions(record, [1, 5, img, 8], None, n_image) == 2 + 100  # after it
    assert reusable_positions(record, [1, 5, img, 7, reg, 9, 4, 2, 3], vec.clone(), n_image) == 106  # all fed
    assert reusable_positions(record, [1, 5, img, 7, reg, 9], vec + 1, n_image) == 4 + 99  # region changed
    assert reusable_positions(record, [1, 5, img, 7, reg, 9], None, n_image) == 4 + 99


def test_a_new_image_never_reuses_another_images_cache(fast) -> None:
    settings = GenerationSettings(max_new_tokens=8)
    fast.ask(fast.set_image(_bundled(0)), "What modality is this image?", settings=settings)
    other = fast.set_image(_bundled(1))
    fast.ask(other, "What modality is this image?", settings=settings)
    assert fast.fast.last_reused == 0


def test_kept_prefixes_use_bounded_memory_and_stale_ones_fall_back_to_a_full_prefill(fast, plain) -> None:
    settings = GenerationSettings(max_new_tokens=8)
    images = [fast.set_image(_bundled(i)) for i in range(2)]
    answers = [fast.ask(im, "What modality is this image?", settings=settings) for im in images]
    # many sessions, few caches: the first image's cache was taken over by the second request
    assert len(fast.fast._buffers) <= MAX_CACHE_BUFFERS
    follow = fast.ask(images[0], "Is there bone?", history=[("What modality is this image?", answers[0].text)],
                      settings=settings)
    assert fast.fast.last_reused == 0
    fresh = plain.ask(plain.set_image(_bundled(0)), "Is there bone?",
                      history=[("What modality is this image?", answers[0].text)], settings=settings)
    _assert_same_answer(follow, fresh)


def test_a_follow_up_that_outgrows_its_cache_copies_the_prefix_and_keeps_the_bound(fast, plain) -> None:
    eng = load_engine(None, device="cpu", dtype="float32")
    eng.fast = FastDecoder(eng.model, max_buffers=1)
    image = eng.set_image(_bundled(0))
    first = eng.ask(image, "What modality is this image?", settings=GenerationSettings(max_new_tokens=4))
    history = [("What modality is this image?", first.text)]
    settings = GenerationSettings(max_new_tokens=400)  # a bigger cache than the first turn's
    second = eng.ask(image, "Is there bone?", history=history, settings=settings)
    assert eng.fast.last_reused > 576 and len(eng.fast._buffers) == 1
    _assert_same_answer(second, plain.ask(plain.set_image(_bundled(0)), "Is there bone?", history=history,
                                          settings=settings))


def test_an_abandoned_stream_leaves_no_reusable_prefix(fast) -> None:
    """A stream the user stops half-way must not leave a record claiming keys/values it never wrote."""
    image = fast.set_image(_bundled(0))
    pieces = iter(fast.stream(image, "What modality is this image?", settings=GenerationSettings(max_new_tokens=30)))
    next(pieces)
    pieces.close()
    assert image._prefix is None
    answer = fast.ask(image, "What modality is this image?", settings=GenerationSettings(max_new_tokens=30))
    assert image._prefix is not None and len(image._prefix.ids) > len(answer.token_ids)


# ---- CUDA (skipped without a GPU) --------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("graphs", ["cuda-graph", "none", "compile"])
def test_cuda_fast_loop_matches_the_plain_loop_in_fp32(graphs) -> None:
    rgb = _bundled(0)
    plain_gpu = load_engine(None, device="cuda", dtype="float32", decode="plain")
    fast_gpu = load_engine(None, device="cuda", dtype="float32", graphs=graphs)
    settings = GenerationSettings(max_new_tokens=40)
    history: list[tuple[str, str]] = []
    for question in QUESTIONS[:2]:
        a = fast_gpu.ask(fast_gpu.set_image(rgb), question, history=history, settings=settings)
        b = plain_gpu.ask(plain_gpu.set_image(rgb), question, history=history, settings=settings)
        _assert_same_answer(a, b)
        history.append((question, a.text))
    if graphs == "cuda-graph":
        assert all(b.graph is not None for b in fast_gpu.fast._buffers.values())


@pytest.mark.gpu
@gpu
def test_cuda_grouped_expert_path_matches_gather_in_bf16() -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm's bf16 kernel needs sm90+")
    eng = load_engine(None, device="cuda", dtype="bfloat16", graphs="none")
    eng.fast.prepare()
    step = eng.fast.step
    llm = eng.model.llm
    with torch.inference_mode():
        kv = StaticKV.allocate(llm, 768, device=torch.device("cuda"), dtype=torch.bfloat16)
        torch.manual_seed(0)
        hidden = prefill(llm, torch.randn(1, 600, llm.hf_config.hidden_size, device="cuda",
                                          dtype=torch.bfloat16), kv, start=0)
        token = eng.model.logits(hidden[0, -1]).argmax().view(1, 1)
        outs = {}
        for path in ("gather", "grouped", "select"):
            step.expert_path = path
            outs[path] = step(token.clone(), torch.tensor([600], device="cuda"), kv.keys.clone(), kv.values.clone())
    for path in ("grouped", "select"):
        torch.testing.assert_close(outs[path][0], outs["gather"][0], atol=2e-2, rtol=2e-2)
        assert torch.equal(outs[path][2], outs["gather"][2])
