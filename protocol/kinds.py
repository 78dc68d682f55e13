"""Message kinds, and which of them are sequenced or never dropped. Each kind's fields: :mod:`protocol.schema`."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    # trainer -> sidecar, sequenced (journaled, acknowledged, exactly once)
    RUN_START = "run_start"
    METRICS = "metrics"
    METRIC_ROWS = "metric_rows"  # consecutive ``log()`` calls in one message (see protocol.schema.MetricRows)
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
    {Kind.RUN_START, Kind.METRICS, Kind.METRIC_ROWS, Kind.CHECKPOINT, Kind.VAL_DATA, Kind.PRED_BATCH, Kind.IMAGE,
     Kind.CONFIG, Kind.RUN_FINISH}
)
#: Kinds the client must never drop, whatever its queues look like.
NEVER_DROPPED = frozenset({Kind.RUN_START, Kind.CHECKPOINT, Kind.VAL_DATA, Kind.CONFIG, Kind.RUN_FINISH})
