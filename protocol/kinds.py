"""Message kinds and the fields each carries.

A schema maps a field name to ``(accepted types, required)``. Bodies are checked against it on decode:
unknown fields are refused, so a typo on one side is an error and not silently dropped data.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np


class Kind(StrEnum):
    # trainer -> sidecar, sequenced (journaled, acknowledged, exactly once)
    RUN_START = "run_start"
    METRICS = "metrics"
    CHECKPOINT = "checkpoint"
    VAL_DATA = "val_data"
    PRED_BATCH = "pred_batch"
    IMAGE = "image"
    CONFIG = "config"
    RUN_FINISH = "run_finish"
    # trainer -> sidecar, unsequenced
    HEARTBEAT = "heartbeat"
    STATUS = "status"
    # sidecar -> trainer
    ACK = "ack"
    REJECT = "reject"
    STATUS_REPLY = "status_reply"


#: Kinds that carry a sequence number and are journaled.
SEQUENCED = frozenset(
    {Kind.RUN_START, Kind.METRICS, Kind.CHECKPOINT, Kind.VAL_DATA, Kind.PRED_BATCH, Kind.IMAGE, Kind.CONFIG,
     Kind.RUN_FINISH}
)
#: Kinds the client must never drop, whatever its queues look like.
NEVER_DROPPED = frozenset({Kind.RUN_START, Kind.CHECKPOINT, Kind.VAL_DATA, Kind.CONFIG, Kind.RUN_FINISH})

_int = (int,)
_str = (str,)
_dict = (dict,)
_list = (list,)
_bool = (bool,)
_arr = (np.ndarray,)
_opt_int = (int, type(None))
_opt_str = (str, type(None))

SCHEMAS: dict[Kind, dict[str, tuple[tuple[type, ...], bool]]] = {
    Kind.RUN_START: {
        "init_kwargs": (_dict, True),
        "config": (_dict, False),
        "define_metrics": (_list, False),
        "files": (_list, False),  # [{"path": str, "base_path": str}] for wandb.save
        "code": (_dict, False),  # {"root": str, "name": str | None, "program": str | None} for run.log_code
        "client": (_dict, False),
    },
    Kind.METRICS: {
        "data": (_dict, True),
        "step": (_opt_int, False),
        "commit": (_bool, False),
    },
    Kind.CHECKPOINT: {
        "path": (_str, True),
        "source_path": (_str, False),
        "spooled": (_bool, False),
        "aliases": (_list, False),
        "metadata": ((dict, type(None)), False),
        "artifact_name": (_opt_str, False),
    },
    Kind.VAL_DATA: {
        "class_names": (_list, True),
        "image_names": (_list, True),
        "image_paths": (_list, False),  # read by the sidecar
        "image_bytes": (_list, False),  # encoded files, for a sidecar that cannot see the dataset
        "gt_boxes": (_list, True),  # per image: float32 (n, 4) xyxy
        "gt_labels": (_list, True),  # per image: int64 (n,) 0-based
        "gt_masks": (_list, False),  # per image: list of per-instance polygon lists, or None
        "artifact_name": (_opt_str, False),
        "table_name": (_opt_str, False),
    },
    Kind.PRED_BATCH: {
        "tag": (_str, True),  # "epoch_3" / "iter_400"
        "indices": (_list, True),  # position in the val table of each prediction
        "boxes": (_list, True),  # per image: float32 (n, 4) xyxy
        "scores": (_list, True),  # per image: float32 (n,)
        "labels": (_list, True),  # per image: int64 (n,) 0-based
        "masks": (_list, False),  # per image: list of COCO RLE dicts, one per box, or None
        "score_thr": ((float, int), False),
        "aliases": (_list, False),
    },
    Kind.IMAGE: {
        "name": (_str, True),  # the history key
        "image": (_arr, True),  # uint8 (H, W) or (H, W, 1|3|4), RGB(A)
        "step": (_opt_int, False),
        "commit": (_bool, False),
    },
    Kind.CONFIG: {"config": (_dict, True)},  # a config update after the run start (run.config.update)
    Kind.RUN_FINISH: {"exit_code": (_int, True)},
    Kind.HEARTBEAT: {},
    Kind.STATUS: {},
    Kind.ACK: {"delivered": (_opt_int, False)},
    Kind.REJECT: {"reason": (_str, True), "detail": (_str, True), "rejected_seq": (_int, True)},
    Kind.STATUS_REPLY: {"status": (_dict, True)},
}
