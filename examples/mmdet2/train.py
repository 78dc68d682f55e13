"""In-process equivalent of mmdet 2.x ``tools/train.py`` for the tiny test config.

Run as a subprocess::

    PYTHONPATH=/work/main python -m examples.mmdet2.train --work-dir /tmp/x --data-root /tmp/d \
        --logger upstream
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mmcv import Config

from protocol import DEFAULT_ADDR

EXP_NAME = "tiny_mask_rcnn.py"
HOOK_ARGS: dict[str, Any] = dict(
    interval=1,
    log_checkpoint=True,
    log_checkpoint_metadata=True,
    num_eval_images=3,
    bbox_score_thr=0.3,
)


@dataclass
class TrainResult:
    """What a finished run left behind."""

    work_dir: Path
    seconds: float
    checkpoints: list[Path] = field(default_factory=list)
    log_json: Path | None = None

    def log_records(self) -> list[dict[str, Any]]:
        """Records of mmcv's ``<timestamp>.log.json`` (first line is the env/config header)."""
        if self.log_json is None:
            return []
        lines = self.log_json.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def logger_hooks(
    logger: str, *, sidecar_addr: str | None = None, project: str = "test",
    hook_args: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """``log_config.hooks`` for ``logger`` in ``none`` | ``upstream`` | ``sidecar``."""
    hooks: list[dict[str, Any]] = [dict(type="TextLoggerHook")]
    init_kwargs = {"project": project, "mode": "offline"}
    args = {**HOOK_ARGS, **(hook_args or {})}
    if logger == "upstream":
        hooks.append(dict(type="MMDetWandbHook", init_kwargs=init_kwargs, **args))
    elif logger == "sidecar":
        hooks.append(dict(type="MMDetWandbSidecarHook", sidecar_addr=sidecar_addr,
                          init_kwargs=init_kwargs, **args))
    elif logger != "none":
        raise ValueError(f"unknown logger {logger!r}")
    return hooks


def train(cfg: Config) -> TrainResult:
    """Build model and datasets from ``cfg``; ``train_detector`` with validation, one process."""
    import mmcv
    import mmdet
    from mmcv.utils import import_modules_from_strings
    from mmdet.apis import set_random_seed, train_detector
    from mmdet.datasets import build_dataset
    from mmdet.models import build_detector
    from mmdet.utils import get_root_logger

    if cfg.get("custom_imports"):
        import_modules_from_strings(**cfg.custom_imports)
    work_dir = Path(cfg.work_dir).resolve()
    mmcv.mkdir_or_exist(str(work_dir))
    cfg.dump(str(work_dir / EXP_NAME))  # MMDetWandbHook saves it and reads config keys from it
    timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    get_root_logger(log_file=str(work_dir / f"{timestamp}.log"), log_level=cfg.log_level)
    set_random_seed(cfg.seed, deterministic=False)
    meta = dict(env_info="", config=cfg.pretty_text, seed=cfg.seed, exp_name=EXP_NAME)

    start = time.perf_counter()
    model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    datasets = [build_dataset(cfg.data.train)]
    cfg.checkpoint_config.meta = dict(mmdet_version=mmdet.__version__, CLASSES=datasets[0].CLASSES)
    model.CLASSES = datasets[0].CLASSES
    train_detector(
        model, datasets, cfg, distributed=False, validate=True, timestamp=timestamp, meta=meta
    )
    seconds = time.perf_counter() - start

    log_json = work_dir / f"{timestamp}.log.json"
    return TrainResult(
        work_dir=work_dir,
        seconds=seconds,
        checkpoints=sorted(
            (p for p in work_dir.glob("*.pth") if not p.is_symlink()), key=lambda p: p.stat().st_mtime
        ),
        log_json=log_json if log_json.exists() else None,
    )


def _time_hook_methods(logger: str) -> dict[str, list[float]]:
    """Wrap the wandb hook's runner callbacks to record how long each call held the training loop."""
    if logger == "upstream":
        from mmdet.core.hook.wandblogger_hook import MMDetWandbHook as hook_cls
    elif logger == "sidecar":
        from trainer_hook.mmdet import MMDetWandbSidecarHook as hook_cls
    else:
        return {}
    timings: dict[str, list[float]] = {}
    for name in ("before_run", "after_train_iter", "after_train_epoch", "after_run"):
        original = getattr(hook_cls, name)

        def timed(self: Any, runner: Any, _original: Any = original, _name: str = name) -> Any:
            t0 = time.perf_counter()
            try:
                return _original(self, runner)
            finally:
                timings.setdefault(_name, []).append(time.perf_counter() - t0)

        setattr(hook_cls, name, timed)
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: generate the synthetic data if missing, build the tiny config, train."""
    from examples.mmdet2.synthetic_coco import coco_paths, make_coco_dataset
    from examples.mmdet2.tiny_config import tiny_mask_rcnn_cfg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--data-root", required=True, help="synthetic COCO root (created if missing)")
    p.add_argument("--logger", choices=["none", "upstream", "sidecar"], default="none")
    p.add_argument("--sidecar-addr", default=DEFAULT_ADDR)
    p.add_argument("--project", default="test")
    p.add_argument("--by-iter", action="store_true", help="IterBasedRunner instead of epochs")
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--base-channels", type=int, default=64, help="ResNet-18 width; 16: ~7 MB ckpts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hook-args", type=json.loads, default={},
                   help='JSON overriding the wandb hook arguments, e.g. \'{"num_eval_images": 0}\'')
    p.add_argument("--max-keep-ckpts", type=int, default=-1, help="CheckpointHook's max_keep_ckpts")
    p.add_argument("--time-hooks", action="store_true",
                   help="report the wall time spent in the wandb hook's methods (the trainer's stall)")
    args = p.parse_args(argv)

    data = coco_paths(Path(args.data_root))
    if not Path(data["train_ann_file"]).exists():
        data = make_coco_dataset(Path(args.data_root))
    cfg = tiny_mask_rcnn_cfg(
        data,
        args.work_dir,
        by_epoch=not args.by_iter,
        max_epochs=args.max_epochs,
        max_iters=args.max_iters,
        base_channels=args.base_channels,
        hooks=logger_hooks(args.logger, sidecar_addr=args.sidecar_addr, project=args.project,
                           hook_args=args.hook_args),
        seed=args.seed,
    )
    if args.max_keep_ckpts > 0:
        cfg.checkpoint_config.max_keep_ckpts = args.max_keep_ckpts
    if args.logger == "sidecar":
        cfg.custom_imports = dict(imports=["trainer_hook.mmdet"], allow_failed_imports=False)
    timings = _time_hook_methods(args.logger) if args.time_hooks else None
    result = train(cfg)
    print(json.dumps({"work_dir": str(result.work_dir), "seconds": round(result.seconds, 3),
                      "checkpoints": [str(c) for c in result.checkpoints],
                      "hook_seconds": timings}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
