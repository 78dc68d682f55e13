"""The run table: who owns each run id, sequencing per (run id, incarnation), liveness. No sockets, no wandb.

A run id is a wandb run; an *incarnation* is one trainer process streaming into it (a ``SidecarClient``'s
random token). Sequence numbers count per incarnation. Only one incarnation of a run is live at a time:

- a message of the current incarnation is accepted in sequence order (duplicates re-acknowledged, gaps not
  accepted: the client goes back and resends);
- a run start of a *new* incarnation takes the run over once the current one has ended (finished, declared
  lost, refused, failed, or recovered from the journal after a restart and not heard from since): a
  resumed training lands every message in the same wandb run;
- while the current incarnation is live, another one is refused (``run_in_use``) and nothing of it is
  accepted; it keeps its data and resends, so it lands once the live one ends.

Every accepted message also gets the run's next *journal index*: one counter per run across incarnations,
so the worker, the delivery mark and compaction need a single number.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable

from protocol import Header, Message

if TYPE_CHECKING:
    from .run_worker import RunWorker

log = logging.getLogger("sidecar")

#: Ended incarnations remembered per run (their late resends are re-acknowledged, not taken as new).
MAX_ENDED_INCARNATIONS = 16
#: Run states in which the current incarnation no longer owns the run.
ENDED_STATES = frozenset({"finished", "lost", "incomplete", "replaying", "failed", "refused"})
RUN_STATES = ("active", "finished", "lost", "paused", "incomplete", "replaying", "failed", "refused")


class Admit(Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"  # already journaled: acknowledge again, drop
    GAP = "gap"  # a message after a missing one: not accepted
    IN_USE = "run_in_use"  # another incarnation owns the run
    REFUSED = "refused"  # this incarnation's run start was refused, or its wandb.init failed for good
    BACKPRESSURE = "backpressure"  # the run's backlog in the journal is at its bound


@dataclass
class RunState:
    run_id: str
    incarnation: str = ""
    last_seq: int = 0  # highest sequence number of the current incarnation accepted (journaled once its batch is)
    journaled_seq: int = 0  # last_seq once its batch is on disk (status shows this; last_seq moves mid-batch)
    index_base: int = 0  # journal index of the current incarnation's message ``seq`` is index_base + seq
    last_index: int = 0  # highest journal index given out
    delivered_index: int = 0  # highest journal index that reached wandb
    last_step: int = -1  # highest explicit step the trainer sent (status: how many steps wandb is behind)
    ended: collections.OrderedDict[str, int] = field(default_factory=collections.OrderedDict)  # inc -> last seq
    heard: bool = True  # the current incarnation has spoken since this state was made (False after recovery)
    refused: str = ""  # why the current incarnation is refused ('' when it is not): a reason code
    refused_detail: str = ""
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    rejected: int = 0
    rejected_by: dict[str, int] = field(default_factory=dict)  # reason -> count
    backpressure: int = 0
    in_use_refused: int = 0  # messages of another incarnation refused while this one was live
    incarnations: int = 1
    last_seen: float = field(default_factory=time.monotonic)
    finished_at: float = 0.0  # wall time the run last finished (retention)
    peer: bytes = b""
    start: Message | None = None
    start_frames: list[bytes] | None = None
    worker: "RunWorker | None" = None
    state: str = "active"
    replay_at: float = 0.0  # incomplete: when to replay the journal into wandb again
    replay_delay: float = 0.0  # the next wait before a replay (doubles, from the server's replay_backoff)

    def saw_step(self, step: Any) -> None:
        """A metrics message was accepted with this (last) step: None and UNSET say nothing."""
        if type(step) is int and step > self.last_step:
            self.last_step = step

    def live(self) -> bool:
        """Does the current incarnation still own the run (a trainer is, or may be, streaming)?"""
        return self.state in ("active", "paused") and self.heard and not self.refused

    def journaled_before(self, header: Header) -> bool:
        """The message was journaled already, sent by an earlier incarnation whose trainer never saw the
        acknowledgement (``origin_*``: a later client delivers what that one left on disk)."""
        inc = header.origin_incarnation
        return bool(inc) and inc != self.incarnation and header.origin_seq <= self.ended.get(inc, 0)

    def begin_incarnation(self, incarnation: str, first_seq: int) -> None:
        """A new incarnation takes the run over; its first message has ``first_seq``."""
        if self.incarnation and self.incarnation != incarnation:
            log.info("run %s: incarnation %s takes over from %s (%s); resuming the same wandb run", self.run_id,
                     incarnation, self.incarnation, self.state)
            self.ended[self.incarnation] = self.last_seq
            while len(self.ended) > MAX_ENDED_INCARNATIONS:
                self.ended.popitem(last=False)
            self.incarnations += 1
        self.incarnation = incarnation
        self.last_seq = self.journaled_seq = first_seq - 1
        self.index_base = self.last_index - self.last_seq
        self.heard = True
        self.refused = self.refused_detail = ""
        self.state = "active"  # at once: another incarnation in the same batch must find it owned

    def index_of(self, seq: int) -> int:
        return self.index_base + seq

    def acked_seq(self, incarnation: str) -> int | None:
        """The sequence number to acknowledge to ``incarnation`` (None: not one this run knows)."""
        if incarnation == self.incarnation:
            return self.journaled_seq
        return self.ended.get(incarnation)

    def delivered_seq(self, incarnation: str) -> int:
        """What reached wandb, in ``incarnation``'s own sequence numbers."""
        if incarnation != self.incarnation:
            return self.ended.get(incarnation, 0)
        return max(0, min(self.journaled_seq, self.delivered_index - self.index_base))

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self.rejected_by[reason] = self.rejected_by.get(reason, 0) + 1


class RunTable:
    """Every run the sidecar knows, and the admission decision for each sequenced message."""

    def __init__(self, backlog_full: Callable[[str], bool] | None = None) -> None:
        self.runs: dict[str, RunState] = {}
        #: ``backlog_full(run_id)``: the run's journal is at its bound (messages are then not acknowledged)
        self.backlog_full = backlog_full or (lambda run_id: False)

    def get(self, run_id: str) -> RunState | None:
        return self.runs.get(run_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.runs.values()))

    def __len__(self) -> int:
        return len(self.runs)

    def create(self, run_id: str) -> RunState:
        st = self.runs[run_id] = RunState(run_id)
        return st

    def drop(self, run_id: str) -> None:
        self.runs.pop(run_id, None)

    def heartbeat(self, header: Header, peer: bytes) -> RunState | None:
        """A heartbeat keeps only its own incarnation alive (never another trainer's run)."""
        st = self.runs.get(header.run_id)
        if st is None or st.incarnation != header.incarnation:
            return None
        st.last_seen = time.monotonic()
        st.peer = peer
        st.heard = True
        return st

    def admit(self, header: Header, peer: bytes) -> tuple[Admit, RunState]:
        """Decide what to do with a sequenced message. On ACCEPT, ``last_seq``/``last_index`` move."""
        st = self.runs.get(header.run_id)
        if st is None:
            st = self.create(header.run_id)
            st.begin_incarnation(header.incarnation, header.seq)
        elif header.incarnation != st.incarnation:
            if header.incarnation in st.ended:
                last = st.ended[header.incarnation]
                if header.seq <= last:
                    st.duplicates += 1
                    return Admit.DUPLICATE, st
                st.in_use_refused += 1
                return Admit.IN_USE, st  # superseded by a newer incarnation: nothing more of it is taken
            if st.live():
                st.in_use_refused += 1
                return Admit.IN_USE, st
            st.begin_incarnation(header.incarnation, header.seq)
        st.received += 1
        st.last_seen = time.monotonic()
        st.peer = peer
        st.heard = True
        if st.refused:
            return Admit.REFUSED, st
        if header.seq <= st.last_seq:
            st.duplicates += 1
            return Admit.DUPLICATE, st
        if header.seq > st.last_seq + 1:
            st.out_of_order += 1
            return Admit.GAP, st
        if self.backlog_full(st.run_id):
            st.backpressure += 1
            return Admit.BACKPRESSURE, st
        st.last_seq = header.seq
        st.last_index = st.index_of(header.seq)
        return Admit.ACCEPT, st

    def roll_back(self, st: RunState, header: Header) -> None:
        """The journal write of an accepted message failed: it was not accepted after all."""
        st.last_seq = min(st.last_seq, header.seq - 1)
        st.last_index = min(st.last_index, st.index_of(header.seq) - 1)

    def live_count(self) -> int:
        return sum(1 for st in self.runs.values() if st.state not in ENDED_STATES)

    def expired(self, now_wall: float, retention: float) -> list[RunState]:
        """Finished runs whose retention is over (they leave the table, the journal and the metrics)."""
        return [st for st in self.runs.values()
                if st.state == "finished" and st.finished_at and now_wall - st.finished_at > retention
                and (st.worker is None or not st.worker.is_alive())]


def summary(st: RunState) -> dict[str, Any]:
    """The run-table part of a run's status."""
    return {
        "state": st.state,
        "incarnation": st.incarnation,
        "incarnations": st.incarnations,
        "received": st.received,
        "journaled_seq": st.journaled_seq,
        "delivered_seq": st.delivered_seq(st.incarnation),
        "lag": max(0, st.index_of(st.journaled_seq) - st.delivered_index),
        "last_step": st.last_step,  # the newest explicit step the trainer sent (-1: none yet)
        "duplicates": st.duplicates,
        "out_of_order": st.out_of_order,
        "backpressure": st.backpressure,
        "in_use_refused": st.in_use_refused,
        "rejected": st.rejected,
        "rejected_by": dict(st.rejected_by),
        "refused": st.refused,
    }
