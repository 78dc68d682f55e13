"""Smoke test of the GPU benchmark (figure 10) at its CPU size: three modes run, log the same detections."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torchvision")


@pytest.mark.slow
def test_three_modes_run_with_the_same_detections_and_everything_delivered(tmp_path: Path) -> None:
    from benchmarks.torch_detection import benchmark
    from sidecar.readback import read_runs

    out = benchmark("tiny", ["none", "inprocess", "sidecar"], tmp_path)
    by_mode = {r["mode"]: r for r in out["results"]}
    assert set(by_mode) == {"none", "inprocess", "sidecar"}
    detections = {mode: r["detections_per_eval"] for mode, r in by_mode.items()}
    assert detections["none"] == detections["inprocess"] == detections["sidecar"] and detections["none"][0] > 0
    stats = by_mode["sidecar"]["client_stats"]
    assert stats["acked"] == stats["sent"] and stats.get("undelivered", 0) == 0
    assert not any(k.startswith(("dropped", "rejected")) for k in stats)
    [run] = read_runs(tmp_path / "sidecar" / "wandb_dir").values()  # what the sidecar made of it
    assert {a.name.split("_")[0] for a in run.artifacts} >= {"val", "run"}
    assert any(a.name.endswith("_pred") for a in run.artifacts) and any(a.name.endswith("_model") for a in run.artifacts)
    assert [row["_step"] for row in run.history][-1] == out["config"]["iterations"]
