"""Validation and prediction tables, as upstream ``MMDetWandbHook`` (mmdet 2.28.2) logs them, built here.

Upstream builds them on rank 0 inside training (``_add_ground_truth``, ``_log_data_table``,
``_log_predictions``, ``_log_eval_table``, ``_get_wandb_bboxes``, ``_get_wandb_masks``); the trainer hook
now only ships the raw data (``Kind.VAL_DATA``, ``Kind.PRED_BATCH``) and this module, on the run's worker
thread, produces the same wandb objects: 1-based class ids, the same box dicts and captions, one mask
layer per class, the same table columns, artifact names, types and aliases.

Deliberate differences, each where upstream crashes or logs nothing:

- An image that cannot be had (path outside the allowed roots, missing file, undecodable bytes) is
  logged and counted, and its row is kept with ``None`` in the image cell (its ground truth is lost with
  it). Keeping the row keeps the trainer's row positions (``PRED_BATCH.indices``) valid and shows the
  image name in the table; its prediction rows get ``None`` cells too.
- Boxes with a label outside the class list or a non-finite coordinate are dropped and counted (upstream:
  KeyError). Instances without a usable polygon (``None``, empty, fewer than 3 points) have no mask
  (upstream: crash, mmdet#8455). Mask layers of classes with id > 255 are dropped and counted: wandb masks
  are 8-bit (upstream: overflow).
- Offline, ``use_artifact`` raises, and upstream then logs no validation artifact at all; here it is
  logged with ``log_artifact`` and the in-memory table is the reference, as upstream's offline reference.
  Online it is upstream's ``use_artifact`` + ``wait`` + ``get``, so prediction tables point at the
  uploaded images instead of uploading them again.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import wandb
from PIL import Image as PILImage
from PIL import ImageOps

from protocol import Counters

log = logging.getLogger("sidecar.media")

VAL_COLUMNS = ["image_name", "image"]
PRED_COLUMNS = ["image_name", "ground_truth", "prediction"]
#: wandb stores masks as 8-bit images: a class id above this cannot be a mask value.
MAX_MASK_CLASS_ID = 255

RLE = dict[str, Any]


@dataclass(slots=True)
class _ValData:
    """What prediction tables need from the validation table (upstream's ``data_table_ref`` and classes)."""

    class_labels: dict[int, str]  # 1-based id -> name
    class_set: wandb.Classes
    table: wandb.Table  # rows ``[image_name, wandb.Image | None]``; the reference prediction rows reuse


class MediaBuilder:
    """One per wandb run: logs the validation table once and a prediction table per evaluation."""

    def __init__(self, run: Any, guard: Any) -> None:
        self.run = run
        self.guard = guard
        self.counters = Counters()
        self._val: _ValData | None = None
        self._val_parts: tuple[int, _ValData] | None = None  # (next part expected, the table so far)

    # ------------------------------------------------------------------------------- validation table

    def val_table(self, body: dict[str, Any], publish: bool = True) -> None:
        """Build and log the ``val`` dataset artifact; keep its table for the prediction tables.

        ``publish=False`` rebuilds the table in memory only: a restarted sidecar replaying a run whose
        validation artifact is already logged still needs it as the prediction tables' reference."""
        part, parts = body.get("part", 0), body.get("parts", 1)
        state = self._val_parts
        if part == 0 or (state is not None and state[0] == part):
            if part == 0:
                class_labels = {i + 1: str(name) for i, name in enumerate(body["class_names"])}
                class_set = wandb.Classes([{"id": cid, "name": name} for cid, name in class_labels.items()])
                state = (0, _ValData(class_labels, class_set, wandb.Table(columns=VAL_COLUMNS)))
            val = state[1]
            self._add_val_rows(body, val)
            self._val_parts = state = (part + 1, val)
        elif not (state is not None and state[0] == part + 1 == parts):  # (that: the last part, retried)
            self.counters.add("val_parts_out_of_order")  # they are sent in order: a table without them is wrong
            log.error("run %s: validation table part %d of %d without the parts before it; skipped", self.run.id,
                      part, parts)
            return
        if part + 1 < parts:
            return
        # Set before publishing: if the upload fails, prediction tables still work from memory.
        self._val = val = state[1]
        table = val.table
        if not publish:
            self._val_parts = None
            return
        table_name = body.get("table_name") or "val_data"
        artifact = wandb.Artifact(body.get("artifact_name") or "val", type="dataset")
        artifact.add(table, table_name)
        self._val.table = self._publish_val(artifact, table, table_name)
        self._val_parts = None
        self.counters.add("val_tables")

    def _add_val_rows(self, body: dict[str, Any], val: _ValData) -> None:
        """One message's rows: all built, then added (a part retried after a failure never adds twice)."""
        polygons = body.get("gt_masks")
        rows = []
        for i, name in enumerate(body["image_names"]):
            image = self._open_image(body, i)
            gt = None
            if image is not None:
                gt = self._gt_image(image, body["gt_boxes"][i], body["gt_labels"][i],
                                    polygons[i] if polygons is not None else None, val.class_labels, val.class_set)
            rows.append((name, gt))
        for name, gt in rows:
            val.table.add_data(name, gt)
        self.counters.add("val_rows", len(rows))

    def _publish_val(self, artifact: wandb.Artifact, table: wandb.Table, table_name: str) -> wandb.Table:
        """Log the artifact; return the table prediction rows should reference (see module docstring)."""
        if self.run.offline:
            self.run.log_artifact(artifact)
            return table
        self.run.use_artifact(artifact)  # logs the draft artifact, waits for it, marks it as input
        try:
            artifact.wait()
            ref = artifact.get(table_name)
        except Exception as exc:  # logged already; only the reference is lost: rows re-upload their images
            ref = None
            log.warning("run %s: validation table logged but not readable back (%s: %s); prediction tables "
                        "will carry their own image copies", self.run.id, type(exc).__name__, exc)
        if ref is None:
            self.counters.add("val_reference_fallback")
            return table
        return ref

    def _open_image(self, body: dict[str, Any], i: int) -> PILImage.Image | None:
        """The original image, RGB, EXIF orientation applied (as mmcv's cv2 loader does); None if unusable."""
        if "image_bytes" in body:  # bytes, or a uint8 array (large validation sets travel in the blob frame)
            source: Any = io.BytesIO(memoryview(body["image_bytes"][i]))
            what = f"image_bytes[{i}] ({body['image_names'][i]})"
        else:
            raw = body["image_paths"][i]
            source = self.guard.check(raw)
            what = repr(raw)
            if source is None:
                self.counters.add("images_refused")
                log.error("run %s: image %s is outside the allowed roots; row without image", self.run.id, what)
                return None
        try:
            with PILImage.open(source) as im:
                return ImageOps.exif_transpose(im).convert("RGB")
        except FileNotFoundError:
            self.counters.add("images_missing")
            log.error("run %s: image %s does not exist; row without image", self.run.id, what)
        except Exception as exc:  # PIL raises OSError, SyntaxError, DecompressionBombError...
            self.counters.add("images_unreadable")
            log.error("run %s: image %s cannot be decoded (%s: %s); row without image",
                      self.run.id, what, type(exc).__name__, exc)
        return None

    def _gt_image(
        self,
        image: PILImage.Image,
        boxes: np.ndarray,
        labels: np.ndarray,
        polygons: Sequence[Any] | None,
        class_labels: dict[int, str],
        class_set: wandb.Classes,
    ) -> wandb.Image:
        """The validation row's image with its ground truth boxes and per-class masks."""
        if len(boxes) != len(labels):
            self.counters.add("gt_malformed")
            log.error("run %s: %d gt boxes for %d labels; image logged without ground truth",
                      self.run.id, len(boxes), len(labels))
            return wandb.Image(image, classes=class_set)
        keep = self._valid_boxes(boxes, labels, len(class_labels))
        labels = labels[keep]
        masks = None
        if polygons is not None:
            if len(polygons) != len(keep):
                self.counters.add("masks_malformed")
                log.error("run %s: %d gt masks for %d boxes; masks dropped", self.run.id, len(polygons), len(keep))
            else:
                masks = self._gt_masks([p for p, k in zip(polygons, keep) if k], labels, image, class_labels)
        wandb_boxes = {"ground_truth": _wandb_boxes(boxes[keep], labels, None, class_labels)}
        return wandb.Image(image, boxes=wandb_boxes, masks=masks, classes=class_set)

    def _gt_masks(
        self, polygons: Sequence[Any], labels: np.ndarray, image: PILImage.Image, class_labels: dict[int, str]
    ) -> dict[str, dict[str, Any]] | None:
        """Per-class mask layers from COCO polygons, rasterised at the image's size."""
        width, height = image.size
        try:
            instances = _polygon_rles(polygons, height, width)
        except (TypeError, ValueError) as exc:
            self.counters.add("masks_malformed")
            log.error("run %s: gt masks are not COCO polygon lists (%s: %s); masks dropped",
                      self.run.id, type(exc).__name__, exc)
            return None
        return self._class_masks(instances, labels, class_labels)

    # ------------------------------------------------------------------------------- prediction table

    def pred_table(self, body: dict[str, Any]) -> None:
        """Log a ``run_<id>_pred`` evaluation artifact whose rows reuse the validation rows' images."""
        val = self._val
        if val is None:
            self.counters.add("pred_without_val")
            log.error("run %s: prediction batch %s arrived with no validation table in memory (sidecar "
                      "restarted after it was logged?); not logged", self.run.id, body["tag"])
            return
        rows = val.table.data
        masks = body.get("masks")
        thr = float(body.get("score_thr", 0.0))
        table = wandb.Table(columns=PRED_COLUMNS)
        for j, index in enumerate(body["indices"]):
            if index >= len(rows):
                self.counters.add("pred_index_out_of_range")
                log.error("run %s: prediction for row %d of a %d-row validation table; skipped",
                          self.run.id, index, len(rows))
                continue
            name, gt = rows[index][0], rows[index][1]
            pred = None
            if gt is None:
                self.counters.add("pred_rows_without_image")
            else:
                pred = self._pred_image(gt, body["boxes"][j], body["scores"][j], body["labels"][j],
                                        masks[j] if masks is not None else None, thr, val)
            table.add_data(name, gt, pred)
            self.counters.add("pred_rows")

        artifact = wandb.Artifact(f"run_{self.run.id}_pred", type="evaluation")
        artifact.add(table, "eval_data")
        self.run.log_artifact(artifact, aliases=list(body.get("aliases") or ["latest", body["tag"]]))
        self.counters.add("pred_tables")

    def _pred_image(
        self,
        gt: wandb.Image,
        boxes: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        rles: Sequence[RLE] | None,
        thr: float,
        val: _ValData,
    ) -> wandb.Image:
        """A new image on the validation row's file, with the predictions above the threshold."""
        if not len(boxes) == len(scores) == len(labels):
            self.counters.add("pred_malformed")
            log.error("run %s: %d boxes, %d scores, %d labels in one prediction; logged without predictions",
                      self.run.id, len(boxes), len(scores), len(labels))
            return wandb.Image(gt, classes=val.class_set)
        keep = self._valid_boxes(boxes, labels, len(val.class_labels))
        if thr > 0:
            keep &= scores > thr  # strict, as upstream
        labels = labels[keep]
        masks = None
        if rles is not None:
            if len(rles) != len(keep):
                self.counters.add("masks_malformed")
                log.error("run %s: %d predicted masks for %d boxes; masks dropped", self.run.id, len(rles), len(keep))
            else:
                kept = [[r] if r is not None else [] for r, k in zip(rles, keep) if k]  # None: box without mask
                masks = self._class_masks(kept, labels, val.class_labels)
        wandb_boxes = {"predictions": _wandb_boxes(boxes[keep], labels, scores[keep], val.class_labels)}
        return wandb.Image(gt, boxes=wandb_boxes, masks=masks, classes=val.class_set)

    # ------------------------------------------------------------------------------- shared

    def _valid_boxes(self, boxes: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Boolean mask of boxes wandb can show: a known class and finite coordinates."""
        keep = (labels >= 0) & (labels < num_classes) & np.isfinite(boxes).all(axis=1)
        dropped = int(len(keep) - keep.sum())
        if dropped:
            self.counters.add("boxes_invalid", dropped)
            log.warning("run %s: %d boxes with an unknown class or non-finite coordinates dropped",
                        self.run.id, dropped)
        return keep

    def _class_masks(
        self, instances: Sequence[Sequence[RLE]], labels: np.ndarray, class_labels: dict[int, str]
    ) -> dict[str, dict[str, Any]] | None:
        """Upstream's ``_get_wandb_masks``: per class, the union of its instances, valued with the class id.

        The union is an RLE merge (pycocotools, in C) and one decode per class, not one bitmap per instance.
        Layers come in order of each class's first instance, as upstream's dict fills.
        """
        by_class: dict[int, list[RLE]] = {}
        for rles, label in zip(instances, labels.tolist()):
            by_class.setdefault(label + 1, []).extend(rles)
        layers: dict[str, dict[str, Any]] = {}
        try:
            for class_id, rles in by_class.items():
                if not rles:
                    continue
                if class_id > MAX_MASK_CLASS_ID:
                    self.counters.add("mask_classes_over_255")
                    continue
                mask = mask_util.decode(mask_util.merge(rles) if len(rles) > 1 else rles[0])
                mask *= np.uint8(class_id)
                layers[class_labels[class_id]] = {"mask_data": mask, "class_labels": class_labels}
        except Exception as exc:  # pycocotools raises bare Exception/TypeError/KeyError on bad RLEs
            self.counters.add("masks_malformed")
            log.error("run %s: masks cannot be decoded (%s: %s); masks dropped", self.run.id, type(exc).__name__, exc)
            return None
        return layers


def _wandb_boxes(
    boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None, class_labels: dict[int, str]
) -> dict[str, Any]:
    """Upstream's ``_get_wandb_bboxes`` body: int pixel positions, 1-based ids, name (and score) captions."""
    class_ids = (labels.astype(np.int64) + 1).tolist()
    positions = boxes[:, :4].astype(np.int64).tolist()  # int() truncation, as upstream
    if scores is None:
        captions: Iterable[str] = (class_labels[c] for c in class_ids)
    else:
        captions = (f"{class_labels[c]} {s:.2f}" for c, s in zip(class_ids, scores.tolist()))
    box_data = [
        {
            "position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1},
            "class_id": c,
            "box_caption": caption,
            "domain": "pixel",
        }
        for (x0, y0, x1, y1), c, caption in zip(positions, class_ids, captions)
    ]
    return {"box_data": box_data, "class_labels": class_labels}


def _polygon_rles(instances: Sequence[Any], height: int, width: int) -> list[list[RLE]]:
    """Per instance, the RLEs of its COCO polygons (upstream's ``polygon_to_bitmap``, before decoding).

    Polygons with fewer than 3 points or an odd coordinate count are skipped (as mmdet's annotation loader
    does); pycocotools would otherwise read a 4-number polygon as a box. An instance without any has no
    mask. Raises TypeError/ValueError when the data is not polygons.
    """
    out: list[list[RLE]] = []
    for polys in instances:
        arrays = [np.asarray(p, dtype=np.float64).ravel() for p in (polys or ())]
        arrays = [a for a in arrays if a.size >= 6 and a.size % 2 == 0]
        out.append(mask_util.frPyObjects(arrays, height, width) if arrays else [])
    return out
