"""Scale-out on Ray Serve: C students ask questions of N CPU replicas of the shipped model, on this machine.

    .venv/bin/python -m benchmarks.scale --replicas 2 --clients 30 [--kill-one] [--questions 4] --json

Starts a private local Ray cluster on 127.0.0.1 (no dashboard, no HTTP proxy, other ports chosen by Ray), deploys
`engine.serve.engine_app` and replays the students through `engine.serve.RemoteEngine`, the client the portal
uses: each student loads a different bundled image and asks a short conversation about it (a first question,
a question about a boxed region, a segmentation request, a yes/no follow-up). Prints answered and failed
students, answers per second, the cache hit rate of follow-ups, and `speedup_2_over_1`: the same load served by
1 and by 2 replicas in the same run. `--kill-one` kills a replica once 40 % of the answers are in; its requests
are retried on the other replica and Serve starts a replacement. Every phase is bounded by --timeout-s.
The cluster and Serve are always shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.results import Answer, GenerationSettings
from engine.serve import APP_NAME, DEPLOYMENT_NAME, RemoteEngine, ServeOptions, engine_app

# isort: split
import ray  # after engine.serve, which sets Ray Serve's throughput mode before ray.serve is imported
from ray import serve

log = logging.getLogger("benchmarks.scale")

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "medimages"
DASHBOARD_PORT = 8782  # Ray's head process binds it even without the dashboard; away from the default 8265
KILL_AT = 0.4  # share of the expected answers after which --kill-one kills a replica
ANSWER_STAGES = ("prefill", "decode", "mask")  # Answer.timings_ms stages run for every answer
READING_S = 0.2  # a student reads each answer before asking the next question
MAX_NEW_TOKENS = 24
QUESTIONS = (
    ("What modality is this image?", None),
    ("What is in the marked region? <region>", "box"),
    ("Please segment the {organ} in this image.", None),
    ("Is there any abnormality in this image?", None),
)


@dataclass(frozen=True)
class Student:
    """One student's image (H, W, 3) uint8, the box region of one of its structures, and its organ."""

    rgb: np.ndarray
    box: np.ndarray | None  # (H, W) bool
    organ: str


@dataclass(frozen=True)
class PhaseResult:
    replicas: int
    students: int
    answered: int  # students whose every question was answered
    failed: int
    answers: int
    seconds: float
    answers_per_s: float
    cache_hit_rate: float
    follow_ups: int
    retries: int
    killed_replica: bool
    engine_ms_per_answer: float  # prefill + decode + mask on the replica (image encoding excluded)
    answers_by_replica: tuple[int, ...]  # most first; a killed replica and its replacement count apart


def load_students(count: int) -> list[Student]:
    """`count` students on distinct bundled (non-synthetic) images; more students than images share them."""
    entries = [e for e in json.loads((ASSETS / "index.json").read_text()) if not e.get("synthetic")]
    students = []
    for i in range(count):
        entry = entries[(i * 7) % len(entries)]  # a stride spreads the students over modalities
        rgb = np.asarray(Image.open(ASSETS / entry["image"]).convert("RGB"))
        box_path = next(
            (m["regions"]["box"] for m in entry.get("masks", []) if "box" in m.get("regions", {})), None
        )
        box = np.asarray(Image.open(ASSETS / box_path)) > 0 if box_path else None
        students.append(Student(rgb=rgb, box=box, organ=entry.get("organ") or "lesion"))
    return students


def run_student(engine: RemoteEngine, student: Student, questions: int, deadline: float,
                on_answer: Callable[[Answer], None], reading_s: float = READING_S) -> bool:  # fmt: skip
    """Ask the student's conversation; True when every question got an answer before the deadline."""
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    history: list[tuple[str, str]] = []
    image = engine.set_image(student.rgb)
    for turn, (text, region_kind) in enumerate(QUESTIONS[:questions]):
        if turn:
            time.sleep(reading_s)
        if time.monotonic() > deadline:
            return False
        region = student.box if region_kind == "box" else None
        question = (
            text.format(organ=student.organ)
            if region_kind is None or region is not None
            else "Describe the image."
        )
        answer = engine.ask(image, question, region=region, history=tuple(history), settings=settings)
        history.append((question, answer.text))
        on_answer(answer)
    return True


def app_name(replicas: int) -> str:
    return f"{APP_NAME}-scale-{replicas}"


def kill_one_replica(app: str, busiest: str | None) -> str:
    """Kill a replica actor of `app`, the one with id `busiest` when it is there (Serve starts a replacement)."""
    prefix = f"SERVE_REPLICA::{app}#{DEPLOYMENT_NAME}"
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    if not names:
        raise RuntimeError(f"no replica of {app}/{DEPLOYMENT_NAME} to kill")
    victim = sorted(names, key=lambda a: (not a["name"].endswith(f"#{busiest}"), a["name"]))[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


@dataclass(frozen=True)
class Load:
    """What every phase replays."""

    questions: int
    timeout_s: float
    reading_s: float


def run_phase(replicas: int, students: list[Student], load: Load, *, kill_one: bool = False) -> PhaseResult:
    """Replay the students against the deployed application with `replicas` replicas."""
    app = app_name(replicas)
    engine = RemoteEngine(serve.get_app_handle(app))
    done = [0]
    lock, killed = threading.Lock(), threading.Event()
    kill_after = int(KILL_AT * len(students) * load.questions)

    engine_ms: list[float] = []

    def on_answer(answer: Answer) -> None:
        with lock:
            done[0] += 1
            engine_ms.append(sum(answer.timings_ms.get(stage, 0.0) for stage in ANSWER_STAGES))
            should_kill = kill_one and not killed.is_set() and done[0] >= kill_after
            if should_kill:
                killed.set()
        if should_kill:
            served = engine.stats.per_replica
            busiest = max(served, key=served.get) if served else None
            log.info("killed %s after %d answers", kill_one_replica(app, busiest), done[0])

    deadline = time.monotonic() + load.timeout_s
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(students)) as pool:
        futures = [
            pool.submit(run_student, engine, s, load.questions, deadline, on_answer, load.reading_s)
            for s in students
        ]
        outcomes = [_outcome(f) for f in futures]
    seconds = time.perf_counter() - t0
    stats = engine.stats
    answered = sum(outcomes)
    return PhaseResult(replicas=replicas, students=len(students), answered=answered,
                       failed=len(students) - answered, answers=stats.answers, seconds=round(seconds, 2),
                       answers_per_s=round(stats.answers / seconds, 2), cache_hit_rate=round(stats.hit_rate, 3),
                       follow_ups=stats.follow_ups, retries=stats.retries, killed_replica=killed.is_set(),
                       engine_ms_per_answer=round(sum(engine_ms) / max(len(engine_ms), 1), 1),
                       answers_by_replica=tuple(sorted(stats.per_replica.values(), reverse=True)))  # fmt: skip


def _outcome(future) -> bool:
    try:
        return bool(future.result())
    except Exception:  # a student whose request failed for good: counted as failed, the run goes on
        log.exception("a student failed")
        return False


def deploy(counts: set[int], model: str | None) -> None:
    """One application per replica count, all deployed up front (idle replicas use no CPU), so the phases
    alternate without redeploying."""
    for replicas in sorted(counts):
        options = ServeOptions(model=model, replicas=replicas, torch_threads=1, graceful_shutdown_s=1.0)
        serve.run(engine_app(options), name=app_name(replicas), route_prefix=None)


def run(replicas: int, clients: int, *, kill_one: bool = False, questions: int = 4, timeout_s: float = 300.0,
        model: str | None = None, reading_s: float = READING_S, repeats: int = 2) -> dict:  # fmt: skip
    """The whole benchmark on a private local Ray cluster; returns the summary printed by --json.

    1 and 2 replicas are measured `repeats` times, alternating (the machine's other load changes over time),
    each phase with new images (so no phase starts with a warm cache); then, with --kill-one or more than
    2 replicas, the main phase.
    """
    load = Load(questions=questions, timeout_s=timeout_s, reading_s=reading_s)
    counts = {1, 2, replicas}
    pool = load_students(clients * (2 * repeats + 1))
    batches = iter([pool[i : i + clients] for i in range(0, len(pool), clients)])
    ray.init(address="local", num_cpus=sum(counts), include_dashboard=False, dashboard_port=DASHBOARD_PORT,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)  # fmt: skip
    try:
        serve.start(proxy_location="Disabled")
        deploy(counts, model)
        ones, twos = [], []
        for _ in range(repeats):
            ones.append(run_phase(1, next(batches), load))
            twos.append(run_phase(2, next(batches), load))
        main = run_phase(replicas, next(batches), load, kill_one=kill_one) if kill_one or replicas > 2 else None
    finally:
        serve.shutdown()
        ray.shutdown()
    clean = {1: ones, 2: twos}.get(replicas, [])
    return summary(main or clean[-1], ones, twos, clean, reading_s)


def _rate(phases: list[PhaseResult]) -> float:
    return sum(p.answers for p in phases) / sum(p.seconds for p in phases)


def summary(main: PhaseResult, ones: list[PhaseResult], twos: list[PhaseResult], clean: list[PhaseResult],
            reading_s: float) -> dict:  # fmt: skip
    """speedup_2_over_1: answers per second over all 2-replica phases / over all 1-replica phases.
    cache_hit_rate: follow-ups answered from the replica's cache in the runs without a kill at the asked replica
    count (at 2 when that count was not run clean); after a kill, the follow-ups on the dead replica's images
    must re-encode wherever they land (cache_hit_rate_with_kill)."""
    clean = clean or twos
    follow_ups = sum(p.follow_ups for p in clean)
    hits = sum(round(p.cache_hit_rate * p.follow_ups) for p in clean)
    return {
        "answered": main.answered,
        "failed": main.failed,
        "replicas": main.replicas,
        "answers_per_s": main.answers_per_s,
        "speedup_2_over_1": round(_rate(twos) / _rate(ones), 2),
        "cache_hit_rate": round(hits / follow_ups, 3) if follow_ups else None,
        "cache_hit_rate_with_kill": main.cache_hit_rate if main.killed_replica else None,
        "engine": "ray_serve",
        "clients": main.students,
        "answers": main.answers,
        "killed_replica": main.killed_replica,
        "retries": main.retries,
        "answers_per_s_1_replica": round(_rate(ones), 2),
        "answers_per_s_2_replicas": round(_rate(twos), 2),
        "reading_s": reading_s,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "phases": [asdict(p) for p in (*ones, *twos, *([] if main in (*ones, *twos) else [main]))],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--kill-one", action="store_true")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--timeout-s", type=float, default=300.0, help="bound of each phase")
    parser.add_argument("--model", default=None, help="default: the shipped small model")
    parser.add_argument(
        "--reading-s", type=float, default=READING_S, help="pause between a student's questions"
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternating 1- and 2-replica phases")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if min(args.replicas, args.clients, args.repeats) < 1:
        parser.error("--replicas, --clients and --repeats must be at least 1")
    result = run(args.replicas, args.clients, kill_one=args.kill_one, questions=args.questions,
                 timeout_s=args.timeout_s, model=args.model, reading_s=args.reading_s, repeats=args.repeats)  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "phases":
                print(f"{key:<18} {value}")


if __name__ == "__main__":
    main()
