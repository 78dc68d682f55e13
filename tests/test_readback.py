"""Reading offline runs back: every run directory of a run counts, whatever wandb named it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import wandb

from sidecar.readback import read_runs
from sidecar.wandb_files import max_step_in, persisted


def test_a_run_directory_made_in_the_same_second_as_the_previous_one_is_read(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=tmp_path, id="quick-1", project="readback", reinit="create_new",
                     settings=wandb.Settings(console="off"))
    for step in range(3):
        run.log({"x": float(step)}, step=step)
    run.finish()
    root = tmp_path / "wandb"
    (first,) = root.glob("offline-run-*")
    deadline = time.monotonic() + 120  # wandb's service may still be closing the file when finish() returns
    while max_step_in(first / "run-quick-1.wandb") != 2:
        assert time.monotonic() < deadline, "wandb's file never showed the three steps"
        time.sleep(0.1)
    # a resume within the same second: wandb names the new directory "<name>-1" (seen after a quick restart)
    shutil.copytree(first, root / f"{first.name}-1")
    runs = read_runs(tmp_path)
    assert list(runs) == ["quick-1"]  # the id comes from the run file, not the directory's last dash
    assert [d.name for d in runs["quick-1"].dirs] == [first.name, f"{first.name}-1"]
    held = persisted(root, "quick-1", tmp_path / "cache.json", exclude=first.name)
    assert held.max_step == 2  # the "-1" directory alone holds steps 0..2
