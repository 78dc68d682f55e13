"""Soak: one run open for a long stream, the sidecar SIGKILLed and restarted twice, bounded all along.

    .venv/bin/python -m benchmarks.soak [--messages 2000000] [--out bench-out/soak.json]

One trainer logs ``--messages`` metric messages (3 scalars, one step each) in blocks, each block flushed
(journaled and acknowledged). The sidecar is SIGKILLed at 30 % and 60 % of the stream and restarted on the
same journal. At the end: every step in the wandb run exactly once (read back with wandb's own reader), the
open run's journal under 8 MB (compacted during the run up to what wandb's files hold), and the sidecar's
RSS at the end within 20 MB of its RSS at 10 % of the stream.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import memory_bytes, write_json

BLOCK = 20_000
GOAL_JOURNAL = 8 * 1024 * 1024
GOAL_RSS_GROWTH = 20 * 1024 * 1024


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def soak(root: Path, messages: int) -> dict[str, Any]:
    from sidecar.readback import read_runs
    from tests.sidecar_process import SidecarProcess
    from trainer_hook import SidecarClient

    kill_at = {int(messages * 0.3) // BLOCK * BLOCK, int(messages * 0.6) // BLOCK * BLOCK}
    sidecar = SidecarProcess(root).start()
    client = SidecarClient(sidecar.addr, init_kwargs={"project": "soak"}, run_id="soak", spill_dir=None)
    rss_10 = 0
    journal_max = 0
    t0 = time.perf_counter()
    for start in range(0, messages, BLOCK):
        for step in range(start, min(start + BLOCK, messages)):
            client.log({"a": step * 0.5, "b": float(step), "c": 1.0}, step=step)
        if not client.flush(600):
            raise RuntimeError(f"block at {start} not acknowledged: {client.stats()}")
        journal_max = max(journal_max, _dir_bytes(sidecar.journal))
        if not rss_10 and start + BLOCK >= messages // 10:
            rss_10 = memory_bytes(sidecar.proc.pid)
        if start + BLOCK in kill_at:
            sidecar.kill()
            sidecar = SidecarProcess(root, port=sidecar.port).start()
    streamed = time.perf_counter() - t0
    sidecar.wait_for(lambda s: s["runs"]["soak"]["lag"] <= 1, timeout=3600)
    time.sleep(6)  # let the worker's periodic look at the journal run once more (no assertion waits on it)
    journal_end = _dir_bytes(sidecar.journal)
    rss_end = memory_bytes(sidecar.proc.pid)
    ok = client.finish(timeout=600)
    assert sidecar.stop(timeout=1800) == 0
    total = time.perf_counter() - t0
    steps = read_runs(sidecar.wandb_dir)["soak"].steps()
    exact = ok and steps == list(range(messages))
    return {"messages": messages, "sidecar_kills": len(kill_at), "exactly_once": exact,
            "steps_read_back": len(steps), "journal_bytes_end": journal_end, "journal_bytes_max": journal_max,
            "rss_at_10pct": rss_10, "rss_end": rss_end, "rss_growth": rss_end - rss_10,
            "seconds_streaming": streamed, "seconds_total": total,
            "goals_met": exact and journal_end < GOAL_JOURNAL and rss_end - rss_10 <= GOAL_RSS_GROWTH}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2_000_000)
    p.add_argument("--out", default="bench-out/soak.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="wsc-soak-") as tmp:
        result = soak(Path(tmp), a.messages)
    write_json(Path(a.out), {"soak": result})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
