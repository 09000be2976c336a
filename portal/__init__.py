"""The Gradio 6 teaching portal: `build_app(PortalContext(engine, store))` builds the Blocks app.

Importing `portal` is cheap; gradio loads with `portal.app`.
"""

from __future__ import annotations

from portal.context import PortalContext, PortalSettings

__all__ = ["PortalContext", "PortalSettings"]
