"""Validation and prediction tables (filled in by the MMDetection work)."""

from __future__ import annotations

from typing import Any


class MediaBuilder:
    def __init__(self, run: Any, guard: Any) -> None:
        self.run = run
        self.guard = guard

    def val_table(self, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def pred_table(self, body: dict[str, Any]) -> None:
        raise NotImplementedError
