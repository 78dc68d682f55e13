"""Optional Prometheus endpoint (``wandb-sidecar serve --metrics-port N``): the counters of ``status``.

A custom collector reads :meth:`SidecarServer.status` at scrape time, so the endpoint shows exactly what
``wandb-sidecar status --json`` shows, with no second set of counters to keep in step. ``status()`` is
safe to call from the HTTP thread (it reads ints and copies dicts; see its docstring).

Sidecar-wide: ``wandb_sidecar_up``, ``_info{version,bind,wandb_mode}``, ``_uptime_seconds``,
``_received_total`` (every message on the socket: trainer data, heartbeats, status requests, garbage),
``_journaled_total``, ``_journal_errors_total``, ``_backpressure_total``, ``_replies_unsent_total``,
``_rejected_total{reason}``, ``_runs{state}``.
Per run (label ``run``): ``_messages_received_total``, ``_journaled_seq``, ``_delivered_seq``, ``_lag``
(journaled but not yet in wandb, in messages), ``_queue_depth``, ``_duplicates_total``,
``_out_of_order_total``, ``_run_backpressure_total``, ``_run_rejected_total{reason}``,
``_last_seen_seconds``, ``_run_info{state,worker,project}`` (always 1) and ``_wandb_events_total{event}``
(the wandb sink's counters: ``log_calls``, ``checkpoints``, ``images``, ``failed_<kind>``, ...).
Plus the standard ``process_*`` metrics of the sidecar process.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .run_table import RUN_STATES

log = logging.getLogger("sidecar.metrics")

PREFIX = "wandb_sidecar"
_COUNTER_HELP = {
    "received": "Messages received on the socket (trainer data, heartbeats, status requests, rejected ones).",
    "received_calls": "Like received, with a metric_rows message counted as the log() calls it carries.",
    "received_multiparts": "ZeroMQ multipart messages received (each carries one or more messages).",
    "journaled": "Messages written to the journal (and so acknowledged).",
    "journal_errors": "Journal batches that failed to be written (not acknowledged; trainers resend).",
    "backpressure": "Messages not accepted because a run's worker was too far behind wandb.",
    "replies_unsent": "Acknowledgements or replies that could not be sent.",
}
# per-run status field -> (metric name, kind, help)
_RUN_FIELDS = (
    ("received", "messages_received", "counter", "Sequenced messages received from the run's trainer."),
    ("journaled_seq", "journaled_seq", "gauge", "Highest sequence number journaled and acknowledged."),
    ("delivered_seq", "delivered_seq", "gauge", "Highest sequence number delivered to wandb."),
    ("lag", "lag", "gauge", "Messages journaled but not yet delivered to wandb."),
    ("queue", "queue_depth", "gauge", "Messages waiting in the run's worker queue."),
    ("duplicates", "duplicates", "counter", "Duplicate messages dropped (already journaled; resent by the client)."),
    ("out_of_order", "out_of_order", "counter", "Messages after a gap, not accepted (the client resends)."),
    ("backpressure", "run_backpressure", "counter", "Messages not accepted because the worker was too far behind."),
    ("last_seen_s", "last_seen_seconds", "gauge", "Seconds since the run's trainer was last heard from."),
)


class SidecarCollector:
    """Turns one ``status()`` dict into Prometheus metric families, at each scrape."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def describe(self) -> list[Metric]:
        return []  # families depend on the runs; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_up", "1 while the sidecar serves, 0 while it drains or cannot report.")
        try:
            st = self._status()
        except Exception:  # a scrape must not take the sidecar down; report it as not up
            log.exception("status for the metrics endpoint failed")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1 if st.get("serving", True) else 0)
        yield up
        yield from metric_families(st)


def metric_families(st: dict[str, Any]) -> Iterator[Metric]:
    """The metric families for one status dict (see the module docstring)."""
    info = GaugeMetricFamily(f"{PREFIX}_info", "The sidecar's version, bind address and wandb mode (always 1).",
                             labels=["version", "bind", "wandb_mode"])
    info.add_metric([str(st.get("version", "")), str(st.get("bind", "")), str(st.get("wandb_mode", ""))], 1)
    yield info
    yield GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "Seconds since the sidecar started.",
                            value=float(st.get("uptime_s", 0.0)))
    for key, value in sorted(st.get("counters", {}).items()):
        yield CounterMetricFamily(f"{PREFIX}_{key}", _COUNTER_HELP.get(key, f"Sidecar counter {key}."),
                                  value=value)
    rejected = CounterMetricFamily(f"{PREFIX}_rejected", "Messages rejected, by reason.", labels=["reason"])
    for reason, n in sorted(st.get("rejected", {}).items()):
        rejected.add_metric([reason], n)
    yield rejected

    runs: dict[str, dict[str, Any]] = st.get("runs", {})
    states = dict.fromkeys(RUN_STATES, 0)
    for r in runs.values():
        states[r["state"]] = states.get(r["state"], 0) + 1
    by_state = GaugeMetricFamily(f"{PREFIX}_runs", "Runs known to the sidecar, by state.", labels=["state"])
    for state, n in states.items():
        by_state.add_metric([state], n)
    yield by_state

    for field, name, kind, doc in _RUN_FIELDS:
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
            f"{PREFIX}_{name}", doc, labels=["run"])
        for run_id, r in sorted(runs.items()):
            family.add_metric([run_id], r.get(field, 0))
        yield family
    run_rejected = CounterMetricFamily(f"{PREFIX}_run_rejected", "A run's messages rejected, by reason.",
                                       labels=["run", "reason"])
    run_info = GaugeMetricFamily(f"{PREFIX}_run_info", "A run's state, its worker's state and its wandb project "
                                 "(always 1).", labels=["run", "state", "worker", "project"])
    events = CounterMetricFamily(f"{PREFIX}_wandb_events", "What a run's wandb sink did (log calls, checkpoints, "
                                 "images, failures...), by event.", labels=["run", "event"])
    for run_id, r in sorted(runs.items()):
        for reason, n in sorted(r.get("rejected_by", {}).items()):
            run_rejected.add_metric([run_id, reason], n)
        run_info.add_metric([run_id, r["state"], str(r.get("worker", "")), str(r.get("project") or "")], 1)
        for event, n in sorted(r.get("wandb", {}).items()):
            events.add_metric([run_id, event], n)
    yield run_rejected
    yield run_info
    yield events


def start_metrics_server(status: Callable[[], dict[str, Any]], port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; return the HTTP server (``.shutdown()``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(status))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    httpd, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, httpd.server_port)
    return httpd
