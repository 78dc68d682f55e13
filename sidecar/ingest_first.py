"""Ingest first: when wandb delivery waits for the receiver, decided after each receive batch.

The receiver and the run workers share one GIL, and a worker holds it ~0.1 ms per ``run.log``: in a burst
(messages pile up faster than the receiver takes them) delivery waits, so acknowledgements, which trainers
wait for, never queue behind wandb work. A trickle (a node's sweep: 16 trainers at 100 steps/s each, a few
messages per receive batch) is no burst: there a waiting worker only made wandb late, by up to a second per
message, while the receiver had time to spare.
"""

from __future__ import annotations

import threading

#: A receive batch of at least this many messages is a burst (messages were waiting in the socket). A
#: sweep of 32 trainers at 100 steps/s brings a few per batch; a trainer's burst, thousands.
BURST_BATCH = 256
#: Bursts up to this long have delivery wait; a longer one shares the process with delivery, so its queues
#: drain.
INGEST_FIRST_S = 2.0


class IngestFirst:
    """Sets and clears ``gate`` (set: delivery may run) from the receiver's batches."""

    def __init__(self, gate: threading.Event, burst_batch: int = BURST_BATCH,
                 longest: float = INGEST_FIRST_S) -> None:
        self.gate = gate
        self.burst_batch = burst_batch
        self.longest = longest
        self._burst_since = 0.0

    def after_batch(self, messages: int, now: float) -> None:
        """The receiver took ``messages`` in one batch, at monotonic time ``now``."""
        if messages < self.burst_batch:
            self.idle()
            return
        self._burst_since = self._burst_since or now
        if now - self._burst_since < self.longest:
            self.gate.clear()
        else:
            self.gate.set()  # a long burst: delivery shares the GIL again

    def idle(self) -> None:
        """No burst (nothing waiting, or a small batch): delivery runs."""
        self._burst_since = 0.0
        self.gate.set()
