"""MMDetection 3.x (mmengine): ``SidecarVisBackend`` and ``DetWandbSidecarHook``; no wandb work in the trainer.

Load with ``custom_imports=dict(imports=['trainer_hook.mmdet3'], allow_failed_imports=False)``::

    visualizer = dict(type='DetLocalVisualizer', vis_backends=[
        dict(type='LocalVisBackend'),
        dict(type='SidecarVisBackend', sidecar_addr='tcp://127.0.0.1:5555', init_kwargs=dict(project='mmdet'))])
    custom_hooks = [dict(type='DetWandbSidecarHook', num_eval_images=100, bbox_score_thr=0.3)]

``SidecarVisBackend`` takes mmengine's ``WandbVisBackend`` arguments and logs the same run (config, code
artifact, define_metric, scalars, images), through a :class:`SidecarClient`: every call only queues a
message. ``DetWandbSidecarHook`` adds what mmengine/mmdet 3 do not log: checkpoint artifacts
(``run_<id>_model``, aliases ``epoch_N``/``iter_N`` + ``latest``, the evaluation metrics as metadata), the
``val`` table and a ``run_<id>_pred`` prediction table per evaluation, as the 2.x hook does. The hook uses
the backend's client, so both go to one wandb run.

Deliberate differences from ``WandbVisBackend``:

- **The step is honoured.** Upstream ignores ``step`` (wandb's own counter then counts calls). Here the
  wandb step is the ``step`` given (mmengine's ``LoggerHook`` passes the global iteration), with two
  rules, because wandb has one increasing step per run: calls made by a validation that runs inside
  training (mmengine's ``loop_stage`` is ``val`` and it knows the training iteration) are logged at the
  training iteration reached, where ``LoggerHook`` passes the epoch and ``DetVisualizationHook`` passes
  ``iter + batch_idx``; and a step lower than one already logged is logged at the latest step (counted in
  ``steps_raised``), instead of wandb dropping it. Images of one step under one name (the validation
  images ``DetVisualizationHook`` draws) become one list of images in that row.
- **No run directory in the trainer.** ``init_kwargs`` go to ``wandb.init`` in the sidecar; ``dir`` is not
  defaulted to ``save_dir`` (the sidecar's ``WANDB_DIR`` decides), ``save_dir`` may be omitted.
- **Config.** Runner calls ``add_config`` first: the config travels in the run start (``wandb.init(config=...)``
  instead of a ``config.update`` right after it); a later ``add_config`` is a ``Kind.CONFIG`` update
  (``allow_val_change=True``). Values that are not plain data (classes of pure-Python configs) are sent as
  their ``str``. ``log_code`` runs in the sidecar on the trainer's working directory (same filesystem,
  inside ``--allow-root``); ``log_code=False`` turns it off.
- ``add_graph`` (``wandb.watch``) needs the model in the wandb process: not supported, warned once.
- ``close`` finishes the run and waits up to ``finish_timeout`` for the sidecar; later calls are dropped
  and counted (upstream raises).
"""

from __future__ import annotations

import logging
import os
import os.path as osp
import sys
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import MessageHub
from mmengine.registry import HOOKS, VISBACKENDS
from mmengine.runner import BaseLoop, IterBasedTrainLoop
from mmengine.visualization.vis_backend import BaseVisBackend

from protocol import DEFAULT_ADDR, Kind
from protocol.limits import MAX_KEY_LEN, MAX_STR_LEN

from .client import SidecarClient
from .val_data import val_data_body

if TYPE_CHECKING:
    from mmengine.runner import Runner

log = logging.getLogger("trainer_hook.mmdet3")

_MAX_DEPTH = 16  # deeper config nesting is sent as text (the protocol refuses deep nesting)


# ------------------------------------------------------------------------------------ vis backend


@VISBACKENDS.register_module()
class SidecarVisBackend(BaseVisBackend):
    """mmengine's ``WandbVisBackend``, through the sidecar (see the module docstring for the differences).

    Args:
        save_dir (str, optional): accepted for ``Visualizer``; unused (wandb writes in the sidecar).
        init_kwargs (dict, optional): ``wandb.init`` arguments, applied in the sidecar.
        define_metric_cfg (dict | list[dict], optional): as ``WandbVisBackend``.
        commit (bool): ``commit`` of every ``log``. Default True.
        log_code_name (str, optional): name of the code artifact (default: wandb's ``source-...``).
        watch_kwargs (dict, optional): accepted for compatibility; ``add_graph`` is not supported.
        sidecar_addr (str): ZeroMQ address of ``wandb-sidecar serve``.
        client_kwargs (dict, optional): extra :class:`SidecarClient` arguments (queues, timeouts, keys).
        log_code (bool): log the trainer's source tree as upstream's ``add_config`` does. Default True.
        finish_timeout (float): seconds ``close`` waits for the sidecar to acknowledge everything.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        init_kwargs: dict | None = None,
        define_metric_cfg: dict | list | None = None,
        commit: bool | None = True,
        log_code_name: str | None = None,
        watch_kwargs: dict | None = None,
        sidecar_addr: str = DEFAULT_ADDR,
        client_kwargs: dict | None = None,
        log_code: bool = True,
        finish_timeout: float = 60.0,
    ) -> None:
        super().__init__(save_dir)  # type: ignore[arg-type]
        if define_metric_cfg is not None and not isinstance(define_metric_cfg, (dict, list)):
            raise ValueError("define_metric_cfg should be dict or list")
        self._init_kwargs = dict(init_kwargs or {})
        self._define_metric_cfg = define_metric_cfg
        self._commit = True if commit is None else bool(commit)
        self._log_code_name = log_code_name
        self._watch_kwargs = watch_kwargs if watch_kwargs is not None else {}
        self._sidecar_addr = sidecar_addr
        self._client_kwargs = dict(client_kwargs or {})
        self._log_code = log_code
        self._finish_timeout = finish_timeout
        self._client: SidecarClient | None = None
        self._closed = False
        self._last_step = 0
        self._warned: set[str] = set()
        self.counters: dict[str, int] = {}

    # -- the run

    def _init_env(self) -> None:
        """mmengine's lazy set-up: start the run (without config) on first use."""
        self._start(None)

    def _start(self, config: dict | None) -> SidecarClient:
        code = None
        if self._log_code and config is not None:  # upstream logs code in add_config
            main = getattr(sys.modules.get("__main__"), "__file__", None)
            program = osp.relpath(osp.abspath(main), os.getcwd()) if main else None
            if program is not None and program.startswith(".."):
                program = None  # as wandb's program_relpath: a script outside the working directory
            code = {"root": os.getcwd(), "name": self._log_code_name, "program": program}
        self._client = SidecarClient(self._sidecar_addr, init_kwargs=self._init_kwargs, config=config,
                                     define_metrics=self._define_metrics(), code=code, **self._client_kwargs)
        self._env_initialized = True
        return self._client

    def _define_metrics(self) -> list[dict[str, Any]]:
        cfg = self._define_metric_cfg
        if isinstance(cfg, dict):
            return [{"name": metric, "summary": summary} for metric, summary in cfg.items()]
        return [dict(m) for m in cfg or []]

    @property
    def client(self) -> SidecarClient:
        """The run's client, started on first use. ``DetWandbSidecarHook`` logs through it too."""
        return self._client if self._client is not None else self._start(None)

    @property
    def experiment(self) -> SidecarClient:
        """Upstream returns the ``wandb`` module; here the client (``log(data, step)``, ``log_checkpoint``)."""
        return self.client

    # -- what the visualizer forwards

    def add_config(self, config: Any, **kwargs: Any) -> None:
        """Config (a ``Config`` or a dict) in the run start, or a config update once the run is started."""
        data = _plain(config.to_dict() if hasattr(config, "to_dict") else dict(config))
        if self._client is None:
            self._start(data)
        elif self._usable("add_config"):
            self._client.send(Kind.CONFIG, {"config": data})

    def add_graph(self, model: Any, data_batch: Sequence[dict], **kwargs: Any) -> None:
        self._warn_once("graph", "SidecarVisBackend: add_graph (wandb.watch) needs the model in the wandb "
                                 "process; not logged")

    def add_image(self, name: str, image: np.ndarray, step: int = 0, **kwargs: Any) -> None:
        """Queue an RGB image for ``wandb.Image`` in the sidecar, at the (honoured) step."""
        if not self._usable("add_image"):
            return
        self.client.send(Kind.IMAGE, {"name": str(name)[:MAX_KEY_LEN], "image": _uint8_image(image),
                                      "step": self._step(step), "commit": self._commit})

    def add_scalar(self, name: str, value: Any, step: int = 0, **kwargs: Any) -> None:
        self.add_scalars({name: value}, step)

    def add_scalars(self, scalar_dict: dict, step: int = 0, file_path: str | None = None, **kwargs: Any) -> None:
        """Queue scalars for one ``log`` at the (honoured) step; values that are not scalars are skipped."""
        if not self._usable("add_scalars"):
            return
        data = {}
        for key, value in scalar_dict.items():
            scalar = _scalar(value)
            if scalar is _SKIP or not 0 < len(str(key)) <= MAX_KEY_LEN:
                self._count("skipped_values")
                self._warn_once(f"skip:{key}", "SidecarVisBackend: %r is not a scalar; not logged", key)
                continue
            data[str(key)] = scalar
        if data:
            self.client.log(data, step=self._step(step), commit=self._commit)

    def close(self) -> None:
        """Finish the run; wait up to ``finish_timeout`` for the sidecar to have everything."""
        if self._client is not None and not self._closed:
            self._closed = True
            if not self._client.finish(exit_code=0, timeout=self._finish_timeout):
                log.warning("wandb sidecar did not acknowledge everything in %s s: %s",
                            self._finish_timeout, self._client.stats())

    # -- helpers

    def _step(self, step: int) -> int:
        """The wandb step: ``step``, the training iteration during validation inside training, never back."""
        hub = MessageHub.get_current_instance()
        train_iter = hub.get_info("iter")
        if hub.get_info("loop_stage") == "val" and train_iter is not None:
            step = int(train_iter) + 1  # ``iter`` is set before each training iteration: +1 is the one done
        step = int(step)
        if step < self._last_step:
            self._count("steps_raised")
            step = self._last_step
        self._last_step = step
        return step

    def _usable(self, what: str) -> bool:
        if self._closed:
            self._count("after_close")
            self._warn_once("closed", "SidecarVisBackend: %s after close(); not logged", what)
            return False
        return True

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)


# ------------------------------------------------------------------------------------ hook


@HOOKS.register_module()
class DetWandbSidecarHook(Hook):
    """Checkpoint artifacts and validation/prediction tables for MMDetection 3.x, through the sidecar.

    Logs into the run of the visualizer's :class:`SidecarVisBackend`; without one, it starts its own run
    from ``sidecar_addr``, ``init_kwargs`` and ``client_kwargs`` (and finishes it after the run).

    Args:
        log_checkpoint (bool): a ``run_<id>_model`` artifact (type ``model``) for each checkpoint the
            ``CheckpointHook`` saves, aliases ``epoch_N``/``iter_N`` and ``latest``. Default True.
        log_checkpoint_metadata (bool): its metadata is ``{"epoch"|"iter": N, **metrics}``, the metrics of
            the evaluation that follows the save (``after_val_epoch``); without one, only the position.
        num_eval_images (int): validation images in the ``val`` table (drawn with ``RandomState(42)``,
            as the 2.x hook); 0 turns the tables off. Default 100.
        bbox_score_thr (float): predictions at or below it are neither sent nor drawn. Default 0.3.
        send_image_bytes (bool): send the images' bytes instead of their paths (a sidecar that cannot
            see the dataset). Default False.

    Checkpoints are announced after the evaluation that follows them (for the metadata; the file is only
    removed by ``max_keep_ckpts`` at the next save), or before the next training epoch/iteration when no
    evaluation follows. In distributed validation, the prediction table holds the selected images that
    rank 0 evaluated.
    """

    priority = "LOWEST"  # after CheckpointHook (VERY_LOW): this epoch's checkpoint is saved when we look

    def __init__(
        self,
        log_checkpoint: bool = True,
        log_checkpoint_metadata: bool = True,
        num_eval_images: int = 100,
        bbox_score_thr: float = 0.3,
        send_image_bytes: bool = False,
        sidecar_addr: str = DEFAULT_ADDR,
        init_kwargs: dict | None = None,
        client_kwargs: dict | None = None,
        finish_timeout: float = 60.0,
    ) -> None:
        self.log_checkpoint = log_checkpoint
        self.log_checkpoint_metadata = log_checkpoint and log_checkpoint_metadata
        self.num_eval_images = num_eval_images
        self.bbox_score_thr = float(bbox_score_thr)
        self.send_image_bytes = send_image_bytes
        self.sidecar_addr = sidecar_addr
        self.init_kwargs = init_kwargs
        self.client_kwargs = dict(client_kwargs or {})
        self.finish_timeout = finish_timeout
        self.client: SidecarClient | None = None
        self._own_client = False
        self._ckpt_hook: CheckpointHook | None = None
        self._ckpt_by_epoch: bool | None = None  # None: checkpoints not logged
        self._seen_ckpt: str | None = None
        self._pending_ckpt: tuple[str, dict[str, int]] | None = None
        self._hold_ckpt = False
        self._rows: dict[str, int] = {}  # image path -> row of the val table
        self._preds: dict[int, tuple] = {}
        self._evals = 0

    # -- run start

    def before_run(self, runner: Runner) -> None:
        if not is_main_process() or self.client is not None:
            return
        backend = _sidecar_backend(runner)
        if backend is not None:
            self.client = backend.client
        else:
            runner.logger.warning("DetWandbSidecarHook: no SidecarVisBackend in the visualizer; logging "
                                  "checkpoints and tables to a run of its own")
            self.client = SidecarClient(self.sidecar_addr, init_kwargs=self.init_kwargs, **self.client_kwargs)
            self._own_client = True
        self._ckpt_hook = next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)
        if self.log_checkpoint and self._ckpt_hook is None:
            self.log_checkpoint = self.log_checkpoint_metadata = False
            runner.logger.warning("DetWandbSidecarHook: no CheckpointHook; checkpoints are not logged")
        if self.log_checkpoint and self._ckpt_hook is not None:
            self._ckpt_by_epoch = bool(self._ckpt_hook.by_epoch)
        val_loop = runner._val_loop  # built by train()/val() before before_run; a dict when unused
        has_val = isinstance(val_loop, BaseLoop)
        self._hold_ckpt = self.log_checkpoint_metadata and has_val
        if self.num_eval_images > 0 and has_val:
            try:
                self._send_val_data(runner, val_loop.dataloader.dataset)
            except Exception as exc:  # a dataset this hook cannot read must not stop training
                self._rows = {}
                runner.logger.warning(f"DetWandbSidecarHook: validation table not logged "
                                      f"({type(exc).__name__}: {exc})")

    def _send_val_data(self, runner: Runner, dataset: Any) -> None:
        """The selected validation images (paths or bytes) and their ground truth, once."""
        n = len(dataset)
        indices = np.arange(n)
        np.random.RandomState(42).shuffle(indices)  # the 2.x hook's selection, without global reseeding
        indices = indices[: min(self.num_eval_images, n)]
        names, paths, boxes, labels, masks = [], [], [], [], []
        for row, idx in enumerate(indices.tolist()):
            info = dataset.get_data_info(idx)
            path = info["img_path"]
            self._rows[str(path)] = row
            names.append(osp.basename(path))
            paths.append(osp.abspath(path))
            b, l, m = _ground_truth(info.get("instances", []))
            boxes.append(b)
            labels.append(l)
            masks.append(m)
        assert self.client is not None
        self.client.send(Kind.VAL_DATA, val_data_body(dataset.metainfo.get("classes", ()), names, paths, boxes, labels, masks,
                                                      self.send_image_bytes))

    # -- checkpoints

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        if self._ckpt_by_epoch is False:
            self._checkpoint_saved({"iter": runner.iter + 1})

    def after_train_epoch(self, runner: Runner) -> None:
        if self._ckpt_by_epoch:
            self._checkpoint_saved({"epoch": runner.epoch + 1})

    def before_train_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None) -> None:
        if self._pending_ckpt is not None:
            self._send_checkpoint({})  # no evaluation followed it

    def before_train_epoch(self, runner: Runner) -> None:
        if self._pending_ckpt is not None:
            self._send_checkpoint({})

    def after_train(self, runner: Runner) -> None:
        if self._pending_ckpt is not None:
            self._send_checkpoint({})  # before after_run, where LoggerHook closes the visualizer's run

    def _checkpoint_saved(self, position: dict[str, int]) -> None:
        """Notice a new ``CheckpointHook.last_ckpt``; announce it now, or after the evaluation for metadata."""
        assert self._ckpt_hook is not None
        path = self._ckpt_hook.last_ckpt
        if path is None or path == self._seen_ckpt:
            return
        self._seen_ckpt = path
        if self._pending_ckpt is not None:
            self._send_checkpoint({})
        self._pending_ckpt = (str(path), position)
        if not self._hold_ckpt:
            self._send_checkpoint({})

    def _send_checkpoint(self, metrics: Mapping[str, Any]) -> None:
        assert self.client is not None and self._pending_ckpt is not None
        path, position = self._pending_ckpt
        self._pending_ckpt = None
        (unit, n), = position.items()
        metadata = _plain({**position, **metrics}) if self.log_checkpoint_metadata else None
        self.client.log_checkpoint(path, aliases=[f"{unit}_{n}", "latest"], metadata=metadata)

    # -- evaluation

    def after_val_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None,
                       outputs: Sequence[Any] | None = None) -> None:
        """Keep the predictions of the selected images (only those: the rest costs a dict lookup)."""
        if not self._rows or not outputs:
            return
        for sample in outputs:
            row = self._rows.get(str(sample.metainfo.get("img_path")))
            if row is not None and "pred_instances" in sample:
                self._preds[row] = _predictions(sample.pred_instances, self.bbox_score_thr)

    def after_val_epoch(self, runner: Runner, metrics: dict[str, float] | None = None) -> None:
        if self.client is None:
            return
        if self._ckpt_by_epoch is not None:
            # CheckpointHook(save_best) may save the current checkpoint again, or a new one, in this stage
            self._checkpoint_saved({"epoch": runner.epoch} if self._ckpt_by_epoch else {"iter": runner.iter})
            if self._pending_ckpt is not None:
                self._send_checkpoint(metrics or {})
        if self._rows:
            self._send_predictions(self._eval_tag(runner))

    def _eval_tag(self, runner: Runner) -> str:
        loop = runner._train_loop
        self._evals += 1
        if not isinstance(loop, BaseLoop):
            return f"eval_{self._evals}"  # runner.val() outside training
        return f"iter_{runner.iter}" if isinstance(loop, IterBasedTrainLoop) else f"epoch_{runner.epoch}"

    def _send_predictions(self, tag: str) -> None:
        assert self.client is not None
        rows = sorted(self._preds)
        preds = [self._preds[r] for r in rows]
        self._preds = {}
        body: dict[str, Any] = {"tag": tag, "indices": rows, "boxes": [p[0] for p in preds],
                                "scores": [p[1] for p in preds], "labels": [p[2] for p in preds],
                                "score_thr": self.bbox_score_thr, "aliases": ["latest", tag]}
        if any(p[3] is not None for p in preds):
            body["masks"] = [p[3] for p in preds]
        self.client.send(Kind.PRED_BATCH, body)

    # -- run end

    def after_run(self, runner: Runner) -> None:
        if self.client is not None and self._own_client:
            if not self.client.finish(exit_code=0, timeout=self.finish_timeout):
                runner.logger.warning("wandb sidecar did not acknowledge everything in %s s: %s",
                                      self.finish_timeout, self.client.stats())


# ------------------------------------------------------------------------------------ helpers


def _sidecar_backend(runner: Runner) -> SidecarVisBackend | None:
    backends = getattr(runner.visualizer, "_vis_backends", {}) or {}
    return next((b for b in backends.values() if isinstance(b, SidecarVisBackend)), None)


def _ground_truth(instances: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, list]:
    """mmdet 3 ``instances`` (not ignored) → boxes (n, 4) xyxy, 0-based labels (n,), polygon lists."""
    kept = [i for i in instances if not i.get("ignore_flag", 0)]
    boxes = np.asarray([i["bbox"] for i in kept], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray([i["bbox_label"] for i in kept], dtype=np.int64).reshape(-1)
    masks = []
    for i in kept:
        mask = i.get("mask")
        if isinstance(mask, list):  # polygons; RLE (crowd) or none: no polygon to send
            masks.append([np.asarray(p, dtype=np.float64).ravel().tolist() for p in mask])
        else:
            masks.append([])
    return boxes, labels, masks


def _predictions(pred: Any, thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, list | None]:
    """``DetDataSample.pred_instances`` above ``thr`` → boxes, scores, labels and COCO RLEs (or None)."""
    scores = _numpy(pred.scores).astype(np.float32).reshape(-1)
    keep = scores > thr if thr > 0 else np.ones(len(scores), dtype=bool)
    boxes = _numpy(pred.bboxes).astype(np.float32).reshape(-1, 4)[keep]
    labels = _numpy(pred.labels).astype(np.int64).reshape(-1)[keep]
    rles = None
    if "masks" in pred:
        masks = pred.masks
        masks = _numpy(getattr(masks, "masks", masks))[keep]  # BitmapMasks or a (n, H, W) tensor
        rles = _rles(masks)
    return np.ascontiguousarray(boxes), np.ascontiguousarray(scores[keep]), labels, rles


def _rles(masks: np.ndarray) -> list | None:
    try:
        import pycocotools.mask as mask_util
    except ImportError:
        return None
    if len(masks) == 0:
        return []
    encoded = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"]} for r in encoded]


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


_SKIP = object()


def _scalar(value: Any) -> Any:
    """A plain scalar for the wire, or ``_SKIP``: numpy/torch scalars and one-element arrays unwrap."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "numel"):  # torch.Tensor
        return value.item() if value.numel() == 1 else _SKIP
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    return _SKIP


def _plain(obj: Any, depth: int = 0) -> Any:
    """Config or metadata as plain msgpack data: dicts with str keys, lists, scalars; the rest as text."""
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, str):
        return obj if len(obj) <= MAX_STR_LEN // 4 else obj[: MAX_STR_LEN // 4]
    if depth >= _MAX_DEPTH:
        return _plain(str(obj), depth)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    scalar = _scalar(obj)
    return _plain(str(obj), depth) if scalar is _SKIP else scalar


def _uint8_image(image: Any) -> np.ndarray:
    """An owned uint8 copy (the caller may reuse its buffer); floats in [0, 1] are scaled as wandb does."""
    arr = _numpy(image)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255
        return np.clip(arr, 0, 255).astype(np.uint8)
    return arr.copy()


__all__: Sequence[str] = ["DetWandbSidecarHook", "SidecarVisBackend"]
