"""A node's sweep into one sidecar: N trainer processes at once, each logging 20 scalars at 100 steps/s.

Measured from the outside, as an operator would: the worst delivery lag any run shows in
``wandb-sidecar status`` while they train (``lag_steps``: the trainer's newest step minus the newest step
wandb has a committed row of; a run still in ``wandb.init`` counts too), how long after
the last trainer's ``finish()`` returned every run is finished in wandb, and the sidecar's peak RSS.

    python -m benchmarks.sweep [--trainers 16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, cpu_seconds, memory_bytes

_TRAINER = """
import json, sys, time
from trainer_hook import SidecarClient
addr, run_id, steps, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
client = SidecarClient(addr, run_id=run_id, init_kwargs={"project": "sweep"}, spill_dir=None)
t0 = time.monotonic()
for step in range(steps):
    client.log({f"train/m{k}": step * 0.001 + k for k in range(20)}, step=step)
    delay = t0 + (step + 1) / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
ok = client.finish(timeout=300)
print(json.dumps({"ok": ok, "finished_at": time.time(), "late_s": time.monotonic() - t0 - steps / rate}))
"""


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far (``/proc/stat``): the machine's load over an interval."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def sweep(trainers: int, seconds: float, rate: float = 100.0) -> dict[str, Any]:
    from tests.sidecar_process import SidecarProcess

    steps = int(seconds * rate)
    with tempfile.TemporaryDirectory() as tmp, SidecarProcess(Path(tmp)) as sidecar:
        assert sidecar.proc is not None
        procs = [subprocess.Popen([sys.executable, "-c", _TRAINER, sidecar.addr, f"sweep{i:02d}", str(steps), str(rate)],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True) for i in range(trainers)]
        worst_lag, polls = 0, 0
        lags: list[int] = []  # the worst lag of each poll: the start (wandb.init of every run) vs steady state
        cpu0, (busy0, total0), t0 = cpu_seconds(sidecar.proc.pid), _machine_busy(), time.monotonic()
        while any(p.poll() is None for p in procs):
            status = sidecar.status(timeout=10)
            runs = [r for name, r in status["runs"].items() if name.startswith("sweep")]
            lags.append(max([0, *(r["lag_steps"] for r in runs if r["state"] == "active")]))
            worst_lag = max(worst_lag, lags[-1])
            polls += 1
            time.sleep(0.2)
        sidecar_cpu = (cpu_seconds(sidecar.proc.pid) - cpu0) / (time.monotonic() - t0)
        busy1, total1 = _machine_busy()
        results = [json.loads(p.stdout.read().strip().splitlines()[-1]) for p in procs]
        last_finish = max(r["finished_at"] for r in results)
        status = sidecar.wait_for(lambda s: sum(r["state"] == "finished" for n, r in s["runs"].items()
                                                if n.startswith("sweep")) == trainers, timeout=600)
        all_finished = time.time() - last_finish
        delivered = sum(r["delivered_seq"] for r in status["runs"].values())
        rss = memory_bytes(sidecar.proc.pid, "VmHWM") / 2**20
        assert sidecar.stop(600) == 0
    return {"trainers": trainers, "steps_each": steps, "all_acked": all(r["ok"] for r in results),
            "worst_lag_steps": worst_lag, "status_polls": polls, "finished_after_last_finish_s": all_finished,
            "sidecar_peak_rss_mb": rss, "delivered_messages": delivered,
            "worst_lag_second_half_steps": max(lags[len(lags) // 2:], default=0),
            "sidecar_cpu_cores": sidecar_cpu, "machine_busy": (busy1 - busy0) / max(1, total1 - total0),
            "trainer_late_s_max": max(r["late_s"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trainers", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0)
    a = p.parse_args()
    print(json.dumps(sweep(a.trainers, a.seconds), indent=2))


if __name__ == "__main__":
    main()
