"""Which files the sidecar may read: a peer names paths (checkpoints, images, code), the operator names roots."""

from __future__ import annotations

import os
from pathlib import Path


class FileGuard:
    """Resolve a path (symlinks, ``..``) and allow it only under the configured roots."""

    def __init__(self, roots: list[str | os.PathLike[str]]) -> None:
        self.roots = [Path(r).resolve() for r in roots]

    def check(self, path: str) -> Path | None:
        try:
            resolved = Path(path).resolve(strict=False)
        except (OSError, RuntimeError, ValueError):
            return None
        if any(resolved == r or resolved.is_relative_to(r) for r in self.roots):
            return resolved
        return None

    def refusal(self, path: object) -> str:
        """'' when ``path`` is allowed, else why not (for the trainer and the log)."""
        if isinstance(path, str) and self.check(path) is not None:
            return ""
        return (f"{str(path)[:300]!r} is outside the allowed roots {[str(r) for r in self.roots]} (the sidecar "
                "opens the path the trainer sends: write under a root, by its absolute path)")
