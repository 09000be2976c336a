"""Start the MedPLIB Portal: `python app.py [--model M] [--host 127.0.0.1] [--port 7860] [--db URL] [--device D]`.

The only place that reads the command line and the environment (DATABASE_URL, PORTAL_EXAMPLES, SPACE_ID,
MEDPLIB_INSTRUCTORS_HF: comma-separated Hugging Face usernames allowed to sign in as instructors on a Space).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "assets" / "medimages"
logger = logging.getLogger("medplib.portal")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MedPLIB teaching portal (Gradio).")
    parser.add_argument(
        "--model", default=None, help="model folder or hub id (default: the shipped small model)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: per device)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--share", action="store_true", help="open a public gradio.live link (not recommended)"
    )
    parser.add_argument("--db", default=None, help="case library URL or SQLite path (default: $DATABASE_URL)")
    parser.add_argument("--no-db", action="store_true", help="run without the case library")
    parser.add_argument(
        "--session-ttl", type=float, default=None, help="seconds an idle Ask session is kept (default 1800)"
    )
    parser.add_argument(
        "--session-budget-mb", type=int, default=None, help="memory for all Ask sessions together (default 2048)"
    )
    return parser.parse_args(argv)


def open_store(url: str | None):
    """A cases.CaseStore at url, or None when the cases package is not installed."""
    if importlib.util.find_spec("cases") is None:
        logger.warning("the cases package is missing: the portal runs without the case library")
        return None
    from cases import CaseStore

    return CaseStore(url)


def blocked_paths(store) -> tuple[str, ...]:
    """Never serve the SQLite database file or its -wal / -shm through /gradio_api/file= (only those: blocking
    the whole folder hid the portal's own outputs when Gradio's temp folder lived under it)."""
    url = getattr(store, "url", "") or ""
    if url.startswith("sqlite:///") and url.removeprefix("sqlite:///") not in ("", ":memory:"):
        database = str(Path(url.removeprefix("sqlite:///")).resolve())
        return (database, f"{database}-wal", f"{database}-shm")
    return ()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from engine import load_engine
    from portal.app import build_app, launch_kwargs
    from portal.context import PortalContext, PortalSettings

    engine = load_engine(args.model, device=args.device, dtype=args.dtype)
    store = None if args.no_db else open_store(args.db or os.environ.get("DATABASE_URL"))
    examples = Path(os.environ.get("PORTAL_EXAMPLES", EXAMPLES_DIR))
    on_space = bool(os.environ.get("SPACE_ID"))
    allowlist = tuple(n.strip() for n in os.environ.get("MEDPLIB_INSTRUCTORS_HF", "").split(",") if n.strip())
    limits = {"session_ttl_s": args.session_ttl, "session_budget_mb": args.session_budget_mb}
    settings = PortalSettings(
        examples_dir=examples if examples.is_dir() else None,
        blocked_paths=blocked_paths(store),
        hf_oauth=on_space and bool(allowlist),
        instructor_allowlist=allowlist,
        cookie_secure=on_space,
        **{name: value for name, value in limits.items() if value is not None},
    )
    demo = build_app(PortalContext(engine=engine, store=store, settings=settings))
    if args.share:
        logger.warning("--share publishes the portal on a public URL; uploads may contain patient data")
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs(settings, store))


if __name__ == "__main__":
    main()
