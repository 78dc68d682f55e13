"""The validation-table message both MMDetection hooks send once per run (``Kind.VAL_DATA``)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def val_data_body(class_names: Sequence[str], image_names: list[str], image_paths: list[str],
                  gt_boxes: list[np.ndarray], gt_labels: list[np.ndarray], gt_masks: list[Any],
                  send_image_bytes: bool) -> dict[str, Any]:
    """What the sidecar needs to draw the table: images by path (it reads them) or, for a sidecar that
    cannot see the dataset, their file bytes (read here, once per run, as uint8 arrays: they travel in the
    message's blob frame, where bytes in the body stopped at its 16 MiB limit, about 100 images; any number
    of them, in parts: see :func:`val_data_parts`); GT as arrays and polygons."""
    body: dict[str, Any] = {"class_names": [str(c) for c in class_names], "image_names": image_names,
                            "gt_boxes": gt_boxes, "gt_labels": gt_labels}
    if any(m for m in gt_masks):
        body["gt_masks"] = gt_masks
    if send_image_bytes:
        body["image_bytes"] = [np.fromfile(p, dtype=np.uint8) for p in image_paths]
    else:
        body["image_paths"] = image_paths
    return body



#: Image bytes per ``VAL_DATA`` message: a larger validation set is sent as several (the blob frame's
#: limit is 256 MiB; smaller parts also keep the journal's records and the sidecar's memory modest).
VAL_PART_BYTES = 32 * 1024 * 1024
_PER_IMAGE = ("image_names", "image_bytes", "gt_boxes", "gt_labels", "gt_masks")


def val_data_parts(body: dict[str, Any], part_bytes: int = VAL_PART_BYTES) -> list[dict[str, Any]]:
    """``body`` as the messages to send: itself, or, when its image bytes exceed ``part_bytes``, parts of
    consecutive images (each at least one image) that the sidecar joins into one table."""
    images = body.get("image_bytes")
    if images is None or sum(len(b) for b in images) <= part_bytes:
        return [body]
    groups: list[list[int]] = [[]]
    size = 0
    for i, b in enumerate(images):
        if groups[-1] and size + len(b) > part_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(b)
    parts = []
    for n, group in enumerate(groups):
        part = {k: v for k, v in body.items() if k not in _PER_IMAGE}
        part.update({k: [body[k][i] for i in group] for k in _PER_IMAGE if k in body})
        part.update(part=n, parts=len(groups))
        parts.append(part)
    return parts
