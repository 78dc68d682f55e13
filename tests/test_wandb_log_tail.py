"""The in-process reader of wandb's transaction log, on a real offline run's file: what it tells the run's
finish check (the highest step written, and whether wandb wrote the run's exit record, which comes last)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sidecar.wandb_log_tail import WandbLogTail

_RUN = """
import wandb
run = wandb.init(project="tail", id="tailrun", settings=wandb.Settings(console="off"))
for step in range(300):
    run.log({"x": float(step), "pad": "p" * 200}, step=step)
run.finish()
"""


def test_tail_sees_every_step_and_the_exit_only_in_a_whole_file(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    env.pop("WANDB_SERVICE", None)  # its own wandb service, as a trainer's
    subprocess.run([sys.executable, "-c", _RUN], env=env, check=True, timeout=120)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-tailrun.wandb")

    whole = WandbLogTail(run_file)
    assert whole.max_step() == 299 and whole.exited

    cut = tmp_path / "cut.wandb"  # the file as it may be when run.finish returns: its last part unwritten
    data = run_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    partial = WandbLogTail(cut)
    step = partial.max_step()
    assert 0 < step < 299 and not partial.exited
    with open(cut, "ab") as f:  # the rest arrives: the same reader goes on from where it stopped
        f.write(data[len(data) // 2:])
    assert partial.max_step() == 299 and partial.exited
