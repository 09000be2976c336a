"""`python -m engine evaluate`: MeCoVQA's metrics for any model `load_engine` loads.

    python -m engine evaluate [--model M] (--data SPLIT.json | --split test|val) [--limit N] [--json]
                              [--after-turn "What is the modality of this image?"]   # follow-up scores

Metrics (MedPLIB `model/eval/vqa_infer.py` and `cal_metric.py`, re-implemented; no nltk):
  grounding  per-sample IoU of the predicted mask (greedy answer to the question; no `<SEG>` → IoU 0; an
             empty union → 0), Dice = 2·IoU / (1 + IoU); mIoU / mDice are sample means, overall and per modality;
             mDice also per "modality: class", the class read from the mask file name (`mask_class`), so a model
             that answers every brain structure with the whole brain shows at a glance.
  closed     complex-VQA yes/no questions: exact match of the normalised answers.
  open       complex-VQA open questions: token recall of the reference (unique words found in the prediction),
             token F1 (multiset overlap) and BLEU-1 (clipped unigram precision × brevity penalty).
  region     region-VQA questions, exact match of the normalised answers. The region mask of
             `<region>path</region>` is fed as the region prompt (the reference evaluation forgot to).
  region_mask  region-conditioned grounding ("Please segment the structure in the marked region." with a region,
             task `region_grounding`): `region_mask_mDice` over the samples whose reference has a mask (Dice as
             for grounding), `region_none_accuracy` over those whose region holds no structure (right when the
             answer has no `<SEG>`); both per modality too.
  describe   descriptions (`"kind": "describe"`): `describe_f1`, the token F1 against the reference sentence(s),
             overall and per modality; they are left out of the open-question figures.
  expert_share  per layer, the share of tokens each expert handled, separately for grounding and for VQA
             prompts: `all` (prompt and generated tokens), `text` (the same without the 576 image tokens) and
             `answer` (only the positions that generated the answer, e.g. the one that predicted `<SEG>`).
Samples are MeCoVQA-format JSON (`training.corpus`): paths are relative to the image folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import string
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.conversation import DEFAULT_TEMPLATE, TEMPLATES
from engine.results import GenerationSettings

log = logging.getLogger(__name__)

DEFAULT_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "medimages"
SPLITS = ("train", "val", "test")
DEFAULT_MAX_NEW_TOKENS = 64  # the longest reference description is about 45 tokens of the shipped tokenizer
_REGION_RE = re.compile(r"<region>(.*?)</region>")
_MASK_RE = re.compile(r"<mask>(.*?)</mask>")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
SEG_TOKEN = "<SEG>"
GROUNDING_TASKS = ("grounding", "region_grounding")  # answered by the grounding expert (routing tally)
DESCRIBE_KIND = "describe"


class EvaluationInputError(ValueError):
    """The samples or their image folder cannot be evaluated (named file missing, bad JSON, ...)."""


# ---------------------------------------------------------------------------------------------- metrics
def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces (MedPLIB's `normalize_word` in spirit)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def mask_iou(pred: np.ndarray | None, gt: np.ndarray) -> float:
    """IoU of two (H, W) bool masks; a missing prediction or an empty union scores 0 (as the reference)."""
    if pred is None:
        return 0.0
    if pred.shape != gt.shape:
        raise ValueError(f"predicted mask {pred.shape} and ground truth {gt.shape} differ in size")
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 0.0


def dice_from_iou(iou: float) -> float:
    """Dice = 2·IoU / (1 + IoU)."""
    return 2 * iou / (1 + iou)


def token_recall(prediction: str, reference: str) -> float:
    """Share of the reference's distinct words that occur in the prediction (MeCoVQA open "recall")."""
    ref = set(normalize_answer(reference).split())
    pred = set(normalize_answer(prediction).split())
    return len(ref & pred) / len(ref) if ref else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the multiset word overlap between prediction and reference."""
    pred, ref = Counter(normalize_answer(prediction).split()), Counter(normalize_answer(reference).split())
    common = sum((pred & ref).values())
    if not common:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1: clipped unigram precision × brevity penalty exp(1 - r/c) when c < r."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return 0.0
    clipped = sum((Counter(pred) & Counter(ref)).values())
    penalty = 1.0 if len(pred) >= len(ref) else math.exp(1 - len(ref) / len(pred))
    return penalty * clipped / len(pred)


# ---------------------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class EvalSample:
    """One question: `question` has `<region>` where the region goes; paths are absolute."""

    id: str
    task: str  # "grounding" | "region" | "complex" | "region_grounding"
    answer_type: str  # "open" | "closed"
    modality: str
    image: Path
    question: str
    reference: str  # answer text without `<SEG>` / `<mask>…</mask>`
    region: Path | None
    gt_mask: Path | None
    kind: str | None = None  # "describe" for descriptions


def parse_sample(raw: dict, root: Path) -> EvalSample:
    """A MeCoVQA-format sample dict -> EvalSample (task inferred when the `task` field is absent)."""
    try:
        question, answer = raw["conversations"][0]["value"], raw["conversations"][1]["value"]
        image = root / raw["image"]
    except (KeyError, IndexError, TypeError) as err:
        raise EvaluationInputError(f"sample {raw.get('id', '?')!r} is not MeCoVQA-format ({err!r})") from None
    region, mask = _REGION_RE.search(question), _MASK_RE.search(answer)
    task = raw.get("task") or ("grounding" if SEG_TOKEN in answer else "region" if region else "complex")
    return EvalSample(
        id=str(raw.get("id", raw["image"])), task=task, answer_type=raw.get("answer_type", "open"),
        modality=raw.get("modality") or Path(raw["image"]).name.split("_")[0], image=image,
        question=_REGION_RE.sub("<region>", question).replace("<image>", "").strip(),
        reference=_MASK_RE.sub("", answer).replace(SEG_TOKEN, "").strip(),
        region=root / region.group(1) if region else None, gt_mask=root / mask.group(1) if mask else None,
        kind=raw.get("kind"))


def mask_class(path: Path | None) -> str | None:
    """The structure a ground-truth mask shows, from its file name: MeCoVQA-G names masks
    `<image>--<class>_merged.png`, this repository's corpus `<image>--<class>.png` ("grey_matter" -> "grey matter");
    None when the name has no `--`."""
    if path is None or "--" not in path.stem:
        return None
    name = path.stem.rsplit("--", 1)[1]
    return name.removesuffix("_merged").replace("_", " ")


def load_samples(raw: Sequence[dict], root: Path, *, limit: int | None = None) -> list[EvalSample]:
    samples = [parse_sample(r, root) for r in raw][:limit]
    missing = sorted({str(p) for s in samples for p in (s.image, s.region, s.gt_mask) if p and not p.is_file()})
    if missing:
        raise EvaluationInputError(f"{len(missing)} files named by the samples are missing under {root}, e.g. "
                                   f"{missing[0]}; pass --image-folder (the folder the paths are relative to)")
    return samples


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def _read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PNG/JPEG sample image."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------------- routing tally
class RoutingTally:
    """Counts, per layer, the tokens each expert handled, via forward hooks on the MoE layers."""

    def __init__(self, model, n_experts: int) -> None:
        self.n_experts = n_experts
        self.image_span: tuple[int, int] | None = None
        self.counts: dict[str, np.ndarray] = {}
        self.kind = "vqa"
        self.paused = False  # True while an earlier turn (--after-turn) is answered: not counted
        self._hooks = [layer.mlp.register_forward_hook(self._hook(i)) for i, layer in enumerate(model.llm.layers)]
        self.n_layers = len(self._hooks)

    def _hook(self, layer: int):
        def hook(module, _inputs, _output) -> None:
            if self.paused:
                return
            choice = module.last_choice.reshape(-1).cpu().numpy()  # prefill: (T,), decoding: (1,)
            text = choice
            if choice.shape[0] > 1 and self.image_span is not None:
                keep = np.ones(choice.shape[0], dtype=bool)
                keep[self.image_span[0]:self.image_span[1]] = False
                text = choice[keep]
            for part, values in (("all", choice), ("text", text)):
                table = self.counts.setdefault(f"{self.kind}/{part}", np.zeros((self.n_layers, self.n_experts)))
                table[layer] += np.bincount(values, minlength=self.n_experts)
        return hook

    def add_answer(self, experts: Sequence[Sequence[int]]) -> None:
        """Count the routing of the positions that generated the answer (`Answer.experts`, [layer][t])."""
        table = self.counts.setdefault(f"{self.kind}/answer", np.zeros((self.n_layers, self.n_experts)))
        for layer, choices in enumerate(experts):
            table[layer] += np.bincount(np.asarray(choices, dtype=np.int64), minlength=self.n_experts)

    def shares(self) -> dict[str, dict[str, list[list[float]]]]:
        out: dict[str, dict[str, list[list[float]]]] = defaultdict(dict)
        for key, table in sorted(self.counts.items()):
            kind, part = key.split("/")
            totals = table.sum(axis=1, keepdims=True)
            out[kind][part] = np.round(table / np.maximum(totals, 1), 4).tolist()
        return dict(out)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class SampleResult:
    sample: EvalSample
    prediction: str
    iou: float | None  # samples with a reference mask only
    refused: bool = False  # the engine rejected the input (counted as wrong)
    has_mask: bool = False  # the answer had `<SEG>`


def _image_span(eng, sample: EvalSample, settings: GenerationSettings) -> tuple[int, int]:
    from engine.conversation import build_prompt
    from engine.tokenizer import IMAGE_TOKEN_INDEX

    ids = eng.tokenizer.encode_prompt(build_prompt(sample.question, template=settings.template,
                                                   has_region=sample.region is not None))
    start = ids.index(IMAGE_TOKEN_INDEX)
    return start, start + eng.config.n_image_tokens


def run_samples(eng, samples: Sequence[EvalSample], settings: GenerationSettings, *, progress: bool = False,
                after_turn: str | None = None) -> tuple[list[SampleResult], RoutingTally]:
    """Ask every sample's question (image embeddings cached per image); returns results and routing counts.

    after_turn: ask each question as a follow-up, after this question about the same image with the model's own
    answer to it, replayed as the portal's chat replays a conversation (that turn is not scored or tallied)."""
    from tqdm import tqdm

    tally = RoutingTally(eng.model, eng.config.moe.num_experts)
    handles: dict[Path, object] = {}
    history: tuple[tuple[str, str], ...] = ()
    results = []
    try:
        for sample in tqdm(samples, desc="evaluate", disable=not progress, dynamic_ncols=True):
            if sample.image not in handles:
                handles = {sample.image: eng.set_image(_read_rgb(sample.image))}  # keep one image cached
                if after_turn:
                    tally.paused = True
                    history = ((after_turn, eng.ask(handles[sample.image], after_turn, settings=settings).text),)
                    tally.paused = False
            image = handles[sample.image]
            region = _read_mask(sample.region) if sample.region else None
            tally.kind = "grounding" if sample.task in GROUNDING_TASKS else "vqa"
            tally.image_span = _image_span(eng, sample, settings)
            try:
                answer = eng.ask(image, sample.question, region=region, history=history, settings=settings)
            except ValueError as err:  # e.g. a region too small for the 24x24 CLIP grid: scored as wrong
                log.warning("sample %s refused by the engine (%s): scored as a wrong answer", sample.id, err)
                results.append(SampleResult(sample=sample, prediction="", iou=0.0 if sample.gt_mask else None,
                                            refused=True))
                continue
            tally.add_answer(answer.experts)
            iou = mask_iou(answer.mask, _read_mask(sample.gt_mask)) if sample.gt_mask is not None else None
            results.append(SampleResult(sample=sample, prediction=answer.text, iou=iou, has_mask=answer.has_mask))
    finally:
        tally.close()
    return results, tally


def summarize(results: Sequence[SampleResult], tally: RoutingTally | None = None) -> dict:
    """The metrics dict (see module docstring); subsets with no sample report 0.0 and n = 0."""
    ground = [r for r in results if r.sample.task == "grounding"]  # named structures only
    vqa = [r for r in results if r.sample.task == "complex"]
    closed = [r for r in vqa if r.sample.answer_type == "closed"]
    describe = [r for r in vqa if r.sample.kind == DESCRIBE_KIND]
    open_ = [r for r in vqa if r.sample.answer_type != "closed" and r.sample.kind != DESCRIBE_KIND]
    region_ground = [r for r in results if r.sample.task == "region_grounding"]
    region_masks = [r for r in region_ground if r.sample.gt_mask is not None]
    region_none = [r for r in region_ground if r.sample.gt_mask is None]
    region = [r for r in results if r.sample.task == "region"]
    by_mod: dict[str, list[float]] = defaultdict(list)
    by_class: dict[str, list[float]] = defaultdict(list)
    for r in ground:
        by_mod[r.sample.modality].append(r.iou)
        label = mask_class(r.sample.gt_mask)
        if label is not None:
            by_class[f"{r.sample.modality}: {label}"].append(r.iou)
    exact = [_exact(r) for r in closed]
    region_exact = [_exact(r) for r in region]
    ious = [r.iou for r in ground]
    return {
        "mIoU": _mean(ious), "mDice": _mean([dice_from_iou(i) for i in ious]),
        "mIoU_per_modality": {m: _mean(v) for m, v in sorted(by_mod.items())},
        "mDice_per_modality": {m: _mean([dice_from_iou(i) for i in v]) for m, v in sorted(by_mod.items())},
        "mDice_per_class": {c: _mean([dice_from_iou(i) for i in v]) for c, v in sorted(by_class.items())},
        "n_per_class": {c: len(v) for c, v in sorted(by_class.items())},
        "closed_accuracy": _mean(exact), "region_accuracy": _mean(region_exact),
        "closed_accuracy_per_modality": _per_modality(closed, _exact),
        "region_accuracy_per_modality": _per_modality(region, _exact),
        "n_per_modality": _counts_per_modality(results),
        "open_recall": _mean([token_recall(r.prediction, r.sample.reference) for r in open_]),
        "open_f1": _mean([token_f1(r.prediction, r.sample.reference) for r in open_]),
        "bleu1": _mean([bleu1(r.prediction, r.sample.reference) for r in open_]),
        "region_mask_mDice": _mean([dice_from_iou(r.iou) for r in region_masks]),
        "region_mask_mDice_per_modality": _per_modality(region_masks, lambda r: dice_from_iou(r.iou)),
        "region_none_accuracy": _mean([not r.has_mask and not r.refused for r in region_none]),
        "region_none_accuracy_per_modality": _per_modality(region_none, lambda r: not r.has_mask and not r.refused),
        "describe_f1": _mean([token_f1(r.prediction, r.sample.reference) for r in describe]),
        "describe_f1_per_modality": _per_modality(describe, lambda r: token_f1(r.prediction, r.sample.reference)),
        "n": {"grounding": len(ground), "closed": len(closed), "open": len(open_), "region": len(region),
              "region_mask": len(region_masks), "region_none": len(region_none), "describe": len(describe),
              "total": len(results), "refused": sum(r.refused for r in results)},
        "expert_share": tally.shares() if tally else {},
    }


def _exact(r: SampleResult) -> bool:
    return normalize_answer(r.prediction) == normalize_answer(r.sample.reference)


def _counts_per_modality(results: Sequence[SampleResult]) -> dict[str, dict[str, int]]:
    """modality -> {task: number of samples}; descriptions count as "describe", closed complex questions as
    "closed", the other complex questions as "complex"."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in results:
        closed = r.sample.task == "complex" and r.sample.answer_type == "closed"
        out[r.sample.modality][r.sample.kind or ("closed" if closed else r.sample.task)] += 1
    return {m: dict(sorted(c.items())) for m, c in sorted(out.items())}


def _per_modality(results: Sequence[SampleResult], score) -> dict[str, float]:
    """modality -> mean of `score(result)` over `results` of that modality."""
    by_mod: dict[str, list[float]] = defaultdict(list)
    for r in results:
        by_mod[r.sample.modality].append(float(score(r)))
    return {m: _mean(v) for m, v in sorted(by_mod.items())}


def _mean(values: Sequence[float]) -> float:
    return round(float(np.mean(values)), 4) if len(values) else 0.0


def evaluate_engine(eng, raw: Sequence[dict], root: Path, *, limit: int | None = None,
                    settings: GenerationSettings | None = None, progress: bool = False,
                    after_turn: str | None = None) -> dict:
    """Metrics of `eng` on MeCoVQA-format samples whose paths are relative to `root` (`run_samples`)."""
    settings = settings or GenerationSettings(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    results, tally = run_samples(eng, load_samples(raw, root, limit=limit), settings, progress=progress,
                                 after_turn=after_turn)
    metrics = summarize(results, tally)
    metrics["after_turn"] = after_turn
    return metrics


def evaluate_folder(folder: Path, raw: Sequence[dict], root: Path, **kwargs) -> dict:
    """Load the checkpoint `folder` with `load_engine` and evaluate it (used by training to select on val)."""
    from engine.loading import load_engine

    return evaluate_engine(load_engine(folder, device="cpu"), raw, root, **kwargs)


# ---------------------------------------------------------------------------------------------- CLI
def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="MeCoVQA metrics (mDice/mIoU, closed/region accuracy, open "
                                               "recall/F1/BLEU-1, expert shares) on a MeCoVQA-format split")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the shipped small model)")
    p.add_argument("--revision", default=None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="MeCoVQA-format JSON (a list of samples)")
    src.add_argument("--split", choices=SPLITS, help="build this split of --assets with training.corpus")
    p.add_argument("--assets", type=Path, default=DEFAULT_ASSETS, help="asset folder of training.sources")
    p.add_argument("--image-folder", type=Path, default=None,
                   help="folder the sample paths are relative to (default: the JSON's folder, else --assets)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, choices=sorted(TEMPLATES),
                   help=f"default {DEFAULT_TEMPLATE}, as the CLI, the portal and the quiz")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--after-turn", default=None, metavar="QUESTION",
                   help='ask every question as a follow-up, after QUESTION (e.g. "What is the modality of this '
                        'image?") about the same image with the model\'s own answer, as the portal\'s chat does')
    p.add_argument("--postprocess", default=None, choices=("medplib", "crop"),
                   help="mask post-processing (default: the model's own)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true", help="end with one line holding the metrics as JSON")


def _split_samples(split: str, assets: Path) -> list[dict]:
    try:
        from training.corpus import build_corpus, write_corpus
    except ImportError as err:
        raise EvaluationInputError(f"--split needs the training package of this repository ({err})") from None
    corpus = build_corpus(assets)
    with tempfile.TemporaryDirectory(prefix="medplib-eval-") as tmp:
        write_corpus(corpus, Path(tmp))
        return json.loads((Path(tmp) / f"{split}.json").read_text())


def _data_samples(path: Path) -> list[dict]:
    if not path.is_file():
        raise EvaluationInputError(f"data file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationInputError(f"{path} is not JSON: {err}") from None
    if not isinstance(raw, list) or not raw:
        raise EvaluationInputError(f"{path} must hold a non-empty JSON list of MeCoVQA-format samples")
    return raw


def _image_root(args: argparse.Namespace, raw: list[dict]) -> Path:
    if args.image_folder is not None:
        return args.image_folder
    if args.data is not None and (args.data.parent / str(raw[0].get("image", ""))).is_file():
        return args.data.parent
    return args.assets


def _print_table(metrics: dict) -> None:
    n = metrics["n"]
    lines = [f"grounding  n={n['grounding']:<4} mDice {metrics['mDice']:.3f}  mIoU {metrics['mIoU']:.3f}"]
    for m, d in metrics["mDice_per_modality"].items():
        lines.append(f"  {m:<26} mDice {d:.3f}")
        lines += [f"    {c.split(': ', 1)[1]:<24} mDice {dc:.3f}  (n={metrics['n_per_class'][c]})"
                  for c, dc in metrics["mDice_per_class"].items() if c.startswith(f"{m}: ")]
    lines += [f"closed     n={n['closed']:<4} accuracy {metrics['closed_accuracy']:.3f}",
              f"region     n={n['region']:<4} accuracy {metrics['region_accuracy']:.3f}",
              f"open       n={n['open']:<4} recall {metrics['open_recall']:.3f}  F1 {metrics['open_f1']:.3f}  "
              f"BLEU-1 {metrics['bleu1']:.3f}",
              f"region-conditioned masks n={n['region_mask']:<4} mDice {metrics['region_mask_mDice']:.3f}; "
              f"no structure n={n['region_none']} accuracy {metrics['region_none_accuracy']:.3f}",
              f"describe   n={n['describe']:<4} F1 {metrics['describe_f1']:.3f}"]
    for name in ("region_mask_mDice", "describe_f1"):
        per = metrics[f"{name}_per_modality"]
        lines.append(f"  {name} per modality: " + ", ".join(f"{m} {v:.3f}" for m, v in per.items()))
    for kind, parts in metrics["expert_share"].items():
        for part in ("text", "answer"):
            shares = " ".join("/".join(f"{s:.2f}" for s in layer) for layer in parts.get(part, []))
            lines.append(f"experts ({kind}, {part} tokens, per layer e0/e1): {shares}")
    print("\n".join(lines))


def run_evaluate(args: argparse.Namespace) -> int:
    """CLI entry: returns the exit code (2 on bad input, via the CLI's UsageError)."""
    from engine.cli import UsageError
    from engine.loading import ModelNotFoundError, load_engine

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    try:
        raw = _data_samples(args.data) if args.data is not None else _split_samples(args.split, args.assets)
        eng = load_engine(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                          postprocess=args.postprocess)
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, template=args.template)
        metrics = evaluate_engine(eng, raw, _image_root(args, raw), limit=args.limit, settings=settings,
                                  progress=not args.json and sys.stderr.isatty(), after_turn=args.after_turn)
    except (EvaluationInputError, ModelNotFoundError) as err:
        raise UsageError(str(err)) from None
    metrics["model"] = eng.info.name
    if args.json:
        print(json.dumps(metrics))
    else:
        _print_table(metrics)
    return 0
