"""How to keep an open run's journal bounded: the product's single file against SQLite (WAL) and segment
files, the same workload side by side in one run, in one temp directory, with real fsyncs.

    python -m benchmarks.journal_store [--quick] [--root DIR] [--out bench-out/journal_store.json]

Workload: one run streams real metric messages (``protocol.encode``: a 42-byte header frame and a 195-byte
body of 10 scalars) in receive batches of 1,000 and 8,192 messages, one durable write per batch; after each
batch the delivery mark (lagging the written index by two batches) is handed to the store's trim. A second
case streams a few 5-20 MiB image messages (validation data goes through the journal), one per batch.

Per store: write throughput (messages over the time in ``write_batch`` + ``trim``, median of repeats), the
writing thread's CPU per message (``time.thread_time``), the largest on-disk footprint during the stream and
at its end (every file: ``-wal``/``-shm`` too), the replay of what is undelivered after a simulated crash
(a copy of the files as they are, without SQLite's ``-shm``, replayed by a fresh process: time and peak
RSS above its start), and what a torn tail (a crash in the middle of a batch's write) leaves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import ROOT, write_json
from benchmarks.journal_stores import KINDS, SqliteStore, open_store
from protocol import Kind, encode
from sidecar.journal_trim import TRIM_BYTES

MiB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    messages: int
    batch: int  # messages per receive batch (one durable write)
    lag_batches: int  # the delivery mark trails the written index by this many batches
    large: bool = False  # 5-20 MiB image messages instead of metrics


@dataclass(frozen=True)
class Config:
    limit_bytes: int  # the file journal's trim threshold; SQLite's -wal size limit and freelist limit
    segment_bytes: int
    repeats: int
    cases: tuple[Case, ...]
    large_sizes: tuple[int, ...]


FULL = Config(TRIM_BYTES, 1 * MiB, 3,
              (Case("metrics x 300,000, batches of 1,000", 300_000, 1_000, 2),
               Case("metrics x 300,000, batches of 8,192", 300_000, 8_192, 2),
               Case("images of 5, 10, 20 MiB x 9, one a batch", 9, 1, 1, large=True)),
              (5 * MiB, 10 * MiB, 20 * MiB))
QUICK = Config(256 * 1024, 128 * 1024, 1,
               (Case("metrics x 40,000, batches of 500", 40_000, 500, 2),
                Case("images of 1, 2 MiB x 4, one a batch", 4, 1, 1, large=True)),
               (1 * MiB, 2 * MiB))


def message_pool(case: Case, large_sizes: Sequence[int]) -> list[list[bytes]]:
    """The frames the run sends; message ``i`` (1-based) is ``pool[(i - 1) % len(pool)]``."""
    run, inc, now = "bench-run", "0123abcd", time.time()
    if case.large:
        rng = np.random.default_rng(0)
        return [encode(Kind.IMAGE, run, i + 1, now,
                       {"key": "val/image", "image": rng.integers(0, 256, size, dtype=np.uint8)}, incarnation=inc)
                for i, size in enumerate(large_sizes)]
    return [encode(Kind.METRICS, run, i + 1, now, {"data": {f"train/m{k}": i * 0.25 + k for k in range(10)},
                                                     "step": i}, incarnation=inc)
            for i in range(min(case.batch, 8_192))]


def _batches(case: Case, pool: list[list[bytes]]) -> list[list[tuple[int, Sequence[bytes]]]]:
    return [[(i, pool[(i - 1) % len(pool)]) for i in range(start, min(start + case.batch, case.messages + 1))]
            for start in range(1, case.messages + 1, case.batch)]


def footprint_bound(case: Case, cfg: Config, pool: list[list[bytes]]) -> int:
    """What a bounded store may hold on disk whatever the stream's length: twice the undelivered batches plus
    the one being written, three times the size limit (file threshold; SQLite's -wal, freelist and
    checkpoint lag), a segment and 1 MiB of overhead. An unbounded store passes it once the stream is long."""
    biggest = max(sum(map(len, m)) + 16 for m in pool)
    return 2 * (case.lag_batches + 1) * case.batch * biggest + 3 * cfg.limit_bytes + cfg.segment_bytes + MiB


def _crc(pool: list[list[bytes]], first: int, last: int) -> int:
    crc = 0
    for i in range(first, last + 1):
        for frame in pool[(i - 1) % len(pool)]:
            crc = zlib.crc32(frame, crc)
    return crc


def _disk_written() -> int:
    """Bytes this process has caused to be written to storage (``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def stream(kind: str, case: Case, cfg: Config, pool: list[list[bytes]], root: Path) -> dict[str, Any]:
    """Write the case's batches, trimming after each up to the lagging delivery mark; leave the files as a
    crash would (nothing closed)."""
    store = open_store(kind, root, cfg.limit_bytes, cfg.segment_bytes)
    wall = cpu = trim_wall = 0.0
    peak = 0
    delivered = 0
    io0 = _disk_written()
    for batch in _batches(case, pool):
        w0, c0 = time.perf_counter(), time.thread_time()
        store.write_batch(batch)
        w1 = time.perf_counter()
        peak = max(peak, store.disk_bytes())
        w2 = time.perf_counter()
        delivered = max(0, batch[-1][0] - case.lag_batches * case.batch)
        if delivered:
            store.trim(delivered)
        w3, c3 = time.perf_counter(), time.thread_time()
        wall += (w1 - w0) + (w3 - w2)
        trim_wall += w3 - w2
        cpu += c3 - c0  # disk_bytes' scandir is in it: a few µs per batch
        peak = max(peak, store.disk_bytes())
    return {"store": store, "wall_s": wall, "trim_s": trim_wall, "cpu_s": cpu, "max_bytes": peak,
            "disk_written": _disk_written() - io0,
            "end_bytes": store.disk_bytes(), "delivered": delivered}


def crash_copy(root: Path, dest: Path) -> Path:
    """The files as a crash leaves them (SQLite's shared-memory index not kept: it is rebuilt on open)."""
    dest.mkdir(parents=True)
    for p in root.iterdir():
        if p.is_file() and not p.name.endswith("-shm"):
            shutil.copy2(p, dest / p.name)
    return dest


def replay_in_fresh_process(kind: str, root: Path, after: int, cfg: Config) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.journal_replay", kind, str(root), str(after),
                          str(cfg.limit_bytes), str(cfg.segment_bytes)], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_case(case: Case, cfg: Config, tmp: Path) -> dict[str, Any]:
    """Every store through the case, interleaved per repeat; then one crash + replay per store."""
    pool = message_pool(case, cfg.large_sizes)
    written = sum(len(f) for i in range(1, case.messages + 1) for f in pool[(i - 1) % len(pool)])
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for r in range(cfg.repeats):
        for kind in KINDS:
            root = tmp / f"{kind}-{r}"
            res = stream(kind, case, cfg, pool, root)
            store = res.pop("store")
            if r == cfg.repeats - 1:
                crashed = crash_copy(root, tmp / f"{kind}-crash")
                res["replay"] = replay_in_fresh_process(kind, crashed, res["delivered"], cfg)
                res["replay"]["expected_crc"] = _crc(pool, res["delivered"] + 1, case.messages)
                shutil.rmtree(crashed)
            store.close()
            shutil.rmtree(root)
            runs[kind].append(res)
    out: dict[str, Any] = {"case": asdict(case), "frame_bytes_written": written,
                           "footprint_bound": footprint_bound(case, cfg, pool)}
    for kind, rs in runs.items():
        wall = statistics.median(x["wall_s"] for x in rs)
        out[kind] = {"msgs_per_s": case.messages / wall, "mb_per_s": written / wall / 1e6,
                     "cpu_us_per_msg": statistics.median(x["cpu_s"] for x in rs) / case.messages * 1e6,
                     "trim_share": statistics.median(x["trim_s"] / x["wall_s"] for x in rs),
                     "write_amplification": statistics.median(x["disk_written"] for x in rs) / written,
                     "max_bytes": max(x["max_bytes"] for x in rs), "end_bytes": rs[-1]["end_bytes"],
                     "delivered": rs[-1]["delivered"], "replay": rs[-1]["replay"], "walls_s": [x["wall_s"] for x in rs]}
    return out


def torn_tail(kind: str, cfg: Config, tmp: Path) -> dict[str, Any]:
    """Three batches of 100 metrics written; the third one's bytes cut in half on disk (a crash in the
    middle of its write, before its fsync returned: never acknowledged). What does a restart see, and can it
    append after it?"""
    case = Case("torn", 300, 100, 0)
    pool = message_pool(case, ())
    batches = _batches(case, pool)
    root = tmp / f"torn-{kind}"
    store = open_store(kind, root, 1 << 40, 1 << 40)  # no trim, no roll, no checkpoint in the way
    if isinstance(store, SqliteStore):
        store.db.execute("PRAGMA wal_autocheckpoint=0")
    for batch in batches[:2]:
        store.write_batch(batch)
    sizes = {p.name: p.stat().st_size for p in root.iterdir()}
    store.write_batch(batches[2])
    crashed = crash_copy(root, tmp / f"torn-{kind}-crash")
    store.close()
    for p in crashed.iterdir():
        grown = p.stat().st_size - sizes.get(p.name, 0)
        if grown > 0:
            os.truncate(p, sizes.get(p.name, 0) + grown // 2)
    reopened = open_store(kind, crashed, 1 << 40, 1 << 40)
    seen = [i for i, _ in reopened.replay(0)]
    nxt = (seen[-1] if seen else 0) + 1
    reopened.write_batch([(nxt + j, pool[j]) for j in range(10)])  # the next batch after the restart
    after = [i for i, _ in reopened.replay(0)]
    reopened.close()
    shutil.rmtree(root)
    shutil.rmtree(crashed)
    return {"acked_intact": seen[:200] == list(range(1, 201)),
            "torn_batch_records_kept": len(seen) - 200,
            "in_order": seen == list(range(1, len(seen) + 1)),
            "append_after_restart_ok": after == list(range(1, nxt + 10))}


def benchmark(quick: bool = False, root: Path | None = None) -> dict[str, Any]:
    """Run every case against every store; the dict ``run_all`` prints as figure 11."""
    cfg = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="journal-store-", dir=root) as t:
        tmp = Path(t)
        cases = [measure_case(c, cfg, tmp) for c in cfg.cases]
        torn = {k: torn_tail(k, cfg, tmp) for k in KINDS}
    return {"config": {"limit_bytes": cfg.limit_bytes, "segment_bytes": cfg.segment_bytes, "repeats": cfg.repeats,
                       "quick": quick}, "cases": cases, "torn_tail": torn}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--root", type=Path, default=None, help="where the stores go (default: the temp dir)")
    p.add_argument("--out", type=Path, default=Path("bench-out/journal_store.json"))
    a = p.parse_args()
    t0 = time.perf_counter()
    res = benchmark(a.quick, a.root)
    res["seconds"] = time.perf_counter() - t0
    write_json(a.out, res)
    for c in res["cases"]:
        print(c["case"]["name"])
        for k in KINDS:
            s = c[k]
            r = s["replay"]
            print(f"  {k:9s} {s['msgs_per_s']:>10,.0f} msg/s {s['mb_per_s']:7.1f} MB/s"
                  f"  cpu {s['cpu_us_per_msg']:8.2f} µs/msg  trim {s['trim_share']:5.1%}"
                  f"  written {s['write_amplification']:4.1f}x  max {s['max_bytes'] / 1e6:6.2f} MB"
                  f"  end {s['end_bytes'] / 1e6:6.2f} MB  replay {r['count']} in {r['seconds'] * 1e3:.0f} ms"
                  f" +{r['rss_delta_bytes'] / 1e6:.1f} MB RSS")
    print("torn tail:", json.dumps(res["torn_tail"]))
    print(f"({res['seconds']:.1f} s; JSON: {a.out})")


if __name__ == "__main__":
    main()
