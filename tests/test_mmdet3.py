"""MMDetection 3.x (mmengine) through the sidecar: a real mmengine Runner trains mmdet 3's own Mask R-CNN
config (shrunk) and streams to a real sidecar process; the offline wandb run is read back.

Needs the 3.x stack (``.venv3``, ``scripts/setup_mmdet3.sh``); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mmengine = pytest.importorskip("mmengine", reason="needs the MMDetection 3.x stack (.venv3)")
mmdet = pytest.importorskip("mmdet")
if not mmdet.__version__.startswith("3."):
    pytest.skip(f"needs mmdet 3.x, found {mmdet.__version__}", allow_module_level=True)

from sidecar.readback import Artifact, RunRecords, read_runs  # noqa: E402
from examples.mmdet2.synthetic_coco import make_coco_dataset  # noqa: E402
from tests.sidecar_process import SidecarProcess  # noqa: E402
from tests.sent_predictions import assert_table_shows, load as load_sent  # noqa: E402
from tests.stream_client import value  # noqa: E402

pytestmark = pytest.mark.mmdet3

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["square", "circle", "triangle"]
ITERS_PER_EPOCH = 12  # 6 train images x RepeatDataset(4) / batch 2
TRAIN_KEYS = {"loss", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask", "acc", "lr"}
VAL_KEYS = {f"coco/{t}_mAP{s}" for t in ("bbox", "segm") for s in ("", "_50", "_75", "_s", "_m", "_l")}


def _train(sidecar: SidecarProcess, tmp_path: Path, run_id: str, *extra: str) -> subprocess.Popen[str]:
    """Start ``tests.mmdet3.train`` in its own process, from a project directory holding one .py file."""
    project = tmp_path / f"project-{run_id}"
    project.mkdir()
    (project / "my_detector.py").write_text("NUM_CLASSES = 3\n")
    (project / "notes.txt").write_text("not code\n")
    cmd = [sys.executable, "-m", "tests.mmdet3.train", "--work-dir", str(tmp_path / f"work-{run_id}"),
           "--data-root", str(tmp_path / "data"), "--sidecar-addr", sidecar.addr, "--run-id", run_id, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "trainer-wandb")}
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return json.loads(out.strip().splitlines()[-1])


def _table(artifact: Artifact, name: str) -> dict[str, Any]:
    return json.loads(Path(artifact.files[name]["local_path"]).read_text())


def _row(run: RunRecords, step: int) -> dict[str, Any]:
    return next(row for row in run.history if row["_step"] == step)


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Any]:
    return make_coco_dataset(tmp_path / "data")


def _check_trainer_stats(result: dict[str, Any]) -> None:
    stats = result["stats"]
    assert not {k: v for k, v in stats.items() if k.startswith(("dropped", "rejected", "undelivered")) and v}
    assert stats["unacked"] == 0 and stats["acked_seq"] > 0


def test_epoch_training_logs_metrics_config_code_checkpoints_and_tables(tmp_path: Path, data: dict) -> None:
    with SidecarProcess(tmp_path) as sidecar:
        result = _finish(_train(sidecar, tmp_path, "mmdet3ep", "--draw", "--record-sent", str(tmp_path / "sent.json")))
        assert sidecar.stop() == 0
    _check_trainer_stats(result)
    assert result["backend_counters"] == {}  # nothing skipped, no step moved back
    run = read_runs(sidecar.wandb_dir)["mmdet3ep"]
    assert run.project == "test" and run.exit_code == 0

    # config: the Runner's add_config, in the run start
    assert run.config["train_cfg"]["max_epochs"] == 2
    assert run.config["model"]["backbone"]["depth"] == 18
    assert run.config["custom_imports"]["imports"] == ["trainer_hook.mmdet3"]

    # history: the step is the iteration; validation metrics and drawn images join the epoch's last row
    last = 2 * ITERS_PER_EPOCH
    assert run.steps() == list(range(1, last + 1))
    for row in run.history:
        assert TRAIN_KEYS <= set(row), row
    for step in (ITERS_PER_EPOCH, last):
        row = _row(run, step)
        assert VAL_KEYS <= set(row), row
        assert all(isinstance(row[k], (int, float)) for k in VAL_KEYS)
        assert row["val_img._type"] == "images/separated" and row["val_img.count"] == 4  # all val images
    assert not any("coco/bbox_mAP" in row for row in run.history if row["_step"] % ITERS_PER_EPOCH)
    assert run.summary["coco/bbox_mAP"]["max"] >= 0  # define_metric_cfg={"coco/bbox_mAP": "max"}

    by_type: dict[str, list[Artifact]] = {}
    for a in run.artifacts:
        by_type.setdefault(a.type, []).append(a)
    assert sorted(by_type) == ["code", "dataset", "evaluation", "model"]

    # code: the trainer's working directory, wandb's default selection (python files)
    (code,) = by_type["code"]
    # wandb's default name; the script (tests/mmdet3/train.py) lies outside the working directory: "None"
    assert code.name == "source-test-None" and list(code.files) == ["my_detector.py"]

    # checkpoints: one per epoch, aliases, the evaluation of that epoch as metadata
    models = by_type["model"]
    assert [m.name for m in models] == ["run_mmdet3ep_model"] * 2
    assert [sorted(m.aliases) for m in models] == [["epoch_1", "latest"], ["epoch_2", "latest"]]
    assert [list(m.files) for m in models] == [["epoch_1.pth"], ["epoch_2.pth"]]
    for epoch, m in enumerate(models, start=1):
        assert m.metadata["epoch"] == epoch
        assert VAL_KEYS <= set(m.metadata)
        assert m.metadata["coco/bbox_mAP"] == pytest.approx(_row(run, epoch * ITERS_PER_EPOCH)["coco/bbox_mAP"])
    assert [Path(c).name for c in result["checkpoints"]] == ["epoch_1.pth", "epoch_2.pth"]

    # validation table once, prediction tables per evaluation
    (val,) = by_type["dataset"]
    assert val.name == "val"
    val_table = _table(val, "val_data.table.json")
    assert val_table["columns"] == ["image_name", "image"] and val_table["nrows"] == 3
    assert all(cell["boxes"]["ground_truth"] and cell["masks"] for _, cell in val_table["data"])
    preds = by_type["evaluation"]
    assert [p.name for p in preds] == ["run_mmdet3ep_pred"] * 2
    assert [sorted(p.aliases) for p in preds] == [["epoch_1", "latest"], ["epoch_2", "latest"]]
    # each table shows exactly the predictions the hook sent (which ones pass bbox_score_thr depends on
    # the machine's kernels, so nothing is assumed about them); the hook sent only scores above it
    sent = load_sent(tmp_path / "sent.json")
    assert [b["tag"] for b in sent] == ["epoch_1", "epoch_2"]
    val_names = [r[0] for r in val_table["data"]]
    for p, batch in zip(preds, sent):
        table = _table(p, "eval_data.table.json")
        assert table["nrows"] == 3 and sorted(batch["indices"]) == [0, 1, 2]  # every selected image
        assert all(s > 0.3 for scores in batch["scores"] for s in scores)
        assert [len(r) for r in batch["rles"]] == [len(sc) for sc in batch["scores"]]  # a mask for each box
        assert_table_shows(table, batch, CLASSES, val_names)


def test_iteration_training_tags_checkpoints_and_tables_by_iteration(tmp_path: Path, data: dict) -> None:
    with SidecarProcess(tmp_path) as sidecar:
        result = _finish(_train(sidecar, tmp_path, "mmdet3it", "--by-iter"))
        assert sidecar.stop() == 0
    _check_trainer_stats(result)
    run = read_runs(sidecar.wandb_dir)["mmdet3it"]
    assert run.steps() == list(range(1, 25))
    for step in (12, 24):  # upstream mmdet 2.x loses these rows in iteration mode (mmdet#7000)
        assert VAL_KEYS <= set(_row(run, step))
    models = run.artifacts_named("run_mmdet3it_model")
    assert [sorted(m.aliases) for m in models] == [["iter_12", "latest"], ["iter_24", "latest"]]
    assert [m.metadata["iter"] for m in models] == [12, 24] and all(VAL_KEYS <= set(m.metadata) for m in models)
    preds = run.artifacts_named("run_mmdet3it_pred")
    assert [sorted(p.aliases) for p in preds] == [["iter_12", "latest"], ["iter_24", "latest"]]


def test_2x_style_client_and_3x_trainer_share_one_sidecar(tmp_path: Path, data: dict) -> None:
    with SidecarProcess(tmp_path) as sidecar:
        trainer = _train(sidecar, tmp_path, "mmdet3sh")
        plain = subprocess.Popen([sys.executable, "-m", "tests.stream_client", sidecar.addr, "plainrun",
                                  "--steps", "500", "--keys", "5", "--prefix", "p", "--exit-code", "0"], cwd=ROOT)
        result = _finish(trainer)
        assert plain.wait(300) == 0
        assert sidecar.stop() == 0
    _check_trainer_stats(result)
    runs = read_runs(sidecar.wandb_dir)
    assert sorted(runs) == ["mmdet3sh", "plainrun"]
    plain_run, mm = runs["plainrun"], runs["mmdet3sh"]
    assert plain_run.steps() == list(range(500)) and plain_run.artifacts == []
    for row in plain_run.history:
        assert {k: v for k, v in row.items() if not k.startswith("_")} == {
            f"p/m{i}": value(row["_step"], i) for i in range(5)}
    assert mm.steps() == list(range(1, 25))
    assert not any(k.startswith("p/") for row in mm.history for k in row)
    assert {a.name for a in mm.artifacts} >= {"val", "run_mmdet3sh_model", "run_mmdet3sh_pred"}
    assert plain_run.config["prefix"] == "p" and "model" in mm.config


def test_vis_backend_api_steps_images_config_and_close(tmp_path: Path) -> None:
    import torch
    from mmengine.config import Config
    from mmengine.logging import MessageHub

    from trainer_hook.mmdet3 import SidecarVisBackend

    rng = np.random.default_rng(0)
    with SidecarProcess(tmp_path) as sidecar:
        backend = SidecarVisBackend(sidecar_addr=sidecar.addr, init_kwargs={"id": "visapi", "project": "api"},
                                    define_metric_cfg=[{"name": "loss", "summary": "min"}])
        backend.add_config(Config(dict(lr=0.1, sizes=(1, 2), nested=dict(cls=Config, deep=[dict(a=None)]))))
        backend.add_scalars({"loss": torch.tensor(0.5), "acc": np.float32(0.25), "vec": [1, 2]}, step=1)
        backend.add_scalar("loss", 0.4, step=2)
        backend.add_scalars({"late": 1.0}, step=1)  # behind step 2: logged at step 2, not dropped by wandb
        images = [rng.integers(0, 256, (8, 10, 3), dtype=np.uint8) for _ in range(2)]
        backend.add_image("img", images[0], step=3)
        backend.add_image("img", images[1], step=3)  # same name, same step: one row, two images
        backend.add_image("gray", rng.random((6, 6)), step=4)  # floats in [0, 1], as wandb.Image takes them
        hub = MessageHub.get_instance("test_vis_backend_api")
        hub.update_info("iter", 9)  # a validation inside training, after iteration 10
        hub.update_info("loop_stage", "val")
        backend.add_scalars({"coco/bbox_mAP": 0.5}, step=1)  # LoggerHook passes the epoch
        hub.pop_info("loop_stage")
        backend.add_config({"late_key": "yes"})  # after the run start: a config update
        backend.close()
        backend.add_scalar("after", 1.0, step=11)  # dropped and counted, never raised
        assert sidecar.stop() == 0
    assert backend.counters == {"skipped_values": 1, "steps_raised": 1, "after_close": 1}
    run = read_runs(sidecar.wandb_dir)["visapi"]
    assert run.steps() == [1, 2, 3, 4, 10]
    assert {k: v for k, v in _row(run, 1).items() if not k.startswith("_")} == {"loss": 0.5, "acc": 0.25}
    assert _row(run, 2)["loss"] == 0.4 and _row(run, 2)["late"] == 1.0
    assert _row(run, 3)["img._type"] == "images/separated" and _row(run, 3)["img.count"] == 2
    assert _row(run, 4)["gray._type"] == "image-file" and _row(run, 4)["gray.width"] == 6
    assert _row(run, 10)["coco/bbox_mAP"] == 0.5
    assert run.config["lr"] == 0.1 and run.config["sizes"] == [1, 2] and run.config["late_key"] == "yes"
    assert "Config" in run.config["nested"]["cls"] and run.config["nested"]["deep"] == [{"a": None}]
    assert run.summary["loss"]["min"] == 0.4
    assert run.exit_code == 0
    # log_code: this process's working directory is outside the sidecar's --allow-root: not read
    assert run.artifacts == [] and "code root" in sidecar.log()


def test_hook_without_vis_backend_logs_to_a_run_of_its_own(tmp_path: Path, data: dict) -> None:
    """The hook alone (visualizer without SidecarVisBackend): checkpoints and tables in its own run."""
    from mmengine.runner import Runner
    from mmengine.utils import import_modules_from_strings

    from examples.mmdet2.synthetic_coco import coco_paths
    from tests.mmdet3.tiny_config import tiny_mask_rcnn_cfg

    with SidecarProcess(tmp_path) as sidecar:
        cfg = tiny_mask_rcnn_cfg(coco_paths(tmp_path / "data"), str(tmp_path / "work"), max_epochs=1,
                                 custom_hooks=[dict(type="DetWandbSidecarHook", sidecar_addr=sidecar.addr,
                                                    init_kwargs={"id": "hookonly"}, num_eval_images=2)])
        import_modules_from_strings(imports=["trainer_hook.mmdet3"])
        cfg.experiment_name = "hook_only"
        Runner.from_cfg(cfg).train()
        assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["hookonly"]
    assert run.history == [] and run.exit_code == 0
    assert [(a.name, sorted(a.aliases)) for a in run.artifacts] == [
        ("val", ["latest"]), ("run_hookonly_model", ["epoch_1", "latest"]), ("run_hookonly_pred", ["epoch_1", "latest"])]
    assert _table(run.artifacts[0], "val_data.table.json")["nrows"] == 2
