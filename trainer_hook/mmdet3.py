"""MMDetection 3.x (mmengine): ``SidecarVisBackend`` and ``DetWandbSidecarHook``; no wandb work in the trainer.

Load with ``custom_imports=dict(imports=['trainer_hook.mmdet3'], allow_failed_imports=False)``::

    visualizer = dict(type='DetLocalVisualizer', vis_backends=[
        dict(type='LocalVisBackend'),
        dict(type='SidecarVisBackend', init_kwargs=dict(project='mmdet'))])  # the default owner-only socket
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
- **Validation keys that training logs too** (``time`` and ``data_time``: mmengine's ``LogProcessor`` logs
  both for every training iteration and for each validation) are logged as ``val/time`` and
  ``val/data_time`` where a validation joins a training row, mmengine's own names for them (its message
  hub's, and ``log_with_hierarchy``'s): upstream's separate rows keep both values, so ours does too. Any
  other validation key that training has logged is renamed the same way (counted in ``val_keys_renamed``).
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
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
from mmengine.dist import all_gather_object, get_world_size, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import MessageHub
from mmengine.registry import HOOKS, VISBACKENDS
from mmengine.runner import BaseLoop, IterBasedTrainLoop
from mmengine.visualization.vis_backend import BaseVisBackend

from protocol import DEFAULT_ADDR, Counters, Kind
from protocol.limits import MAX_KEY_LEN, MAX_STR_LEN

from .client import SidecarClient
from .detections import OrderedWorker, encode_masks, eval_image_indices, finish_run, polygon_masks
from .val_data import val_data_body, val_data_parts
from .warn_once import WarnOnce

if TYPE_CHECKING:
    from mmengine.runner import Runner

log = logging.getLogger("trainer_hook.mmdet3")

# Config nesting deeper than this is sent as its text: a config that deep is a mistake or a cycle-like
# structure, and wandb shows text there as well as a tree (a choice of this module; the protocol's decoder
# sets no depth limit of its own today).
_MAX_DEPTH = 16
# keys mmengine's LogProcessor logs for training and for validation alike
_SHARED_RUNTIME_KEYS = frozenset({"time", "data_time"})


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
        self._train_keys: set[str] = set()  # scalar keys training logged (a validation must not replace them)
        self._drains: list[Callable[[float], Any]] = []
        self._warnings = WarnOnce(log)
        self.counters = Counters()

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
                                      "step": self._step(step, self._joined_step()), "commit": self._commit})

    def add_scalar(self, name: str, value: Any, step: int = 0, **kwargs: Any) -> None:
        self.add_scalars({name: value}, step)

    def add_scalars(self, scalar_dict: dict, step: int = 0, file_path: str | None = None, **kwargs: Any) -> None:
        """Queue scalars for one ``log`` at the (honoured) step; values that are not scalars are skipped.

        A validation inside training joins the training iteration's row: its keys that training logs as
        well (``time``, ``data_time``) become ``val/<key>``, mmengine's own name for them (its message hub's
        and ``log_with_hierarchy``'s), so neither value replaces the other."""
        if not self._usable("add_scalars"):
            return
        joined = self._joined_step()
        training = joined is None and MessageHub.get_current_instance().get_info("loop_stage") == "train"
        data = {}
        for key, value in scalar_dict.items():
            key, scalar = str(key), _scalar(value)
            if joined is not None and (key in _SHARED_RUNTIME_KEYS or key in self._train_keys):
                if key not in _SHARED_RUNTIME_KEYS:
                    self._count("val_keys_renamed")
                    self._warn_once(f"renamed:{key}", "SidecarVisBackend: validation key %r is a training key "
                                    "too; logged as 'val/%s' in the training iteration's row", key, key)
                key = f"val/{key}"
            if scalar is _SKIP or not 0 < len(key) <= MAX_KEY_LEN:
                self._count("skipped_values")
                self._warn_once(f"skip:{key}", "SidecarVisBackend: %r is not a scalar; not logged", key)
                continue
            if training:
                self._train_keys.add(key)
            data[key] = scalar
        if data:
            self.client.log(data, step=self._step(step, joined), commit=self._commit)

    def before_close(self, drain: Callable[[float], Any]) -> None:
        """Have ``close`` call ``drain(seconds_left)`` first: work queued elsewhere for this run (the hook's
        prediction batches) reaches the client before the run's end, within the one ``finish_timeout``."""
        self._drains.append(drain)

    def close(self) -> None:
        """Finish the run; wait up to ``finish_timeout`` for the sidecar to have everything."""
        if self._client is not None and not self._closed:
            deadline = time.monotonic() + self._finish_timeout
            for drain in self._drains:
                drain(max(0.0, deadline - time.monotonic()))
            self._closed = True
            finish_run(self._client, max(0.0, deadline - time.monotonic()))

    # -- helpers

    def _joined_step(self) -> int | None:
        """The training iteration a validation inside training joins (mmengine's ``loop_stage`` is ``val``
        and it knows the training iteration); None otherwise."""
        hub = MessageHub.get_current_instance()
        train_iter = hub.get_info("iter")
        if hub.get_info("loop_stage") == "val" and train_iter is not None:
            return int(train_iter) + 1  # ``iter`` is set before each training iteration: +1 is the one done
        return None

    def _step(self, step: int, joined: int | None) -> int:
        """The wandb step: ``step``, or the training iteration a validation joins; never back."""
        step = int(step) if joined is None else joined
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
        self.counters.add(key)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        self._warnings.warn(key, message, *args)


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
    evaluation follows. Predictions are filtered by score where they are (GPU), only the kept ones are
    copied, and their masks are RLE-encoded on a worker thread of the hook, in order. In distributed
    validation every rank keeps the predictions of the selected images it evaluated, and rank 0 gathers
    them all at the end of the validation, so the tables cover every selected image.
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
        self._started = False
        self._own_client = False
        self._ckpt_hook: CheckpointHook | None = None
        self._ckpt_by_epoch: bool | None = None  # None: checkpoints not logged
        self._seen_ckpt: str | None = None
        self._pending_ckpt: tuple[str, dict[str, int]] | None = None
        self._hold_ckpt = False
        self._rows: dict[str, int] = {}  # image path -> row of the val table (same on every rank)
        self._preds: dict[int, Prediction] = {}  # this rank's, this validation's
        self._send_tables = True
        self._encoder = OrderedWorker("wandb-sidecar-masks")
        self._evals = 0

    # -- run start

    def before_run(self, runner: Runner) -> None:
        if self._started:  # runner.val()/test() after train(): one run
            return
        self._started = True
        val_loop = runner._val_loop  # built by train()/val() before before_run; a dict when unused
        has_val = isinstance(val_loop, BaseLoop)
        selection = None
        if self.num_eval_images > 0 and has_val:
            try:  # on every rank: each keeps the predictions of the selected images it evaluates
                selection = _eval_selection(val_loop.dataloader.dataset, self.num_eval_images)
            except Exception as exc:  # a dataset this hook cannot read must not stop training
                runner.logger.warning(f"DetWandbSidecarHook: validation table not logged "
                                      f"({type(exc).__name__}: {exc})")
        if selection is not None:
            keys, selection = selection
            self._rows = {key: row for row, key in enumerate(keys)}
        if not is_main_process():
            return
        backend = _sidecar_backend(runner)
        if backend is not None:
            self.client = backend.client
            backend.before_close(self._encoder.drain)  # predictions still encoding go out before the finish
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
        self._hold_ckpt = self.log_checkpoint_metadata and has_val
        if selection is not None:
            try:
                for part in val_data_parts(val_data_body(send_image_bytes=self.send_image_bytes, **selection)):
                    self.client.send(Kind.VAL_DATA, part)
            except OSError as exc:  # an image file it cannot read (send_image_bytes): no tables, training goes on
                self._send_tables = False  # the other ranks still take part in each validation's gather
                runner.logger.warning(f"DetWandbSidecarHook: validation table not logged "
                                      f"({type(exc).__name__}: {exc})")

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
        """Keep the predictions of the selected images (only those: the rest costs a dict lookup).

        Filtered by score on their device, only the kept ones copied; masks encoded on the worker."""
        if not self._rows or not outputs:
            return
        for sample in outputs:
            row = self._rows.get(str(sample.metainfo.get("img_path")))
            if row is not None and "pred_instances" in sample:
                boxes, scores, labels, masks = _kept_predictions(sample.pred_instances, self.bbox_score_thr)
                rles = None if masks is None else self._encoder.submit(encode_masks, masks)
                self._preds[row] = (boxes, scores, labels, rles)

    def after_val_epoch(self, runner: Runner, metrics: dict[str, float] | None = None) -> None:
        preds, self._preds = self._preds, {}
        if self._rows and get_world_size() > 1:
            preds = _gather(preds)  # a collective: every rank calls it, rank 0 gets every rank's
        if self.client is None:
            return
        if self._ckpt_by_epoch is not None:
            # CheckpointHook(save_best) may save the current checkpoint again, or a new one, in this stage
            self._checkpoint_saved({"epoch": runner.epoch} if self._ckpt_by_epoch else {"iter": runner.iter})
            if self._pending_ckpt is not None:
                self._send_checkpoint(metrics or {})
        if self._rows and self._send_tables:
            # after the masks this validation queued on the worker: the batch goes out complete, in order
            self._encoder.submit(self._send_predictions, self._eval_tag(runner), preds)

    def _eval_tag(self, runner: Runner) -> str:
        loop = runner._train_loop
        self._evals += 1
        if not isinstance(loop, BaseLoop):
            return f"eval_{self._evals}"  # runner.val() outside training
        return f"iter_{runner.iter}" if isinstance(loop, IterBasedTrainLoop) else f"epoch_{runner.epoch}"

    def _send_predictions(self, tag: str, preds: dict[int, Prediction]) -> None:
        """On the worker: one prediction batch, rows in table order."""
        assert self.client is not None
        rows = sorted(preds)
        resolved = [_resolved(preds[r]) for r in rows]
        body: dict[str, Any] = {"tag": tag, "indices": rows, "boxes": [p[0] for p in resolved],
                                "scores": [p[1] for p in resolved], "labels": [p[2] for p in resolved],
                                "score_thr": self.bbox_score_thr, "aliases": ["latest", tag]}
        if any(p[3] is not None for p in resolved):
            body["masks"] = [p[3] for p in resolved]
        self.client.send(Kind.PRED_BATCH, body)

    # -- run end

    def after_run(self, runner: Runner) -> None:
        if self.client is not None and self._own_client:
            self._encoder.drain(self.finish_timeout)
            finish_run(self.client, self.finish_timeout, runner.logger.warning)
        self._encoder.shutdown()


# ------------------------------------------------------------------------------------ helpers

# one image's kept predictions: boxes (n, 4), scores (n,), 0-based labels (n,), and its masks' RLEs (a
# list, a Future of the worker's list, or None without masks)
Prediction = tuple[np.ndarray, np.ndarray, np.ndarray, Any]


def _sidecar_backend(runner: Runner) -> SidecarVisBackend | None:
    backends = getattr(runner.visualizer, "_vis_backends", {}) or {}
    return next((b for b in backends.values() if isinstance(b, SidecarVisBackend)), None)


def _eval_selection(dataset: Any, num_eval_images: int) -> tuple[list[str], dict[str, Any]]:
    """The selected validation images: their ``img_path`` as the samples carry it (the rows' keys), and
    ``val_data_body``'s arguments (names, absolute paths, ground truth)."""
    keys: list[str] = []
    out: dict[str, list] = {"image_names": [], "image_paths": [], "gt_boxes": [], "gt_labels": [], "gt_masks": []}
    for idx in eval_image_indices(len(dataset), num_eval_images).tolist():
        info = dataset.get_data_info(idx)
        path = info["img_path"]
        keys.append(str(path))
        out["image_names"].append(osp.basename(path))
        out["image_paths"].append(osp.abspath(path))
        boxes, labels, masks = _ground_truth(info.get("instances", []))
        out["gt_boxes"].append(boxes)
        out["gt_labels"].append(labels)
        out["gt_masks"].append(masks)
    return keys, {"class_names": dataset.metainfo.get("classes", ()), **out}


def _ground_truth(instances: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, list]:
    """mmdet 3 ``instances`` (not ignored) → boxes (n, 4) xyxy, 0-based labels (n,), polygon lists."""
    kept = [i for i in instances if not i.get("ignore_flag", 0)]
    boxes = np.asarray([i["bbox"] for i in kept], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray([i["bbox_label"] for i in kept], dtype=np.int64).reshape(-1)
    return boxes, labels, polygon_masks(i.get("mask") for i in kept) or []


def _kept_predictions(pred: Any, thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``DetDataSample.pred_instances`` above ``thr`` → boxes, scores, labels, masks (n, H, W) as numpy.

    The score test runs where the tensors are (a GPU's), so only the kept predictions are copied; masks
    are copied, not encoded (:func:`encode_masks` runs on the hook's worker)."""
    scores = pred.scores
    keep: Any = None
    if thr > 0:
        # float32, as mmdet's scores are (an fp16 score is compared as the float32 it becomes here)
        keep = (scores.float() if hasattr(scores, "float") else np.asarray(scores, np.float32)) > thr
    masks = None
    if "masks" in pred:
        masks = pred.masks
        masks = _kept(getattr(masks, "masks", masks), keep)  # BitmapMasks' array, or a (n, H, W) tensor
    return (np.ascontiguousarray(_kept(pred.bboxes, keep).astype(np.float32).reshape(-1, 4)),
            np.ascontiguousarray(_kept(scores, keep).astype(np.float32).reshape(-1)),
            _kept(pred.labels, keep).astype(np.int64).reshape(-1), masks)


def _kept(values: Any, keep: Any) -> np.ndarray:
    """``values[keep]`` as numpy: indexed where it lives (device tensor or array), then copied."""
    if keep is None:
        return _numpy(values)
    if hasattr(values, "detach"):
        if not hasattr(keep, "detach"):
            import torch

            keep = torch.as_tensor(keep)
        return _numpy(values[keep.to(values.device)])
    return np.asarray(values)[_numpy(keep)]


def _resolved(pred: Prediction) -> Prediction:
    boxes, scores, labels, rles = pred
    return boxes, scores, labels, rles.result() if isinstance(rles, Future) else rles


def _gather(preds: dict[int, Prediction]) -> dict[int, Prediction]:
    """Every rank's predictions of the selected images, on every rank (their masks encoded first).

    A sampler that pads the last batch evaluates an image twice: either copy is the same prediction."""
    local = {row: _resolved(p) for row, p in preds.items()}
    merged: dict[int, Prediction] = {}
    for part in all_gather_object(local):
        for row, pred in part.items():
            merged.setdefault(row, pred)
    return merged


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
