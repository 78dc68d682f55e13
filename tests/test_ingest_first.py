"""Ingest first: delivery waits for the receiver only in a burst, and never before ``wandb.init``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from protocol import Kind
from sidecar.ingest_first import IngestFirst
from sidecar.paths import FileGuard
from sidecar.run_worker import RunWorker
from tests.in_process_wandb import journaled, offline_init_kwargs


def test_a_trickle_leaves_delivery_running_a_burst_holds_it_for_a_while() -> None:
    gate = threading.Event()
    first = IngestFirst(gate, burst_messages=256, burst_rate=10_000.0, longest=2.0)
    for k in range(100):  # a sweep: a message waiting at every look, 3,200 a second, for 10 s
        first.busy(now=10.0 + k * 0.1)
        assert gate.is_set()
        first.took(320)
    first.idle()
    first.busy(now=30.0)  # a trainer's burst: delivery runs for its first messages only
    assert gate.is_set()
    first.took(2000)
    first.busy(now=30.05)
    assert not gate.is_set()
    first.took(8000)
    first.busy(now=31.0)
    assert not gate.is_set()
    first.took(100_000)
    first.busy(now=32.1)  # a burst longer than 2 s shares the GIL with delivery again
    assert gate.is_set()
    first.idle()
    assert gate.is_set()
    first.busy(now=40.0)  # a new burst starts its own 2 s
    first.took(5000)
    first.busy(now=40.1)
    assert not gate.is_set()


class _CountingGate(threading.Event):
    """A gate that is never set and never waits: it counts who asked to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return False


def test_run_start_does_not_wait_for_ingest_but_metrics_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init_kwargs = offline_init_kwargs(tmp_path, monkeypatch, "gate")
    guard = FileGuard([str(tmp_path)])
    gate = _CountingGate()
    delivered: list[int] = []
    worker = RunWorker("gated", guard, lambda run, i: delivered.append(i), lambda *a: None, lambda run: None,
                       delivery_gate=gate)
    worker.start()
    worker.submit(journaled(Kind.RUN_START, "gated", 1, {"init_kwargs": init_kwargs}))
    worker.submit(journaled(Kind.METRICS, "gated", 2, {"data": {"x": 1.0}, "step": 0}))
    worker.submit(journaled(Kind.METRICS, "gated", 3, {"data": {"x": 2.0}, "step": 1}))
    worker.stop(0)
    worker.join(120)
    assert not worker.is_alive() and worker.state == "finished", worker.last_error
    assert worker.delivered == 3
    assert gate.waits == 2  # the two metrics waited (bounded), the run start did not
