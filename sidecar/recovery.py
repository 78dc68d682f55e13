"""Rebuild the run table from the journal at startup, and stream a run's journal back into its worker.

Finished runs come back from their ``.done`` records (to acknowledge late resends and to resume); every run
with a log is scanned once (streamed, never held in memory) for its incarnations and sequence numbers, then
resumed by a worker that replays the log from disk. Recovered runs are not *heard*: a new incarnation may
take one over at once (a training resumed after a crash of both), while its own trainer, if it is alive,
simply goes on (same incarnation, the sidecar acknowledges what it already has).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

from protocol import Kind, Message, ProtocolError, decode_header

from .admission import admit_journaled
from .run_table import RunState

if TYPE_CHECKING:
    from .server import SidecarServer

log = logging.getLogger("sidecar.recovery")


def recover(server: "SidecarServer") -> None:
    journal, table = server.journal, server.table
    for run_id, done in journal.done_runs().items():
        st = table.create(run_id)
        st.incarnation = done.get("incarnation", "")
        st.last_seq = st.journaled_seq = done.get("last_seq", 0)
        st.last_index = st.delivered_index = done.get("last_index", 0)
        st.index_base = st.last_index - st.last_seq
        st.ended.update(done.get("ended", {}))
        st.finished_at = done.get("finished_at", 0.0)
        st.state, st.heard = "finished", False
        _load_start(server, st)
    for run_id in journal.runs():  # unfinished, or a trainer that came back after finishing
        st = table.get(run_id) or table.create(run_id)
        count = _scan(server, st)
        if not count:
            continue
        st.state, st.heard = "active", False
        st.delivered_index = max(st.delivered_index, journal.delivered(run_id))
        _load_start(server, st)
        if st.refused:
            st.state = "refused"
            continue
        server.start_worker(st, replay_upto=st.last_index)
        log.info("run %s: recovered from journal: %d record(s), up to index %d, %d delivered; replaying",
                 run_id, count, st.last_index, st.delivered_index)


def _scan(server: "SidecarServer", st: RunState) -> int:
    """Read a run's log once: incarnations, last sequence numbers, a refused run start."""
    count = 0
    for index, frames in server.journal.replay(st.run_id, after=st.last_index, repair=True):
        count += 1
        try:
            header = decode_header(frames[0])
        except ProtocolError:
            st.last_index = index
            continue
        if header.incarnation != st.incarnation:
            st.begin_incarnation(header.incarnation, header.seq)
        st.last_seq = st.journaled_seq = header.seq
        st.last_index = index
        st.index_base = index - header.seq
        if header.kind is Kind.RUN_START:
            msg = admit_journaled(frames, server.guard, index)
            if msg is None:
                st.refused, st.refused_detail = "init_refused", "its run start was refused on arrival"
    return count


def _load_start(server: "SidecarServer", st: RunState) -> None:
    frames = server.journal.start(st.run_id)
    if frames:
        st.start_frames = frames
        st.start = admit_journaled(frames, server.guard, 0)


def journaled_messages(server: "SidecarServer", run_id: str, upto: int, after: int = 0) -> Iterator[Message]:
    """The run's journaled messages with an index above ``after`` up to ``upto`` as the worker should see
    them (refused ones left out), read from disk as the worker goes."""
    for index, frames in server.journal.replay(run_id, after=after):
        if index > upto:
            return
        msg = admit_journaled(frames, server.guard, index)
        if msg is not None:
            yield msg
