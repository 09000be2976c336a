"""The inference engine: set an image once, then ask many questions, streamed token by token.

Knows nothing of any UI. Images go in as (H, W, 3) uint8 numpy arrays, answers come out as `Answer`s.
The flow for one question (reference: MedPLIB `evaluate()` and its demo worker):
  prompt text → ids with -200 (image) / -300 (region) → embeddings with the 576 image tokens and the pooled
  region vector spliced in → MoE-LLaMA prefill + cached decoding → if `<SEG>` was produced, the post-norm
  hidden state that predicted it → text_hidden_fcs → SAM-Med2D prompt → 64×64 logits → original size mask.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import MedPLIBConfig
from engine.conversation import build_prompt
from engine.decoding import DECODE_MODES, Decoded, FastDecoder, PrefixRecord, plain_generate
from engine.modeling.medplib import MedPLIBModel
from engine.processing import (
    binarize,
    clip_preprocess,
    pool_region,
    postprocess_masks,
    region_grid,
    sam_preprocess,
)
from engine.results import Answer, GenerationSettings, ModelInfo
from engine.tokenizer import MedPLIBTokenizer


@dataclass
class ImageHandle:
    """One image's cached embeddings; create it with `Engine.set_image`, reuse it for every question.

    clip_features: (576, mm_hidden) CLIP patch features; image_tokens: (576, hidden) projected.
    The SAM-Med2D embedding is computed on the first `<SEG>` and kept. With the fast decoder, the last
    turn's keys/values (`_prefix`) are kept too: a follow-up whose prompt extends the previous prompt and
    answer token for token prefills only its new tokens. The record dies with the handle (a new image); the
    cache memory itself is the engine's, bounded (`decoding.MAX_CACHE_BUFFERS`).
    """

    shape: tuple[int, int]  # (H, W) of the original image
    clip_features: torch.Tensor
    image_tokens: torch.Tensor
    sam_pixels: torch.Tensor  # (1, 3, 256, 256)
    sam_resized_hw: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    _sam_embedding: torch.Tensor | None = None
    _prefix: PrefixRecord | None = None


class AnswerStream:
    """Iterate for text pieces as they are generated; `result` holds the `Answer` once iteration ends."""

    def __init__(self, run: Callable[[AnswerStream], Iterator[str]]) -> None:
        self.result: Answer | None = None
        self._pieces = run(self)  # a generator: nothing runs until the first piece is asked for

    def __iter__(self) -> Iterator[str]:
        return self._pieces


class Engine:
    """MedPLIB inference on one model. Thread-compatible, not thread-safe: serialise calls (the portal does)."""

    def __init__(self, *, model: MedPLIBModel, tokenizer: MedPLIBTokenizer, config: MedPLIBConfig,
                 info: ModelInfo, decode: str = "fast", graphs: str = "auto") -> None:
        """decode: "fast" (static cache, sync-free step, CUDA graphs on CUDA, prefix reuse) or "plain" (one
        eager forward per token, as before; kept for comparison). graphs: see `decoding.FastDecoder`."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.info = info
        self.device = torch.device(info.device)
        self.dtype = next(model.llm.parameters()).dtype
        self.decode = decode
        self.fast = FastDecoder(model, graphs=graphs) if decode == "fast" else None

    # ---- image --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def set_image(self, rgb: np.ndarray) -> ImageHandle:
        """(H, W, 3) uint8 RGB → cached CLIP features (SAM's follow on the first `<SEG>`)."""
        check_rgb(rgb)
        t0 = time.perf_counter()
        pixels = torch.from_numpy(clip_preprocess(rgb))[None].to(self.device, self.dtype)
        feats = self.model.clip_features(pixels)[0]  # (576, mm_hidden)
        tokens = self.model.project_image(feats)  # (576, hidden)
        sam_np, resized = sam_preprocess(rgb)
        sam_pixels = torch.from_numpy(sam_np)[None].to(self.device, self.model.sam_dtype())
        return ImageHandle(shape=rgb.shape[:2], clip_features=feats, image_tokens=tokens, sam_pixels=sam_pixels,
                           sam_resized_hw=tuple(resized), timings_ms={"clip": _ms(t0)})

    def sam_embedding(self, image: ImageHandle) -> torch.Tensor:
        """(1, C, 16, 16) SAM-Med2D image embedding, computed once per image."""
        if image._sam_embedding is None:
            t0 = time.perf_counter()
            with torch.inference_mode():
                image._sam_embedding = self.model.sam.encode_image(image.sam_pixels)
            image.timings_ms["sam"] = _ms(t0)
        return image._sam_embedding

    # ---- questions ----------------------------------------------------------------------------------
    def ask(self, image: ImageHandle, question: str, *, region: np.ndarray | None = None,
            history: Sequence[tuple[str, str]] = (), settings: GenerationSettings = GenerationSettings()) -> Answer:
        return drain(self.stream(image, question, region=region, history=history, settings=settings))

    def stream(self, image: ImageHandle, question: str, *, region: np.ndarray | None = None,
               history: Sequence[tuple[str, str]] = (), settings: GenerationSettings = GenerationSettings()
               ) -> AnswerStream:
        """Start answering; validation errors are raised here, before any piece is yielded."""
        check_question(question, region, image.shape)
        prompt = build_prompt(question, template=settings.template, history=history, has_region=region is not None)
        ids = self.tokenizer.encode_prompt(prompt)
        return AnswerStream(lambda stream: self._run(stream, image, ids, region, settings))

    @torch.inference_mode()
    def _run(self, stream: AnswerStream, image: ImageHandle, ids: list[int], region: np.ndarray | None,
             settings: GenerationSettings) -> Iterator[str]:
        t0 = time.perf_counter()
        timings: dict[str, float] = dict(image.timings_ms)
        region_vector = self._region_vector(image, region, settings)
        embeds = self.model.embed_prompt(ids, image.image_tokens, region_vector)
        decoder = self.tokenizer.streaming_decoder()
        if settings.force_answer is not None:
            decoded = self._teacher_force(image, ids, region_vector, embeds, settings.force_answer)
            timings["prefill"] = _ms(t0)
            tokens: Iterable[int] = decoded.ids
        else:
            decoded = Decoded()
            tokens = self._generate(image, ids, region_vector, embeds, settings, decoded, timings)
        for tok in tokens:
            piece = decoder.push(tok)
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail
        stream.result = self._finish(image, decoded, decoder.text, timings, t0)

    def _region_vector(self, image: ImageHandle, region: np.ndarray | None,
                       settings: GenerationSettings) -> torch.Tensor | None:
        if region is None:
            return None
        grid = region_grid(region)
        if not grid.any():
            raise ValueError("the marked region is too small to reach any 14-px CLIP patch: mark a larger area")
        fmap = self.model.region_feature_map(image.clip_features).float()
        if settings.seed is not None:
            torch.manual_seed(settings.seed)  # the reference demo seeds right before randperm
        return pool_region(fmap, grid, max_points=self.config.max_sample_point)

    def _teacher_force(self, image: ImageHandle, ids: list[int], region: torch.Tensor | None, embeds: torch.Tensor,
                       answer: str) -> Decoded:
        """Feed prompt + forced answer + `</s>` in one causal pass, as training does."""
        forced = self.tokenizer.encode(answer, add_bos=False) + [self.tokenizer.eos_id]
        if self.fast is not None:
            decoded = self.fast.teacher_force(embeds, ids=ids, region=region, prefix=image._prefix, forced=forced)
            image._prefix = decoded.prefix
            return decoded
        extra = self.model.embed_ids(torch.tensor([forced[:-1]], device=self.device))
        hidden, _ = self.model.llm(torch.cat([embeds, extra], dim=1))
        start = embeds.shape[1] - 1  # the position that predicts forced[0]
        routing = self.model.llm.routing()
        return Decoded(
            ids=forced,
            predicting_hidden=list(hidden[0, start:]),
            experts=[r[0, start:].tolist() for r in routing],
        )

    def _generate(self, image: ImageHandle, ids: list[int], region: torch.Tensor | None, embeds: torch.Tensor,
                  settings: GenerationSettings, out: Decoded, timings: dict[str, float]) -> Iterator[int]:
        """Greedy (temperature 0) or sampled decoding; yields each new id as soon as it is on the host."""
        generator = None
        if settings.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(settings.seed if settings.seed is not None else int(time.time_ns() % 2**31))
        common = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                      generator=generator, stop_id=self.tokenizer.eos_id, out=out, timings=timings)
        if self.fast is None:
            yield from plain_generate(self.model, embeds, **common)
            return
        yield from self.fast.generate(embeds, ids=ids, region=region, prefix=image._prefix, **common)
        image._prefix = out.prefix

    def _finish(self, image: ImageHandle, decoded: Decoded, text: str, timings: dict[str, float],
                t0: float) -> Answer:
        seg = self.tokenizer.seg_token_id
        mask = logits = low = None
        if seg in decoded.ids:
            t1 = time.perf_counter()
            low, logits, mask = self._mask(image, decoded.predicting_hidden[decoded.ids.index(seg)])
            timings["mask"] = _ms(t1)
        timings["total"] = _ms(t0) + image.timings_ms.get("clip", 0.0)
        return Answer(text=text, token_ids=tuple(decoded.ids), mask=mask, mask_logits=logits, low_res_logits=low,
                      experts=tuple(tuple(e) for e in decoded.experts), timings_ms=timings)

    def _mask(self, image: ImageHandle, hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hidden state that predicted `<SEG>` → (low-res (64,64), logits (H,W), bool mask (H,W))."""
        emb = self.model.seg_embedding(hidden).to(self.model.sam_dtype())
        low, _iou = self.model.sam.decode_with_text(self.sam_embedding(image), emb)
        full = postprocess_masks(low.float(), image.sam_resized_hw, image.shape, mode=self.config.postprocess)
        logits = full[0, 0]
        mask = binarize(logits, threshold=self.config.mask_threshold)
        return low[0, 0].float().cpu().numpy(), logits.cpu().numpy(), np.asarray(mask.cpu().numpy(), dtype=bool)


def check_rgb(rgb: np.ndarray) -> None:
    """ValueError unless `rgb` is an (H, W, 3) uint8 RGB image (every engine front: local, ZeroGPU, Ray)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")


def check_question(question: str, region: np.ndarray | None, shape: tuple[int, int]) -> None:
    """ValueError for an empty question or a region mask whose shape is not the image's (H, W)."""
    if not question or not question.strip():
        raise ValueError("the question is empty: type a question about the image")
    if region is not None and region.shape != shape:
        raise ValueError(f"the region mask is {region.shape} but the image is {shape}")


def drain(stream) -> Answer:
    """Read an answer stream (any engine's) to its end and return its `Answer`: `ask` on top of `stream`."""
    for _ in stream:
        pass
    assert stream.result is not None
    return stream.result


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 2)
