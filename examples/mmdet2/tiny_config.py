"""A CPU-sized Mask R-CNN config derived from mmdet 2.x's own W&B example config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mmcv import Config

from examples.mmdet2.tiny_model import shrink_mask_rcnn

SHIPPED_CONFIG = "mask_rcnn/mask_rcnn_r50_fpn_1x_wandb_coco.py"
IMG_SCALE = (96, 96)


def shipped_config_path() -> Path:
    """Path of ``configs/mask_rcnn/mask_rcnn_r50_fpn_1x_wandb_coco.py`` inside the mmdet wheel."""
    import mmdet

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / SHIPPED_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"mmdet's shipped config not found at {path}")
    return path


def _rescale_pipeline(pipeline: list[dict[str, Any]]) -> None:
    """Set ``img_scale`` of every Resize / MultiScaleFlipAug step (recursively) to IMG_SCALE."""
    for step in pipeline:
        if step["type"] in ("Resize", "MultiScaleFlipAug"):
            step["img_scale"] = IMG_SCALE
        if "transforms" in step:
            _rescale_pipeline(step["transforms"])


def tiny_mask_rcnn_cfg(
    data: dict[str, Any],
    work_dir: str,
    *,
    by_epoch: bool = True,
    max_epochs: int = 2,
    max_iters: int | None = None,
    interval: int | None = None,
    repeat: int = 4,
    base_channels: int = 64,
    hooks: Sequence[dict[str, Any]] | None = None,
    log_interval: int = 1,
    seed: int = 0,
) -> Config:
    """The shipped W&B Mask R-CNN config, shrunk to train on CPU in seconds.

    ``data`` is :func:`examples.mmdet2.synthetic_coco.coco_paths` output. ``hooks`` become
    ``log_config.hooks`` (default: only ``TextLoggerHook``). Evaluation (bbox+segm) and
    checkpoints happen every ``interval`` epochs, or iterations when ``by_epoch=False``
    (default: 1 epoch, or ``max_iters // 2`` iterations; ``max_iters`` defaults to 24).
    The train set is wrapped in a ``RepeatDataset`` (``repeat`` times per epoch) so that
    after 2 epochs val images usually have detections above the hooks' ``bbox_score_thr=0.3`` (tests do
    not rely on it: which scores a tiny model reaches depends on the machine).
    ``base_channels=16`` (a quarter-width ResNet-18) shrinks checkpoints from ~91 MB to ~7 MB.
    """
    cfg = Config.fromfile(str(shipped_config_path()))
    classes = tuple(data["classes"])
    shrink_mask_rcnn(cfg.model, len(classes), base_channels)

    splits = {
        "train": (data["train_ann_file"], data["train_img_prefix"]),
        "val": (data["val_ann_file"], data["val_img_prefix"]),
        "test": (data["val_ann_file"], data["val_img_prefix"]),
    }
    for split, (ann_file, img_prefix) in splits.items():
        ds = cfg.data[split]
        ds.update(ann_file=ann_file, img_prefix=img_prefix, classes=classes)
        _rescale_pipeline(ds.pipeline)
    if repeat > 1:
        cfg.data.train = dict(type="RepeatDataset", times=repeat, dataset=cfg.data.train)
    cfg.data.update(samples_per_gpu=2, workers_per_gpu=0)

    cfg.optimizer.lr = 0.02
    cfg.optimizer_config = dict(grad_clip=dict(max_norm=10.0, norm_type=2))
    cfg.lr_config = dict(
        policy="step", warmup="linear", warmup_iters=2, warmup_ratio=0.1, step=[1000]
    )
    if by_epoch:
        cfg.runner = dict(type="EpochBasedRunner", max_epochs=max_epochs)
        interval = interval or 1
    else:
        max_iters = max_iters or 24
        cfg.runner = dict(type="IterBasedRunner", max_iters=max_iters)
        interval = interval or max(1, max_iters // 2)
    # mmdet's train_detector derives the eval hook's by_epoch from the runner type, and
    # IterBasedRunner defaults the checkpoint and logger hooks to by_epoch=False.
    cfg.evaluation = dict(interval=interval, metric=["bbox", "segm"])
    cfg.checkpoint_config = dict(interval=interval)
    cfg.log_config = dict(
        interval=log_interval,
        hooks=[dict(h) for h in hooks] if hooks is not None else [dict(type="TextLoggerHook")],
    )

    cfg.work_dir = work_dir
    cfg.device = "cpu"
    cfg.gpu_ids = [0]
    cfg.seed = seed
    cfg.load_from = None
    cfg.resume_from = None
    return cfg
