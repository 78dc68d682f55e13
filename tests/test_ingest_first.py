"""Ingest first: delivery waits for the receiver only in a burst, and never before ``wandb.init``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from protocol import Kind, encode, split
from sidecar.admission import admit_body
from sidecar.ingest_first import IngestFirst
from sidecar.paths import FileGuard
from sidecar.run_worker import RunWorker


def test_a_trickle_leaves_delivery_running_a_burst_holds_it_for_a_while() -> None:
    gate = threading.Event()
    first = IngestFirst(gate, burst_batch=256, longest=2.0)
    first.after_batch(3, now=10.0)  # a sweep's trainers: a few messages per batch
    assert gate.is_set()
    first.after_batch(256, now=10.1)  # messages piled up
    assert not gate.is_set()
    first.after_batch(2000, now=11.9)
    assert not gate.is_set()
    first.after_batch(2000, now=12.2)  # a burst longer than 2 s shares the GIL with delivery again
    assert gate.is_set()
    first.after_batch(5, now=12.3)
    first.after_batch(300, now=12.4)  # a new burst starts its own 2 s
    assert not gate.is_set()
    first.idle()
    assert gate.is_set()


class _CountingGate(threading.Event):
    """A gate that is never set and never waits: it counts who asked to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return False


def _message(kind: Kind, seq: int, body: dict, guard: FileGuard):  # type: ignore[no-untyped-def]
    ((header, frames),) = split(encode(kind, "gated", seq, time.time(), body, "0123abcd"))
    msg = admit_body(header, frames[1:], guard)
    msg.index = seq
    return msg


def test_run_start_does_not_wait_for_ingest_but_metrics_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    guard = FileGuard([str(tmp_path)])
    gate = _CountingGate()
    delivered: list[int] = []
    worker = RunWorker("gated", guard, lambda run, i: delivered.append(i), lambda *a: None, lambda run: None,
                       delivery_gate=gate)
    worker.start()
    worker.submit(_message(Kind.RUN_START, 1, {"init_kwargs": {"project": "gate"}}, guard))
    worker.submit(_message(Kind.METRICS, 2, {"data": {"x": 1.0}, "step": 0}, guard))
    worker.submit(_message(Kind.METRICS, 3, {"data": {"x": 2.0}, "step": 1}, guard))
    worker.stop(0)
    worker.join(120)
    assert not worker.is_alive() and worker.state == "finished", worker.last_error
    assert worker.delivered == 3
    assert gate.waits == 2  # the two metrics waited (bounded), the run start did not
