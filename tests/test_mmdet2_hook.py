"""MMDetWandbSidecarHook against upstream MMDetWandbHook: a real mmcv runner trains MMDetection's own
Mask R-CNN wandb config (shrunk to CPU) on a synthetic COCO set; both wandb runs are read back.

Each training runs in its own process (upstream imports the dumped config by module name, so a second
training in one process would see the first one's config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mmdet", reason="needs the MMDetection 2.x stack (scripts/setup.sh)")
mmdet = pytest.importorskip("mmdet")
if not mmdet.__version__.startswith("2."):
    pytest.skip("MMDetection 2.x only", allow_module_level=True)

from sidecar.readback import RunRecords, read_runs  # noqa: E402
from tests.sent_predictions import assert_table_shows, load as load_sent  # noqa: E402
from tests.resumed_run import assert_each_epochs_artifacts_once  # noqa: E402
from tests.sidecar_process import SidecarProcess  # noqa: E402

pytestmark = [pytest.mark.mmdet2, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["square", "circle", "triangle"]
NUM_EVAL_IMAGES = 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples.mmdet2.synthetic_coco import make_coco_dataset

    root = tmp_path_factory.mktemp("coco")
    data = make_coco_dataset(root)
    assert list(data["classes"]) == CLASSES
    return root


def _train(logger: str, work: Path, data_root: Path, wandb_dir: Path, *args: str, addr: str = "") -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
           "WANDB_DATA_DIR": str(wandb_dir / "data"), "WANDB_CACHE_DIR": str(wandb_dir / "cache"),
           "PYTHONPATH": str(ROOT)}
    wandb_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "examples.mmdet2.train", "--work-dir", str(work), "--data-root", str(data_root),
           "--logger", logger, "--base-channels", "16", *args]
    if addr:
        cmd += ["--sidecar-addr", addr]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def _ours(tmp_path: Path, data_root: Path, *args: str, sees_data: bool = True) -> tuple[RunRecords, SidecarProcess]:
    roots = [tmp_path, data_root] if sees_data else [tmp_path]
    with SidecarProcess(tmp_path, allow_roots=roots) as sidecar:
        _train("sidecar", tmp_path / "work_dirs", data_root, tmp_path / "trainer_wandb",
               "--record-sent", str(tmp_path / "sent.json"), *args, addr=sidecar.addr)
        assert sidecar.stop() == 0
    runs = read_runs(sidecar.wandb_dir)
    assert len(runs) == 1
    assert not (tmp_path / "trainer_wandb" / "wandb").exists()  # the trainer itself wrote no wandb files
    return next(iter(runs.values())), sidecar


def _metrics(row: dict) -> set[str]:
    return {k for k in row if not k.startswith("_")}


def _train_keys(run: RunRecords) -> set[str]:
    return {k for row in run.history for k in row if k.startswith("train/")}


def _check_val_table(run: RunRecords) -> None:
    [val] = run.artifacts_named("val")
    assert (val.name, val.type) == ("val", "dataset")
    table = val.table("val_data")
    assert table["columns"] == ["image_name", "image"]
    assert len(table["data"]) == NUM_EVAL_IMAGES
    for name, image in table["data"]:
        assert name.endswith(".png")
        boxes = image["boxes"]["ground_truth"]
        assert boxes, "every synthetic image has objects"
        assert {b["class_id"] for b in boxes} <= {1, 2, 3}  # 1-based
        assert all(b["box_caption"] == CLASSES[b["class_id"] - 1] and b["domain"] == "pixel" for b in boxes)
        assert set(image["masks"]) <= set(CLASSES) and image["masks"]  # polygons became per-class bitmaps
        assert image["width"] == image["height"] == 96  # the original image, not the resized one


def _check_pred_tables(run: RunRecords, tags: list[str], sent: list[dict] | None = None) -> None:
    """Layout of the prediction tables; with ``sent`` (what our hook sent), every box of every row.

    Which predictions pass ``bbox_score_thr`` depends on the machine's kernels, so nothing is assumed
    about how many there are: upstream's tables are checked for their form, ours against what was sent.
    """
    val = run.artifacts_named("val")
    val_images = {name: image["path"] for name, image in val[0].table("val_data")["data"]} if val else {}
    preds = run.artifacts_named(f"run_{run.run_id}_pred")
    assert [a.type for a in preds] == ["evaluation"] * len(tags)
    assert [sorted(a.aliases) for a in preds] == [sorted(["latest", t]) for t in tags]
    if sent is not None:
        assert [b["tag"] for b in sent] == tags
    for k, art in enumerate(preds):
        table = art.table("eval_data")
        assert table["columns"] == ["image_name", "ground_truth", "prediction"]
        assert len(table["data"]) == NUM_EVAL_IMAGES
        for name, gt, pred in table["data"]:
            assert gt["path"].startswith("media/images/")
            if val_images:  # the image is uploaded once: prediction rows point at the val table's file
                assert gt["path"] == val_images[name]
            for box in pred["boxes"]["predictions"]:
                name, score = box["box_caption"].rsplit(" ", 1)
                assert name == CLASSES[box["class_id"] - 1] and float(score) >= 0.30  # > thr, shown rounded
        if sent is not None:
            assert_table_shows(table, sent[k], CLASSES, [row[0] for row in table["data"]])


def test_epoch_run_matches_upstream_except_documented_differences(tmp_path: Path, data_root: Path) -> None:
    _train("upstream", tmp_path / "up_work", data_root, tmp_path / "up_wandb")
    [upstream] = read_runs(tmp_path / "up_wandb").values()
    ours, _ = _ours(tmp_path / "ours", data_root)

    # metrics: same keys, same steps (iter + 1), train every iteration, val at each epoch's end
    keys = {k for row in ours.history for k in _metrics(row)}
    assert keys == {k for row in upstream.history for k in _metrics(row)}
    assert {"learning_rate", "momentum", "val/bbox_mAP", "val/segm_mAP", "train/loss"} <= keys
    assert ours.steps() == list(range(1, 26))
    val_steps = [row["_step"] for row in ours.history if "val/bbox_mAP" in row]
    assert val_steps == [13, 25] and [r["_step"] for r in upstream.history if "val/bbox_mAP" in r] == [13, 25]
    # documented: upstream loses epoch 2's first training row (same step as epoch 1's val row, mmdet#7000)
    up_train_steps = [r["_step"] for r in upstream.history if "train/loss" in r]
    our_train_steps = [r["_step"] for r in ours.history if "train/loss" in r]
    assert set(our_train_steps) - set(up_train_steps) == {13}
    assert our_train_steps == list(range(1, 25))

    # config and the saved config file
    # same config but for what the two trainings were given differently (hook, work dir, custom_imports)
    ours_cfg, up_cfg = json.loads(json.dumps(ours.config)), json.loads(json.dumps(upstream.config))
    assert set(ours_cfg) - set(up_cfg) == {"custom_imports"} and set(up_cfg) <= set(ours_cfg)
    assert {k for k in up_cfg if ours_cfg[k] != up_cfg[k]} == {"log_config", "work_dir"}
    assert ours_cfg["model"] == up_cfg["model"] and ours_cfg["data"] == up_cfg["data"]
    assert ours.config["runner"]["max_epochs"] == 2
    assert "tiny_mask_rcnn.py" in ours.files and "tiny_mask_rcnn.py" in upstream.files

    # checkpoints: one model artifact per epoch, aliases, metadata keys as upstream's
    for run in (ours, upstream):
        models = run.artifacts_named(f"run_{run.run_id}_model")
        assert [(a.type, sorted(a.aliases), list(a.files)) for a in models] == [
            ("model", ["epoch_1", "latest"], ["epoch_1.pth"]), ("model", ["epoch_2", "latest"], ["epoch_2.pth"])]
        assert [m.metadata["epoch"] for m in models] == [1, 2]
    up_meta = [set(a.metadata) for a in upstream.artifacts_named(f"run_{upstream.run_id}_model")]
    assert [set(a.metadata) for a in ours.artifacts_named(f"run_{ours.run_id}_model")] == up_meta
    assert {"bbox_mAP", "segm_mAP", "bbox_mAP_copypaste"} <= up_meta[0]

    # tables: ours has the val table offline (documented: upstream logs none offline), the same pred tables
    _check_val_table(ours)
    assert upstream.artifacts_named("val") == []
    _check_pred_tables(ours, ["epoch_1", "epoch_2"], load_sent(tmp_path / "ours" / "sent.json"))
    _check_pred_tables(upstream, ["epoch_1", "epoch_2"])
    up_rows = [r[0] for r in upstream.artifacts_named(f"run_{upstream.run_id}_pred")[0].table("eval_data")["data"]]
    our_rows = [r[0] for r in ours.artifacts_named(f"run_{ours.run_id}_pred")[0].table("eval_data")["data"]]
    assert our_rows == up_rows  # the same images, in the same order (upstream's index selection)
    assert ours.exit_code == upstream.exit_code == 0


def test_iteration_runner_keeps_val_rows_checkpoints_survive_max_keep_ckpts_images_as_bytes(tmp_path: Path,
                                                                                 data_root: Path) -> None:
    # and a sidecar that cannot see the dataset: the hook sends the images' bytes
    run, _ = _ours(tmp_path, data_root, "--by-iter", "--max-iters", "24", "--max-keep-ckpts", "1",
                   "--hook-args", json.dumps({"send_image_bytes": True}), sees_data=False)
    _check_val_table(run)
    assert run.steps() == list(range(1, 25))
    # upstream drops both of these rows (mmdet#7000): ours keeps them
    assert [row["_step"] for row in run.history if "val/bbox_mAP" in row] == [12, 24]
    models = run.artifacts_named(f"run_{run.run_id}_model")
    assert [sorted(a.aliases) for a in models] == [["iter_12", "latest"], ["iter_24", "latest"]]
    assert [a.metadata["iter"] for a in models] == [12, 24]
    assert not (tmp_path / "work_dirs" / "iter_12.pth").exists()  # max_keep_ckpts deleted it
    assert int(models[0].files["iter_12.pth"]["size"]) > 1_000_000  # uploaded all the same
    _check_pred_tables(run, ["iter_12", "iter_24"], load_sent(tmp_path / "sent.json"))


def test_no_eval_images_and_no_checkpoint_logging(tmp_path: Path, data_root: Path) -> None:
    run, sidecar = _ours(tmp_path, data_root, "--hook-args", json.dumps({"num_eval_images": 0, "log_checkpoint": False}))
    assert run.artifacts == []
    assert run.steps() == list(range(1, 26))
    assert any("val/bbox_mAP" in row for row in run.history)
    assert run.exit_code == 0


def test_two_rank_training_gives_one_run_from_rank_0_and_clears_every_ranks_log_buffer(tmp_path: Path,
                                                                                        data_root: Path) -> None:
    """``dist_train.sh`` with 2 ranks on CPU (gloo; ``train_detector`` and ``DistEvalHook`` unmodified): one
    wandb run, one client (rank 0), tables covering every selected image (DistEvalHook gathers results on
    rank 0), every rank's log buffer cleared after each iteration (mmdet#8145), no hang."""
    from tests.sidecar_process import free_port

    wandb_dir = tmp_path / "trainer_wandb"
    wandb_dir.mkdir()
    port = str(free_port())
    with SidecarProcess(tmp_path, allow_roots=[tmp_path, data_root]) as sidecar:
        ranks = []
        for rank in (0, 1):
            env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
                   "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            cmd = [sys.executable, "-m", "examples.mmdet2.train", "--work-dir", str(tmp_path / "work_dirs"),
                   "--data-root", str(data_root), "--logger", "sidecar", "--base-channels", "16", "--dist",
                   "--sidecar-addr", sidecar.addr, "--record-sent", str(tmp_path / f"sent{rank}.json")]
            ranks.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        try:
            outs = [proc.communicate(timeout=600)[0] for proc in ranks]  # a hang fails here
        finally:
            for proc in ranks:
                if proc.poll() is None:
                    proc.kill()
        assert [proc.returncode for proc in ranks] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
        status = sidecar.status()
        assert sidecar.stop() == 0
    results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["clients"] for r in results] == [1, 0]  # only rank 0 connects
    assert list(status["runs"]) == [next(iter(read_runs(sidecar.wandb_dir)))]
    (run_status,) = status["runs"].values()
    assert run_status["client"]["pid"] == results[0]["pid"]
    for r in results:  # (ready, entries) after every iteration's logger hooks, on both ranks
        assert len(r["log_buffer_after_iters"]) == 12 and set(map(tuple, r["log_buffer_after_iters"])) == {(False, 0)}
    [run] = read_runs(sidecar.wandb_dir).values()
    assert run.exit_code == 0
    # 6 train images x 4 / (2 ranks x 2 a batch): 6 iterations an epoch
    assert run.steps() == list(range(1, 14))
    assert [row["_step"] for row in run.history if "val/bbox_mAP" in row] == [7, 13]
    assert load_sent(tmp_path / "sent1.json") == []  # rank 1 sends nothing
    _check_val_table(run)
    _check_pred_tables(run, ["epoch_1", "epoch_2"], load_sent(tmp_path / "sent0.json"))



def _mmcv_log(work: Path) -> list[dict]:
    """Every record of mmcv's ``*.log.json`` files in ``work`` (one file a training), env headers left out."""
    records = []
    for path in sorted(work.glob("*.log.json")):
        records += [r for r in map(json.loads, path.read_text().splitlines()) if "mode" in r]
    return records


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[RunRecords, dict, list[dict]]:
    """Train 1 epoch, end the trainer, ``resume_from`` its checkpoint with the same wandb id for epoch 2 (a
    new process: the second incarnation of the run). Returns the run read back, the sidecar's status once
    the run finished, and mmcv's own log records of both trainings."""
    tmp_path = tmp_path_factory.mktemp("resume2x")
    run_id, work, wandb_dir = "resume2x", tmp_path / "work_dirs", tmp_path / "trainer_wandb"
    with SidecarProcess(tmp_path, allow_roots=[tmp_path, data_root]) as sidecar:
        _train("sidecar", work, data_root, wandb_dir, "--max-epochs", "1", "--run-id", run_id, addr=sidecar.addr)
        assert sorted(p.name for p in work.glob("epoch_*.pth")) == ["epoch_1.pth"]
        _train("sidecar", work, data_root, wandb_dir, "--max-epochs", "2", "--run-id", run_id,
               "--resume-from", str(work / "epoch_1.pth"), addr=sidecar.addr)
        status = sidecar.wait_for(lambda s: s["runs"][run_id]["state"] == "finished", timeout=600)
        assert sidecar.stop() == 0
    runs = read_runs(sidecar.wandb_dir)
    assert list(runs) == [run_id]
    return runs[run_id], status, _mmcv_log(work)


def _hook_steps(records: list[dict]) -> tuple[list[int], list[int], int]:
    """The steps the hook gives what mmcv logged (iteration + 1; validation at the epoch's last + 1)."""
    train = [r for r in records if r["mode"] == "train"]
    per_epoch = max(r["iter"] for r in train)
    train_steps = [(r["epoch"] - 1) * per_epoch + r["iter"] for r in train]
    val_steps = [r["epoch"] * per_epoch + 1 for r in records if r["mode"] == "val"]
    return train_steps, val_steps, per_epoch


def test_resume_from_a_checkpoint_with_the_same_run_id_continues_one_wandb_run(resumed) -> None:  # type: ignore[no-untyped-def]
    """One wandb run, taken over by the second trainer unrefused; every step once, in order; both epochs'
    training steps and evaluations; each epoch's checkpoint and prediction table once."""
    run, status, records = resumed
    run_status = status["runs"][run.run_id]
    assert run_status["incarnations"] == 2 and run_status["duplicates"] == 0
    assert not status["rejected"] and not run_status["in_use_refused"] and not run_status["rejected"]
    assert len(run.dirs) == 2 and run.exit_code == 0  # one wandb run, resumed once

    train_steps, val_steps, per_epoch = _hook_steps(records)
    assert [r["epoch"] for r in records if r["mode"] == "train"] == [1] * per_epoch + [2] * per_epoch
    assert train_steps == list(range(1, 2 * per_epoch + 1)) and val_steps == [per_epoch + 1, 2 * per_epoch + 1]
    steps = run.steps()
    assert steps == sorted(set(steps)), "a step twice or out of order in the wandb history"
    assert steps == list(range(1, 2 * per_epoch + 2))  # no step missing, epoch 2's after epoch 1's
    assert [row["_step"] for row in run.history if "val/bbox_mAP" in row] == val_steps
    # every training step but epoch 2's first (see the next test) holds its training metrics
    assert [row["_step"] for row in run.history if "train/loss" in row] == [s for s in train_steps if s != per_epoch + 1]

    assert_each_epochs_artifacts_once(run, run.run_id)


@pytest.mark.xfail(strict=True, reason=(
    "known loss: the 2.x hook logs epoch 1's evaluation at step iter+1, the step of epoch 2's first training "
    "iteration; the first trainer's finish commits that step, so the resumed trainer's row for it is skipped "
    "(wandb keeps steps increasing) and its training metrics are lost, as upstream loses them in every run "
    "(mmdet#7000)"))
def test_resume_keeps_the_first_training_row_of_the_resumed_epoch(resumed) -> None:  # type: ignore[no-untyped-def]
    run, _, records = resumed
    train_steps, _, _ = _hook_steps(records)
    assert [row["_step"] for row in run.history if "train/loss" in row] == train_steps
