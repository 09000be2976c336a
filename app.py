"""Start the MedPLIB Portal: `python app.py [--model M] [--host H] [--port P] [--db URL] [--device D] [--engine ray]`.

The only place that reads the command line and the environment. A flag wins over its variable:
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (set by Hugging Face Spaces), MEDPLIB_MODEL, MEDPLIB_DEVICE,
MEDPLIB_QUANT, MEDPLIB_ENGINE_URL (a Ray cluster serving `python -m engine.serve`), DATABASE_URL, PORTAL_EXAMPLES,
SPACE_ID, MEDPLIB_INSTRUCTORS_HF (comma-separated Hugging Face usernames allowed to sign in as instructors on a Space).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

if importlib.util.find_spec("spaces") is not None:
    import spaces  # noqa: F401  (ZeroGPU: imported before anything initialises CUDA; torch is not loaded yet)

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "assets" / "medimages"
logger = logging.getLogger("medplib.portal")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MedPLIB teaching portal (Gradio).")
    env = os.environ
    parser.add_argument(
        "--model",
        default=env.get("MEDPLIB_MODEL") or None,
        help="model folder or hub id ($MEDPLIB_MODEL; default: the released model on a GPU Space, else the shipped small model)",
    )
    parser.add_argument(
        "--device", default=env.get("MEDPLIB_DEVICE") or None, help="cpu, cuda, cuda:1, ... ($MEDPLIB_DEVICE)"
    )
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: per device)")
    parser.add_argument(
        "--quant",
        default=env.get("MEDPLIB_QUANT") or None,
        choices=["8bit", "4bit"],
        help="$MEDPLIB_QUANT (CUDA)",
    )
    parser.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="ray" if env.get("MEDPLIB_ENGINE_URL") else "local",
        help="local: load the model here; ray: use the Ray Serve deployment at --engine-url",
    )
    parser.add_argument(
        "--engine-url", default=env.get("MEDPLIB_ENGINE_URL") or "auto", help="Ray cluster address"
    )
    parser.add_argument(
        "--host",
        default=env.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        help="($GRADIO_SERVER_NAME; default 127.0.0.1)",
    )
    parser.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT") or 7860))
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


def default_model(model: str | None, env: dict[str, str] | os._Environ) -> str | None:
    """The model to load: the flag or $MEDPLIB_MODEL; on a Space with a GPU the released checkpoint; else None
    (the shipped small model)."""
    if model:
        return model
    if not env.get("SPACE_ID"):
        return None
    import torch

    from engine.loading import RELEASED_MODEL_ID

    zero_gpu = env.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
    return RELEASED_MODEL_ID if zero_gpu or torch.cuda.is_available() else None


def make_engine(args: argparse.Namespace):
    """The portal's engine: a Ray Serve client, or a local Engine (behind @spaces.GPU when `spaces` is there).

    On ZeroGPU the model is loaded on cuda here, at start-up, outside any GPU function, as ZeroGPU requires.
    """
    if args.engine == "ray":
        from engine.serve import RemoteEngine

        return RemoteEngine.connect(args.engine_url)
    from engine import load_engine

    engine = load_engine(default_model(args.model, os.environ), device=args.device, dtype=args.dtype,
                         quantization=args.quant)  # fmt: skip
    if importlib.util.find_spec("spaces") is None:
        return engine
    from engine.zerogpu import ZeroGPUEngine

    return ZeroGPUEngine(engine)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from portal import texts
    from portal.app import build_app, launch_kwargs
    from portal.context import PortalContext, PortalSettings

    engine = make_engine(args)
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
        model_concurrency_limit=texts.REMOTE_MODEL_CONCURRENCY_LIMIT if args.engine == "ray" else 1,
    )
    demo = build_app(PortalContext(engine=engine, store=store, settings=settings))
    if args.share:
        logger.warning("--share publishes the portal on a public URL; uploads may contain patient data")
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs(settings, store))


if __name__ == "__main__":
    main()
