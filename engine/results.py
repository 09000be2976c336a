"""Frozen result types of the engine's public API.

Everything that leaves the engine is one of these: plain numpy arrays and Python scalars, never torch
tensors, so the portal and the case library can use results without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What is loaded: shown on the portal's banner and in JSON records."""

    name: str  # hub id or folder name
    revision: str | None
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "bfloat16", ...
    n_parameters: int
    n_layers: int
    n_experts: int
    is_demo_model: bool  # True for the shipped small model (not MedPLIB's weights)


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode one answer.

    temperature 0 means greedy (the evaluation setting); > 0 samples with that temperature.
    force_answer teacher-forces the answer text (e.g. "<SEG>") instead of generating it.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    seed: int | None = None
    force_answer: str | None = None
    template: str = "llava_v1"  # engine.conversation.DEFAULT_TEMPLATE; "vicuna_v1": MedPLIB's evaluation scripts


@dataclass(frozen=True)
class Answer:
    """One answer to one question about one image.

    text: the user-facing answer (no `<SEG>`, no `</s>`).
    token_ids: generated ids, `<SEG>` and the final `</s>` included when generated (or the forced ids).
    mask: (H, W) bool at the original image size, or None when no `<SEG>` was produced.
    mask_logits: (H, W) float32 logits at the original size, or None.
    low_res_logits: (64, 64) float32 SAM decoder logits, or None.
    experts: experts[layer][t] = index of the expert that handled generated token t in that layer.
    timings_ms: wall time per stage ("clip", "sam", "prefill", "decode", "mask", "total").
    """

    text: str
    token_ids: tuple[int, ...]
    mask: np.ndarray | None
    mask_logits: np.ndarray | None
    low_res_logits: np.ndarray | None
    experts: tuple[tuple[int, ...], ...]
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    @property
    def mask_area(self) -> int:
        """Mask area in pixels (0 when there is no mask)."""
        return 0 if self.mask is None else int(self.mask.sum())


# Words a finished English sentence does not end on: an answer ending on one of them was cut off or mixed from two
# templates ("The image shows.", "This is a CT image of the.").
DANGLING_WORDS = frozenset({"a", "an", "and", "are", "as", "at", "in", "is", "of", "on", "or", "show", "shows",
                            "the", "to", "with"})


def answer_is_unfinished(text: str) -> bool:
    """True for an empty answer or one whose last word cannot end a sentence (`DANGLING_WORDS`). `<SEG>` and
    other control tokens are not text: pass the user-facing `Answer.text`."""
    words = text.strip().rstrip(".!?;:, ").split()
    return not words or words[-1].lower() in DANGLING_WORDS
