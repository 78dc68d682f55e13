"""Smoke test of the GPU benchmark (figure 9) at its CPU size: three modes run, log the same detections.

It runs in its own process: its in-process wandb mode would otherwise leave a wandb session (and service)
in the test process that later tests' wandb runs would inherit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import ROOT

pytest.importorskip("torchvision")


@pytest.mark.slow
def test_three_modes_run_with_the_same_detections_and_everything_delivered(tmp_path: Path) -> None:
    from sidecar.readback import read_runs

    subprocess.run([sys.executable, "-m", "benchmarks.torch_detection", "--size", "tiny", "--root", str(tmp_path),
                    "--out", str(tmp_path / "out.json")], cwd=ROOT, check=True, timeout=900, capture_output=True)
    out = json.loads((tmp_path / "out.json").read_text())
    by_mode = {r["mode"]: r for r in out["results"]}
    assert set(by_mode) == {"none", "inprocess", "sidecar"}
    detections = {mode: r["detections_per_eval"] for mode, r in by_mode.items()}
    assert detections["none"] == detections["inprocess"] == detections["sidecar"] and detections["none"][0] > 0
    stats = by_mode["sidecar"]["client_stats"]
    assert stats["acked"] == stats["sent"] and stats.get("undelivered", 0) == 0
    assert not any(k.startswith(("dropped", "rejected")) for k in stats)
    [run] = read_runs(tmp_path / "sidecar" / "wandb_dir").values()  # what the sidecar made of it
    assert any(a.name == "val" for a in run.artifacts)
    assert any(a.name.endswith("_pred") for a in run.artifacts) and any(a.name.endswith("_model") for a in run.artifacts)
    assert [row["_step"] for row in run.history][-1] == out["config"]["iterations"]
