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
import ray
from PIL import Image
from ray import serve

from engine.results import GenerationSettings
from engine.serve import APP_NAME, DEPLOYMENT_NAME, RemoteEngine, ServeOptions, engine_app

log = logging.getLogger("benchmarks.scale")

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "medimages"
DASHBOARD_PORT = 8782  # Ray's head process binds it even without the dashboard; away from the default 8265
KILL_AT = 0.4  # share of the expected answers after which --kill-one kills a replica
READING_S = 0.2  # a student reads each answer before the next question (Serve learns a new image's
# replica from the replica's report, pushed every 0.1 s: questions sent back to back within that window miss)
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
                on_answer: Callable[[], None], reading_s: float = READING_S) -> bool:  # fmt: skip
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
        on_answer()
    return True


def kill_one_replica() -> str:
    """Kill one replica actor of the deployment (Serve will start a replacement)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}"
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    if not names:
        raise RuntimeError(f"no replica of {APP_NAME}/{DEPLOYMENT_NAME} to kill")
    victim = sorted(names, key=lambda a: a["name"])[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


def run_phase(replicas: int, students: list[Student], *, questions: int, kill_one: bool, timeout_s: float,
              model: str | None, reading_s: float) -> PhaseResult:  # fmt: skip
    """Deploy `replicas` CPU replicas, replay the students, tear the application down."""
    serve.run(engine_app(ServeOptions(model=model, replicas=replicas, torch_threads=1, graceful_shutdown_s=1.0)), name=APP_NAME)
    try:
        engine = RemoteEngine(serve.get_app_handle(APP_NAME))
        done = [0]
        lock, killed = threading.Lock(), threading.Event()
        kill_after = int(KILL_AT * len(students) * questions)

        def on_answer() -> None:
            with lock:
                done[0] += 1
                should_kill = kill_one and not killed.is_set() and done[0] >= kill_after
                if should_kill:
                    killed.set()
            if should_kill:
                log.info("killed %s after %d answers", kill_one_replica(), done[0])

        deadline = time.monotonic() + timeout_s
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(students)) as pool:
            futures = [pool.submit(run_student, engine, s, questions, deadline, on_answer, reading_s) for s in students]
            outcomes = [_outcome(f) for f in futures]
        seconds = time.perf_counter() - t0
        stats = engine.stats
        answered = sum(outcomes)
        return PhaseResult(replicas=replicas, students=len(students), answered=answered,
                           failed=len(students) - answered, answers=stats.answers, seconds=round(seconds, 2),
                           answers_per_s=round(stats.answers / seconds, 2), cache_hit_rate=round(stats.hit_rate, 3),
                           follow_ups=stats.follow_ups, retries=stats.retries, killed_replica=killed.is_set())  # fmt: skip
    finally:
        serve.delete(APP_NAME)


def _outcome(future) -> bool:
    try:
        return bool(future.result())
    except Exception:  # a student whose request failed for good: counted as failed, the run goes on
        log.exception("a student failed")
        return False


def run(replicas: int, clients: int, *, kill_one: bool = False, questions: int = 4, timeout_s: float = 300.0,
        model: str | None = None, reading_s: float = READING_S) -> dict:  # fmt: skip
    """The whole benchmark on a private local Ray cluster; returns the summary printed by --json."""
    students = load_students(clients)
    ray.init(address="local", num_cpus=max(replicas, 2), include_dashboard=False, dashboard_port=DASHBOARD_PORT,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)  # fmt: skip
    try:
        serve.start(proxy_location="Disabled")
        phase = {"questions": questions, "timeout_s": timeout_s, "model": model, "reading_s": reading_s}
        one = run_phase(1, students, kill_one=False, **phase)
        two = run_phase(2, students, kill_one=False, **phase) if replicas != 1 else None
        main = (
            run_phase(replicas, students, kill_one=kill_one, **phase)
            if kill_one or replicas > 2
            else (two or one)
        )
    finally:
        serve.shutdown()
        ray.shutdown()
    return summary(main, one, two, reading_s)


def summary(main: PhaseResult, one: PhaseResult, two: PhaseResult | None, reading_s: float) -> dict:
    """cache_hit_rate comes from the largest replica count run without a kill: after a kill, the follow-ups
    on the images of the dead replica must re-encode wherever they land (cache_hit_rate_with_kill)."""
    clean = main if not main.killed_replica else (two or one)
    return {
        "answered": main.answered,
        "failed": main.failed,
        "replicas": main.replicas,
        "answers_per_s": main.answers_per_s,
        "speedup_2_over_1": round(two.answers_per_s / one.answers_per_s, 2) if two else None,
        "cache_hit_rate": clean.cache_hit_rate,  # routing quality: the largest run without a kill
        "cache_hit_rate_with_kill": main.cache_hit_rate if main.killed_replica else None,
        "engine": "ray_serve",
        "clients": main.students,
        "answers": main.answers,
        "killed_replica": main.killed_replica,
        "retries": main.retries,
        "reading_s": reading_s,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "phases": [asdict(p) for p in (one, two, main) if p is not None],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--kill-one", action="store_true")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--timeout-s", type=float, default=300.0, help="bound of each phase")
    parser.add_argument("--model", default=None, help="default: the shipped small model")
    parser.add_argument("--reading-s", type=float, default=READING_S, help="pause between a student's questions")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.replicas < 1 or args.clients < 1:
        parser.error("--replicas and --clients must be at least 1")
    result = run(args.replicas, args.clients, kill_one=args.kill_one, questions=args.questions,
                 timeout_s=args.timeout_s, model=args.model, reading_s=args.reading_s)  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "phases":
                print(f"{key:<18} {value}")


if __name__ == "__main__":
    main()
