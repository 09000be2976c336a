"""Replay a class against a real portal on 127.0.0.1 and print the figures of issue 16's targets.

    .venv/bin/python -m benchmarks.load                 # the full class (about 15 minutes on 2 cores)
    .venv/bin/python -m benchmarks.load --small         # a few students, small volumes (CI runs this)

It starts `app.py` (the shipped model, no case library) as a child process on --port, drives it with
gradio_client (one Client = one browser session), and prints:

1. memory kept per session after a CT-sized volume upload (512x512x500 int16 .nii.gz, mostly air);
2. peak memory while reading it (the server's VmHWM, reset before the upload);
3. server memory --close-wait seconds after --sessions sessions (each with one volume) have closed;
4. --students students at once, each uploading an image and asking a question: uploads refused, questions
   answered, answered within 3 minutes, and whether waiting students were told their place in line;
5. a raw upload with patient data (a PNG text chunk), fetched by its URL after it was read: served or not.

Memory is the server process's resident set (VmRSS) from /proc, so it needs Linux. Everything is bounded in
count and time and stops by itself; the server is stopped at the end. Timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import gzip
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "medimages" / "images" / "ct-pydicom-spine.png"
ANSWER_TARGET_S = 180.0
MB = 2**20


@dataclass(frozen=True)
class Plan:
    """How big the replayed class is."""

    volume_shape: tuple[int, int, int]
    per_session_samples: int  # sessions whose memory is averaged for figure 1
    closed_sessions: int
    close_wait_s: float
    students: int
    session_ttl_s: float
    class_timeout_s: float
    deep_png_side: int  # a 16-bit greyscale PNG of this side, for the peak memory of a large photo


FULL = Plan((512, 512, 500), 5, 100, 300.0, 50, 1800.0, 300.0, 6300)
SMALL = Plan((256, 256, 120), 2, 4, 20.0, 3, 1800.0, 120.0, 1500)


# ------------------------------------------------------------------------------------------------ server


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory field of /proc/<pid>/status in MiB (VmRSS now, VmHWM peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Reset the process's peak resident set (VmHWM) to its current size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextlib.contextmanager
def portal(port: int, work: Path, ttl_s: float, startup_s: float = 240.0) -> Iterator[subprocess.Popen]:
    """app.py on 127.0.0.1:port; its Gradio cache and spilled volumes under work/; stopped on exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(work / "gradio"), "TMPDIR": str(work), "GRADIO_HEARTBEAT_INTERVAL": "2"}  # fmt: skip
    command = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port), "--no-db",
               "--session-ttl", str(ttl_s)]  # fmt: skip
    log = (work / "server.log").open("w")
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/", server, startup_s)
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _wait_until_up(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the portal exited with {server.returncode}; see server.log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"the portal did not answer within {timeout_s:.0f} s")


def settle(seconds: float) -> None:
    time.sleep(seconds)


# ------------------------------------------------------------------------------------------------- files


def ct_volume(path: Path, shape: tuple[int, int, int]) -> Path:
    """A CT-like int16 NIfTI: air (-1000 HU) with a soft-tissue block; small once gzipped."""
    import nibabel as nib

    data = np.full(shape, -1000, np.int16)
    x, y, z = shape
    data[x // 3 : 2 * x // 3, y // 3 : 2 * y // 3, z // 3 : 2 * z // 3] = 40
    image = nib.Nifti1Image(data, np.diag([0.7, 0.7, 1.0, 1.0]))
    path.write_bytes(gzip.compress(image.to_bytes(), 6))
    return path


def deep_png(path: Path, side: int) -> Path:
    """A side x side 16-bit greyscale PNG (a smooth gradient with noise: small to upload, large to decode)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 60000, side, dtype=np.float32)
    values = (ramp[None, :] * 0.5 + ramp[:, None] * 0.5).astype(np.uint16)
    values[:: max(side // 64, 1)] += rng.integers(0, 100, side, dtype=np.uint16)
    Image.fromarray(values).save(path, compress_level=9)
    return path


def peak_of_one_upload(url: str, pid: int, path: Path) -> float:
    """Peak resident MiB above the level before, while one fresh session reads path."""
    session = client(url)
    settle(2)
    before = rss_mb(pid)
    reset_peak(pid)
    upload(session, path)
    peak = rss_mb(pid, "VmHWM") - before
    session.close()
    return peak


def photo_with_patient_data(path: Path) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("PatientName", "Doe^Jane")
    Image.open(PHOTO).save(path, pnginfo=info)
    return path


# ---------------------------------------------------------------------------------------------- sessions


def client(url: str, tries: int = 3):
    """One browser session (a gradio_client Client); opening the page is retried on a busy server."""
    from gradio_client import Client

    for attempt in range(tries):
        try:
            return Client(url, verbose=False, httpx_kwargs={"timeout": 60})
        except httpx.HTTPError:
            if attempt == tries - 1:
                raise
            time.sleep(2 + attempt * 3)
    raise AssertionError("unreachable")


def upload(session, path: Path) -> None:
    from gradio_client import handle_file

    session.predict(handle_file(str(path)), False, api_name="/load_image")


def memory_per_session(url: str, pid: int, volume: Path, n: int) -> tuple[float, float, list]:
    """(MiB kept per session, peak MiB above the level before, the open sessions) over n volume uploads."""
    sessions = [client(url) for _ in range(n)]
    settle(2)
    before = rss_mb(pid)
    reset_peak(pid)
    upload(sessions[0], volume)
    peak = rss_mb(pid, "VmHWM") - before
    for session in sessions[1:]:
        upload(session, volume)
    settle(3)
    return (rss_mb(pid) - before) / n, peak, sessions


def closed_sessions(url: str, pid: int, volume: Path, n: int, wait_s: float) -> tuple[float, float]:
    """(MiB above the level before, with n sessions open; MiB above it wait_s after they all closed)."""
    before = rss_mb(pid)
    sessions = []
    for _ in range(n):
        sessions.append(client(url))
        upload(sessions[-1], volume)
    settle(3)
    open_mb = rss_mb(pid) - before
    for session in sessions:
        session.close()  # stops the heartbeat: the server sees the tab close
    del sessions
    settle(wait_s)
    return open_mb, rss_mb(pid) - before


@dataclass
class StudentResult:
    upload_refused: bool = False
    upload_error: str = ""
    answered_s: float | None = None
    question_error: str = ""
    best_rank: int | None = None  # the place in line the student was told, if they waited


def student(session, start: threading.Event, deadline: float) -> StudentResult:
    """One student with the page open: at the start signal upload a photo, ask one question, watch the queue."""
    from gradio_client import handle_file

    result = StudentResult()
    start.wait()
    t0 = time.monotonic()
    try:
        session.predict(handle_file(str(PHOTO)), False, api_name="/load_image")
    except Exception as err:  # noqa: BLE001 - counted, e.g. "Queue is full"
        result.upload_refused, result.upload_error = True, f"{type(err).__name__}: {err}"[:200]
        return result
    job = session.submit("Describe the image.", "None", None, 0.5, "fill", "orange", api_name="/ask")
    while not job.done() and time.monotonic() < deadline:
        rank = job.status().rank
        if rank is not None:
            result.best_rank = rank if result.best_rank is None else min(result.best_rank, rank)
        time.sleep(0.5)
    try:
        chat = job.result(timeout=max(deadline - time.monotonic(), 1))[1]
        if chat:
            result.answered_s = time.monotonic() - t0
    except Exception as err:  # noqa: BLE001 - counted
        result.question_error = f"{type(err).__name__}: {err}"[:200]
    session.close()
    return result


def a_class(url: str, n: int, timeout_s: float) -> list[StudentResult]:
    """n students open the page in the same minute (five at a time), then all upload and ask at once."""
    with futures.ThreadPoolExecutor(max_workers=5) as pool:
        sessions = list(pool.map(lambda _i: client(url), range(n)))
    start = threading.Event()
    with futures.ThreadPoolExecutor(max_workers=n) as pool:
        deadline = time.monotonic() + timeout_s
        jobs = [pool.submit(student, session, start, deadline) for session in sessions]
        time.sleep(1)
        start.set()
        done, _ = futures.wait(jobs, timeout=timeout_s + 90)
    return [job.result() for job in done]


def raw_upload_served(url: str, path: Path) -> tuple[bool, bool]:
    """(served before it was read, served after): upload, read through /load_image, fetch its URL again."""
    response = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, path.read_bytes(), "image/png")})
    server_path = response.json()[0]
    fetched = lambda: httpx.get(f"{url}gradio_api/file={server_path}")  # noqa: E731
    served_before = fetched().status_code == 200 and b"Doe^Jane" in fetched().content
    session = client(url)
    session.predict({"path": server_path, "meta": {"_type": "gradio.FileData"}, "orig_name": path.name},
                    False, api_name="/load_image")  # fmt: skip
    after = fetched()
    session.close()
    return served_before, after.status_code == 200 and b"Doe^Jane" in after.content


# ------------------------------------------------------------------------------------------------ report


def run(plan: Plan, port: int, class_only: bool = False, keep_log: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="medplib-load-") as folder:
        work = Path(folder)
        volume = ct_volume(work / "ct.nii.gz", plan.volume_shape)
        shape = "x".join(map(str, plan.volume_shape))
        print(f"volume {shape} int16, {volume.stat().st_size / 1024:.0f} KB gzipped", flush=True)
        with portal(port, work, plan.session_ttl_s) as server:
            url = f"http://127.0.0.1:{port}/"
            warm = client(url)
            upload(warm, PHOTO)
            warm.predict("Describe the image.", "None", None, 0.5, "fill", "orange", api_name="/ask")
            warm.close()
            settle(5)
            baseline = rss_mb(server.pid)
            print(f"server baseline (model loaded, warmed up): {baseline:.0f} MiB", flush=True)
            if not class_only:
                _memory_and_privacy_figures(url, server.pid, work, volume, plan, baseline)
            if plan.students:
                _report_class(a_class(url, plan.students, plan.class_timeout_s), plan.students)
            log = (work / "server.log").read_text()
            print(f"server log: {log.count('Traceback')} tracebacks; 'Queue is full' {log.count('Queue is full')} times")
            if keep_log is not None:
                keep_log.write_text(log)


def _memory_and_privacy_figures(url: str, pid: int, work: Path, volume: Path, plan: Plan, baseline: float) -> None:
    """Figures 1, 2, 2b, 3 and 5 (figure 4 is the class)."""
    shape = "x".join(map(str, plan.volume_shape))
    per_session, peak, open_sessions = memory_per_session(url, pid, volume, plan.per_session_samples)
    print(f"1. memory kept per session after a {shape} volume upload: {per_session:.1f} MiB "
          "(target <= 64 MB)", flush=True)  # fmt: skip
    print(f"2. peak memory while reading it: {peak:.0f} MiB above the level before "
          "(target <= 512 MB)", flush=True)  # fmt: skip
    side = plan.deep_png_side
    png_peak = peak_of_one_upload(url, pid, deep_png(work / "deep.png", side))
    print(f"2b. peak memory while reading a {side}x{side} 16-bit PNG: {png_peak:.0f} MiB above the level "
          "before (target <= 512 MB)", flush=True)  # fmt: skip
    for session in open_sessions:
        session.close()
    if plan.closed_sessions:
        _closed_figure(url, pid, volume, plan, baseline)
    before, after = raw_upload_served(url, photo_with_patient_data(work / "Doe_Jane_1970.png"))
    print(f"5. raw upload with patient data fetched by URL: before it was read "
          f"{'served' if before else 'not served'}; after it was read "
          f"{'SERVED' if after else 'not served'} (target: not served)", flush=True)  # fmt: skip


def _closed_figure(url: str, pid: int, volume: Path, plan: Plan, baseline: float) -> None:
    open_mb, after_mb = closed_sessions(url, pid, volume, plan.closed_sessions, plan.close_wait_s)
    print(f"3. {plan.closed_sessions} sessions with one volume each: +{open_mb:.0f} MiB while open; "
          f"{after_mb:+.0f} MiB {plan.close_wait_s:.0f} s after they closed; server at "
          f"{rss_mb(pid) - baseline:+.0f} MiB against the baseline (target <= +300 MB)", flush=True)  # fmt: skip


def _report_class(results: list[StudentResult], n: int) -> None:
    refused = sum(r.upload_refused for r in results)
    answered = [r.answered_s for r in results if r.answered_s is not None]
    in_time = sum(s <= ANSWER_TARGET_S for s in answered)
    told = sum(r.best_rank is not None for r in results)
    unanswered_untold = sum(r.answered_s is None and r.best_rank is None for r in results)
    times = f"median {np.median(answered):.0f} s, slowest {max(answered):.0f} s" if answered else "none"
    print(f"4. {n} students at once: {refused} uploads refused; {len(answered)} questions answered "
          f"({in_time} within 3 min; {times}); {told} were told their place in line while waiting; "
          f"{unanswered_untold} neither answered nor told; {n - len(results)} still running at the end "
          "(targets: 0 refused, >= 48 of 50 within 3 min)", flush=True)  # fmt: skip
    for r in results:
        for error in (r.upload_error, r.question_error):
            if error:
                print(f"    e.g. {error}")
                return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a few students and small volumes (CI)")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--students", type=int, default=None, help="students at once (figure 4; 0 skips)")
    parser.add_argument("--sessions", type=int, default=None, help="sessions opened and closed (figure 3; 0 skips)")
    parser.add_argument("--class-only", action="store_true", help="only figure 4 (the class at once)")
    parser.add_argument("--keep-log", type=Path, default=None, help="copy the server's log here")
    parser.add_argument("--close-wait", type=float, default=None, help="seconds after closing (default 300)")
    args = parser.parse_args(argv)
    plan = SMALL if args.small else FULL
    overrides = {"students": args.students, "closed_sessions": args.sessions, "close_wait_s": args.close_wait}
    plan = Plan(**{**plan.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    run(plan, args.port, class_only=args.class_only, keep_log=args.keep_log)


if __name__ == "__main__":
    main()
