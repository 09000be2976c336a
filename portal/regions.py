"""Region marks made by clicking on the image: points and two-click boxes, with undo.

MedPLIB takes one region per question, so the *last* mark is the active region; earlier marks are kept only
so that Undo can bring them back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class Mark:
    """One region mark in image pixels. xyxy: box corners, or (x, y, x, y) for a point."""

    kind: Literal["point", "box"]
    xyxy: tuple[int, int, int, int]

    @property
    def point(self) -> tuple[int, int]:
        return self.xyxy[0], self.xyxy[1]


@dataclass(frozen=True)
class RegionMarks:
    """All marks on the current image; `pending` is the first corner of an unfinished box."""

    marks: tuple[Mark, ...] = ()
    pending: tuple[int, int] | None = None

    @property
    def active(self) -> Mark | None:
        return self.marks[-1] if self.marks else None

    def click(self, tool: str, x: int, y: int) -> RegionMarks:
        """Add a click made with `tool` ("Point" or "Box"); other tools ignore clicks."""
        if tool == "Point":
            return RegionMarks(self.marks + (Mark("point", (x, y, x, y)),), None)
        if tool != "Box":
            return self
        if self.pending is None:
            return replace(self, pending=(x, y))
        (x0, y0) = self.pending
        box = (min(x0, x), min(y0, y), max(x0, x), max(y0, y))
        return RegionMarks(self.marks + (Mark("box", box),), None)

    def undo(self) -> RegionMarks:
        """Drop the unfinished corner if any, else the last mark."""
        if self.pending is not None:
            return replace(self, pending=None)
        return RegionMarks(self.marks[:-1], None)
