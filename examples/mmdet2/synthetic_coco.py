"""A tiny synthetic COCO instance-segmentation dataset for MMDetection tests.

Each image is a flat-coloured background with one to three non-overlapping shapes
(square, circle, triangle). Every shape is drawn from the very polygon stored as its
``segmentation``, so boxes, masks and pixels agree exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("square", "circle", "triangle")
_CIRCLE_POINTS = 24


def coco_paths(root: Path) -> dict[str, Any]:
    """The paths :func:`make_coco_dataset` writes under ``root`` (nothing is written)."""
    root = Path(root)
    return {
        "root": str(root),
        "train_ann_file": str(root / "annotations" / "train.json"),
        "val_ann_file": str(root / "annotations" / "val.json"),
        "train_img_prefix": str(root / "train") + "/",
        "val_img_prefix": str(root / "val") + "/",
        "classes": CLASSES,
    }


def _shape_polygon(
    kind: int, cx: float, cy: float, r: float, rng: np.random.Generator
) -> np.ndarray:
    """Vertices (n, 2) of a shape of class index ``kind`` centred at (cx, cy) with radius ``r``."""
    if kind == 0:  # axis-aligned square
        return np.array([[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
    if kind == 1:  # circle as a regular polygon
        t = np.linspace(0.0, 2 * np.pi, _CIRCLE_POINTS, endpoint=False)
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    # triangle: equilateral, random rotation
    t = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a simple polygon."""
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _make_split(
    out_dir: Path, n: int, size: int, rng: np.random.Generator, ann_start: int
) -> dict[str, Any]:
    """Write ``n`` images into ``out_dir``; return the split's COCO dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    ann_id = ann_start
    for i in range(n):
        bg = tuple(int(v) for v in rng.integers(0, 80, 3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        placed: list[tuple[float, float, float]] = []
        n_shapes = int(rng.integers(1, 4))
        for _ in range(50 * n_shapes):  # rejection sampling for non-overlapping shapes
            if len(placed) == n_shapes:
                break
            r = float(rng.uniform(size * 0.12, size * 0.22))
            cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
            if any(np.hypot(cx - px, cy - py) < r + pr + 2 for px, py, pr in placed):
                continue
            placed.append((cx, cy, r))
            kind = int(rng.integers(0, len(CLASSES)))
            poly = np.round(_shape_polygon(kind, cx, cy, r, rng), 1)
            colour = tuple(int(v) for v in rng.integers(120, 256, 3))
            draw.polygon([tuple(p) for p in poly.tolist()], fill=colour)
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            annotations.append({
                "id": ann_id,
                "image_id": i + 1,
                "category_id": kind + 1,
                "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                "area": round(_polygon_area(poly), 2),
                "iscrowd": 0,
                "segmentation": [[float(v) for v in poly.reshape(-1)]],
            })
            ann_id += 1
        name = f"{i:06d}.png"
        img.save(out_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco_dataset(
    root: Path, n_train: int = 6, n_val: int = 4, size: int = 96, seed: int = 0
) -> dict[str, Any]:
    """Write the dataset under ``root`` and return :func:`coco_paths` of it.

    Layout: ``annotations/{train,val}.json``, images in ``train/`` and ``val/``.
    The output depends only on the arguments (a local ``default_rng(seed)``).
    """
    paths = coco_paths(Path(root))
    rng = np.random.default_rng(seed)
    ann_dir = Path(paths["train_ann_file"]).parent
    ann_dir.mkdir(parents=True, exist_ok=True)
    train = _make_split(Path(paths["train_img_prefix"]), n_train, size, rng, ann_start=1)
    val = _make_split(Path(paths["val_img_prefix"]), n_val, size, rng, ann_start=100_000)
    Path(paths["train_ann_file"]).write_text(json.dumps(train))
    Path(paths["val_ann_file"]).write_text(json.dumps(val))
    return paths
