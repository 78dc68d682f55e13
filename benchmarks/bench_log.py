"""Caller-side cost of one metrics call: ``SidecarClient.log`` vs ``wandb.log`` in-process (offline).

Both log the same dict of 10 scalars at increasing steps; every call is timed on its own
(``perf_counter_ns``). The client streams into a real sidecar process. Prints medians, p99 and ratios.

    .venv/bin/python -m benchmarks.bench_log [--calls 20000] [--out bench-out/log.json]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import summary_us, table, write_json


def _time_calls(log, calls: int, first_step: int = 0) -> list[int]:  # type: ignore[no-untyped-def]
    """Time each ``log(data, step=step)`` call on its own (the dict is built outside the timing)."""
    samples = []
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for step in range(first_step, first_step + calls):
            data = {f"train/m{i}": step * 0.001 + i for i in range(10)}
            t0 = clock()
            log(data, step=step)
            samples.append(clock() - t0)
    finally:
        gc.enable()
    return samples


def bench_client(addr: str, calls: int) -> list[int]:
    from trainer_hook import SidecarClient

    client = SidecarClient(addr, init_kwargs={"project": "bench"})
    samples = []
    for start in range(0, calls, 5000):  # flush between chunks: this measures the call, not a full queue
        samples += _time_calls(client.log, min(5000, calls - start), first_step=start)
        client.flush(60)
    assert client.finish(timeout=120), client.stats()
    return samples


def bench_client_down(calls: int, spill_dir: Path) -> list[int]:
    """The same calls with no sidecar listening: the backlog fills and spills to disk, the caller
    must not notice."""
    from tests.sidecar_process import free_port
    from trainer_hook import SidecarClient

    client = SidecarClient(f"tcp://127.0.0.1:{free_port()}", max_backlog_bytes=4 << 20, spill_dir=spill_dir)
    samples = _time_calls(client.log, calls)
    client.finish(timeout=0.1)
    return samples


def bench_wandb(root: Path, calls: int) -> list[int]:
    import wandb

    run = wandb.init(project="bench", mode="offline", dir=str(root), reinit="create_new",
                     settings=wandb.Settings(console="off"))
    samples = _time_calls(run.log, calls)
    run.finish()
    return samples


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--out", default="bench-out/log.json")
    a = p.parse_args()
    from tests.sidecar_process import SidecarProcess

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("WANDB_SILENT", "true")
        with SidecarProcess(root / "sidecar") as sidecar:
            ours = summary_us(bench_client(sidecar.addr, a.calls))
            assert sidecar.stop() == 0
        theirs = summary_us(bench_wandb(root / "inproc", a.calls))
    rows = [
        ["SidecarClient.log", ours["median_us"], ours["p99_us"], ours["mean_us"]],
        ["wandb run.log (in-process, offline)", theirs["median_us"], theirs["p99_us"], theirs["mean_us"]],
        ["ratio wandb / ours", theirs["median_us"] / ours["median_us"], theirs["p99_us"] / ours["p99_us"],
         theirs["mean_us"] / ours["mean_us"]],
    ]
    print(f"caller-side cost of one log call, 10 scalars, {a.calls} calls each")
    print(table(rows, ["", "median µs", "p99 µs", "mean µs"]))
    write_json(Path(a.out), {"calls": a.calls, "sidecar_client": ours, "wandb_inprocess": theirs,
                             "ratio_median": theirs["median_us"] / ours["median_us"],
                             "ratio_p99": theirs["p99_us"] / ours["p99_us"]})


if __name__ == "__main__":
    main()
