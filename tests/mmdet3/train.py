"""Train the tiny mmdet 3 Mask R-CNN with mmengine's Runner, streaming to a sidecar (one process a run).

    PYTHONPATH=/work/main .venv3/bin/python -m tests.mmdet3.train --work-dir W --data-root D \
        --sidecar-addr tcp://127.0.0.1:5555 --run-id abc123

``--logger upstream`` logs with mmengine's own ``WandbVisBackend`` instead (offline, into ``--wandb-dir``),
for the parity test. ``--dist`` is one rank of a distributed training on CPU: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` come from the environment (as ``torchrun`` sets them).

The data root is generated when missing. The last stdout line is JSON: work dir, seconds of
``runner.train()``, the checkpoints saved, the client's stats (rank 0), and what this rank holds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

HOOK_ARGS: dict[str, Any] = dict(num_eval_images=3, bbox_score_thr=0.3)


def _start_gloo() -> None:
    """The process group mmengine would make, on CPU: it is CUDA-only as shipped, and skips its own
    ``init_dist`` when a group already exists."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def _end_gloo() -> None:
    """Every rank meets before leaving: without it a gloo rank can abort at exit ("terminate called
    without an active exception")."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    from mmengine.runner import Runner
    from mmengine.utils import import_modules_from_strings

    from examples.mmdet2.synthetic_coco import coco_paths, make_coco_dataset
    from tests.mmdet3.tiny_config import tiny_mask_rcnn_cfg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--data-root", required=True, help="synthetic COCO root (created if missing)")
    p.add_argument("--logger", choices=["sidecar", "upstream"], default="sidecar")
    p.add_argument("--sidecar-addr", default="tcp://127.0.0.1:5555")
    p.add_argument("--wandb-dir", default=None, help="upstream: wandb.init(dir=...)")
    p.add_argument("--run-id", default=None)
    p.add_argument("--project", default="test")
    p.add_argument("--by-iter", action="store_true", help="IterBasedTrainLoop (24 iterations) instead of epochs")
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--resume", action="store_true",
                   help="cfg.resume=True: continue from the latest checkpoint in the work dir")
    p.add_argument("--draw", action="store_true", help="DetVisualizationHook draws every validation image")
    p.add_argument("--no-hook", action="store_true", help="only the vis backend, no DetWandbSidecarHook")
    p.add_argument("--record-sent", default=None, help="write the prediction batches sent here (JSON)")
    p.add_argument("--dist", action="store_true", help="one rank of a gloo (CPU) distributed training")
    args = p.parse_args(argv)
    sent = None
    if args.record_sent:
        from tests.sent_predictions import record_prediction_batches

        sent = record_prediction_batches()

    rank = 0
    if args.dist:
        _start_gloo()
        rank = int(os.environ["RANK"])
    data = coco_paths(Path(args.data_root))
    if rank == 0 and not Path(data["train_ann_file"]).exists():
        data = make_coco_dataset(Path(args.data_root))
    init_kwargs: dict[str, Any] = {"project": args.project}
    if args.run_id:
        init_kwargs.update(id=args.run_id, resume="allow")  # a resumed training continues the same run
    if args.logger == "upstream":
        backend = dict(type="WandbVisBackend", init_kwargs={**init_kwargs, "mode": "offline", "dir": args.wandb_dir},
                       define_metric_cfg={"coco/bbox_mAP": "max"})
        hooks = []
    else:
        backend = dict(type="SidecarVisBackend", sidecar_addr=args.sidecar_addr, init_kwargs=init_kwargs,
                       define_metric_cfg={"coco/bbox_mAP": "max"})
        hooks = [] if args.no_hook else [dict(type="DetWandbSidecarHook", **HOOK_ARGS)]
    cfg = tiny_mask_rcnn_cfg(data, args.work_dir, max_epochs=args.max_epochs, by_iter=args.by_iter,
                             vis_backends=[backend], custom_hooks=hooks, draw=args.draw)
    cfg.resume = args.resume
    if args.resume:
        # mmengine 0.10 loads its checkpoints (numpy arrays, its HistoryBuffer) with torch.load's default,
        # which is weights_only=True since torch 2.6 and refuses them; this run's own checkpoint is trusted
        os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    if args.logger == "sidecar":
        cfg.custom_imports = dict(imports=["trainer_hook.mmdet3"], allow_failed_imports=False)
        import_modules_from_strings(**cfg.custom_imports)  # what Config.fromfile does for a config file
    if args.dist:
        cfg.launcher = "pytorch"
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)

    runner = Runner.from_cfg(cfg)
    start = time.perf_counter()
    runner.train()
    seconds = time.perf_counter() - start
    if sent is not None:
        from tests.sent_predictions import dump

        dump(sent, args.record_sent)
    work_dir = Path(cfg.work_dir).resolve()
    out: dict[str, Any] = {"work_dir": str(work_dir), "seconds": round(seconds, 3), "rank": rank,
                           "pid": os.getpid(), "checkpoints": sorted(str(c) for c in work_dir.glob("*.pth"))}
    if args.logger == "sidecar":
        from trainer_hook import client as client_module
        from trainer_hook.mmdet3 import SidecarVisBackend

        sidecar = next(b for b in runner.visualizer._vis_backends.values() if isinstance(b, SidecarVisBackend))
        out["clients"] = len(client_module._clients)  # SidecarClients this process made
        if sidecar._client is not None:
            out.update(run_id=sidecar.client.run_id, stats=sidecar.client.stats(), backend_counters=sidecar.counters)
    if args.dist:
        _end_gloo()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
