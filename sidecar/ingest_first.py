"""Ingest first: when wandb delivery waits for the receiver, decided before each receive batch.

The receiver and the run workers share one GIL, and a worker holds it ~0.1 ms per ``run.log``: in a burst
(a trainer flushing thousands of messages) delivery waits, so acknowledgements, which trainers wait for,
never queue behind wandb work. A trickle (a node's sweep: 16 trainers at 100 steps/s each) is no burst,
even when a message is waiting at every look: there a waiting worker only made wandb late, by up to a
second per message, while the receiver had time to spare. A busy stretch (the receiver finds a message
waiting at each look) is a burst once it has taken ``BURST_MESSAGES`` at ``BURST_RATE`` or faster. A
``metric_rows`` message counts as the ``log()`` calls it carries: a burst is a rate of calls, however the
client packed them.
"""

from __future__ import annotations

import threading

#: A busy stretch is a burst once it has taken this many messages ...
BURST_MESSAGES = 256
#: ... at this rate or faster (messages/s). A sweep of 32 trainers at 100 steps/s brings 3,200/s; one
#: trainer's burst, 40,000/s and more.
BURST_RATE = 10_000.0
#: Bursts up to this long have delivery wait; a longer one shares the process with delivery, so its queues
#: drain.
INGEST_FIRST_S = 2.0


class IngestFirst:
    """Sets and clears ``gate`` (set: delivery may run) from what the receiver finds and takes."""

    def __init__(self, gate: threading.Event, burst_messages: int = BURST_MESSAGES,
                 burst_rate: float = BURST_RATE, longest: float = INGEST_FIRST_S) -> None:
        self.gate = gate
        self.burst_messages = burst_messages
        self.burst_rate = burst_rate
        self.longest = longest
        self._since = 0.0  # start of the busy stretch (0: idle)
        self._taken = 0  # messages taken in it

    def busy(self, now: float) -> None:
        """A message is waiting, at monotonic time ``now``: the receiver takes a batch next."""
        self._since = self._since or now
        elapsed = now - self._since
        burst = self._taken >= self.burst_messages and self._taken >= self.burst_rate * elapsed
        if burst and elapsed < self.longest:
            self.gate.clear()
        else:
            self.gate.set()  # a trickle, or a burst longer than ``longest``: delivery shares the GIL

    def took(self, messages: int) -> None:
        """The batch held ``messages``."""
        self._taken += messages

    def idle(self) -> None:
        """Nothing waiting: the stretch ends, delivery runs."""
        self._since, self._taken = 0.0, 0
        self.gate.set()
