"""The status a running sidecar reports (``wandb-sidecar status``, the Prometheus endpoint)."""

from __future__ import annotations

import importlib.metadata
import os
import time
from typing import TYPE_CHECKING, Any

from .run_table import summary

if TYPE_CHECKING:
    from .server import SidecarServer

#: Sidecar-wide counters always present in ``status()["counters"]`` (0 until they happen).
COUNTERS = ("received", "journaled", "journal_errors", "backpressure", "replies_unsent")
_ERROR_CHARS = 2000  # a status reply stays well inside the protocol's string limit
try:
    VERSION = importlib.metadata.version("wandb-sidecar")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "unknown"


def status_report(server: "SidecarServer") -> dict[str, Any]:
    """Everything ``wandb-sidecar status`` and the Prometheus endpoint show.

    Called on the socket thread (STATUS requests) and on the metrics HTTP thread: it only reads ints and
    strings and copies dicts and lists with single C-level calls (atomic under the GIL), so it needs no lock
    and never blocks the receiver."""
    now = time.monotonic()
    runs = {}
    for st in server.table:
        w = st.worker
        start = st.start.body if st.start is not None else {}
        client = start.get("client") or {}
        runs[st.run_id] = {
            **summary(st),
            "worker": w.state if w is not None else "none",
            "project": (start.get("init_kwargs") or {}).get("project"),
            "client": {"host": client.get("host"), "pid": client.get("pid")} if client else {},
            # steps the trainer sent that wandb has no committed row of (the newest is held open for its step)
            "lag_steps": max(0, st.last_step - w.sink.last_step_logged) if w is not None and st.last_step >= 0 else 0,
            "queue": w.queued() if w is not None else 0,  # in memory; rows of metric_rows one by one
            "backlog": w.backlog() if w is not None else 0,  # in the journal, past the queue's bound
            "journal_bytes": server.journal.size(st.run_id),
            "journal_trimmed_bytes": w.trimmer.trimmed_bytes if w is not None and w.trimmer is not None else 0,
            "last_seen_s": round(now - st.last_seen, 1),
            "wandb": w.sink.all_counters() if w is not None else {},
            "last_error": (w.last_error if w is not None else st.refused_detail)[:_ERROR_CHARS],
        }
    return {
        "version": VERSION,
        "bind": server.bind,
        "pid": os.getpid(),
        "started": round(server.started, 3),
        "uptime_s": round(time.time() - server.started, 1),
        "serving": not server._stop.is_set(),
        "wandb_mode": os.environ.get("WANDB_MODE", "online"),
        "journal": str(server.journal.root),
        "counters": {**dict.fromkeys(COUNTERS, 0), **server.counters},
        "rejected": dict(server.rejected),
        "last_error": server.last_error[:_ERROR_CHARS],
        "runs": runs,
    }
