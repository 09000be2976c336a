"""Strict loading of the released layout: key table coverage, named key errors, shard formats, dtypes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import load_engine
from engine.loading import ModelNotFoundError, resolve_model
from engine.weights import CheckpointKeyError, is_harmless, ours_to_released, released_to_ours


def _copy_without_weights(src: Path, dst: Path) -> Path:
    """Copy a checkpoint folder without its weights; a CLIP config folder beside it comes along."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    clip = src.parent / "tiny-clip-vit-patch14-336"
    if clip.is_dir() and not (dst.parent / clip.name).exists():
        shutil.copytree(clip, dst.parent / clip.name)
    return dst


def test_every_released_key_maps_and_round_trips(golden_dir: Path) -> None:
    keys = [e["key"] for e in json.loads((golden_dir / "keys.json").read_text())]
    assert len(keys) == 266
    for key in keys:
        ours = released_to_ours(key)
        if ours is None:
            assert is_harmless(key), key
            continue
        assert ours_to_released(ours) == key
    assert released_to_ours("model.layers.31.mlp.deepspeed_moe.gate.wg.weight") == "llm.layers.31.mlp.router.weight"
    assert (released_to_ours("model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.1.down_proj.weight")
            == "llm.layers.0.mlp.experts.1.down_proj.weight")


def test_harmless_buffers_are_listed_not_loaded(golden_dir: Path) -> None:
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    assert is_harmless(inv_freq)
    assert not is_harmless("model.layers.0.self_attn.q_proj.weight")


def test_missing_and_unexpected_keys_are_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_without_weights(tiny_checkpoint, tmp_path / "broken")
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    dropped = "model.layers.1.mlp.deepspeed_moe.gate.wg.weight"
    del state[dropped]
    state["model.layers.0.mlp.bogus_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointKeyError) as err:
        load_engine(folder, device="cpu")
    assert dropped in str(err.value)
    assert "model.layers.0.mlp.bogus_proj.weight" in str(err.value)


def test_shape_mismatch_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_without_weights(tiny_checkpoint, tmp_path / "shape")
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    state["model.mm_projector.0.bias"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointKeyError, match=r"model\.mm_projector\.0\.bias"):
        load_engine(folder, device="cpu")


def test_bin_fallback_and_sharded_index_load_the_same(golden_dir: Path, tmp_path: Path) -> None:
    ref = golden_dir / "tiny-medplib-ref"
    bin_only = _copy_without_weights(ref, tmp_path / "bin")
    shutil.copy(ref / "pytorch_model.bin", bin_only / "pytorch_model.bin")
    sharded = _copy_without_weights(ref, tmp_path / "sharded")
    state = load_file(str(ref / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(sharded / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    engines = [load_engine(f, device="cpu") for f in (ref, bin_only, sharded)]
    params = [dict(e.model.named_parameters()) for e in engines]
    for name, value in params[0].items():
        assert torch.equal(value, params[1][name]) and torch.equal(value, params[2][name]), name


def test_nothing_left_on_meta_and_router_stays_fp32(golden_dir: Path) -> None:
    eng = load_engine(golden_dir / "tiny-medplib-ref", device="cpu", dtype="bfloat16")
    tensors = [*eng.model.named_parameters(), *eng.model.named_buffers()]
    assert not [n for n, t in tensors if t.is_meta]
    router = eng.model.llm.layers[0].mlp.router.weight
    assert router.dtype == torch.float32
    # the reference loads wg in bf16, then upcasts: values are bf16-representable
    assert torch.equal(router, router.to(torch.bfloat16).float())
    assert eng.model.llm.embed_tokens.weight.dtype == torch.bfloat16
    assert eng.info.dtype == "bfloat16"


def test_unknown_model_and_offline_hub_id_give_clear_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        resolve_model("no-such-thing.bin")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model("Huangxs/MedPLIB-7b-2e")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(empty)


def test_released_sizes_build_on_meta_without_allocating(golden_dir: Path, tmp_path: Path) -> None:
    """MedPLIB-7b-2e's sizes (config.json as the release writes it, CLIP-L and SAM ViT-B defaults) build on the
    meta device: ~11.7B parameters, no RAM spent on them."""
    from engine.config import MedPLIBConfig
    from engine.modeling.medplib import MedPLIBModel
    from engine.weights import parameters_on_meta

    raw = json.loads((golden_dir / "tiny-medplib-ref" / "config.json").read_text())
    raw |= {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32267, "mm_hidden_size": 1024, "out_dim": 256,
            "mm_vision_tower": "/author/local/path/clip-vit-large-patch14-336"}
    raw["moe"] |= {"moe_layers_idx": list(range(32)), "num_experts": [2] * 32}
    config = MedPLIBConfig.from_released_dict(raw, folder=tmp_path)
    assert config.clip["hidden_size"] == 1024 and config.sam.encoder_embed_dim == 768
    with parameters_on_meta():
        model = MedPLIBModel(config)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    total = sum(p.numel() for p in params)
    assert 11.6e9 < total < 11.8e9, total


def test_mask_postprocess_default_comes_from_the_model(tiny_checkpoint: Path, tmp_path: Path, golden_dir: Path) -> None:
    """The released checkpoint has no `mask_postprocess` → medplib; our own models may declare "crop"."""
    from engine.config import MedPLIBConfig

    assert MedPLIBConfig.from_folder(golden_dir / "tiny-medplib-ref").postprocess == "medplib"
    folder = _copy_without_weights(tiny_checkpoint, tmp_path / "crop")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"mask_postprocess": "crop"}))
    assert MedPLIBConfig.from_folder(folder).postprocess == "crop"
    assert MedPLIBConfig.from_folder(folder, postprocess="medplib").postprocess == "medplib"
