"""Print one line per row of issue 17's targets table (instructor accounts, case text, archives).

    .venv/bin/python -m benchmarks.security_check [--port 7874] [--skip-browser]

Everything runs on 127.0.0.1 against temporary databases; every loop is bounded. Rows:
session_hash reuse, guessing vs the owner, login timing, hostile imports, planted HTML (runs the
Chromium test when chromium + playwright are present), the publish gate, Annex E leftovers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"


def row(check: str, target: str, result: str) -> None:
    print(f"| {check} | {target} | {result} |", flush=True)


def _store(folder: Path, name: str):
    from cases import CaseStore

    store = CaseStore(str(folder / f"{name}.sqlite"), seed_starter=False)
    store.create_instructor(store.operator_session(), "teacher", PASSWORD)
    return store


def check_session_hash(folder: Path, port: int) -> None:
    import gradio as gr
    import httpx
    from gradio_client import Client

    from portal.app import launch_kwargs
    from portal.context import PortalSettings
    from portal.instructor_auth import COOKIE_NAME, LOGIN_PATH
    from portal.instructor_tab import build_instructor_tab

    store, settings = _store(folder, "hash"), PortalSettings()
    ctx = type("Ctx", (), {"store": store, "engine": None, "settings": settings})()
    with gr.Blocks() as demo:
        build_instructor_tab(ctx)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        **launch_kwargs(settings, store))  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        token = httpx.post(url + LOGIN_PATH, json={"username": "teacher", "password": PASSWORD}).cookies[
            COOKIE_NAME
        ]
        teacher = Client(url, headers={"Cookie": f"{COOKIE_NAME}={token}"}, verbose=False)
        teacher.predict(api_name="/export_csv")
        intruder = Client(url, verbose=False)
        intruder.session_hash = teacher.session_hash
        try:
            intruder.predict(api_name="/export_csv")
            result = "ACCEPTED (bug)"
        except Exception as error:  # noqa: BLE001 - any refusal counts; its text is printed
            result = f"refused ({str(error).splitlines()[0][:60]})"
    finally:
        demo.close()
    row("reuse of an instructor's session_hash by another client", "refused", result)


def check_guessing(folder: Path) -> None:
    from cases.errors import LoginThrottled, PermissionDenied

    store = _store(folder, "guess")
    wrong = 0
    for _ in range(10):  # ten wrong passwords fired from one client, as fast as it likes
        try:
            store.login("teacher", "guessing123", client="198.51.100.7")
        except LoginThrottled:
            pass
        except PermissionDenied:
            wrong += 1
    start = time.perf_counter()
    for _ in range(100):  # the owner from another client retries after each Retry-After
        try:
            store.login("teacher", PASSWORD, client="203.0.113.9")
            break
        except LoginThrottled as error:
            time.sleep(error.retry_after_s)
    took = time.perf_counter() - start
    row("10 wrong passwords from one client, then the right one from another", "logged in within 60 s",
        f"logged in after {took:.1f} s ({wrong} of 10 guesses were checked, the rest throttled)")  # fmt: skip


def check_timing(folder: Path, rounds: int = 25) -> None:
    from cases.errors import PermissionDenied
    from cases.throttle import LoginThrottle

    store = _store(folder, "timing")
    times: dict[str, list[float]] = {"unknown": [], "known": []}
    for i in range(rounds):
        for kind, user in (("unknown", f"nobody{i}"), ("known", "teacher")):
            store.throttle = LoginThrottle()  # measure the check itself, not the back-off
            start = time.perf_counter()
            with contextlib.suppress(PermissionDenied):
                store.login(user, "wrong password!", client=f"timing-{i}")
            times[kind].append(time.perf_counter() - start)
    unknown, known = statistics.median(times["unknown"]), statistics.median(times["known"])
    row("login time, unknown user vs known user with a wrong password", "within ±20 %",
        f"{unknown * 1e3:.1f} ms vs {known * 1e3:.1f} ms ({(unknown / known - 1) * 100:+.1f} %, median of {rounds})")  # fmt: skip


def check_imports(folder: Path) -> None:
    from benchmarks.hostile_bundles import HOSTILE
    from cases import CaseStore

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kind, build in HOSTILE.items():
        bundle = build(folder / f"{kind}.zip")
        db = folder / f"import-{kind}.sqlite"
        args = ["--db", str(db), "--no-starter", "import", str(bundle)]
        returncode, stderr, took, peak_mb = _run_measured(args, env)
        imported = len(CaseStore(str(db), seed_starter=False).list_cases(include_unpublished=True))
        lines = stderr.strip().splitlines()
        row(f"`cases import` of a {kind} bundle ({bundle.stat().st_size / 1024:.0f} KiB)",
            "exit 2, one line, ≤ 10 s, ≤ 1 GB peak, nothing imported",
            f"exit {returncode}, {len(lines)} line, {took:.1f} s, peak {peak_mb:.0f} MB, {imported} imported"
            f"{', TRACEBACK' if 'Traceback' in stderr else ''}: {_reason(lines)}")  # fmt: skip


def _reason(lines: list[str]) -> str:
    """The refusal without the temporary path."""
    return lines[0].split(".zip", 1)[-1].lstrip(": ")[:90] if lines else ""


# Runs `python -m cases ...` and writes the process's own peak RSS (VmHWM of its fresh address space,
# so the benchmark's own memory inherited at fork does not count) to the file named by PEAK_FILE.
_MEASURED_MAIN = (
    "import atexit, os, runpy, sys\n"
    "def _peak():\n"
    "    status = open('/proc/self/status').read()\n"
    "    open(os.environ['PEAK_FILE'], 'w').write(status.split('VmHWM:')[1].split()[0])\n"
    "atexit.register(_peak)\n"
    "sys.argv = ['cases', *sys.argv[1:]]\n"
    "runpy.run_module('cases', run_name='__main__')\n"
)


def _run_measured(
    args: list[str], env: dict[str, str], timeout_s: float = 120
) -> tuple[int, str, float, float]:
    """(exit code, stderr, seconds, peak RSS MB) of `python -m cases *args`."""
    with tempfile.NamedTemporaryFile(suffix=".peak") as peak:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _MEASURED_MAIN, *args], capture_output=True, text=True,
                              env={**env, "PEAK_FILE": peak.name}, timeout=timeout_s)  # fmt: skip
        took = time.perf_counter() - start
        text = Path(peak.name).read_text().strip()
    return done.returncode, done.stderr, took, int(text) / 1024 if text else float("nan")


def check_planted_html(skip: bool) -> None:
    if skip:
        row(
            "HTML planted in DICOM tags, file names and case text, opened in Chromium",
            "0 requests",
            "skipped",
        )
        return
    test = REPO / "tests" / "browser" / "test_browser_planted_html.py"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", str(test)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)  # fmt: skip
    counts = [line for line in done.stdout.splitlines() if line.startswith("planted-html requests:")]
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
    result = counts[-1].split(":", 1)[1].strip() + " requests" if counts else "not measured"
    row("HTML planted in DICOM tags, file names and case text, opened in Chromium", "0 requests",
        f"{result} (pytest: {summary})")  # fmt: skip


def check_publish_gate(folder: Path) -> None:
    from cases.errors import PublishBlocked
    from cases.samples import sample_draft

    store = _store(folder, "gate")
    session = store.login("teacher", PASSWORD)
    draft = dataclasses.replace(sample_draft("Flagged", published=False), burned_in_suspected=True)
    case = store.create_case(session, draft)
    try:
        store.set_published(session, case.id, True)
        result = "PUBLISHED (bug)"
    except PublishBlocked:
        result = "refused by the store (PublishBlocked)"
    row(
        "publish of a case flagged for burned-in annotation, without a review", "refused by the store", result
    )


def check_annex_e() -> None:
    import io

    from pydicom import dcmread

    from cases.deid import annex_e_leftovers, deidentify_bytes
    from cases.deid_table import BASIC_PROFILE, FILE_META_ACTIONS
    from cases.samples import full_phi_dataset

    original = full_phi_dataset()
    original.file_meta.PrivateInformationCreatorUID = "1.2.826.0.1.3680043.2.1143.77"
    original.file_meta.PrivateInformation = b"SECRETMETA"
    for tag in [elem.tag for elem in original if elem.tag.group == 0]:
        del original[tag]
    original.preamble = b"\0" * 128
    buffer = io.BytesIO()
    original.save_as(buffer, enforce_file_format=True)
    clean_bytes, _ = deidentify_bytes(buffer.getvalue())
    left = annex_e_leftovers(original, dcmread(io.BytesIO(clean_bytes)))
    row("Annex E attributes left in a stored or exported DICOM", "0",
        f"{len(left)} of {len(BASIC_PROFILE) + len(FILE_META_ACTIONS)} table rows filled {left[:5] if left else ''}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7874)
    parser.add_argument("--skip-browser", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    print("| check | target | result |\n|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="medplib-security-") as tmp:
        folder = Path(tmp)
        check_session_hash(folder, args.port)
        check_guessing(folder)
        check_timing(folder)
        check_imports(folder)
        check_planted_html(args.skip_browser)
        check_publish_gate(folder)
        check_annex_e()


if __name__ == "__main__":
    main()
