"""The two decoding loops behind `Engine.stream`.

- `plain_generate`: one eager forward per token over a transformers `DynamicCache`; it reads the routing and the
  token back after every step (about two host syncs per layer and token). Kept for comparison and benchmarks.
- `FastDecoder`: the request's keys/values live in a static cache preallocated at prompt length plus
  `max_new_tokens` (rounded up to a bucket); the prefill is eager (SDPA) and may start after a prefix kept from
  the previous turn on the same image; each new token is one `DecodeStep` (no host sync), replayed as a CUDA
  graph on CUDA; token ids, experts and hidden states stay on the device and are copied back once per chunk.

Both give the same ids, routing and hidden states (fp32: equal up to float rounding of the attention sums).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from engine.modeling.medplib import MedPLIBModel
from engine.modeling.static_decode import DecodeStep, StaticKV, prefill
from engine.quantize import graph_capturable
from engine.tokenizer import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX

log = logging.getLogger(__name__)

DECODE_MODES = ("fast", "plain")
GRAPH_MODES = ("auto", "cuda-graph", "compile", "none")
# ids/experts are copied to the host once per chunk: the first token alone, then chunks of 2, 4, ... up to this
# (on CUDA; a CPU has no device to wait on, so there every token is its own chunk). Growing chunks waste few
# steps past `</s>` on short answers.
DECODE_CHUNK_TOKENS = 8
CACHE_BUCKET = 256  # static caches are allocated in multiples of this many positions (one CUDA graph each)
MAX_CACHE_BUFFERS = 2  # static caches kept alive per engine (LRU): bounds the memory of kept prefixes
_LEASES = itertools.count(1)  # process-wide, so a record can never match another decoder's cache


@dataclass
class Decoded:
    """What a decoding loop leaves for the mask step and the `Answer`."""

    ids: list[int] = field(default_factory=list)
    predicting_hidden: list[torch.Tensor] = field(default_factory=list)  # hidden that predicted ids[t]
    experts: list[list[int]] = field(default_factory=list)  # [layer][t]
    prefix: PrefixRecord | None = None  # set by the fast loop when it finishes


@dataclass(frozen=True)
class PrefixRecord:
    """The keys/values one image's last turn left in a static cache, for the next turn to reuse.

    ids: prompt ids (-200 image, -300 region) then the generated ids; region: the region vector of that prompt.
    n_positions: how many embedded positions (the image counting 576) hold valid keys/values.
    capacity, lease: which cache holds them, and the lease that must still be current for them to be valid.
    """

    ids: tuple[int, ...]
    region: torch.Tensor | None
    n_positions: int
    capacity: int
    lease: int


def expanded_length(ids: Sequence[int], n_image_tokens: int) -> int:
    """Embedded positions of the first len(ids) ids (the image placeholder stands for n_image_tokens rows)."""
    return len(ids) + (n_image_tokens - 1) * sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)


def reusable_positions(record: PrefixRecord | None, ids: Sequence[int], region: torch.Tensor | None,
                       n_image_tokens: int) -> int:
    """How many leading embedded positions of `ids` equal the record's, token for token (same image assumed).

    A region placeholder inside the common prefix counts only when the region vectors are equal.
    """
    if record is None:
        return 0
    common = 0
    for a, b in zip(record.ids, ids, strict=False):
        if a != b:
            break
        common += 1
    if REGION_TOKEN_INDEX in ids[:common] and not _same_region(record.region, region):
        common = list(ids).index(REGION_TOKEN_INDEX)
    return min(expanded_length(ids[:common], n_image_tokens), record.n_positions)


def _same_region(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a, b.to(a.device, a.dtype)))


def pick_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """logits (V,) fp32 → next id as a 0-d int64 device tensor (greedy when temperature <= 0)."""
    if temperature <= 0:
        return logits.argmax()
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 2)


# ---- today's loop ---------------------------------------------------------------------------------------------
def plain_generate(model: MedPLIBModel, embeds: torch.Tensor, *, max_new_tokens: int, temperature: float,
                   generator: torch.Generator | None, stop_id: int | None, out: Decoded,
                   timings: dict[str, float]) -> Iterator[int]:
    """Greedy or sampled decoding with a DynamicCache, one eager forward and host read-back per token."""
    llm = model.llm
    cache = llm.new_cache()
    t0 = time.perf_counter()
    hidden, _ = llm(embeds, cache=cache, start=0)
    timings["prefill"] = _ms(t0)
    t1 = time.perf_counter()
    pos = embeds.shape[1]
    out.experts = [[] for _ in llm.layers]
    for _ in range(max_new_tokens):
        h_last = hidden[0, -1]
        for layer, choice in enumerate(llm.routing()):
            out.experts[layer].append(int(choice[0, -1]))
        tok = int(pick_token(model.logits(h_last), temperature, generator))
        timings.setdefault("first_token", _ms(t0))
        out.ids.append(tok)
        out.predicting_hidden.append(h_last)
        yield tok
        if tok == stop_id:
            break
        hidden, _ = llm(model.embed_ids(torch.tensor([[tok]], device=embeds.device)), cache=cache, start=pos)
        pos += 1
    timings["decode"] = _ms(t1)


# ---- the fast loop --------------------------------------------------------------------------------------------
@dataclass
class _Buffers:
    """One static cache with its device-side token/position and, on CUDA, the decode step captured on it."""

    kv: StaticKV
    token: torch.Tensor  # (1, 1) int64
    pos: torch.Tensor  # (1,) int64
    lease: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the graph's static outputs


@dataclass
class _Request:
    """Device-side records of one request's generated tokens (copied to the host once per chunk)."""

    ids: torch.Tensor  # (N,) int64
    hidden: torch.Tensor  # (N, C)
    experts: torch.Tensor  # (L, N) int64
    n: int = 0  # tokens recorded

    def record(self, token: torch.Tensor, hidden: torch.Tensor, experts: torch.Tensor) -> None:
        self.ids[self.n].copy_(token.reshape(()))
        self.hidden[self.n].copy_(hidden.reshape(-1))
        self.experts[:, self.n].copy_(experts)
        self.n += 1


def default_expert_path(model: MedPLIBModel, device: torch.device) -> str:
    """"gather" on CPU (bit-identical to the plain MoE); on CUDA "grouped" (bf16, sm90+) else "select"."""
    if device.type != "cuda":
        return "gather"
    dtype = next(model.llm.parameters()).dtype
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9:
        return "grouped"
    return "select"


class FastDecoder:
    """Static-cache decoding with a host-sync-free step; owns at most MAX_CACHE_BUFFERS caches (LRU).

    graphs: "auto" (CUDA graphs on CUDA, none on CPU), "cuda-graph" (torch.cuda.CUDAGraph, no torch.compile:
    works on ZeroGPU), "compile" (torch.compile mode="reduce-overhead"), or "none" (eager steps).
    expert_path: how a step reaches its expert (see `Top1MoE.step`); None picks `default_expert_path`.
    """

    def __init__(self, model: MedPLIBModel, *, graphs: str = "auto", expert_path: str | None = None,
                 chunk: int | None = None, max_buffers: int = MAX_CACHE_BUFFERS) -> None:
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs must be one of {GRAPH_MODES}, got {graphs!r}")
        self.model = model
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self._expert_request = expert_path
        self.expert_path = ""  # chosen by `prepare`
        if graphs == "auto":
            graphs = "cuda-graph" if self.device.type == "cuda" and graph_capturable(model.llm) else "none"
        if graphs != "none" and self.device.type != "cuda":
            raise ValueError(f"graphs={graphs!r} needs a CUDA device; the model is on {self.device}")
        self.graphs = graphs
        self.chunk = chunk or (DECODE_CHUNK_TOKENS if self.device.type == "cuda" else 1)
        self.max_buffers = max_buffers
        self.step = DecodeStep(llm=model.llm, lm_head=model.lm_head, expert_path="select")
        self._run_step = torch.compile(self.step, mode="reduce-overhead", fullgraph=True) \
            if graphs == "compile" else self.step
        self._buffers: OrderedDict[int, _Buffers] = OrderedDict()
        self._graph_pool = None
        self.last_reused = 0  # positions taken from a kept prefix by the last request (for tests/benchmarks)
        self.n_image_tokens = model.config.n_image_tokens

    def prepare(self) -> None:
        """Stack the experts and choose how a step reaches them. Runs on first use, not at load time: on ZeroGPU
        CUDA work is allowed only inside its decorated calls."""
        if self.expert_path:
            return
        stacked = all([layer.mlp.stack_experts() for layer in self.model.llm.layers])
        path = self._expert_request or default_expert_path(self.model, self.device)
        path = path if stacked else "select"
        if path == "grouped" and self._expert_request is None and not self._grouped_works():
            path = "select"
        self.expert_path = self.step.expert_path = path

    @torch.inference_mode()
    def _grouped_works(self) -> bool:
        """One step through `torch._grouped_mm` against "select" on a scratch cache; False on error or mismatch."""
        step = DecodeStep(llm=self.model.llm, lm_head=self.model.lm_head, expert_path="grouped")
        kv = StaticKV.allocate(self.model.llm, 8, device=self.device, dtype=self.dtype)
        outs = {}
        try:
            for path in ("grouped", "select"):
                step.expert_path = path
                token = torch.ones((1, 1), dtype=torch.long, device=self.device)
                outs[path] = step(token, torch.zeros(1, dtype=torch.long, device=self.device), kv.keys, kv.values)
        except RuntimeError as err:
            log.warning("torch._grouped_mm is unusable here (%s): the decode step runs every expert instead", err)
            return False
        same = torch.equal(outs["grouped"][2], outs["select"][2]) and torch.allclose(
            outs["grouped"][0].float(), outs["select"][0].float(), atol=5e-2, rtol=5e-2)
        if not same:
            log.warning("torch._grouped_mm disagrees with the reference expert: the decode step runs every expert")
        return same

    # ---- caches ---------------------------------------------------------------------------------------
    def _valid(self, record: PrefixRecord | None) -> _Buffers | None:
        bufs = None if record is None else self._buffers.get(record.capacity)
        return bufs if bufs is not None and bufs.lease == record.lease else None

    def _acquire(self, needed: int, source: _Buffers | None, reuse: int) -> _Buffers:
        """A cache of >= needed positions holding the `reuse` first positions of `source`, under a new lease."""
        if source is not None and source.kv.capacity >= needed:
            bufs = source
        else:
            capacity = -(-needed // CACHE_BUCKET) * CACHE_BUCKET
            bufs = self._buffers.get(capacity) or self._new_buffers(capacity, keep=source)
            if source is not None and reuse:
                bufs.kv.copy_prefix_from(source.kv, reuse)
        self._buffers.move_to_end(bufs.kv.capacity)
        while len(self._buffers) > self.max_buffers:  # the source, kept only for the copy
            del self._buffers[next(iter(self._buffers))]
        bufs.lease = next(_LEASES)
        return bufs

    def _new_buffers(self, capacity: int, keep: _Buffers | None) -> _Buffers:
        evictable = [k for k, b in self._buffers.items() if b is not keep]  # oldest first
        while evictable and len(self._buffers) >= self.max_buffers:
            del self._buffers[evictable.pop(0)]
        kv = StaticKV.allocate(self.model.llm, capacity, device=self.device, dtype=self.dtype)
        bufs = _Buffers(kv=kv, token=torch.zeros((1, 1), dtype=torch.long, device=self.device),
                        pos=torch.zeros((1,), dtype=torch.long, device=self.device))
        if self.graphs == "compile":
            for t in (kv.keys, kv.values, bufs.token, bufs.pos):
                torch._dynamo.mark_static_address(t)
        elif self.graphs == "cuda-graph":
            try:
                self._capture(bufs)
            except RuntimeError as err:  # a layer that syncs (e.g. a quantised kernel): step eagerly from now on
                log.warning("could not capture the decode step as a CUDA graph (%s); decoding eagerly", err)
                self.graphs, bufs.graph, bufs.outputs = "none", None, None
                bufs.pos.zero_()
        self._buffers[capacity] = bufs
        return bufs

    def _capture(self, bufs: _Buffers) -> None:
        """Record one decode step on `bufs` as a CUDA graph; warm-up steps write only the last cache slot."""
        last = bufs.kv.capacity - 1
        args = (bufs.token, bufs.pos, bufs.kv.keys, bufs.kv.values)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                bufs.pos.fill_(last)
                self.step(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        bufs.pos.fill_(last)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            bufs.outputs = self.step(*args)
        bufs.graph = graph
        log.info("captured the decode step for a %d-position cache", bufs.kv.capacity)

    def drop_caches(self) -> None:
        """Free every static cache and CUDA graph (kept prefixes become misses)."""
        self._buffers.clear()

    # ---- one request ----------------------------------------------------------------------------------
    def _step(self, bufs: _Buffers, temperature: float, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if bufs.graph is not None:
            bufs.graph.replay()
            assert bufs.outputs is not None
            outs = bufs.outputs
        else:
            outs = self._run_step(bufs.token, bufs.pos, bufs.kv.keys, bufs.kv.values)
        if temperature > 0:
            bufs.token.copy_(pick_token(outs[1], temperature, generator).view(1, 1))
        return outs

    def _prefill(self, embeds: torch.Tensor, ids: Sequence[int], region: torch.Tensor | None,
                 prefix: PrefixRecord | None, capacity: int, keep_from: int) -> tuple[_Buffers, torch.Tensor, int]:
        """Prefill what the kept prefix does not cover; hidden states are needed from position `keep_from` on.

        Returns the cache, the post-norm hidden states of the prefilled positions (1, T - reused, C) and reused.
        """
        source = self._valid(prefix)
        reuse = min(reusable_positions(prefix, ids, region, self.n_image_tokens), keep_from) if source else 0
        bufs = self._acquire(capacity, source, reuse)
        self.last_reused = reuse
        hidden = prefill(self.model.llm, embeds[:, reuse:], bufs.kv, start=reuse)
        bufs.pos.fill_(embeds.shape[1])
        return bufs, hidden, reuse

    @torch.inference_mode()
    def teacher_force(self, embeds: torch.Tensor, *, ids: Sequence[int], region: torch.Tensor | None,
                      prefix: PrefixRecord | None, forced: Sequence[int]) -> Decoded:
        """Prompt (ids, embeds (1, T, C)) + forced ids but the last, in one causal pass over a static cache.

        Like the plain teacher-forced pass, but reusing the kept prefix; `out.prefix` covers prompt + forced.
        """
        self.prepare()
        extra = self.model.embed_ids(torch.tensor([list(forced[:-1])], device=self.device))
        full = torch.cat([embeds, extra], dim=1)
        start = embeds.shape[1] - 1  # the position that predicts forced[0]
        bufs, hidden, reuse = self._prefill(full, list(ids) + list(forced[:-1]), region, prefix,
                                            capacity=full.shape[1], keep_from=start)
        routing = self.model.llm.routing()
        return Decoded(
            ids=list(forced), predicting_hidden=list(hidden[0, start - reuse:]),
            experts=[r[0, start - reuse:].tolist() for r in routing],
            prefix=PrefixRecord(ids=tuple(ids) + tuple(forced), region=region, n_positions=full.shape[1],
                                capacity=bufs.kv.capacity, lease=bufs.lease),
        )

    @torch.inference_mode()
    def generate(self, embeds: torch.Tensor, *, ids: Sequence[int], region: torch.Tensor | None,
                 prefix: PrefixRecord | None, max_new_tokens: int, temperature: float,
                 generator: torch.Generator | None, stop_id: int | None, out: Decoded,
                 timings: dict[str, float]) -> Iterator[int]:
        """Like `plain_generate`; on a normal end `out.prefix` describes the cache the next turn may reuse."""
        if max_new_tokens < 1:
            return
        self.prepare()
        t0 = time.perf_counter()
        n_layers = len(self.model.llm.layers)
        n = embeds.shape[1]
        bufs, hidden, _ = self._prefill(embeds, ids, region, prefix, capacity=n + max_new_tokens, keep_from=n - 1)
        h_last = hidden[0, -1]
        experts = torch.stack([c[0, -1] for c in self.model.llm.routing()])
        bufs.token.copy_(pick_token(self.model.logits(h_last), temperature, generator).view(1, 1))
        req = _Request(ids=torch.empty(max_new_tokens, dtype=torch.long, device=self.device),
                       hidden=torch.empty((max_new_tokens, h_last.shape[-1]), dtype=h_last.dtype, device=self.device),
                       experts=torch.empty((n_layers, max_new_tokens), dtype=torch.long, device=self.device))
        req.record(bufs.token, h_last, experts)
        timings["prefill"] = _ms(t0)
        out.experts = [[] for _ in range(n_layers)]
        t1 = time.perf_counter()
        done, chunk = 0, 1
        while True:
            host_ids = req.ids[done:req.n].tolist()  # the one host sync of this chunk
            host_experts = req.experts[:, done:req.n].tolist()
            timings.setdefault("first_token", _ms(t0))
            for j, tok in enumerate(host_ids):
                out.ids.append(tok)
                out.predicting_hidden.append(req.hidden[done + j])
                for layer in range(n_layers):
                    out.experts[layer].append(host_experts[layer][j])
                yield tok
                if tok == stop_id:
                    break
            if out.ids[-1] == stop_id or req.n >= max_new_tokens:
                break
            done, chunk = req.n, min(2 * chunk, self.chunk)
            for _ in range(min(chunk, max_new_tokens - req.n)):
                hidden, _logits, step_experts = self._step(bufs, temperature, generator)
                req.record(bufs.token, hidden, step_experts)
        timings["decode"] = _ms(t1)
        out.prefix = PrefixRecord(ids=tuple(ids) + tuple(out.ids), region=region,
                                  n_positions=embeds.shape[1] + len(out.ids) - 1,
                                  capacity=bufs.kv.capacity, lease=bufs.lease)
