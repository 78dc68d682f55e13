"""``MediaBuilder`` against real offline wandb runs, checked by reading the run files back (no mocks).

The last test compares the box and mask dicts with upstream ``MMDetWandbHook``'s own helpers; it runs
where mmdet 2.x is importable (``.venv``) and is skipped elsewhere.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import pytest
import wandb
from PIL import Image

from sidecar.media import MediaBuilder
from sidecar.readback import Artifact, RunRecords, read_runs
from sidecar.wandb_sink import FileGuard

CLASSES = ["cat", "dog", "bird"]
H, W = 48, 64


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real offline wandb run, all its files (staging too) under tmp_path."""
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = wandb.init(mode="offline", dir=tmp_path, project="media", reinit="create_new",
                   settings=wandb.Settings(console="off"))
    yield r
    r.finish()  # no-op when the test finished it


def _read_back(run: Any, tmp_path: Path) -> RunRecords:
    run_id = run.id
    run.finish()
    return read_runs(tmp_path)[run_id]


def _table(artifact: Artifact, name: str) -> dict[str, Any]:
    return json.loads(Path(artifact.files[f"{name}.table.json"]["local_path"]).read_text())


def _file(artifact: Artifact, path: str) -> Path:
    return Path(artifact.files[path]["local_path"])


def _mask(artifact: Artifact, cell: dict[str, Any], class_name: str) -> np.ndarray:
    return np.asarray(Image.open(_file(artifact, cell["masks"][class_name]["path"])))


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _rle(mask: np.ndarray, as_str: bool = False) -> dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode() if as_str else rle["counts"]}


def _upstream_polygon_mask(instances: list[list[list[float]]], h: int, w: int) -> np.ndarray:
    """What upstream computes: one ``polygon_to_bitmap`` per instance, OR-ed (independent of our RLE merge)."""
    out = np.zeros((h, w), bool)
    for polys in instances:
        out |= mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, h, w))).astype(bool)
    return out


# Ground truth of image 0: two cats (one with two polygons) and a bird.
GT0_POLYS = [[_rect(2, 3, 20, 15), _rect(30, 30, 40, 40)], [_rect(10, 10, 25, 20)], [_rect(45, 5, 60, 25)]]


def _val_body(tmp_path: Path) -> dict[str, Any]:
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(data / "img0.png")
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)).save(data / "img1.jpg")  # grayscale
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(elsewhere / "img2.png")
    return {
        "class_names": CLASSES,
        "image_names": ["img0.png", "img1.jpg", "img2.png", "img3.png"],
        "image_paths": [str(data / "img0.png"), str(data / "img1.jpg"),
                        str(data / ".." / "elsewhere" / "img2.png"), str(data / "img3.png")],
        "gt_boxes": [np.array([[2.9, 3.1, 40.7, 40.2], [10, 10, 25, 20], [45, 5, 60, 25]], np.float32),
                     np.array([[1, 2, 30, 25]], np.float32),
                     np.array([[1, 1, 5, 5]], np.float32), np.zeros((0, 4), np.float32)],
        "gt_labels": [np.array([0, 0, 2]), np.array([1]), np.array([0]), np.zeros(0, np.int64)],
        "gt_masks": [GT0_POLYS, None, [[_rect(1, 1, 5, 5)]], []],
    }


def _guard(tmp_path: Path) -> FileGuard:
    return FileGuard([tmp_path / "data"])


def test_val_table_matches_upstream_layout(run: Any, tmp_path: Path) -> None:
    media = MediaBuilder(run, _guard(tmp_path))
    media.val_table(_val_body(tmp_path))
    assert media.counters == {"val_rows": 4, "val_tables": 1, "images_refused": 1, "images_missing": 1}

    records = _read_back(run, tmp_path)
    [val] = records.artifacts
    assert (val.name, val.type, val.aliases) == ("val", "dataset", ["latest"])
    table = _table(val, "val_data")
    assert table["columns"] == ["image_name", "image"]
    assert [row[0] for row in table["data"]] == ["img0.png", "img1.jpg", "img2.png", "img3.png"]
    img0, img1, refused, missing = (row[1] for row in table["data"])
    assert refused is None and missing is None  # rows kept (indices stay valid), no image

    assert (img0["width"], img0["height"]) == (W, H)
    assert np.array_equal(np.asarray(Image.open(_file(val, img0["path"]))),
                          np.asarray(Image.open(tmp_path / "data" / "img0.png")))
    assert img0["boxes"]["ground_truth"] == [
        {"position": {"minX": 2, "minY": 3, "maxX": 40, "maxY": 40}, "class_id": 1, "box_caption": "cat",
         "domain": "pixel"},
        {"position": {"minX": 10, "minY": 10, "maxX": 25, "maxY": 20}, "class_id": 1, "box_caption": "cat",
         "domain": "pixel"},
        {"position": {"minX": 45, "minY": 5, "maxX": 60, "maxY": 25}, "class_id": 3, "box_caption": "bird",
         "domain": "pixel"},
    ]
    classes = json.loads(_file(val, img0["classes"]["path"]).read_text())
    assert classes["class_set"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]

    # One layer per class present, valued with the class id (the JSON sorts keys: order is checked in
    # test_same_dicts_as_upstream_hook).
    assert sorted(img0["masks"]) == ["bird", "cat"]
    cat, bird = _mask(val, img0, "cat"), _mask(val, img0, "bird")
    assert np.array_equal(cat, _upstream_polygon_mask(GT0_POLYS[:2], H, W).astype(np.uint8) * 1)
    assert np.array_equal(bird, _upstream_polygon_mask(GT0_POLYS[2:], H, W).astype(np.uint8) * 3)
    assert set(np.unique(cat)) == {0, 1} and set(np.unique(bird)) == {0, 3}

    # Grayscale JPEG converted to RGB at its own size; no masks sent, none logged.
    assert (img1["width"], img1["height"]) == (40, 30) and "masks" not in img1
    assert Image.open(_file(val, img1["path"])).mode == "RGB"
    assert [b["class_id"] for b in img1["boxes"]["ground_truth"]] == [2]


def test_pred_tables_reuse_val_rows_and_apply_threshold(run: Any, tmp_path: Path) -> None:
    media = MediaBuilder(run, _guard(tmp_path))
    media.val_table(_val_body(tmp_path))
    cat_mask, dog_mask, bird_mask = (np.zeros((H, W), np.uint8) for _ in range(3))
    cat_mask[5:15, 5:20] = 1
    dog_mask[20:30, 20:30] = 1
    bird_mask[30:40, 40:60] = 1
    batch = {
        "tag": "epoch_1",
        "indices": [0, 2, 1],
        "boxes": [np.array([[1.5, 2.5, 20, 15], [20, 20, 30, 30], [40, 30, 60, 40]], np.float32),
                  np.array([[1, 1, 4, 4]], np.float32), np.array([[3, 4, 10, 12]], np.float32)],
        "scores": [np.array([0.9, 0.3, 0.55], np.float32), np.array([0.99], np.float32),
                   np.array([0.1], np.float32)],
        "labels": [np.array([0, 1, 2]), np.array([0]), np.array([1])],
        "masks": [[_rle(cat_mask), _rle(dog_mask), _rle(bird_mask, as_str=True)], None, None],
        "score_thr": 0.3,
    }
    media.pred_table(batch)
    media.pred_table({**batch, "tag": "epoch_2", "score_thr": 0.0, "aliases": ["latest", "epoch_2", "best"]})
    assert media.counters["pred_rows"] == 6 and media.counters["pred_tables"] == 2
    assert media.counters["pred_rows_without_image"] == 2

    records = _read_back(run, tmp_path)
    val, pred1, pred2 = records.artifacts
    assert [(a.name, a.type) for a in (pred1, pred2)] == [(f"run_{records.run_id}_pred", "evaluation")] * 2
    assert sorted(pred1.aliases) == ["epoch_1", "latest"]  # the run file does not keep alias order
    assert sorted(pred2.aliases) == ["best", "epoch_2", "latest"]
    val_rows = _table(val, "val_data")["data"]

    t1 = _table(pred1, "eval_data")
    assert t1["columns"] == ["image_name", "ground_truth", "prediction"]
    assert [row[0] for row in t1["data"]] == ["img0.png", "img2.png", "img1.jpg"]
    row0, refused, row1 = t1["data"]
    assert refused[1:] == [None, None]
    # ground truth cell is the val row's image; prediction is a new image on the same file
    assert row0[1]["path"] == row0[2]["path"] == val_rows[0][1]["path"]
    assert row0[1]["boxes"] == val_rows[0][1]["boxes"] and "ground_truth" not in row0[2]["boxes"]
    # score 0.3 == thr is excluded (strict), as upstream
    assert row0[2]["boxes"]["predictions"] == [
        {"position": {"minX": 1, "minY": 2, "maxX": 20, "maxY": 15}, "class_id": 1, "box_caption": "cat 0.90",
         "domain": "pixel"},
        {"position": {"minX": 40, "minY": 30, "maxX": 60, "maxY": 40}, "class_id": 3, "box_caption": "bird 0.55",
         "domain": "pixel"},
    ]
    assert sorted(row0[2]["masks"]) == ["bird", "cat"]
    assert np.array_equal(_mask(pred1, row0[2], "cat"), cat_mask * 1)
    assert np.array_equal(_mask(pred1, row0[2], "bird"), bird_mask * 3)
    assert row1[2]["boxes"]["predictions"] == []

    t2 = _table(pred2, "eval_data")
    row0, _, row1 = t2["data"]
    assert [b["box_caption"] for b in row0[2]["boxes"]["predictions"]] == ["cat 0.90", "dog 0.30", "bird 0.55"]
    assert sorted(row0[2]["masks"]) == ["bird", "cat", "dog"]
    assert np.array_equal(_mask(pred2, row0[2], "dog"), dog_mask * 2)
    assert [b["box_caption"] for b in row1[2]["boxes"]["predictions"]] == ["dog 0.10"]


def _encoded(img: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = img.getexif()
    if orientation:
        exif[0x0112] = orientation
    img.save(buf, fmt, exif=exif)
    return buf.getvalue()


def test_image_bytes_mode(run: Any, tmp_path: Path) -> None:
    """Encoded files over the wire: decoded like mmcv (RGB, EXIF orientation applied); garbage is counted."""
    media = MediaBuilder(run, FileGuard([]))  # nothing on disk is allowed: bytes need no guard
    wide = Image.fromarray(np.full((20, 40, 3), 200, np.uint8))
    body = {
        "class_names": CLASSES,
        "image_names": ["a.png", "rotated.jpg", "broken.png"],
        "image_bytes": [_encoded(wide, "PNG"), _encoded(wide, "JPEG", orientation=6), b"not an image"],
        "gt_boxes": [np.array([[0, 0, 10, 10]], np.float32)] * 3,
        "gt_labels": [np.array([2])] * 3,
        "artifact_name": "val_bytes",
        "table_name": "gt",
    }
    media.val_table(body)
    media.pred_table({"tag": "iter_400", "indices": [0, 1, 2], "boxes": body["gt_boxes"],
                      "scores": [np.array([0.8], np.float32)] * 3, "labels": [np.array([0])] * 3})
    assert media.counters["images_unreadable"] == 1 and media.counters["val_rows"] == 3

    val, pred = _read_back(run, tmp_path).artifacts
    assert (val.name, val.type) == ("val_bytes", "dataset")
    a, rotated, broken = (row[1] for row in _table(val, "gt")["data"])
    assert (a["width"], a["height"]) == (40, 20)
    assert (rotated["width"], rotated["height"]) == (20, 40)  # orientation 6: rotated, as cv2 loads it
    assert broken is None
    assert a["boxes"]["ground_truth"][0]["box_caption"] == "bird"
    assert sorted(pred.aliases) == ["iter_400", "latest"]
    rows = _table(pred, "eval_data")["data"]
    assert [r[2] and r[2]["boxes"]["predictions"][0]["box_caption"] for r in rows] == ["cat 0.80", "cat 0.80", None]


def test_pred_batch_without_val_table_is_counted_not_fatal(run: Any, tmp_path: Path) -> None:
    media = MediaBuilder(run, _guard(tmp_path))
    media.pred_table({"tag": "epoch_1", "indices": [0], "boxes": [np.zeros((0, 4), np.float32)],
                      "scores": [np.zeros(0, np.float32)], "labels": [np.zeros(0, np.int64)]})
    assert media.counters == {"pred_without_val": 1}
    assert _read_back(run, tmp_path).artifacts == []


def test_bad_input_is_dropped_and_counted(run: Any, tmp_path: Path) -> None:
    """What crashes upstream (unknown labels, None masks, short polygons) loses only the bad part here."""
    body = _val_body(tmp_path)
    body["gt_labels"][0] = np.array([0, 7, 2])  # label 7 is not a class
    body["gt_masks"][0] = [GT0_POLYS[0], None, [[1, 2, 3, 4]]]  # no polygon, and one too short for an area
    body["gt_masks"][1] = [[_rect(1, 1, 3, 3)], [_rect(2, 2, 4, 4)]]  # two masks for one box
    media = MediaBuilder(run, _guard(tmp_path))
    media.val_table(body)
    media.pred_table({"tag": "epoch_1", "indices": [0, 1, 9],
                      "boxes": [np.array([[1, 1, 5, 5], [np.nan, 1, 5, 5]], np.float32),
                                np.array([[1, 1, 5, 5]], np.float32), np.zeros((0, 4), np.float32)],
                      "scores": [np.array([0.9, 0.9], np.float32), np.array([0.9, 0.8], np.float32),
                                 np.zeros(0, np.float32)],
                      "labels": [np.array([0, 1]), np.array([0]), np.zeros(0, np.int64)],
                      "masks": [[{"size": [H, W]}, None], None, None],
                      "score_thr": 0.3})
    c = media.counters
    assert (c["boxes_invalid"], c["masks_malformed"], c["pred_malformed"], c["pred_index_out_of_range"]) == (2, 2, 1, 1)

    records = _read_back(run, tmp_path)
    val, pred = records.artifacts
    img0, img1 = (row[1] for row in _table(val, "val_data")["data"][:2])
    assert [b["class_id"] for b in img0["boxes"]["ground_truth"]] == [1, 3]
    assert list(img0["masks"]) == ["cat"]  # the bird's only polygon is too short
    assert np.array_equal(_mask(val, img0, "cat"), _upstream_polygon_mask([GT0_POLYS[0]], H, W).astype(np.uint8))
    assert "masks" not in img1 and len(img1["boxes"]["ground_truth"]) == 1
    rows = _table(pred, "eval_data")["data"]
    assert len(rows) == 2
    assert [b["box_caption"] for b in rows[0][2]["boxes"]["predictions"]] == ["cat 0.90"]
    assert "masks" not in rows[0][2]
    assert "boxes" not in rows[1][2] or not rows[1][2]["boxes"]


def test_same_dicts_as_upstream_hook() -> None:
    """Box and mask dicts equal to upstream ``MMDetWandbHook``'s own helpers on the same data."""
    hook_mod = pytest.importorskip("mmdet.core.hook.wandblogger_hook")
    from sidecar.media import _polygon_rles, _wandb_boxes

    hook = hook_mod.MMDetWandbHook.__new__(hook_mod.MMDetWandbHook)
    hook.class_id_to_label = {i + 1: n for i, n in enumerate(CLASSES)}
    media = MediaBuilder(None, None)
    labels = np.array([0, 0, 2])
    boxes = np.array([[2.9, 3.1, 40.7, 40.2], [10, 10, 25, 20], [45, 5, 60, 25]], np.float32)
    scores = np.array([0.123, 0.456, 0.999], np.float32)

    assert {"ground_truth": _wandb_boxes(boxes, labels, None, hook.class_id_to_label)} == \
        hook._get_wandb_bboxes(boxes, labels)
    assert {"predictions": _wandb_boxes(boxes, labels, scores, hook.class_id_to_label)} == \
        hook._get_wandb_bboxes(np.hstack([boxes, scores[:, None]]), labels, log_gt=False)

    def same_masks(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
        assert list(ours) == list(theirs)
        for name in theirs:
            assert ours[name]["class_labels"] == theirs[name]["class_labels"]
            assert ours[name]["mask_data"].dtype == theirs[name]["mask_data"].dtype
            assert np.array_equal(ours[name]["mask_data"], theirs[name]["mask_data"])

    same_masks(media._class_masks(_polygon_rles(GT0_POLYS, H, W), labels, hook.class_id_to_label),
               hook._get_wandb_masks(GT0_POLYS, labels, is_poly_mask=True, height=H, width=W))
    rng = np.random.default_rng(1)
    bitmaps = (rng.random((3, H, W)) > 0.7).astype(np.uint8)
    rles = [_rle(m) for m in bitmaps]
    same_masks(media._class_masks([[r] for r in rles], labels, hook.class_id_to_label),
               hook._get_wandb_masks(mask_util.decode(rles).transpose(2, 0, 1), labels))
