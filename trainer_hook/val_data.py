"""The validation-table message both MMDetection hooks send once per run (``Kind.VAL_DATA``)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def val_data_body(class_names: Sequence[str], image_names: list[str], image_paths: list[str],
                  gt_boxes: list[np.ndarray], gt_labels: list[np.ndarray], gt_masks: list[Any],
                  send_image_bytes: bool) -> dict[str, Any]:
    """What the sidecar needs to draw the table: images by path (it reads them) or, for a sidecar that
    cannot see the dataset, their file bytes (read here, once per run, as uint8 arrays: they travel in the
    message's blob frame, up to 256 MiB (some 1,600 COCO images), where bytes in the body stopped at its
    16 MiB limit, about 100); GT as arrays and polygons."""
    body: dict[str, Any] = {"class_names": [str(c) for c in class_names], "image_names": image_names,
                            "gt_boxes": gt_boxes, "gt_labels": gt_labels}
    if any(m for m in gt_masks):
        body["gt_masks"] = gt_masks
    if send_image_bytes:
        body["image_bytes"] = [np.fromfile(p, dtype=np.uint8) for p in image_paths]
    else:
        body["image_paths"] = image_paths
    return body

