"""Decoding speed of the engine's fast loop against the plain loop, with the latencies that matter on a GPU.

    python -m benchmarks.decode [--size tiny|7b-2e | --model M] [--device cpu|cuda]
        [--dtype bfloat16|float16|float32] [--quant none|8bit|4bit] [--new-tokens 256] [--json]

`--size tiny` is the shipped small model; `--size 7b-2e` builds MedPLIB-7b-2e's exact shapes with random weights
directly on the device (no download, no host copy); `--model` loads a checkpoint folder or hub id. The prompt is
synthetic: ~700 embedded positions (576 image rows from a random image plus random text ids), as a real
question with its image is. Prints a table, and with --json one JSON object as the last line.

Measured in one process, after one warm-up pass of every path (medians of --repeats, of 3 × --repeats for the
follow-ups; the plain decode once):
- decode_tok_s / decode_tok_s_plain: greedy tokens per second after the first token (fast loop / plain loop);
- ttft_ms: image encode + prefill + first token on the host; mask_ms: `<SEG>` hidden state → full-size mask
  (SAM image embedding already cached, its time is sam_ms);
- followup_prefill_ms(_plain): the next turn (prompt + the N-token answer + 40 new tokens) to its first token,
  with prefix reuse / with a full prefill;
- hbm_gbps: device-to-device copy bandwidth (bytes read + written, CUDA only); roofline_fraction:
  decode_tok_s × weight_bytes_per_token / hbm bandwidth;
- graph_breaks: `torch._dynamo.explain` on the decode step (0 = `fullgraph=True` compiles it; -1 = dynamo failed);
- matches_plain: same ids, routing and mask from both loops; with --quant, token agreement over the greedy
  tokens and mask IoU against the same random model in the run's dtype before quantisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

import numpy as np
import torch

from engine.decoding import Decoded, PrefixRecord, plain_generate
from engine.inference import Engine, ImageHandle
from engine.loading import load_engine, pick_device_dtype
from engine.presets import random_model_on, released_config
from engine.quantize import QUANT_MODES, is_quantized, quantize_decoder, stored_bytes
from engine.results import ModelInfo
from engine.tokenizer import IMAGE_TOKEN_INDEX

log = logging.getLogger("benchmarks.decode")

SIZES = ("tiny", "7b-2e")
PROMPT_POSITIONS = 700  # embedded positions of the first question (576 of them image rows)
TEXT_BEFORE_IMAGE = 35  # system prompt + "USER: <im_start>" in ids, roughly as the llava_v1 template has it
FOLLOWUP_NEW_IDS = 40  # "</s>USER: <follow-up question> ASSISTANT:" in ids
HBM_COPY_BYTES = 1 << 30
SEED = 0


@dataclass(frozen=True)
class DecodeReport:
    size: str
    device: str
    dtype: str
    quant: str
    decode_tok_s: float
    decode_tok_s_plain: float
    speedup: float
    ttft_ms: float
    mask_ms: float
    followup_prefill_ms: float
    followup_prefill_ms_plain: float
    peak_mem_gb: float
    weight_bytes_per_token: int
    hbm_gbps: float | None
    roofline_fraction: float | None
    graph_breaks: int
    matches_plain: bool
    # context for the figures above
    gpu: str | None = None
    torch: str = torch.__version__
    date: str = ""
    new_tokens: int = 0
    prompt_positions: int = 0
    expert_path: str = ""
    graphs: str = ""
    image_ms: float = 0.0
    sam_ms: float = 0.0
    followup_speedup: float = 0.0
    followup_reused_positions: int = 0
    token_agreement_plain: float = 0.0
    token_agreement_vs_unquantized: float | None = None
    first_divergence_vs_unquantized: int | None = None
    mask_iou_vs_unquantized: float | None = None
    build_s: float = 0.0
    cpu_threads: int = 0


@dataclass(frozen=True)
class _Run:
    """One greedy run: ids, routing, the hidden state at the last prompt position and the timings."""

    decoded: Decoded
    first_s: float  # from the start to the first token on the host
    tok_s: float  # tokens per second after the first


# ---- building --------------------------------------------------------------------------------------------
def build_engine(args: argparse.Namespace) -> Engine:
    device, dtype = pick_device_dtype(args.device, args.dtype)
    if args.size == "7b-2e" and args.model is None:
        config = released_config()
        model = random_model_on(config, device=device, dtype=dtype, seed=SEED)
        info = ModelInfo(name="random MedPLIB-7b-2e shapes", revision=None, device=device,
                         dtype=str(dtype).removeprefix("torch."), n_parameters=sum(p.numel() for p in model.parameters()),
                         n_layers=config.llm.num_layers, n_experts=config.moe.num_experts, is_demo_model=False)
        # The benchmark feeds ids directly: no tokenizer exists for random weights.
        return Engine(model=model, tokenizer=None, config=config, info=info)  # type: ignore[arg-type]
    return load_engine(args.model, device=device, dtype=dtype)


def synthetic_prompt(vocab_size: int, n_image_tokens: int, positions: int, *, seed: int) -> list[int]:
    """Random text ids around one image placeholder: `positions` embedded positions in total."""
    rng = np.random.default_rng(seed)
    n_text = positions - n_image_tokens
    text = rng.integers(3, vocab_size, size=n_text).tolist()
    return [1, *text[:TEXT_BEFORE_IMAGE], IMAGE_TOKEN_INDEX, *text[TEXT_BEFORE_IMAGE + 1:]]


def random_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(512, 512, 3), dtype=np.uint8)


# ---- timing helpers --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _consume(tokens: Iterator[int], device: torch.device, t0: float) -> tuple[float, float, int]:
    """Iterate the token stream: (seconds to the first token, tokens/s after it, count)."""
    first = next(tokens)
    t_first = time.perf_counter()
    del first
    n = 1 + sum(1 for _ in tokens)
    _sync(device)
    t_end = time.perf_counter()
    return t_first - t0, (n - 1) / max(t_end - t_first, 1e-9), n


def run_fast(engine: Engine, embeds: torch.Tensor, ids: list[int], n: int, *, prefix: PrefixRecord | None = None,
             t0: float | None = None) -> _Run:
    assert engine.fast is not None
    out = Decoded()
    _sync(engine.device)
    t0 = time.perf_counter() if t0 is None else t0
    tokens = engine.fast.generate(embeds, ids=ids, region=None, prefix=prefix, max_new_tokens=n, temperature=0.0,
                                  generator=None, stop_id=None, out=out, timings={})
    first_s, tok_s, _ = _consume(tokens, engine.device, t0)
    return _Run(decoded=out, first_s=first_s, tok_s=tok_s)


def run_plain(engine: Engine, embeds: torch.Tensor, n: int) -> _Run:
    out = Decoded()
    _sync(engine.device)
    t0 = time.perf_counter()
    tokens = plain_generate(engine.model, embeds, max_new_tokens=n, temperature=0.0, generator=None, stop_id=None,
                            out=out, timings={})
    with torch.inference_mode():
        first_s, tok_s, _ = _consume(tokens, engine.device, t0)
    return _Run(decoded=out, first_s=first_s, tok_s=tok_s)


def measure_hbm_gbps(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth in GB/s, counting bytes read and written (CUDA only)."""
    if device.type != "cuda":
        return None
    src = torch.empty(HBM_COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000.0
    return round(2 * HBM_COPY_BYTES * 20 / seconds / 1e9, 1)


def count_graph_breaks(engine: Engine, capacity: int) -> int:
    """Graph breaks of the decode step under dynamo (scratch cache; nothing of the engine's is touched)."""
    from engine.modeling.static_decode import StaticKV

    assert engine.fast is not None
    engine.fast.prepare()
    with torch.inference_mode():
        kv = StaticKV.allocate(engine.model.llm, capacity, device=engine.device, dtype=engine.fast.dtype)
        token = torch.ones((1, 1), dtype=torch.long, device=engine.device)
        pos = torch.zeros(1, dtype=torch.long, device=engine.device)
        try:
            explained = torch._dynamo.explain(engine.fast.step)(token, pos, kv.keys, kv.values)
        except Exception as err:  # dynamo failing on a third-party layer must not lose the other figures
            log.warning("torch._dynamo.explain failed on the decode step: %s", err)
            return -1
        finally:
            torch._dynamo.reset()
    return int(explained.graph_break_count)


def weight_bytes_per_token(engine: Engine) -> int:
    """Weight bytes one decoded token must read: every layer but one expert of each, one embedding row,
    the final norm and lm_head (the vision towers and SAM do not run while decoding)."""
    llm = engine.model.llm
    total = stored_bytes(llm) - stored_bytes(llm.embed_tokens)
    emb = llm.embed_tokens.weight
    total += emb.shape[1] * emb.element_size()
    for layer in llm.layers:
        experts = stored_bytes(layer.mlp.experts)
        total -= experts - experts // len(layer.mlp.experts)
    return total + stored_bytes(engine.model.lm_head)


def peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2)  # KiB on Linux


def mask_from(engine: Engine, image: ImageHandle, hidden: torch.Tensor) -> tuple[float, np.ndarray]:
    """ms from a `<SEG>` hidden state (C,) to the full-size bool mask (SAM embedding cached)."""
    with torch.inference_mode():
        engine.sam_embedding(image)
        _sync(engine.device)
        t0 = time.perf_counter()
        _low, _logits, mask = engine._mask(image, hidden)
    return (time.perf_counter() - t0) * 1000.0, mask


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    """Fraction of positions with equal ids, and the first position where they differ (len when none)."""
    same = [x == y for x, y in zip(a, b, strict=False)]
    first = same.index(False) if False in same else len(same)
    return sum(same) / max(len(same), 1), first


# ---- the measurement ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prompt:
    rgb: np.ndarray
    ids: list[int]


def first_turn(engine: Engine, prompt: _Prompt, n: int) -> tuple[_Run, ImageHandle, torch.Tensor, float]:
    """Image encode + prefill + N greedy tokens with the fast loop: (run, image, embeds, ttft seconds)."""
    _sync(engine.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        image = engine.set_image(prompt.rgb)
        embeds = engine.model.embed_prompt(prompt.ids, image.image_tokens)
    run = run_fast(engine, embeds, prompt.ids, n, t0=t0)
    return run, image, embeds, run.first_s


def followup(engine: Engine, image: ImageHandle, prompt: _Prompt, turn: _Run, *, repeats: int
             ) -> tuple[float, float, int]:
    """Median ms from the follow-up's embeddings to its first token, with prefix reuse and with a full prefill;
    and the positions reused."""
    rng = np.random.default_rng(SEED + 1)
    ids = prompt.ids + turn.decoded.ids + rng.integers(3, engine.config.llm.vocab_size, FOLLOWUP_NEW_IDS).tolist()
    with torch.inference_mode():
        embeds = engine.model.embed_prompt(ids, image.image_tokens)
    assert engine.fast is not None and turn.decoded.prefix is not None
    record = turn.decoded.prefix
    fast_ms, plain_ms, reused = [], [], 0
    for _ in range(repeats):
        run = run_fast(engine, embeds, ids, 1, prefix=record)
        fast_ms.append(run.first_s * 1000.0)
        reused = engine.fast.last_reused
        # The follow-up wrote only positions >= `reused`: the first turn's keys/values are still there, under
        # the new lease, so the same follow-up can be timed again.
        assert run.decoded.prefix is not None
        record = replace(record, lease=run.decoded.prefix.lease)
        plain_ms.append(run_plain(engine, embeds, 1).first_s * 1000.0)
    return float(np.median(fast_ms)), float(np.median(plain_ms)), reused


def measure(engine: Engine, prompt: _Prompt, n: int, repeats: int) -> dict[str, object]:
    """Every timed figure (medians of `repeats`; the plain decode once), each path warmed up first."""
    warm, image, embeds, _ = first_turn(engine, prompt, n)
    followup(engine, image, prompt, warm, repeats=1)
    run_plain(engine, embeds, 8)
    mask_from(engine, image, warm.decoded.predicting_hidden[0])
    turns = [first_turn(engine, prompt, n) for _ in range(repeats)]
    fast, image, embeds, _ = turns[-1]
    follow_ms, follow_plain_ms, reused = followup(engine, image, prompt, fast, repeats=3 * repeats)  # ms each
    plain = run_plain(engine, embeds, n)
    hidden = fast.decoded.predicting_hidden[0]  # the last prompt position, as if it predicted <SEG>
    mask_ms = float(np.median([mask_from(engine, image, hidden)[0] for _ in range(repeats)]))
    _, mask = mask_from(engine, image, hidden)
    _, plain_mask = mask_from(engine, image, plain.decoded.predicting_hidden[0])
    same_ids = fast.decoded.ids == plain.decoded.ids and fast.decoded.experts == plain.decoded.experts
    return {
        "fast": fast, "plain": plain, "ttft_ms": float(np.median([t[3] for t in turns])) * 1000.0,
        "decode_tok_s": float(np.median([t[0].tok_s for t in turns])),
        "image_ms": float(np.median([t[1].timings_ms["clip"] for t in turns])),
        "sam_ms": image.timings_ms.get("sam", 0.0), "mask_ms": mask_ms, "mask": mask,
        "followup_prefill_ms": follow_ms, "followup_prefill_ms_plain": follow_plain_ms, "reused": reused,
        "matches_plain": bool(same_ids and np.array_equal(mask, plain_mask)),
        "token_agreement_plain": agreement(fast.decoded.ids, plain.decoded.ids)[0],
        "embeds_positions": int(embeds.shape[1]),
    }


def quantize_engine(engine: Engine, mode: str) -> Engine:
    """Quantise the decoder in place and rebuild the engine's fast decoder around the new layers."""
    compute = engine.dtype if engine.dtype != torch.float32 else torch.bfloat16
    quantize_decoder(engine.model.llm, mode, compute_dtype=compute)
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    return Engine(model=engine.model, tokenizer=engine.tokenizer, config=engine.config,
                  info=replace(engine.info, dtype=f"{engine.info.dtype}+{mode}"))


def report(args: argparse.Namespace) -> DecodeReport:
    t0 = time.perf_counter()
    engine = build_engine(args)
    build_s = time.perf_counter() - t0
    cfg = engine.config
    prompt = _Prompt(rgb=random_image(SEED),
                     ids=synthetic_prompt(cfg.llm.vocab_size, cfg.n_image_tokens, PROMPT_POSITIONS, seed=SEED))
    quality: dict[str, object] = {}
    if args.quant != "none":
        reference, image, _embeds, _ = first_turn(engine, prompt, args.new_tokens)
        _, ref_mask = mask_from(engine, image, reference.decoded.predicting_hidden[0])
        engine = quantize_engine(engine, args.quant)
        quality = {"ids": reference.decoded.ids, "mask": ref_mask}
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    figures = measure(engine, prompt, args.new_tokens, args.repeats)
    fast, plain = figures["fast"], figures["plain"]
    assert isinstance(fast, _Run) and isinstance(plain, _Run)
    peak = peak_mem_gb(engine.device)  # before the bandwidth test's 2 GiB of buffers
    hbm = measure_hbm_gbps(engine.device)
    wbytes = weight_bytes_per_token(engine)
    assert engine.fast is not None
    rep = DecodeReport(
        size=args.size if args.model is None else str(args.model), device=engine.info.device,
        dtype=str(engine.dtype).removeprefix("torch."), quant=args.quant,
        decode_tok_s=round(float(figures["decode_tok_s"]), 1), decode_tok_s_plain=round(plain.tok_s, 1),
        speedup=round(float(figures["decode_tok_s"]) / plain.tok_s, 2), ttft_ms=round(float(figures["ttft_ms"]), 2),
        mask_ms=round(float(figures["mask_ms"]), 2), followup_prefill_ms=round(float(figures["followup_prefill_ms"]), 2),
        followup_prefill_ms_plain=round(float(figures["followup_prefill_ms_plain"]), 2),
        peak_mem_gb=peak, weight_bytes_per_token=wbytes, hbm_gbps=hbm,
        roofline_fraction=None if hbm is None else round(float(figures["decode_tok_s"]) * wbytes / (hbm * 1e9), 3),
        graph_breaks=count_graph_breaks(engine, capacity=64), matches_plain=bool(figures["matches_plain"]),
        gpu=torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), new_tokens=args.new_tokens,
        prompt_positions=int(figures["embeds_positions"]), expert_path=engine.fast.expert_path,
        graphs=engine.fast.graphs, image_ms=round(float(figures["image_ms"]), 2),
        sam_ms=round(float(figures["sam_ms"]), 2),
        followup_speedup=round(float(figures["followup_prefill_ms_plain"]) / float(figures["followup_prefill_ms"]), 2),
        followup_reused_positions=int(figures["reused"]),
        token_agreement_plain=round(float(figures["token_agreement_plain"]), 4), build_s=round(build_s, 1),
        cpu_threads=torch.get_num_threads(),
    )
    if quality:
        share, first = agreement(fast.decoded.ids, quality["ids"])  # type: ignore[arg-type]
        rep = replace(rep, token_agreement_vs_unquantized=round(share, 4), first_divergence_vs_unquantized=first,
                      mask_iou_vs_unquantized=round(mask_iou(figures["mask"], quality["mask"]), 4))  # type: ignore[arg-type]
    assert is_quantized(engine.model.llm) == (args.quant != "none")
    return rep


def print_table(rep: DecodeReport) -> None:
    print(f"decode benchmark: {rep.size} on {rep.gpu or rep.device}, {rep.dtype}, quant {rep.quant}, "
          f"{rep.new_tokens} new tokens, {rep.prompt_positions}-position prompt ({rep.date})")
    for key, value in asdict(rep).items():
        print(f"  {key:<34} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--model", default=None, help="a checkpoint folder or hub id instead of --size")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    parser.add_argument("--quant", choices=("none", *QUANT_MODES), default="none")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (medians are reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 gives steadier figures on a shared, busy CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be at least 2 and --repeats at least 1")
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    rep = report(args)
    print_table(rep)
    if args.json:
        print(json.dumps(asdict(rep)))


if __name__ == "__main__":
    main()
