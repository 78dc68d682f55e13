"""Named event counters, as both sides report them (the client's ``stats()``, the sidecar's status)."""

from __future__ import annotations

import collections


class Counters(collections.Counter[str]):
    """Event counts by name. ``add`` creates a key only on a non-zero count, so a report shows only what
    happened; ``counters[key] += 1`` works too (a missing key reads 0)."""

    def add(self, key: str, n: int = 1) -> None:
        if n:
            self[key] += n
