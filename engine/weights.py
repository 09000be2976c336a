"""Strict loading (and saving) of checkpoints in the released MedPLIB-7b-2e layout.

One declared table maps released key prefixes onto our module names. The model is built with parameters on
the meta device and the checkpoint tensors are assigned in place, so a 24 GB checkpoint never sits in RAM
twice. Every missing or unexpected key is named in the error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger(__name__)

# (released prefix, our prefix); {i} = layer index, {k} = expert index. First match wins.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("model.layers.{i}.mlp.deepspeed_moe.gate.wg.", "llm.layers.{i}.mlp.router."),
    ("model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{k}.", "llm.layers.{i}.mlp.experts.{k}."),
    ("model.layers.{i}.", "llm.layers.{i}."),
    ("model.embed_tokens.", "llm.embed_tokens."),
    ("model.norm.", "llm.norm."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),  # transformers 5 CLIPVisionModel is flat
    ("model.mm_projector.", "mm_projector."),
    ("model.region_fea_adapter.", "region_fea_adapter."),
    ("model.text_hidden_fcs.0.", "text_hidden_fcs."),
    ("model.visual_model.", "sam."),
    ("lm_head.", "lm_head."),
)

# Buffers the released checkpoint may carry that we recompute: listed, and skipped when present.
HARMLESS_RELEASED_KEYS: tuple[str, ...] = (
    r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",  # persistent in transformers 4.31
    r"^model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$",
)

ROUTER_SUFFIX = ".mlp.router.weight"


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{k\}", r"(?P<k>\d+)")
    return re.compile("^" + pattern)


_FORWARD = [(_template_regex(src), dst) for src, dst in KEY_TABLE]
_BACKWARD = [(_template_regex(dst), src) for src, dst in KEY_TABLE]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for regex, target in table:
        m = regex.match(key)
        if m:
            return target.format(**m.groupdict()) + key[m.end():]
    return None


def released_to_ours(key: str) -> str | None:
    """`model.layers.3.mlp.deepspeed_moe.gate.wg.weight` -> `llm.layers.3.mlp.router.weight` (None: unmapped)."""
    return _rename(key, _FORWARD)


def ours_to_released(key: str) -> str | None:
    return _rename(key, _BACKWARD)


def is_harmless(key: str) -> bool:
    return any(re.match(p, key) for p in HARMLESS_RELEASED_KEYS)


class CheckpointKeyError(RuntimeError):
    """Raised when the checkpoint's keys do not match the model: every offending key is named."""


# ---- reading shards ---------------------------------------------------------------------------------------
def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: safetensors (with or without an index), else .bin shards."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not on disk: {missing}")
            return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        raise FileNotFoundError(
            f"no weights in {folder}: expected model*.safetensors (with or without an index) or pytorch_model*.bin"
        )
    return shards


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (released key, tensor) one at a time; .bin shards are read with weights_only=True."""
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield key, f.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


# ---- building on meta and assigning -----------------------------------------------------------------------
@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create nn.Parameters on the meta device (buffers stay real), so building a 12B model costs no RAM."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def target_dtype(our_key: str, dtype: torch.dtype) -> torch.dtype:
    """The router stays in fp32 (DeepSpeed evaluates the gate in fp32); everything else takes `dtype`."""
    return torch.float32 if our_key.endswith(ROUTER_SUFFIX) else dtype


def convert(our_key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    if our_key.endswith(ROUTER_SUFFIX) and dtype == torch.bfloat16:
        # The reference loads wg in the model dtype (bf16) and upcasts it at the first gate call.
        return tensor.to(torch.bfloat16).to(torch.float32)
    return tensor.to(target_dtype(our_key, dtype))


def load_released_state(model: nn.Module, files: list[Path], *, dtype: torch.dtype, device: str) -> list[str]:
    """Assign every checkpoint tensor to `model` (built under `parameters_on_meta`), strictly.

    Returns the harmless released keys that were skipped. Raises CheckpointKeyError naming every missing
    and unexpected key, and every shape mismatch.
    """
    expected = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    unexpected: list[str] = []
    skipped: list[str] = []
    mismatched: list[str] = []
    for key, tensor in iter_tensors(files):
        ours = released_to_ours(key)
        if ours is None or ours not in expected:
            (skipped if is_harmless(key) else unexpected).append(key)
            continue
        if tuple(expected[ours].shape) != tuple(tensor.shape):
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[ours].shape)}")
            continue
        _assign(model, ours, convert(ours, tensor, dtype).to(device))
        seen.add(ours)
    missing = [ours_to_released(k) or k for k in expected if k not in seen]
    _raise_on_key_errors(missing, unexpected, mismatched)
    return skipped


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _raise_on_key_errors(missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    if not (missing or unexpected or mismatched):
        return
    lines = ["the checkpoint does not match the model:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            lines.append(f"  {title} ({len(keys)}): " + ", ".join(sorted(keys)[:50]) + (" ..." if len(keys) > 50 else ""))
    lines.append("Is this a MedPLIB checkpoint in the released layout (see engine/weights.py KEY_TABLE)?")
    raise CheckpointKeyError("\n".join(lines))


def finish_on_device(model: nn.Module, *, dtype: torch.dtype, device: str) -> None:
    """Move the recomputed buffers (RoPE, CLIP position ids, ...) to the device and check nothing is on meta."""
    for name, buf in list(model.named_buffers()):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        keep = buf if not buf.is_floating_point() or "rotary" in name else buf.to(target_dtype(name, dtype))
        module._buffers[leaf] = keep.to(device)
    on_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if on_meta:
        raise CheckpointKeyError(f"tensors left on the meta device after loading: {on_meta[:20]}")


# ---- saving -----------------------------------------------------------------------------------------------
def released_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict under the released key names (what `save_released` writes)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        released = ours_to_released(key)
        if released is None:
            raise CheckpointKeyError(f"no released name for {key}: add it to KEY_TABLE")
        out[released] = tensor.detach().contiguous().cpu()
    return out


def save_released(model: nn.Module, folder: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write `model.safetensors` in the released layout (router and SAM kept fp32 as in the release)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in released_state_dict(model).items():
        keep_fp32 = ".deepspeed_moe.gate." in key or key.startswith(("model.visual_model.", "model.text_hidden_fcs."))
        state[key] = tensor if keep_fp32 or not tensor.is_floating_point() else tensor.to(dtype)
    path = folder / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path
