"""`python -m benchmarks.decode` at tiny size on the CPU: the CI smoke test of the decode benchmark."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.decode import agreement, mask_iou, synthetic_prompt
from engine.presets import random_model_on, released_config
from engine.tokenizer import IMAGE_TOKEN_INDEX

FIELDS = {"size", "device", "dtype", "quant", "decode_tok_s", "decode_tok_s_plain", "speedup", "ttft_ms", "mask_ms",
          "followup_prefill_ms", "followup_prefill_ms_plain", "peak_mem_gb", "weight_bytes_per_token", "hbm_gbps",
          "roofline_fraction", "graph_breaks", "matches_plain"}


def test_tiny_cpu_run_prints_a_table_and_a_json_line_with_every_field() -> None:
    cmd = [sys.executable, "-m", "benchmarks.decode", "--size", "tiny", "--device", "cpu", "--new-tokens", "24",
           "--repeats", "1", "--threads", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) >= FIELDS
    assert any(line.strip().startswith("decode_tok_s ") for line in lines[:-1])
    assert result["size"] == "tiny" and result["device"] == "cpu" and result["quant"] == "none"
    assert result["graph_breaks"] == 0 and result["matches_plain"] is True
    assert result["hbm_gbps"] is None and result["roofline_fraction"] is None
    assert result["followup_reused_positions"] > 576  # the follow-up reused the image and the first turn
    assert result["decode_tok_s"] > 0 and result["followup_prefill_ms"] > 0
    assert 0 < result["weight_bytes_per_token"] < 4 * 3_000_000  # tiny: ~2 MB of fp32 weights per token


def test_synthetic_prompt_has_the_asked_positions_and_one_image() -> None:
    ids = synthetic_prompt(1267, 576, 700, seed=0)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and len(ids) + 575 == 700 and ids[0] == 1


def test_quality_measures() -> None:
    assert agreement([1, 2, 3, 4], [1, 2, 5, 4]) == (0.75, 2)
    assert agreement([1, 2], [1, 2]) == (1.0, 2)
    a = torch.zeros(4, 4, dtype=torch.bool).numpy()
    assert mask_iou(a, a) == 1.0
    b = a.copy()
    b[0, :2] = True
    c = a.copy()
    c[0, 1:3] = True
    assert mask_iou(b, c) == pytest.approx(1 / 3)


def test_released_shapes_build_on_meta_without_memory() -> None:
    """--size 7b-2e's builder gives MedPLIB-7b-2e's parameter count (about 11.7 B, reference/medplib.md)."""
    model = random_model_on(released_config(), device="meta", dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 11.4e9 < n < 12.0e9
    assert model.llm.layers[0].mlp.router.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
