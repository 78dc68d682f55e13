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
from tests.resumed_run import assert_each_epochs_artifacts_once  # noqa: E402
from tests.sidecar_process import SidecarProcess  # noqa: E402
from tests.sent_predictions import assert_table_shows, load as load_sent  # noqa: E402
from tests.stream_client import value  # noqa: E402

pytestmark = pytest.mark.mmdet3

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["square", "circle", "triangle"]
ITERS_PER_EPOCH = 12  # 6 train images x RepeatDataset(4) / batch 2
TRAIN_KEYS = {"loss", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask", "acc", "lr"}
VAL_KEYS = {f"coco/{t}_mAP{s}" for t in ("bbox", "segm") for s in ("", "_50", "_75", "_s", "_m", "_l")}


def _train(sidecar: SidecarProcess | None, tmp_path: Path, run_id: str, *extra: str,
           env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``tests.mmdet3.train`` in its own process, from a project directory holding one .py file.

    Without a sidecar: upstream's ``WandbVisBackend``, offline, into ``tmp_path / "up-wandb"``."""
    project = tmp_path / f"project-{run_id}"
    project.mkdir(exist_ok=True)
    (project / "my_detector.py").write_text("NUM_CLASSES = 3\n")
    (project / "notes.txt").write_text("not code\n")
    cmd = [sys.executable, "-m", "tests.mmdet3.train", "--work-dir", str(tmp_path / f"work-{run_id}"),
           "--data-root", str(tmp_path / "data"), "--run-id", run_id, *extra]
    cmd += ["--sidecar-addr", sidecar.addr] if sidecar else ["--logger", "upstream", "--wandb-dir", str(tmp_path / "up-wandb")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(tmp_path / "trainer-wandb"), "WANDB_DATA_DIR": str(tmp_path / "trainer-wandb-data"),
           "WANDB_CACHE_DIR": str(tmp_path / "trainer-wandb-cache"), **(env or {})}
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _local_scalars(work_dir: Path) -> list[dict[str, Any]]:
    """What mmengine's own ``LocalVisBackend`` recorded: one dict per ``add_scalars`` call, with its step."""
    (path,) = work_dir.glob("*/vis_data/scalars.json")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    _check_validation_keeps_training_values(run, tmp_path / "work-mmdet3ep")

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


def _check_validation_keeps_training_values(run: RunRecords, work_dir: Path) -> None:
    """mmengine logs ``time``/``data_time`` for training iterations and for each validation; where the
    validation joins a training row, both values are there, the validation's as ``val/<key>``. Every key
    training and validation share is checked, against mmengine's own record (``LocalVisBackend``)."""
    local = _local_scalars(work_dir)
    train = {r["step"]: r for r in local if "loss" in r}
    val = [r for r in local if "coco/bbox_mAP" in r]
    assert sorted(train) == list(range(1, 2 * ITERS_PER_EPOCH + 1)) and len(val) == 2
    shared = (set().union(*train.values()) & set().union(*val)) - {"step"}
    assert {"time", "data_time"} <= shared
    for epoch, record in enumerate(val, start=1):
        row = _row(run, epoch * ITERS_PER_EPOCH)
        for key in shared:
            assert row[key] == pytest.approx(train[epoch * ITERS_PER_EPOCH][key]), key  # the training's
            assert row[f"val/{key}"] == pytest.approx(record[key]), key  # and the validation's
    assert not any(k.startswith("val/") for row in run.history if row["_step"] % ITERS_PER_EPOCH for k in row)


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
        hub.update_info("iter", 9)  # training iteration 10, then a validation inside training
        hub.update_info("loop_stage", "train")
        backend.add_scalars({"loss": 0.45, "time": 0.1}, step=10)
        hub.update_info("loop_stage", "val")
        # LoggerHook passes the epoch; keys training logs too keep both values, the validation's as val/...
        backend.add_scalars({"coco/bbox_mAP": 0.5, "time": 0.2, "loss": 0.9}, step=1)
        hub.pop_info("loop_stage")
        backend.add_config({"late_key": "yes"})  # after the run start: a config update
        backend.close()
        backend.add_scalar("after", 1.0, step=11)  # dropped and counted, never raised
        assert sidecar.stop() == 0
    assert backend.counters == {"skipped_values": 1, "steps_raised": 1, "after_close": 1, "val_keys_renamed": 1}
    run = read_runs(sidecar.wandb_dir)["visapi"]
    assert run.steps() == [1, 2, 3, 4, 10]
    assert {k: v for k, v in _row(run, 1).items() if not k.startswith("_")} == {"loss": 0.5, "acc": 0.25}
    assert _row(run, 2)["loss"] == 0.4 and _row(run, 2)["late"] == 1.0
    assert _row(run, 3)["img._type"] == "images/separated" and _row(run, 3)["img.count"] == 2
    assert _row(run, 4)["gray._type"] == "image-file" and _row(run, 4)["gray.width"] == 6
    assert {k: v for k, v in _row(run, 10).items() if not k.startswith("_")} == {
        "loss": 0.45, "time": 0.1, "coco/bbox_mAP": 0.5, "val/time": 0.2, "val/loss": 0.9}
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


# ------------------------------------------------------------------------------------ parity with upstream


def _history_keys(run: RunRecords) -> set[str]:
    """Logged names (an image's ``name._type``, ``name.count`` ... count as ``name``)."""
    return {k.split(".", 1)[0] for row in run.history for k in row if not k.startswith("_")}


def _images(row: dict[str, Any], name: str) -> int:
    kind = row.get(f"{name}._type")
    return 0 if kind is None else row[f"{name}.count"] if kind == "images/separated" else 1


def _plain_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


# What ours logs differently from mmengine's WandbVisBackend + DetVisualizationHook, on purpose (README,
# "Differences from upstream", 3.x); the parity test allows exactly these.
VAL_RENAMED = {"val/time", "val/data_time"}  # validation's time/data_time where it joins a training row
CONFIG_GIVEN_DIFFERENTLY = {"visualizer", "custom_hooks", "custom_imports", "work_dir"}  # not the logger's doing


def test_parity_with_upstream_wandb_vis_backend_record_by_record(tmp_path: Path, data: dict) -> None:
    """The same tiny training (mmdet 3.3's own config, shrunk), once with mmengine's ``WandbVisBackend`` +
    ``DetVisualizationHook`` and once with ours through a sidecar: ours holds everything upstream logs
    under the same names, plus checkpoints and tables; every other difference is listed above."""
    up = _finish(_train(None, tmp_path, "mmdet3up", "--draw"))
    with SidecarProcess(tmp_path) as sidecar:
        _finish(_train(sidecar, tmp_path, "mmdet3pa", "--draw"))
        assert sidecar.stop() == 0
    upstream = read_runs(tmp_path / "up-wandb")["mmdet3up"]
    ours = read_runs(sidecar.wandb_dir)["mmdet3pa"]
    assert "stats" not in up and upstream.exit_code == ours.exit_code == 0

    # history: the same names, plus the validation's time/data_time under val/
    assert _history_keys(ours) == _history_keys(upstream) | VAL_RENAMED
    assert TRAIN_KEYS | VAL_KEYS | {"time", "data_time", "val_img"} <= _history_keys(upstream)
    # upstream: one row per call (wandb's own counter: training rows, a row per validation, a row per
    # drawn image); ours: one row per training iteration, the validation and its images joining the last
    # iteration of its epoch (the step is honoured)
    up_train = [r for r in upstream.history if "loss" in r]
    up_val = [r for r in upstream.history if "coco/bbox_mAP" in r]
    up_img = [r for r in upstream.history if "val_img._type" in r]
    assert len(up_train) == 2 * ITERS_PER_EPOCH and len(up_val) == 2
    assert len(upstream.history) == len(up_train) + len(up_val) + len(up_img)  # nothing else, nothing shared
    assert ours.steps() == list(range(1, 2 * ITERS_PER_EPOCH + 1))
    assert all(TRAIN_KEYS | {"time", "data_time"} <= set(row) for row in ours.history)
    val_steps = [r["_step"] for r in ours.history if "coco/bbox_mAP" in r]
    assert val_steps == [ITERS_PER_EPOCH, 2 * ITERS_PER_EPOCH]
    for up_row, step in zip(up_val, val_steps):  # the same keys in the validation's row
        row = _row(ours, step)
        for key in _history_keys(upstream) & {k for k in up_row if not k.startswith("_")}:
            assert (f"val/{key}" if key in ("time", "data_time") else key) in row, key
    # drawn images: every one upstream drew, under the same name and size, grouped by step in ours
    assert sum(_images(r, "val_img") for r in ours.history) == sum(_images(r, "val_img") for r in up_img) == 8
    assert {(r["val_img.width"], r["val_img.height"]) for r in up_img} == \
        {(r["val_img.width"], r["val_img.height"]) for r in ours.history if "val_img._type" in r}
    assert ours.summary["coco/bbox_mAP"].keys() == upstream.summary["coco/bbox_mAP"].keys()  # define_metric

    # config: the same, but for what the two trainings were given differently
    ours_cfg, up_cfg = _plain_json(ours.config), _plain_json(upstream.config)
    assert set(ours_cfg) ^ set(up_cfg) <= CONFIG_GIVEN_DIFFERENTLY
    assert {k for k in set(ours_cfg) & set(up_cfg) if ours_cfg[k] != up_cfg[k]} <= CONFIG_GIVEN_DIFFERENTLY
    assert ours_cfg["model"] == up_cfg["model"] and ours_cfg["train_dataloader"] == up_cfg["train_dataloader"]

    # code artifact: same name, type and files; then what only ours logs
    def code(run: RunRecords) -> list[tuple[str, str, list[str]]]:
        return [(a.name, a.type, sorted(a.files)) for a in run.artifacts if a.type == "code"]

    assert code(ours) == code(upstream) == [("source-test-None", "code", ["my_detector.py"])]
    assert [a.type for a in upstream.artifacts] == ["code"]
    assert sorted({a.type for a in ours.artifacts}) == ["code", "dataset", "evaluation", "model"]
    assert [sorted(a.aliases) for a in ours.artifacts_named("run_mmdet3pa_model")] == [["epoch_1", "latest"],
                                                                                       ["epoch_2", "latest"]]
    assert len(ours.artifacts_named("run_mmdet3pa_pred")) == 2 and len(ours.artifacts_named("val")) == 1


# ------------------------------------------------------------------------------------ distributed


def test_two_rank_training_gives_one_run_from_rank_0_with_every_ranks_predictions(tmp_path: Path,
                                                                                   data: dict) -> None:
    """``--launcher pytorch`` with 2 ranks on CPU (gloo): one wandb run, one client (rank 0), prediction
    tables that cover the selected images every rank evaluated, no hang."""
    from tests.sidecar_process import free_port
    from trainer_hook.detections import eval_image_indices

    # the val sampler deals images out by rank (rank r: r, r + 2, ...): the selection spans both ranks
    selected = eval_image_indices(4, 3).tolist()
    assert {i % 2 for i in selected} == {0, 1}
    port = str(free_port())
    with SidecarProcess(tmp_path) as sidecar:
        ranks = [_train(sidecar, tmp_path, "mmdet3dd", "--dist", "--record-sent", str(tmp_path / f"sent{rank}.json"),
                        env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
                 for rank in (0, 1)]
        try:
            results = [_finish(proc, timeout=600) for proc in ranks]  # a hang fails here
        finally:
            for proc in ranks:
                if proc.poll() is None:
                    proc.kill()
        status = sidecar.status()
        assert sidecar.stop() == 0
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["clients"] for r in results] == [1, 0]  # only rank 0 connects
    assert list(status["runs"]) == ["mmdet3dd"] and status["runs"]["mmdet3dd"]["client"]["pid"] == results[0]["pid"]
    _check_trainer_stats(results[0])
    runs = read_runs(sidecar.wandb_dir)
    assert list(runs) == ["mmdet3dd"]
    run = runs["mmdet3dd"]
    assert run.exit_code == 0
    # 6 train images x 4 / (2 ranks x batch 2): 6 iterations an epoch
    assert run.steps() == list(range(1, 13))
    assert [r["_step"] for r in run.history if "coco/bbox_mAP" in r] == [6, 12]
    (val,) = run.artifacts_named("val")
    val_names = [r[0] for r in val.table("val_data")["data"]]
    assert len(val_names) == 3
    sent = load_sent(tmp_path / "sent0.json")
    assert load_sent(tmp_path / "sent1.json") == []  # rank 1 sends nothing
    assert [b["tag"] for b in sent] == ["epoch_1", "epoch_2"]
    for art, batch in zip(run.artifacts_named("run_mmdet3dd_pred"), sent):
        assert batch["indices"] == [0, 1, 2]  # rank 0's and rank 1's images
        assert_table_shows(art.table("eval_data"), batch, CLASSES, val_names)
    assert [sorted(m.aliases) for m in run.artifacts_named("run_mmdet3dd_model")] == [["epoch_1", "latest"],
                                                                                      ["epoch_2", "latest"]]


# ------------------------------------------------------------------------------------ predictions


def _predictions_before(pred: Any, thr: float) -> tuple[list, list, list, list | None]:
    """The hook's predictions as it computed them before the device filter and the worker (everything
    copied to the CPU, filtered there, masks encoded on the training thread): the content to keep."""
    import pycocotools.mask as mask_util

    def numpy(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    scores = numpy(pred.scores).astype(np.float32).reshape(-1)
    keep = scores > thr if thr > 0 else np.ones(len(scores), dtype=bool)
    boxes = numpy(pred.bboxes).astype(np.float32).reshape(-1, 4)[keep]
    labels = numpy(pred.labels).astype(np.int64).reshape(-1)[keep]
    rles = None
    if "masks" in pred:
        masks = numpy(getattr(pred.masks, "masks", pred.masks))[keep]
        encoded = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))) if len(masks) else []
        rles = [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()} for r in encoded]
    return boxes.tolist(), scores[keep].tolist(), labels.tolist(), rles


def test_predictions_sent_are_unchanged_by_the_device_filter_and_the_mask_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from types import SimpleNamespace

    import torch
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    import trainer_hook.mmdet3 as mmdet3
    from tests.sent_predictions import record_prediction_batches
    from tests.sidecar_process import free_port
    from trainer_hook import SidecarClient

    rng = np.random.default_rng(0)
    # float32 scores around the threshold: 0.3 itself is dropped (strict), 0.3004 kept (shown as "0.30")
    scores = torch.tensor([0.9, 0.3, 0.3004, 0.2999, 0.5, 0.05, 0.31])
    n, h, w = len(scores), 20, 24

    def sample(path: str, masks: Any) -> DetDataSample:
        s = DetDataSample(metainfo={"img_path": path})
        xy = torch.as_tensor(rng.uniform(0, 10, (n, 2)), dtype=torch.float32)
        inst = InstanceData(bboxes=torch.cat([xy, xy + 5], 1), scores=scores.clone(),
                            labels=torch.as_tensor(rng.integers(0, 3, n)))
        if masks is not None:
            inst.masks = masks
        s.pred_instances = inst
        return s

    bits = rng.random((n, h, w)) > 0.6
    samples = [sample("a.png", torch.as_tensor(bits)),  # a (n, H, W) tensor, as mmdet 3's heads give
               sample("b.png", BitmapMasks(bits.astype(np.uint8), h, w)),  # BitmapMasks
               sample("c.png", None),  # boxes only
               sample("d.png", torch.as_tensor(bits))]  # not a selected image: never touched

    threads: list[str] = []
    encode = mmdet3.encode_masks
    monkeypatch.setattr(mmdet3, "encode_masks", lambda m: threads.append(threading.current_thread().name) or encode(m))
    monkeypatch.setattr(SidecarClient, "send", SidecarClient.send)  # the recorder's wrapping is undone after
    for thr in (0.3, 0.0):
        sent = record_prediction_batches()
        hook = mmdet3.DetWandbSidecarHook(bbox_score_thr=thr)
        hook._rows = {"a.png": 0, "b.png": 2, "c.png": 1}
        hook.client = SidecarClient(f"tcp://127.0.0.1:{free_port()}", spill_dir=None)  # nobody listens: queued
        hook.after_val_iter(None, 0, outputs=samples[:2])
        hook.after_val_iter(None, 1, outputs=samples[2:])
        hook.after_val_epoch(SimpleNamespace(_train_loop={}), {})
        assert hook._encoder.drain(30)
        hook.client.finish(timeout=0.1)
        hook._encoder.shutdown()
        (batch,) = sent
        assert batch["tag"] == "eval_1" and batch["indices"] == [0, 1, 2] and batch["score_thr"] == thr
        for j, s in enumerate([samples[0], samples[2], samples[1]]):
            boxes, kept, labels, rles = _predictions_before(s.pred_instances, thr)
            assert (batch["boxes"][j], batch["scores"][j], batch["labels"][j]) == (boxes, kept, labels)
            assert batch["rles"][j] == rles
        assert len(batch["scores"][0]) == (4 if thr else n)
    assert threads and all(name.startswith("wandb-sidecar-masks") for name in threads)  # not the trainer's


def _local_steps(work_dir: Path) -> tuple[list[int], list[int]]:
    """Training steps, and the training step each validation follows, as mmengine's own ``LocalVisBackend``
    recorded them in every training of ``work_dir`` (one timestamped directory each), in order."""
    train, val = [], []
    for path in sorted(work_dir.glob("*/vis_data/scalars.json")):
        for record in map(json.loads, filter(str.strip, path.read_text().splitlines())):
            if "loss" in record:
                train.append(record["step"])
            elif "coco/bbox_mAP" in record:
                val.append(train[-1])
    return train, val


def test_resume_with_the_same_run_id_continues_one_wandb_run(tmp_path: Path, data: dict) -> None:
    """Train 1 epoch, end the trainer, ``resume=True`` (the latest checkpoint of the work dir) with the same
    wandb id for epoch 2: the second incarnation takes the run over unrefused; one wandb run with every
    training iteration once, both evaluations, each epoch's checkpoint and prediction table once."""
    run_id = "resume3x"
    with SidecarProcess(tmp_path) as sidecar:
        first = _finish(_train(sidecar, tmp_path, run_id, "--max-epochs", "1"))
        assert [Path(c).name for c in first["checkpoints"]] == ["epoch_1.pth"]
        second = _finish(_train(sidecar, tmp_path, run_id, "--max-epochs", "2", "--resume"))
        status = sidecar.wait_for(lambda s: s["runs"][run_id]["state"] == "finished", timeout=600)
        assert sidecar.stop() == 0
    for result in (first, second):
        _check_trainer_stats(result)  # nothing refused, dropped or unacknowledged by either trainer
        assert result["run_id"] == run_id
    run_status = status["runs"][run_id]
    assert run_status["incarnations"] == 2 and run_status["duplicates"] == 0
    assert not status["rejected"] and not run_status["in_use_refused"] and not run_status["rejected"]

    runs = read_runs(sidecar.wandb_dir)
    assert list(runs) == [run_id]
    run = runs[run_id]
    assert len(run.dirs) == 2 and run.exit_code == 0  # one wandb run, resumed once
    train_steps, val_steps = _local_steps(tmp_path / f"work-{run_id}")
    assert train_steps == list(range(1, 2 * ITERS_PER_EPOCH + 1))  # epoch 2 resumed after epoch 1's last
    assert val_steps == [ITERS_PER_EPOCH, 2 * ITERS_PER_EPOCH]
    steps = run.steps()
    assert steps == sorted(set(steps)), "a step twice or out of order in the wandb history"
    assert steps == train_steps
    for row in run.history:
        assert TRAIN_KEYS <= set(row), row
    assert [row["_step"] for row in run.history if VAL_KEYS <= set(row)] == val_steps

    assert_each_epochs_artifacts_once(run, run_id)
