"""MedPLIB inference engine: `load_engine(model)` → `Engine` (set_image, stream, ask).

Importing `engine` is cheap: torch and transformers load on first use of `load_engine`, so light modules
(`engine.results`, `engine.imageio`) can be used without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.inference import Engine
    from engine.loading import load_engine

__all__ = ["Engine", "load_engine"]


def __getattr__(name: str) -> Any:
    if name == "load_engine":
        from engine.loading import load_engine

        return load_engine
    if name == "Engine":
        from engine.inference import Engine

        return Engine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
