"""The shrinking both tiny Mask R-CNN configs share (mmdet 2.x's and 3.x's own configs have the same model
keys). No mmcv import: the 2.x and 3.x stacks each pass their own ``ConfigDict``."""

from __future__ import annotations

from typing import Any

CHANNELS = 32


def shrink_mask_rcnn(model: Any, num_classes: int, base_channels: int) -> None:
    """ResNet-18 from scratch, 32-channel FPN and heads, ``num_classes`` outputs, few detections."""
    model.backbone.update(depth=18, base_channels=base_channels, init_cfg=None, frozen_stages=-1, norm_eval=False)
    model.neck.update(in_channels=[base_channels * 2**i for i in range(4)], out_channels=CHANNELS)
    model.rpn_head.update(in_channels=CHANNELS, feat_channels=CHANNELS)
    roi = model.roi_head
    roi.bbox_roi_extractor.out_channels = CHANNELS
    roi.bbox_head.update(in_channels=CHANNELS, fc_out_channels=64, num_classes=num_classes)
    roi.mask_roi_extractor.out_channels = CHANNELS
    roi.mask_head.update(in_channels=CHANNELS, conv_out_channels=CHANNELS, num_classes=num_classes)
    model.train_cfg.rcnn.sampler.num = 64
    # Fewer proposals and detections: cheaper CPU inference, smaller W&B tables.
    model.test_cfg.rpn.update(nms_pre=200, max_per_img=100)
    model.test_cfg.rcnn.max_per_img = 20
    # Any weights give detections (softmax scores are > 0): evaluation and the tables never come back
    # empty, whatever a machine's kernels made of the tiny model.
    model.test_cfg.rcnn.score_thr = 0.0
