"""What a trainer's hook sent as prediction batches, and the check that a wandb table shows exactly that.

A tiny model's scores depend on the machine (CPU kernels, thread counts), so a test must not assume which
predictions pass ``bbox_score_thr``; it compares the table with the predictions the sidecar received.

In the training process: ``sent = record_prediction_batches()`` before training, ``dump(sent, path)`` after.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def record_prediction_batches() -> list[dict[str, Any]]:
    """Record every ``Kind.PRED_BATCH`` any :class:`SidecarClient` of this process sends (list filled in place)."""
    from protocol import Kind
    from trainer_hook.client import SidecarClient

    sent: list[dict[str, Any]] = []
    original = SidecarClient.send

    def send(self: SidecarClient, kind: Kind, body: dict[str, Any]) -> bool:
        if kind is Kind.PRED_BATCH:
            sent.append({
                "tag": body["tag"], "indices": [int(i) for i in body["indices"]],
                "score_thr": float(body.get("score_thr", 0.0)),
                # float32 values as Python floats: exactly what the sidecar formats and truncates
                "boxes": [np.asarray(b, np.float32).reshape(-1, 4).tolist() for b in body["boxes"]],
                "scores": [np.asarray(s, np.float32).reshape(-1).tolist() for s in body["scores"]],
                "labels": [np.asarray(lab, np.int64).reshape(-1).tolist() for lab in body["labels"]],
                "rles": None if body.get("masks") is None else [
                    None if m is None else [_rle(r) for r in m] for m in body["masks"]],
            })
        return original(self, kind, body)

    SidecarClient.send = send  # type: ignore[method-assign]
    return sent


def _rle(rle: dict[str, Any] | None) -> dict[str, Any] | None:
    """A COCO RLE as JSON (``counts`` is bytes from pycocotools, text from mmdet 2.x's results)."""
    if rle is None:
        return None
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def dump(sent: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(sent))


def load(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


def expected_boxes(batch: dict[str, Any], j: int, classes: Sequence[str]) -> list[dict[str, Any]]:
    """The box dicts wandb must hold for row ``j`` of ``batch``: scores above the threshold (strict, as
    upstream), 1-based class ids, positions truncated to int, captions ``"<class> <score:.2f>"``."""
    out = []
    for (x0, y0, x1, y1), score, label in zip(batch["boxes"][j], batch["scores"][j], batch["labels"][j]):
        if batch["score_thr"] > 0 and not score > batch["score_thr"]:
            continue
        out.append({"position": {"minX": int(x0), "minY": int(y0), "maxX": int(x1), "maxY": int(y1)},
                    "class_id": label + 1, "box_caption": f"{classes[label]} {score:.2f}", "domain": "pixel"})
    return out


def assert_table_shows(table: dict[str, Any], batch: dict[str, Any], classes: Sequence[str],
                       val_rows: Sequence[str]) -> int:
    """Every row of a ``run_<id>_pred`` table holds exactly the sent predictions above the threshold.

    ``val_rows`` are the image names of the ``val`` table (``batch["indices"]`` index it). Returns the
    number of boxes shown.
    """
    assert table["columns"] == ["image_name", "ground_truth", "prediction"]
    assert [row[0] for row in table["data"]] == [val_rows[i] for i in batch["indices"]]
    shown = 0
    for j, (_, _, pred) in enumerate(table["data"]):
        want = expected_boxes(batch, j, classes)
        got = (pred.get("boxes") or {}).get("predictions") or []  # a table cell holds the box list itself
        assert got == want, (batch["tag"], j)
        # the caption rounds to 2 decimals: a kept score of 0.3004 reads "0.30", never less
        assert all(float(b["box_caption"].rsplit(" ", 1)[1]) >= round(batch["score_thr"], 2) for b in got)
        shown += len(got)
    return shown
