"""ZeroGPU (Hugging Face Spaces): the `Engine` behind `@spaces.GPU` functions, with the same interface.

On ZeroGPU the model is moved to `cuda` at start-up (outside any decorated function CUDA is emulated) and
every call that touches the GPU runs in a forked worker that holds a GPU for `duration` seconds. What crosses
that boundary is pickled, so this wrapper sends and receives CPU data only: the RGB image, a CPU copy of the
image's cached embeddings, the question, and the engine's numpy `Answer`. Answers stream (ZeroGPU supports
generator functions). Nothing here calls `torch.compile` (ZeroGPU does not support it).

Where `spaces` is absent, or present but not on ZeroGPU, `spaces.GPU` returns the function unchanged and the
embeddings stay on the device: the wrapper then behaves exactly like the plain `Engine`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.inference import check_question, check_rgb, drain
from engine.results import Answer, GenerationSettings

ANSWER_BASE_SECONDS = 20  # CLIP (first question on an image) + prefill + SAM-Med2D + mask, with a margin
ANSWER_SECONDS_PER_TOKEN = 0.06  # eager bf16 decoding of a 7B MoE-LLaMA, with a margin


def spaces_installed() -> bool:
    return importlib.util.find_spec("spaces") is not None


def on_zero_gpu() -> bool:
    """True inside a ZeroGPU Space (the `spaces` package says so from SPACES_ZERO_GPU)."""
    if not spaces_installed():
        return False
    from spaces.config import Config

    return bool(Config.zero_gpu)


def answer_duration(
    image: Any,
    question: str,
    *,
    region: Any = None,
    history: Sequence = (),
    settings: GenerationSettings = GenerationSettings(),
) -> int:
    """Seconds of GPU to reserve for one answer (ZeroGPU's callable `duration`, same arguments as the call)."""
    tokens = settings.max_new_tokens if settings.force_answer is None else 8
    return int(ANSWER_BASE_SECONDS + ANSWER_SECONDS_PER_TOKEN * tokens)


@dataclass
class GpuImage:
    """The portal's handle for one image. `cached` is the engine's ImageHandle (None until the first answer
    encodes the image), on CPU when offloading (ZeroGPU), so the whole handle pickles; it is replaced after each
    answer, so a SAM-Med2D embedding computed there is kept too."""

    rgb: np.ndarray  # (H, W, 3) uint8
    cached: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[:2]


class GpuAnswerStream:
    """Iterate for text pieces; `result` holds the `Answer` once iteration ends (as `engine.AnswerStream`)."""

    def __init__(self, items: Iterator[Any], image: GpuImage) -> None:
        self.result: Answer | None = None
        self._items = items
        self._image = image

    def __iter__(self) -> Iterator[str]:
        for item in self._items:
            if isinstance(item, _Final):
                self.result, self._image.cached = item.answer, item.handle
            else:
                yield item


@dataclass(frozen=True)
class _Final:
    answer: Answer
    handle: Any  # the ImageHandle on CPU, SAM embedding included once computed


class ZeroGPUEngine:
    """`Engine` interface (info, tokenizer, set_image, stream, ask) with the GPU work inside `gpu(...)` functions.

    engine: a loaded `Engine` (on cuda on ZeroGPU); gpu: the decorator factory, `spaces.GPU` by default;
    offload: move cached embeddings to CPU between calls (True on ZeroGPU, where the worker is forked).
    """

    def __init__(
        self, engine: Any, *, gpu: Callable[..., Callable] | None = None, offload: bool | None = None
    ) -> None:
        if gpu is None:
            import spaces

            gpu = spaces.GPU
        self.engine = engine
        self.info = engine.info
        self.tokenizer = engine.tokenizer
        self.offload = on_zero_gpu() if offload is None else offload
        self._answer = gpu(duration=answer_duration)(self._answer_on_gpu)

    def set_image(self, rgb: np.ndarray) -> GpuImage:
        """(H, W, 3) uint8 RGB → a picklable handle. The image is encoded inside the first answer's GPU call
        (one GPU hand-over instead of two) and its embeddings come back on CPU for the next turns."""
        check_rgb(rgb)
        return GpuImage(rgb=rgb)

    def stream(
        self,
        image: GpuImage,
        question: str,
        *,
        region: np.ndarray | None = None,
        history: Sequence[tuple[str, str]] = (),
        settings: GenerationSettings = GenerationSettings(),
    ) -> GpuAnswerStream:
        check_question(question, region, image.shape)
        items = self._answer(image, question, region=region, history=tuple(history), settings=settings)
        return GpuAnswerStream(iter(items), image)

    def ask(
        self,
        image: GpuImage,
        question: str,
        *,
        region: np.ndarray | None = None,
        history: Sequence[tuple[str, str]] = (),
        settings: GenerationSettings = GenerationSettings(),
    ) -> Answer:
        return drain(self.stream(image, question, region=region, history=history, settings=settings))

    # ---- inside the GPU worker ------------------------------------------------------------------------
    def _answer_on_gpu(
        self,
        image: GpuImage,
        question: str,
        *,
        region: np.ndarray | None = None,
        history: Sequence[tuple[str, str]] = (),
        settings: GenerationSettings = GenerationSettings(),
    ) -> Iterator[Any]:
        handle = (
            self._to_device(image.cached) if image.cached is not None else self.engine.set_image(image.rgb)
        )
        stream = self.engine.stream(handle, question, region=region, history=history, settings=settings)
        yield from stream
        yield _Final(answer=stream.result, handle=self._to_host(handle))

    def _to_host(self, handle: Any) -> Any:
        return _move(handle, "cpu") if self.offload else handle

    def _to_device(self, handle: Any) -> Any:
        return _move(handle, self.engine.device) if self.offload else handle


def _move(handle: Any, device: Any) -> Any:
    """A copy of an engine ImageHandle with every tensor field on `device`."""
    changes = {f.name: getattr(handle, f.name).to(device) for f in dataclasses.fields(handle)
               if hasattr(getattr(handle, f.name), "to")}  # fmt: skip
    return dataclasses.replace(handle, **changes)
