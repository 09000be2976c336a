"""Scale-out on Ray Serve: the engine as a Serve deployment, and `RemoteEngine`, the portal's client for it.

`engine_app(options)` is a Serve application whose replicas (CPU or GPU) each hold one loaded `Engine`; give it a
fixed replica count or an autoscaling range. `RemoteEngine` has the local `Engine`'s interface (`info`,
`tokenizer`, `set_image` → handle, `stream` → iterate pieces then `.result`, `ask`), so the portal and the quiz
use it unchanged.

Cache affinity: an image's key is a hash of its pixels, sent as Serve's multiplexed model id. The replica that
encoded the image keeps its CLIP (and SAM-Med2D) embeddings in a multiplexed slot, and the router sends later
requests with the same id to it. Follow-ups go without their pixels; a replica that does not hold the image
(evicted, or a replacement) answers ImageNotCached and the request is sent again with them, so a lost or
evicted replica costs one encoding, never an answer. Each reply says whether the replica had the
image cached; `RemoteEngine.stats` counts them. A request that dies with its replica is retried.

Requires `ray[serve]` (requirements-serve.txt). Start a deployment with `python -m engine.serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Ray Serve's throughput-optimised mode (Ray >= 2.56; "Enable High Throughput on Ray Serve" in Ray's docs): gRPC
# between handles and replicas instead of Ray's object transport, user code on the replica's own event loop, buffered
# request logs. The router keeps its own event loop, since the portal and the quiz call from worker threads, not
# from an event loop. Serve reads these when `ray.serve` is imported, so they are set first, here; the replicas get
# them through their runtime_env (`ServeOptions.deployment_options`), whichever way the cluster was started. On this
# project's 2-core machine they cut the client's CPU per answer from about 5 to 3 ms (benchmarks/scale.py). An
# environment that sets them otherwise wins.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}
for _name, _value in THROUGHPUT_ENV.items():
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402
from ray.serve.request_router import (  # noqa: E402
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from engine.inference import check_question, check_rgb  # noqa: E402
from engine.results import Answer, GenerationSettings, ModelInfo  # noqa: E402

log = logging.getLogger(__name__)

APP_NAME = "medplib"
DEPLOYMENT_NAME = "MedPLIBEngine"
IMAGES_PER_REPLICA = 64  # cached image embeddings per replica (LRU); a 7B's are ~5 MB each in bf16
RETRIES = 3  # a request whose replica died is sent again (to a live replica) this many times
_RETRYABLE = (RayActorError, ActorUnavailableError)


@dataclass(frozen=True)
class ServeOptions:
    """How to deploy: the model (as `load_engine` takes it) and the replicas.

    replicas: fixed replica count; autoscale=(min, max) replaces it with Serve autoscaling that targets
    `target_ongoing_requests` requests per replica. num_gpus: GPUs per replica (0 = a CPU replica).
    """

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 64  # queued at the replica that holds the image rather than re-routed
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int | None = None  # e.g. 1 for several CPU replicas on one machine
    graceful_shutdown_s: float = 120.0  # a replica being scaled down finishes its answers first
    warm_up: bool = True  # answer one blank-image question at start-up, so no student pays first-call costs

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] >= 1:
            raise ValueError(
                f"autoscale must be (min, max) with 0 <= min <= max and max >= 1, got {self.autoscale}"
            )

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `serve.deployment(...)`."""
        scaling: dict[str, Any] = {"num_replicas": self.replicas}
        if self.autoscale is not None:
            scaling = {"autoscaling_config": {
                "min_replicas": self.autoscale[0], "max_replicas": self.autoscale[1],
                "target_ongoing_requests": self.target_ongoing_requests,
            }}  # fmt: skip
        return {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_s,
            "graceful_shutdown_wait_loop_s": min(2.0, self.graceful_shutdown_s),
            "request_router_config": RequestRouterConfig(request_router_class=ImageAffinityRouter),
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                "runtime_env": {"env_vars": {name: os.environ[name] for name in THROUGHPUT_ENV}},
            },
            **scaling,
        }


class ImageAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Serve's request router for the engine: a question goes to the replica that holds its image.

    Ranks, best first: the replica this router sent the image to before, or any replica that Serve's multiplexing
    reports as holding it (those reports lag by ~0.1 s); then, for a new image, the live replica that this router
    has given the fewest images (an even share of students per replica, where Serve's default would count
    reported images); the other replicas last, so a full or dead replica never blocks a request.
    """

    def initialize_state(self, remembered: int = 100_000) -> None:
        self._placed: OrderedDict[str, Any] = OrderedDict()  # image key → replica id (LRU)
        self._images: Counter[Any] = Counter()  # replica id → images placed there
        self._remembered = remembered

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:  # fmt: skip
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        by_id = {r.replica_id: r for r in candidate_replicas}
        holders = [self._placed.get(key)] if key else []
        holders += sorted(self._multiplexed_model_id_to_replica_ids.get(key, ()), key=str) if key else []
        first = [by_id[i] for i in dict.fromkeys(holders) if i in by_id]
        if not first and candidate_replicas:
            first = [min(candidate_replicas, key=lambda r: (self._images[r.replica_id], str(r.replica_id)))]
            if key:
                self._place(key, first[0].replica_id)
        rest = [r for r in candidate_replicas if r not in first]
        return [rank for rank in (first, rest) if rank]

    def _place(self, key: str, replica_id: Any) -> None:
        """Remember where a new image was sent (at choice time: Serve reports it only ~0.1 s later)."""
        if key in self._placed:
            self._images[self._placed.pop(key)] -= 1
        self._placed[key] = replica_id
        self._images[replica_id] += 1
        if len(self._placed) > self._remembered:
            _, old = self._placed.popitem(last=False)
            self._images[old] -= 1


@dataclass(frozen=True)
class Reply:
    """The end of one remote request: the answer, and whether the replica had the image cached."""

    cache_hit: bool
    replica: str
    answer: Answer


class ImageNotCached(LookupError):
    """A request without pixels reached a replica that does not hold its image (evicted, or a new replica)."""


@dataclass
class _Slot:
    """One image's cached embeddings on a replica (a Serve multiplexed "model")."""

    handle: Any = None


class EngineReplica:
    """The body of the Serve deployment: one `Engine`, used by one request at a time."""

    def __init__(self, options: ServeOptions) -> None:
        import torch

        from engine.loading import load_engine

        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        self.engine = load_engine(options.model, device=options.device, dtype=options.dtype,
                                  quantization=options.quantization)  # fmt: skip
        self._lock = asyncio.Lock()  # the engine is not thread-safe
        self._replica = serve.get_replica_context().replica_id.unique_id
        if options.warm_up:
            blank = self.engine.set_image(np.zeros((64, 64, 3), np.uint8))
            self.engine.ask(
                blank,
                "Describe the image.",
                settings=GenerationSettings(max_new_tokens=2, force_answer="<SEG>"),
            )

    def info(self) -> ModelInfo:
        return self.engine.info

    def token_pieces(self) -> list[str]:
        """The text of every token id alone (the portal labels its routing plot with these)."""
        tokenizer = self.engine.tokenizer
        return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]

    @serve.multiplexed(max_num_models_per_replica=IMAGES_PER_REPLICA)
    async def _slot(self, image_key: str) -> _Slot:
        return _Slot()

    async def _cached_handle(self, rgb: np.ndarray | None) -> tuple[Any, bool]:
        """The image's engine handle from this replica's slot (hit), else encoded now and kept (miss).
        rgb is None when the client expects a hit; ImageNotCached then asks it to send the pixels."""
        key = serve.get_multiplexed_model_id()
        slot = await self._slot(key)
        if slot.handle is not None:
            return slot.handle, True
        if rgb is None:
            raise ImageNotCached(key)
        slot.handle = await asyncio.to_thread(self.engine.set_image, rgb)
        return slot.handle, False

    async def stream(self, rgb: np.ndarray | None, question: str, region: np.ndarray | None,
                     history: Sequence[tuple[str, str]], settings: GenerationSettings):  # fmt: skip
        """Yields text pieces, then one `Reply` with the `Answer`."""
        async with self._lock:
            handle, hit = await self._cached_handle(rgb)
            stream = self.engine.stream(handle, question, region=region, history=history, settings=settings)
            pieces = iter(stream)
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                yield piece
            yield Reply(cache_hit=hit, replica=self._replica, answer=stream.result)

    async def answer(self, rgb: np.ndarray | None, question: str, region: np.ndarray | None,
                     history: Sequence[tuple[str, str]], settings: GenerationSettings) -> Reply:  # fmt: skip
        """The whole answer in one reply (scripts, quizzes): no per-piece messages."""
        async with self._lock:
            handle, hit = await self._cached_handle(rgb)
            answer = await asyncio.to_thread(self.engine.ask, handle, question, region=region, history=history,
                                             settings=settings)  # fmt: skip
        return Reply(cache_hit=hit, replica=self._replica, answer=answer)


def engine_app(options: ServeOptions) -> Any:
    """The Serve application (`serve.run(engine_app(options), name=APP_NAME)`)."""
    return serve.deployment(EngineReplica, **options.deployment_options()).bind(options)


# ------------------------------------------------------------------------------------------ the client


def image_key(rgb: np.ndarray) -> str:
    """A short hash of the pixels and shape: the multiplexed id that routes an image to its replica."""
    digest = hashlib.blake2b(rgb.tobytes(), digest_size=12)
    digest.update(str(rgb.shape).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class RemoteImage:
    """The portal's handle for an image served by Ray: its pixels (re-sent with each request) and key."""

    rgb: np.ndarray  # (H, W, 3) uint8
    key: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[:2]


@dataclass(frozen=True)
class CacheStats:
    """answers: all answers; follow_ups: answers about an image asked about before through this client;
    hits: follow-ups whose replica still held the image's embeddings; retries: requests sent again;
    per_replica: answers by replica id."""

    answers: int
    follow_ups: int
    hits: int
    retries: int
    per_replica: Mapping[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Share of follow-ups answered from the replica's cache (a first question always encodes)."""
        return self.hits / self.follow_ups if self.follow_ups else 0.0


class _Counters:
    """Thread-safe counts, and the keys of images already asked about (bounded, oldest forgotten)."""

    def __init__(self, remembered: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remembered = remembered
        self.answers = self.follow_ups = self.hits = self.retries = 0
        self.per_replica: Counter[str] = Counter()

    def answered(self, key: str, reply: Reply) -> None:
        with self._lock:
            self.answers += 1
            self.per_replica[reply.replica] += 1
            if key in self._seen:
                self.follow_ups += 1
                self.hits += int(reply.cache_hit)
                self._seen.move_to_end(key)
                return
            self._seen[key] = None
            if len(self._seen) > self._remembered:
                self._seen.popitem(last=False)

    def seen(self, key: str) -> bool:
        with self._lock:
            return key in self._seen

    def retried(self) -> None:
        with self._lock:
            self.retries += 1


def _cause(err: BaseException) -> BaseException:
    """The replica's own exception: Ray's object transport wraps it in a RayTaskError (`.cause`), Serve's gRPC
    transport (RAY_SERVE_THROUGHPUT_OPTIMIZED) raises it as it was raised."""
    return err.cause if isinstance(err, RayTaskError) and err.cause is not None else err


def _not_cached(err: BaseException) -> bool:
    return isinstance(_cause(err), ImageNotCached)


def _user_error(err: BaseException) -> BaseException:
    """The engine's own ValueError (e.g. a region too small) without the remote traceback around it."""
    cause = _cause(err)
    return ValueError(str(cause)) if isinstance(cause, ValueError) else err


class PieceTokenizer:
    """`decode` for the portal's routing plot, from the replica's per-token texts (single ids exact)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.vocab_size = len(pieces)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


class RemoteAnswerStream:
    """Iterate for text pieces; `result` is the `Answer` afterwards. A request cut by a dying replica is sent
    again; text already shown is not repeated (greedy answers are deterministic)."""

    def __init__(self, engine: RemoteEngine, image: RemoteImage, args: tuple) -> None:
        self.result: Answer | None = None
        self._engine, self._image, self._args = engine, image, args

    def __iter__(self) -> Iterator[str]:
        shown = ""
        pixels = not self._engine._counters.seen(self._image.key)  # a follow-up goes without its pixels
        for attempt in range(RETRIES + 1):
            text = ""
            try:
                for item in self._engine._open_stream(self._image, self._args, pixels):
                    if isinstance(item, Reply):
                        self.result = item.answer
                        self._engine._counters.answered(self._image.key, item)
                        return
                    text += item
                    if len(text) > len(shown):
                        yield text[len(shown) :]
                        shown = text
            except _RETRYABLE:
                if attempt == RETRIES:
                    raise
                log.warning("a replica died during an answer; sending the request again")
            except Exception as err:
                if not _not_cached(err) or attempt == RETRIES:
                    raise _user_error(err) from None
            pixels = True
            self._engine._counters.retried()


class RemoteEngine:
    """The local `Engine`'s interface over a Ray Serve deployment handle (thread-safe: Serve queues)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._counters = _Counters()
        info = handle.info.remote().result()
        self.info = dataclasses.replace(info, device=f"{info.device} · Ray Serve")
        self.tokenizer = PieceTokenizer(handle.token_pieces.remote().result())

    @classmethod
    def connect(cls, address: str = "auto", *, app_name: str = APP_NAME) -> RemoteEngine:
        """Join the Ray cluster at `address` ("auto", "host:port", "ray://host:10001") and use its app."""
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        return cls(serve.get_app_handle(app_name))

    @property
    def stats(self) -> CacheStats:
        c = self._counters
        with c._lock:
            return CacheStats(answers=c.answers, follow_ups=c.follow_ups, hits=c.hits, retries=c.retries,
                              per_replica=dict(c.per_replica))  # fmt: skip

    def set_image(self, rgb: np.ndarray) -> RemoteImage:
        """(H, W, 3) uint8 RGB → a handle. The first question encodes the image on the replica that answers it
        (one round trip less than encoding now); Serve then routes follow-ups with the same key there."""
        check_rgb(rgb)
        return RemoteImage(rgb=rgb, key=image_key(rgb))

    def stream(self, image: RemoteImage, question: str, *, region: np.ndarray | None = None,
               history: Sequence[tuple[str, str]] = (), settings: GenerationSettings = GenerationSettings()
               ) -> RemoteAnswerStream:  # fmt: skip
        """Start answering; validation errors are raised here, as the local engine does."""
        check_question(question, region, image.shape)
        return RemoteAnswerStream(self, image, (question, region, tuple(history), settings))

    def ask(
        self,
        image: RemoteImage,
        question: str,
        *,
        region: np.ndarray | None = None,
        history: Sequence[tuple[str, str]] = (),
        settings: GenerationSettings = GenerationSettings(),
    ) -> Answer:
        """The whole answer in one request (no streaming); retried when its replica dies."""
        check_question(question, region, image.shape)  # as `stream` and the local engine check
        routed = self._handle.options(multiplexed_model_id=image.key)
        pixels = not self._counters.seen(image.key)  # a follow-up goes without its pixels
        for attempt in range(RETRIES + 1):
            try:
                rgb = image.rgb if pixels else None
                reply = routed.answer.remote(rgb, question, region, tuple(history), settings).result()
                break
            except _RETRYABLE:
                if attempt == RETRIES:
                    raise
            except Exception as err:
                if not _not_cached(err) or attempt == RETRIES:
                    raise _user_error(err) from None
            pixels = True
            self._counters.retried()
        self._counters.answered(image.key, reply)
        return reply.answer

    def _open_stream(self, image: RemoteImage, args: tuple, pixels: bool) -> Iterator[Any]:
        routed = self._handle.options(multiplexed_model_id=image.key, stream=True)
        return routed.stream.remote(image.rgb if pixels else None, *args)


# --------------------------------------------------------------------------------------------- the CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Deploy the MedPLIB engine on a Ray cluster (Ray Serve).")
    parser.add_argument(
        "--address", default="auto", help="Ray cluster address (default: the running cluster)"
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the shipped model)"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quant", default=None, choices=["8bit", "4bit"])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument(
        "--autoscale", default=None, metavar="MIN,MAX", help="autoscale between MIN and MAX replicas"
    )
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--torch-threads", type=int, default=None)
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    autoscale = tuple(int(v) for v in args.autoscale.split(",")) if args.autoscale else None
    return ServeOptions(model=args.model, device=args.device, dtype=args.dtype, quantization=args.quant,
                        replicas=args.replicas, autoscale=autoscale, num_gpus=args.gpus_per_replica,
                        num_cpus=args.cpus_per_replica, torch_threads=args.torch_threads)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options_from_args(args)
    ray.init(address=args.address, include_dashboard=False)
    serve.start(proxy_location="Disabled")
    serve.run(engine_app(options), name=APP_NAME, blocking=True)


if __name__ == "__main__":
    main()
