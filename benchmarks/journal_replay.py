"""Replay one store's undelivered records in a fresh process, as a restarted sidecar would: its time and
its peak RSS above the RSS before it (a process of its own, so that the peak is this replay's alone).

    python -m benchmarks.journal_replay KIND ROOT AFTER LIMIT_BYTES SEGMENT_BYTES   # prints one JSON line
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from benchmarks.common import memory_bytes
from benchmarks.journal_stores import open_store


def replay(kind: str, root: Path, after: int, limit_bytes: int, segment_bytes: int) -> dict[str, Any]:
    """Stream every record above ``after``; keep only a count, the order and a CRC of the frames."""
    t0 = time.perf_counter()
    store = open_store(kind, root, limit_bytes, segment_bytes)
    base = memory_bytes("self", "VmRSS")
    count, first, last, consecutive, crc = 0, 0, after, True, 0
    for index, frames in store.replay(after):
        consecutive = consecutive and index == last + 1
        first = first or index
        last = index
        count += 1
        for frame in frames:
            crc = zlib.crc32(frame, crc)
    seconds = time.perf_counter() - t0
    store.close()
    peak = memory_bytes("self", "VmHWM")
    return {"seconds": seconds, "rss_delta_bytes": max(0, peak - base), "count": count, "first": first,
            "last": last, "consecutive": consecutive, "crc": crc}


if __name__ == "__main__":
    k, r, a, lim, seg = sys.argv[1:6]
    print(json.dumps(replay(k, Path(r), int(a), int(lim), int(seg))))
