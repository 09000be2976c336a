"""8-bit / 4-bit decoder weights through bitsandbytes (CUDA only; unverified without a GPU).

Only the LLaMA decoder's Linear layers (attention and experts) are swapped; the fp32 router, the vision
towers, SAM-Med2D and lm_head keep their dtype, as bitsandbytes loaders usually skip heads.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_decoder(decoder: nn.Module, mode: str) -> None:
    import bitsandbytes as bnb

    for name, module in list(decoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child_name == "router":
                continue
            device = child.weight.device
            if mode == "8bit":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, new.to(device))
        del name
