"""8-bit / 4-bit decoder weights through bitsandbytes (`requirements-cuda.txt`).

Swapped: the LLaMA decoder's attention and expert Linear layers. Kept as loaded: the fp32 router, the
embeddings and norms, the vision towers, SAM-Med2D, `text_hidden_fcs` and `lm_head` (bitsandbytes loaders
usually skip heads; the router decides routing and the towers decide the image tokens). Each weight is quantised
on its own device, one layer at a time, so a model on the GPU never takes a round trip through host memory.

8-bit uses LLM.int8() (vector-wise int8; threshold 6.0 adds the fp16 outlier path, which reads outlier columns
back on the host and so cannot be captured in a CUDA graph: the fast decoder then steps eagerly). 4-bit is NF4
with the model's dtype as compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

QUANT_MODES = ("8bit", "4bit")
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8() default


def quantize_decoder(decoder: nn.Module, mode: str, *, compute_dtype: torch.dtype = torch.bfloat16,
                     int8_threshold: float = INT8_OUTLIER_THRESHOLD) -> int:
    """Swap every plain Linear of `decoder` except the MoE routers for a bitsandbytes one; returns how many."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization must be one of {QUANT_MODES}, got {mode!r}")
    swapped = 0
    for module in list(decoder.modules()):
        if getattr(module, "_stacked", None) is not None:
            module._stacked = None  # the MoE's stacked bf16 experts: free them as soon as they are replaced
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or name == "router":
                continue
            new = _to_4bit(child, compute_dtype) if mode == "4bit" else _to_8bit(child, int8_threshold)
            setattr(module, name, new)
            swapped += 1
    return swapped


def _to_4bit(lin: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", module=new)
    new.weight._quantize(lin.weight.device)  # on the weight's device: no host copy
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    return new


def _to_8bit(lin: nn.Linear, threshold: float) -> nn.Module:
    import bitsandbytes as bnb

    new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              has_fp16_weights=False, threshold=threshold, device="meta")
    new.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
    new.weight._quantize(lin.weight.device)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    return new


def is_quantized(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in module.modules())


def graph_capturable(module: nn.Module) -> bool:
    """False when a layer reads device values on the host (LLM.int8()'s outlier path, threshold > 0)."""
    for m in module.modules():
        state = getattr(m, "state", None)
        if type(m).__name__ == "Linear8bitLt" and getattr(state, "threshold", 0.0) > 0.0:
            return False
    return True


def stored_bytes(module: nn.Module) -> int:
    """Bytes a forward of `module` reads for its weights: parameters plus 4-bit quantisation statistics."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for m in module.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += _state_bytes(state)
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def _state_bytes(state: object) -> int:
    total = 0
    for name in ("absmax", "code"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    return total + (_state_bytes(nested) if nested is not None else 0)
