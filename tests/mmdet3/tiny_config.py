"""A CPU-sized Mask R-CNN config derived from mmdet 3.x's own ``mask-rcnn_r50_fpn_1x_coco.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mmengine.config import Config

from examples.mmdet2.tiny_model import shrink_mask_rcnn

SHIPPED_CONFIG = "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
IMG_SCALE = (96, 96)


def shipped_config_path() -> Path:
    """Path of ``configs/mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py`` inside the mmdet 3 wheel."""
    import mmdet

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / SHIPPED_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"mmdet's shipped config not found at {path}")
    return path


def _rescale(pipeline: list[dict[str, Any]]) -> None:
    for step in pipeline:
        if step["type"] == "Resize":
            step["scale"] = IMG_SCALE


def tiny_mask_rcnn_cfg(
    data: dict[str, Any],
    work_dir: str,
    *,
    max_epochs: int = 2,
    by_iter: bool = False,
    max_iters: int = 24,
    repeat: int = 4,
    base_channels: int = 16,
    vis_backends: Sequence[dict[str, Any]] = (),
    custom_hooks: Sequence[dict[str, Any]] = (),
    draw: bool = False,
    seed: int = 0,
) -> Config:
    """mmdet 3's own Mask R-CNN config, shrunk to train on CPU in seconds.

    ``data`` is :func:`examples.mmdet2.synthetic_coco.coco_paths` output. Evaluation (CocoMetric bbox+segm)
    and a checkpoint every epoch (or every ``max_iters // 2`` iterations with ``by_iter``); the logger
    logs every iteration. ``vis_backends`` are added to the visualizer's; ``draw`` turns on
    ``DetVisualizationHook`` drawing for every validation image.
    """
    cfg = Config.fromfile(str(shipped_config_path()))
    classes = tuple(data["classes"])
    shrink_mask_rcnn(cfg.model, len(classes), base_channels)

    for loader, ann, prefix in (("train_dataloader", "train_ann_file", "train_img_prefix"),
                                ("val_dataloader", "val_ann_file", "val_img_prefix"),
                                ("test_dataloader", "val_ann_file", "val_img_prefix")):
        dl = cfg[loader]
        dl.update(num_workers=0, persistent_workers=False)
        dl.dataset.update(data_root="", ann_file=data[ann], data_prefix=dict(img=data[prefix]),
                          metainfo=dict(classes=classes))
        _rescale(dl.dataset.pipeline)
    cfg.train_dataloader.batch_size = 2
    if repeat > 1:
        cfg.train_dataloader.dataset = dict(type="RepeatDataset", times=repeat, dataset=cfg.train_dataloader.dataset)
    for evaluator in ("val_evaluator", "test_evaluator"):
        cfg[evaluator].update(ann_file=data["val_ann_file"], metric=["bbox", "segm"])

    cfg.optim_wrapper.optimizer.lr = 0.02
    cfg.optim_wrapper.clip_grad = dict(max_norm=10.0, norm_type=2)
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=2)]
    if by_iter:
        interval = max(1, max_iters // 2)
        cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=interval)
        cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=interval, by_epoch=False)
        cfg.log_processor.by_epoch = False
    else:
        cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=1)
        cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.default_hooks.visualization = dict(type="DetVisualizationHook", draw=draw, interval=1)
    cfg.visualizer.vis_backends = [dict(type="LocalVisBackend"), *[dict(b) for b in vis_backends]]
    cfg.custom_hooks = [dict(h) for h in custom_hooks]

    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=seed)
    cfg.load_from = None
    cfg.resume = False
    return cfg
