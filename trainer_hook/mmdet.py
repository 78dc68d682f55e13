"""``MMDetWandbSidecarHook``: a drop-in for MMDetection 2.x's ``MMDetWandbHook`` that does no wandb work.

Load it with ``custom_imports=dict(imports=['trainer_hook.mmdet'])`` and swap the hook's ``type``; add
``sidecar_addr``. Everything the upstream hook does in the trainer (``wandb.init``, decoding images,
drawing tables, hashing and uploading checkpoints, a second evaluation for metadata) happens in the
sidecar; here the runner's own data is turned into messages and queued.

Deliberate differences from upstream (each documented in the README):
- the evaluation indices are drawn with a private ``RandomState(42)``: the same images, without reseeding
  numpy's global generator;
- checkpoints are logged only when ``log_checkpoint`` is on (upstream uploads the last one when
  ``save_last`` even with ``log_checkpoint=False``, and raises without a CheckpointHook); the file name
  follows the CheckpointHook's ``filename_tmpl``;
- checkpoint metadata is the evaluation the EvalHook already ran, not a second ``dataset.evaluate``.
"""

from __future__ import annotations

import os.path as osp
import warnings
from typing import Any, Sequence

import numpy as np
from mmcv import Config
from mmcv.runner import HOOKS
from mmcv.runner.dist_utils import master_only
from mmcv.runner.hooks.checkpoint import CheckpointHook
from mmcv.runner.hooks.logger.base import LoggerHook

from mmdet.core import DistEvalHook, EvalHook
from protocol import DEFAULT_ADDR, Kind

from .client import SidecarClient
from .detections import eval_image_indices, finish_run, polygon_masks
from .val_data import val_data_body, val_data_parts

_SUMMARY_CHOICES = ("min", "max", "mean", "best", "last", "none")


@HOOKS.register_module()
class MMDetWandbSidecarHook(LoggerHook):
    """Same arguments and defaults as ``MMDetWandbHook`` (and mmcv's ``WandbLoggerHook``), plus:

    Args:
        sidecar_addr (str): ZeroMQ address of ``wandb-sidecar serve``.
        send_image_bytes (bool): send the validation images' file bytes instead of their paths, for a
            sidecar that cannot see the dataset. Default False.
        finish_timeout (float): seconds ``after_run`` waits for the sidecar to acknowledge everything.
        client_kwargs (dict): extra :class:`SidecarClient` arguments (queue bounds, timeouts).
    """

    def __init__(
        self,
        init_kwargs: dict | None = None,
        interval: int = 50,
        log_checkpoint: bool = False,
        log_checkpoint_metadata: bool = False,
        num_eval_images: int = 100,
        bbox_score_thr: float = 0.3,
        ignore_last: bool = True,
        reset_flag: bool = False,
        commit: bool = True,
        by_epoch: bool = True,
        with_step: bool = True,
        log_artifact: bool = True,
        out_suffix: str | tuple = (".log.json", ".log", ".py"),
        define_metric_cfg: dict | None = None,
        sidecar_addr: str = DEFAULT_ADDR,
        send_image_bytes: bool = False,
        finish_timeout: float = 60.0,
        client_kwargs: dict | None = None,
    ) -> None:
        super().__init__(interval, ignore_last, reset_flag, by_epoch)
        self.init_kwargs = init_kwargs
        self.commit = commit
        self.with_step = with_step
        self.log_artifact = log_artifact  # accepted for compatibility; upstream's after_run skips it too
        self.out_suffix = out_suffix
        self.define_metric_cfg = define_metric_cfg
        self.log_checkpoint = log_checkpoint
        self.log_checkpoint_metadata = log_checkpoint and log_checkpoint_metadata
        self.num_eval_images = num_eval_images
        self.bbox_score_thr = bbox_score_thr
        self.log_evaluation = num_eval_images > 0
        self.sidecar_addr = sidecar_addr
        self.send_image_bytes = send_image_bytes
        self.finish_timeout = finish_timeout
        self.client_kwargs = dict(client_kwargs or {})
        self.client: SidecarClient | None = None
        self.ckpt_hook: CheckpointHook | None = None
        self.eval_hook: EvalHook | None = None
        self.eval_image_indexs: np.ndarray = np.zeros(0, dtype=np.int64)
        self._latest_eval: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------- run start

    @master_only
    def before_run(self, runner) -> None:  # type: ignore[no-untyped-def]
        super().before_run(runner)
        config, files = self._config_and_files(runner)
        self.client = SidecarClient(self.sidecar_addr, init_kwargs=self.init_kwargs, config=config,
                                    define_metrics=self._define_metrics(), files=files, **self.client_kwargs)
        self._find_hooks(runner)
        if self.log_evaluation:
            self._send_val_data(runner)

    def _define_metrics(self) -> list[dict[str, str]]:
        out = []
        for metric, summary in (self.define_metric_cfg or {}).items():
            if summary not in _SUMMARY_CHOICES:
                warnings.warn(f"summary should be in {list(_SUMMARY_CHOICES)}. "
                              f"metric={metric}, summary={summary} will be skipped.", stacklevel=2)
            out.append({"name": metric, "summary": summary})  # upstream passes it on regardless
        return out

    def _config_and_files(self, runner) -> tuple[dict | None, list[dict[str, str]]]:  # type: ignore[no-untyped-def]
        exp_name = (runner.meta or {}).get("exp_name")
        if exp_name is None:
            runner.logger.warning("No meta information found in the runner. ")
            return None, []
        path = osp.join(runner.work_dir, exp_name)
        if not osp.exists(path):
            return None, []
        cfg = Config.fromfile(path).to_dict()  # the names upstream reads by importing the dumped config
        return cfg, [{"path": osp.abspath(path), "base_path": osp.abspath(runner.work_dir)}]

    def _find_hooks(self, runner) -> None:  # type: ignore[no-untyped-def]
        for hook in runner.hooks:
            if isinstance(hook, CheckpointHook):
                self.ckpt_hook = hook
            if isinstance(hook, (EvalHook, DistEvalHook)):
                self.eval_hook = hook
        if self.log_checkpoint:
            if self.ckpt_hook is None:
                self.log_checkpoint = False
                self.log_checkpoint_metadata = False
                runner.logger.warning("To log checkpoint in MMDetWandbHook, `CheckpointHook` is"
                                      "required, please check hooks in the runner.")
            else:
                self.ckpt_interval = self.ckpt_hook.interval
        if self.log_evaluation or self.log_checkpoint_metadata:
            if self.eval_hook is None:
                self.log_evaluation = False
                self.log_checkpoint_metadata = False
                runner.logger.warning("To log evaluation or checkpoint metadata in MMDetWandbHook, `EvalHook` "
                                      "or `DistEvalHook` in mmdet is required, please check whether the "
                                      "validation is enabled.")
            else:
                self.eval_interval = self.eval_hook.interval
                self.val_dataset = self.eval_hook.dataloader.dataset
                self._capture_evaluation(self.val_dataset)
                if self.num_eval_images > len(self.val_dataset):
                    self.num_eval_images = len(self.val_dataset)
                    runner.logger.warning(
                        f"The num_eval_images ({self.num_eval_images}) is greater than the total number of "
                        f"validation samples ({len(self.val_dataset)}). The complete validation dataset will "
                        "be logged.")
        if self.log_checkpoint_metadata:
            assert self.ckpt_interval % self.eval_interval == 0, (
                "To log checkpoint metadata in MMDetWandbHook, the interval of checkpoint saving "
                f"({self.ckpt_interval}) should be divisible by the interval of evaluation ({self.eval_interval}).")

    def _capture_evaluation(self, dataset) -> None:  # type: ignore[no-untyped-def]
        """Keep the EvalHook's own ``dataset.evaluate`` result for checkpoint metadata (no second pass)."""
        evaluate = dataset.evaluate

        def evaluate_and_keep(*args: Any, **kwargs: Any) -> Any:
            result = evaluate(*args, **kwargs)
            self._latest_eval = dict(result)
            return result

        dataset.evaluate = evaluate_and_keep

    def _send_val_data(self, runner) -> None:  # type: ignore[no-untyped-def]
        from mmdet.datasets.pipelines import LoadImageFromFile

        ds = self.val_dataset
        if not any(isinstance(t, LoadImageFromFile) for t in ds.pipeline.transforms):
            self.log_evaluation = False
            runner.logger.warning("LoadImageFromFile is required to add images to W&B Tables.")
            return
        self.eval_image_indexs = eval_image_indices(len(ds), self.num_eval_images)
        names, paths, boxes, labels, masks = [], [], [], [], []
        for idx in self.eval_image_indexs:
            info = ds.data_infos[idx]
            names.append(info.get("filename", f"img_{idx}"))
            filename = info["filename"]
            paths.append(osp.abspath(osp.join(ds.img_prefix, filename) if ds.img_prefix else filename))
            ann = ds.get_ann_info(idx)
            boxes.append(np.asarray(ann["bboxes"], dtype=np.float32).reshape(-1, 4))
            labels.append(np.asarray(ann["labels"], dtype=np.int64).reshape(-1))
            masks.append(polygon_masks(ann.get("masks")))
        assert self.client is not None
        for part in val_data_parts(val_data_body(ds.CLASSES, names, paths, boxes, labels, masks,
                                                 self.send_image_bytes)):
            self.client.send(Kind.VAL_DATA, part)

    # ----------------------------------------------------------------------------- metrics

    @master_only
    def log(self, runner) -> None:  # type: ignore[no-untyped-def]
        tags = self.get_loggable_tags(runner)
        if not tags or self.client is None:
            return
        if self.with_step:
            self.client.log(tags, step=self.get_iter(runner), commit=self.commit)
        else:
            tags["global_step"] = self.get_iter(runner)
            self.client.log(tags, commit=self.commit)

    # ----------------------------------------------------------------------------- epoch / iter ends

    def after_train_iter(self, runner) -> None:  # type: ignore[no-untyped-def]
        mode = self.get_mode(runner)  # before super(): as the last logger hook it clears the output
        super().after_train_iter(runner)  # buffer averaging and clearing on every rank (mmdet#8145)
        # At an evaluation iteration mmcv's EvalHook calls the logger hooks once itself before it evaluates
        # (training logs, mode 'train'), then the runner calls them again with the results (mode 'val'):
        # act on the second call there, as upstream does, and on the only call at other iterations
        # (upstream skips those, so a checkpoint saved without an evaluation is never logged there).
        evaluating = self.eval_hook is not None and self.eval_hook._should_evaluate(runner)
        if mode != "train" or not evaluating:
            self._after_train_iter(runner)

    @master_only
    def _after_train_iter(self, runner) -> None:  # type: ignore[no-untyped-def]
        if not self.by_epoch:
            self._log_position(runner, "iter", runner.iter + 1)

    @master_only
    def after_train_epoch(self, runner) -> None:  # type: ignore[no-untyped-def]
        super().after_train_epoch(runner)
        if self.by_epoch:
            self._log_position(runner, "epoch", runner.epoch + 1)

    def _log_position(self, runner, unit: str, n: int) -> None:  # type: ignore[no-untyped-def]
        """At the end of epoch/iteration ``n``: its checkpoint, then its prediction table."""
        if self.log_checkpoint:
            assert self.ckpt_hook is not None
            every = self.every_n_epochs if unit == "epoch" else self.every_n_iters
            last = self.is_last_epoch if unit == "epoch" else self.is_last_iter
            if every(runner, self.ckpt_interval) or (self.ckpt_hook.save_last and last(runner)):
                self._send_checkpoint(f"{unit}_{n}", {unit: n}, n)
        if self.log_evaluation and self.eval_hook._should_evaluate(runner):
            self._send_predictions(f"{unit}_{n}")

    def _send_checkpoint(self, tag: str, position: dict[str, int], n: int) -> None:
        assert self.client is not None and self.ckpt_hook is not None
        tmpl = self.ckpt_hook.args.get("filename_tmpl", "epoch_{}.pth" if self.by_epoch else "iter_{}.pth")
        path = osp.join(self.ckpt_hook.out_dir, tmpl.format(n))
        metadata = None
        if self.log_checkpoint_metadata and self.eval_hook:
            metadata = {**position, **(self._latest_eval or {})}
        self.client.log_checkpoint(path, aliases=[tag, "latest"], metadata=metadata)

    def _send_predictions(self, tag: str) -> None:
        assert self.client is not None and self.eval_hook is not None
        results = self.eval_hook.latest_results
        if results is None:
            return
        boxes, scores, labels, masks = [], [], [], []
        for idx in self.eval_image_indexs:
            image_boxes, image_scores, image_labels, image_masks = _flatten_result(results[idx])
            boxes.append(image_boxes)
            scores.append(image_scores)
            labels.append(image_labels)
            masks.append(image_masks)
        body: dict[str, Any] = {"tag": tag, "indices": list(range(len(boxes))), "boxes": boxes, "scores": scores,
                                "labels": labels, "score_thr": float(self.bbox_score_thr),
                                "aliases": ["latest", tag]}
        if any(m is not None for m in masks):
            body["masks"] = masks
        self.client.send(Kind.PRED_BATCH, body)

    # ----------------------------------------------------------------------------- run end

    @master_only
    def after_run(self, runner) -> None:  # type: ignore[no-untyped-def]
        if self.client is not None:
            finish_run(self.client, self.finish_timeout, runner.logger.warning)


def _flatten_result(result: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list | None]:
    """mmdet's per-class result lists → (boxes (n,4), scores (n,), 0-based labels (n,), RLEs or None)."""
    if isinstance(result, tuple):
        bbox_result, segm_result = result[0], result[1]
        if isinstance(segm_result, tuple):
            segm_result = segm_result[0]  # ms rcnn: (mask, score)
    else:
        bbox_result, segm_result = result, None
    bboxes = np.vstack(bbox_result) if len(bbox_result) else np.zeros((0, 5), np.float32)
    labels = np.concatenate([np.full(len(b), i, dtype=np.int64) for i, b in enumerate(bbox_result)]) \
        if len(bbox_result) else np.zeros(0, np.int64)
    masks = None
    if segm_result is not None:
        masks = [m for per_class in segm_result for m in per_class]
    return (np.ascontiguousarray(bboxes[:, :4], dtype=np.float32), np.ascontiguousarray(bboxes[:, 4], dtype=np.float32),
            labels, masks)


__all__: Sequence[str] = ["MMDetWandbSidecarHook"]
