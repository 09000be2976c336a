"""8-/4-bit decoder layers through bitsandbytes (installed from requirements-cuda.txt; skipped without it).

bitsandbytes >= 0.48 also runs on a CPU, so where it is installed these run here too; the GPU figures come from
`benchmarks/gpu_session.sh`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine import load_engine
from engine.decoding import FastDecoder
from engine.quantize import graph_capturable, is_quantized, quantize_decoder, stored_bytes
from engine.results import GenerationSettings

bnb = pytest.importorskip("bitsandbytes")
IMAGE = np.random.default_rng(0).integers(0, 255, size=(96, 96, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantised_decoder_keeps_router_head_and_towers_and_both_loops_agree(mode) -> None:
    eng = load_engine(None, device="cpu", dtype="float32")
    before = stored_bytes(eng.model.llm)
    n = quantize_decoder(eng.model.llm, mode, compute_dtype=torch.float32, int8_threshold=0.0)
    assert n == 2 * (4 + 2 * 3)  # per layer: q, k, v, o and 3 per expert
    assert is_quantized(eng.model.llm) and stored_bytes(eng.model.llm) < before
    assert type(eng.model.lm_head) is nn.Linear and not is_quantized(eng.model.vision_tower)
    assert not is_quantized(eng.model.sam)
    assert all(type(layer.mlp.router) is nn.Linear for layer in eng.model.llm.layers)
    eng.fast = FastDecoder(eng.model)
    settings = GenerationSettings(max_new_tokens=16)
    fast = eng.ask(eng.set_image(IMAGE), "What modality is this image?", settings=settings)
    assert eng.fast.expert_path == "select"  # quantised experts cannot be stacked
    eng.fast = None
    plain = eng.ask(eng.set_image(IMAGE), "What modality is this image?", settings=settings)
    assert fast.token_ids == plain.token_ids and fast.experts == plain.experts


def test_int8_outlier_path_is_not_captured_in_a_cuda_graph() -> None:
    eng = load_engine(None, device="cpu", dtype="float32")
    quantize_decoder(eng.model.llm, "8bit", compute_dtype=torch.float32, int8_threshold=6.0)
    assert not graph_capturable(eng.model.llm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_cuda_quantised_model_decodes_fast_and_4bit_is_captured_in_a_cuda_graph(mode) -> None:
    eng = load_engine(None, device="cuda", dtype="bfloat16", quantization=mode)
    settings = GenerationSettings(max_new_tokens=16)
    fast = eng.ask(eng.set_image(IMAGE), "What modality is this image?", settings=settings)
    assert eng.fast.expert_path == "select"
    assert eng.fast.graphs == ("cuda-graph" if mode == "4bit" else "none")
    if mode == "4bit":
        assert all(b.graph is not None for b in eng.fast._buffers.values())
    fast_engine = eng.fast
    eng.fast = None
    plain = eng.ask(eng.set_image(IMAGE), "What modality is this image?", settings=settings)
    eng.fast = fast_engine
    assert fast.token_ids[:4] == plain.token_ids[:4]  # bf16: the two attention kernels may round differently later
