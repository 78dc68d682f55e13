"""The receiver: ROUTER socket → admit (run table) → journal (batched fsync) → acknowledge → per-run worker.

One thread owns the socket. Each loop takes what is ready (up to ``BATCH`` messages or ``BATCH_BYTES``),
journals the accepted ones with one fsync, then acknowledges them, so an acknowledged message survives a
SIGKILL. Who owns a run and in which order its messages are taken is :mod:`sidecar.run_table`'s job; what
a body may ask for is :mod:`sidecar.admission`'s; rebuilding from the journal is :mod:`sidecar.recovery`'s.
"""

from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import zmq

from protocol import SEQUENCED, Header, Kind, Message, ProtocolError, encode, split
from protocol.limits import MAX_FRAME_BYTES

from . import recovery
from .admission import admit_body
from .ingest_first import IngestFirst
from .init_policy import InitRefused
from .journal import SEGMENT_BYTES, Journal, JournalError
from .journal_trim import TRIM_BYTES, JournalTrimmer
from .paths import FileGuard
from .run_table import Admit, RunState, RunTable
from .run_worker import LOST_EXIT_CODE, RunWorker
from .status_report import status_report

log = logging.getLogger("sidecar")

BATCH = 2000
#: A receive batch stops taking multiparts once it holds this many bytes (large images, tables).
BATCH_BYTES = 64 * 1024 * 1024
#: ... or this many messages: one fsync per batch is amortised long before, and a batch's objects die
#: young (a batch of 100,000 messages kept them alive long enough for the garbage collector to walk them
#: again and again: 40 % of the receiver's time, profiled).
BATCH_MESSAGES = 8192
#: A run's journal beyond this (wandb far behind, or unreachable for long) stops being acknowledged: its
#: trainer keeps and resends (backpressure), so a sidecar's disk is bounded per run.
MAX_BACKLOG_BYTES = 4 * 1024**3


_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


def _recv_frames(sock: zmq.Socket) -> list[bytes]:
    """``recv_multipart(NOBLOCK)`` with int flags (its ``zmq.Flag`` enums cost a fifth of it, measured).
    Frames are copied into bytes: for the small frames most messages are, a ``zmq.Frame`` and its buffer
    cost more than the copy (a third of the receive path, profiled)."""
    recv, more = sock.recv, sock.get
    parts = [recv(_NOBLOCK)]
    while more(_RCVMORE):
        parts.append(recv(_NOBLOCK))
    return parts


@dataclass
class ReceiveBatch:
    """What one receive loop collected: journaled together (one fsync), then acknowledged together."""

    to_journal: list[tuple[str, int, Sequence[bytes]]] = field(default_factory=list)
    journaled: list[tuple[RunState, Header]] = field(default_factory=list)  # beside to_journal, for a roll-back
    accepted: list[tuple[RunState, Message, Sequence[bytes]]] = field(default_factory=list)
    #: (peer, run id, incarnation) -> run: one ACK each after the journal write
    acks: dict[tuple[bytes, str, str], RunState] = field(default_factory=dict)
    #: (peer, run id, incarnation) -> (reason, detail, seq): one REJECT each, for refusals of a whole incarnation
    refusals: dict[tuple[bytes, str, str], tuple[str, str, int]] = field(default_factory=dict)
    nbytes: int = 0


class SidecarServer:
    def __init__(
        self,
        bind: str,
        journal_dir: str,
        allow_roots: list[str],
        heartbeat_timeout: float = 60.0,
        max_run_queue: int = 10_000,
        max_backlog_bytes: int = MAX_BACKLOG_BYTES,
        fsync: bool = True,
        socket_setup: Any = None,
        replay_backoff: float = 10.0,
        retention: float = 7 * 24 * 3600.0,
        max_runs: int = 1000,
        trim_bytes: int = TRIM_BYTES,
    ) -> None:
        self.bind = bind
        # a trim keeps the last segment: a quarter of the trim threshold, so a trimmed journal is small
        self.journal = Journal(journal_dir, fsync=fsync, segment_bytes=min(SEGMENT_BYTES, max(4096, trim_bytes // 4)))
        self.guard = FileGuard(allow_roots)
        self.max_run_queue = max_run_queue
        self.max_backlog_bytes = max_backlog_bytes
        self.table = RunTable(lambda run_id: self.journal.size(run_id) > max_backlog_bytes)
        self.heartbeat_timeout = heartbeat_timeout
        self.socket_setup = socket_setup
        self.replay_backoff = replay_backoff
        self.retention = retention
        self.max_runs = max_runs
        self.trim_bytes = trim_bytes
        self.rejected: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        self.last_error = ""
        self.started = time.time()
        self._stop = threading.Event()
        #: Set while wandb delivery may run: the receiver clears it in a burst (:mod:`sidecar.ingest_first`),
        #: so acks (what the trainers wait for) never queue behind wandb work. Workers wait on it between
        #: messages.
        self.delivery_gate = threading.Event()
        self.delivery_gate.set()

    @property
    def runs(self) -> dict[str, RunState]:
        return self.table.runs

    # ----------------------------------------------------------------------------- life cycle

    def request_stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Serve until :meth:`request_stop`; then drain every run, finish it in wandb, return."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if self.socket_setup is not None:
            self.socket_setup(ctx, sock)
        sock.bind(self.bind)
        recovery.recover(self)
        # The receiver makes ~10 short-lived containers per message; collecting every 700 of them cost a
        # fifth of its time (profiled). Collect less often; wandb's and our imports are never garbage.
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        log.info("serving on %s (journal %s, allowed roots %s)", self.bind, self.journal.root,
                 ", ".join(map(str, self.guard.roots)))
        last_check = time.monotonic()
        gate = self.delivery_gate
        ingest_first = IngestFirst(gate)
        try:
            while not self._stop.is_set():
                if sock.poll(0, zmq.POLLIN):
                    ingest_first.busy(time.monotonic())
                    received = self.counters["received_calls"]
                    self._handle_batch(sock)
                    ingest_first.took(self.counters["received_calls"] - received)
                else:
                    ingest_first.idle()
                    sock.poll(100, zmq.POLLIN)  # wait for the next message: handled on the next turn
                now = time.monotonic()
                if now - last_check > 1.0:
                    self._housekeeping(now)
                    last_check = now
            gate.set()
            # take what is already queued in the socket, then stop accepting
            while sock.poll(0, zmq.POLLIN):
                self._handle_batch(sock)
        finally:
            gate.set()  # never leave a worker waiting: they drain now
            sock.close(linger=500)
            close = getattr(self.socket_setup, "close", None)
            if close is not None:
                close()
            ctx.term()
            self._drain_workers()
            self.journal.close()
        log.info("stopped: every run drained and finished")

    def _drain_workers(self) -> None:
        workers = [st.worker for st in self.table if st.worker is not None and st.worker.is_alive()]
        for w in workers:
            w.stop(None)
        for w in workers:
            w.join()

    # ----------------------------------------------------------------------------- receiving

    def _handle_batch(self, sock: zmq.Socket) -> None:
        batch = ReceiveBatch()
        for _ in range(BATCH):
            if batch.nbytes >= BATCH_BYTES or len(batch.to_journal) >= BATCH_MESSAGES:
                break
            try:
                parts = _recv_frames(sock)
            except zmq.Again:
                break
            peer = parts[0]
            self.counters["received_multiparts"] += 1
            frames = parts[1:]
            batch.nbytes += sum(map(len, frames))
            try:
                for header, msg_frames in split(frames):
                    self._handle_one(sock, peer, header, msg_frames, batch)
            except ProtocolError as exc:  # broken framing: what came before it was handled
                self._reject(peer, exc)
            except Exception:  # a bug must cost one message, not the sidecar (the fuzz test wants 0)
                self.counters["internal_errors"] += 1
                log.exception("internal error handling a message from peer %s", peer.hex())
        if batch.to_journal:
            try:
                self.journal.write_batch(batch.to_journal)
            except JournalError as exc:
                self.counters["journal_errors"] += 1
                self.last_error = str(exc)
                log.error("%s; %d messages not acknowledged (the trainers keep and resend them)", exc,
                          len(batch.to_journal))
                for st, header in reversed(batch.journaled):
                    self.table.roll_back(st, header)
                return
            self.counters["journaled"] += len(batch.to_journal)
        for (_, _, incarnation), st in batch.acks.items():
            if incarnation == st.incarnation:
                st.journaled_seq = st.last_seq
        for st, msg, frames in batch.accepted:
            self._dispatch(st, msg, frames)
        for (peer, run_id, incarnation), st in batch.acks.items():
            seq = st.acked_seq(incarnation)
            if seq is not None:
                self._send(sock, peer, Kind.ACK, run_id, seq, {"delivered": st.delivered_seq(incarnation)},
                           incarnation)
        for (peer, run_id, incarnation), (reason, detail, seq) in batch.refusals.items():
            self._send(sock, peer, Kind.REJECT, run_id, seq, {"reason": reason, "detail": detail[:500],
                                                              "rejected_seq": seq}, incarnation)

    def _handle_one(self, sock: zmq.Socket, peer: bytes, header: Header, frames: Sequence[bytes],
                    batch: ReceiveBatch) -> None:
        """One message of a multipart: ``frames`` are its own (header first)."""
        self.counters["received"] += 1
        self.counters["received_calls"] += 1  # and a metric_rows message's other rows once decoded
        kind = header.kind
        if kind is Kind.STATUS:
            self._send(sock, peer, Kind.STATUS_REPLY, "", 0, {"status": self.status()})
            return
        if kind is Kind.HEARTBEAT:
            st = self.table.heartbeat(header, peer)
            if st is not None:
                batch.acks[(peer, st.run_id, header.incarnation)] = st
                if st.refused:
                    batch.refusals[(peer, st.run_id, header.incarnation)] = (st.refused, self._why(st), header.seq)
            return
        if kind not in SEQUENCED:
            self._reject(peer, ProtocolError(f"{kind} is not a trainer message"))
            return
        key = (peer, header.run_id, header.incarnation)
        if self.table.get(header.run_id) is None and self.table.live_count() >= self.max_runs:
            self._refuse(batch, key, header, "too_many_runs",
                         f"this sidecar already serves {self.max_runs} live runs (--max-runs)")
            return
        verdict, st = self.table.admit(header, peer)
        if verdict is Admit.ACCEPT and st.journaled_before(header):
            st.duplicates += 1  # in sequence for its new incarnation, but neither journaled nor logged again
            batch.acks[key] = st
        elif verdict is Admit.ACCEPT:
            self._accept(sock, peer, header, frames, st, batch)
        elif verdict in (Admit.DUPLICATE, Admit.GAP):
            batch.acks[key] = st  # tells the client where this incarnation stands
        elif verdict is Admit.BACKPRESSURE:
            self.counters["backpressure"] += 1
        elif verdict is Admit.IN_USE:
            self._refuse(batch, key, header, "run_in_use", self._why(st, header.incarnation))
        elif verdict is Admit.REFUSED:
            self._refuse(batch, key, header, st.refused, self._why(st))

    def _accept(self, sock: zmq.Socket, peer: bytes, header: Header, frames: Sequence[bytes], st: RunState,
                batch: ReceiveBatch) -> None:
        key = (peer, st.run_id, header.incarnation)
        batch.to_journal.append((st.run_id, st.last_index, frames))
        batch.journaled.append((st, header))
        batch.acks[key] = st
        try:
            msg = admit_body(header, frames[1:], self.guard)
        except ProtocolError as exc:
            # consumed and journaled, so the sequence stays whole and a bad message does not block the
            # ones after it; never dispatched (admission runs again on replay)
            st.reject(exc.reason)
            self._reject(peer, exc, header)
            self._send(sock, peer, Kind.REJECT, header.run_id, header.seq,
                       {"reason": exc.reason, "detail": exc.detail[:500], "rejected_seq": header.seq},
                       header.incarnation)
            if isinstance(exc, InitRefused):
                st.refused, st.state = exc.reason, "refused"  # nothing more of this incarnation is taken
                st.refused_detail = exc.detail
            return
        if msg.problems:  # rows of a metric_rows message refused alone; the rest are taken
            for problem in msg.problems:
                st.reject(problem.reason)
                self._reject(peer, problem, header)
            first = msg.problems[0]
            self._send(sock, peer, Kind.REJECT, header.run_id, header.seq,
                       {"reason": first.reason, "detail": (f"{len(msg.problems)} row(s) refused, the other "
                                                           f"{len(msg.body['rows'])} taken; {first.detail}")[:500],
                        "rejected_seq": header.seq}, header.incarnation)
        msg.index = st.last_index
        if header.kind is Kind.METRIC_ROWS:
            rows = msg.body.rows
            self.counters["received_calls"] += len(rows) - 1
            last = rows[-1].step  # only the last row may be without a step
            st.saw_step(last if type(last) is int or len(rows) == 1 else rows[-2].step)
        elif header.kind is Kind.METRICS:
            st.saw_step(msg.body.step)
        batch.accepted.append((st, msg, frames))

    def _refuse(self, batch: ReceiveBatch, key: tuple[bytes, str, str], header: Header, reason: str,
                detail: str) -> None:
        if key not in batch.refusals:
            self.rejected[reason] += 1
            log.warning("refused run %s incarnation %s (peer %s): %s: %s", header.run_id, header.incarnation,
                        key[0].hex(), reason, detail)
        batch.refusals[key] = (reason, detail, header.seq)

    @staticmethod
    def _why(st: RunState, other: str = "") -> str:
        if other:
            client = (st.start.body.get("client") if st.start is not None else None) or {}
            if other in st.ended:
                return (f"run {st.run_id}: incarnation {other} was superseded by incarnation {st.incarnation}; "
                        "nothing more of it is taken")
            return (f"run {st.run_id} is being written by another live trainer (incarnation {st.incarnation}, "
                    f"host {client.get('host')}, pid {client.get('pid')}); this one is taken once that one "
                    "finishes or is declared lost. Use another run id to log both.")
        return st.refused_detail or st.refused

    def _reject(self, peer: bytes, exc: ProtocolError, header: Header | None = None) -> None:
        self.rejected[exc.reason] += 1
        where = f" run {header.run_id} seq {header.seq}" if header else ""
        log.warning("rejected message from peer %s%s: %s", peer.hex(), where, exc)

    def _send(self, sock: zmq.Socket, peer: bytes, kind: Kind, run_id: str, seq: int, body: dict,
              incarnation: str = "") -> None:
        try:
            sock.send_multipart([peer, *encode(kind, run_id, seq, time.time(), body, incarnation)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters["replies_unsent"] += 1

    # ----------------------------------------------------------------------------- dispatching

    def _dispatch(self, st: RunState, msg: Message, frames: Sequence[bytes]) -> None:
        if msg.kind is Kind.RUN_START:
            st.start, st.start_frames = msg, [bytes(f) for f in frames]
            self._save_start(st)
        if st.state != "active":
            log.info("run %s: trainer (incarnation %s) is back after %s; resuming the wandb run", st.run_id,
                     st.incarnation, st.state)
        st.state = "active"
        worker = st.worker
        if worker is not None and worker.state == "failed" and msg.kind is Kind.RUN_START:
            worker.stop(None)  # a new run start after a failed wandb.init: a new worker tries it
            worker = None
        if worker is None or not worker.offer(msg):
            self.start_worker(st).submit(msg)

    def _save_start(self, st: RunState) -> None:
        try:
            self.journal.save_start(st.run_id, st.start_frames or [])
        except OSError as exc:
            log.warning("run %s: cannot save its run start: %s", st.run_id, exc)

    def start_worker(self, st: RunState, replay_upto: int = 0) -> RunWorker:
        """A worker for the run; with ``replay_upto`` it first replays the journal up to that index (wandb's
        files decide what is skipped), streaming it from disk."""
        replay = None
        if replay_upto:
            def replay():  # type: ignore[no-untyped-def]
                return recovery.journaled_messages(self, st.run_id, replay_upto)
        worker = RunWorker(st.run_id, self.guard, self._on_delivered, self._on_finished, self._on_incomplete,
                           delivered=st.delivered_index, state_dir=self.journal.root, start=st.start,
                           replay=replay, delivery_gate=self.delivery_gate, trimmer=JournalTrimmer(
                               st.run_id, lambda: self.journal.size(st.run_id),
                               lambda upto: self.journal.trim(st.run_id, upto), self.trim_bytes),
                           max_queue=self.max_run_queue,
                           journaled=lambda after, upto: recovery.journaled_messages(self, st.run_id, upto, after))
        st.worker = worker
        worker.start()
        return worker

    def _on_delivered(self, run_id: str, index: int) -> None:
        st = self.table.get(run_id)
        if st is None:
            return
        st.delivered_index = max(st.delivered_index, index)
        try:
            self.journal.mark_delivered(run_id, st.delivered_index)
        except OSError as exc:
            log.warning("run %s: cannot record delivery watermark: %s", run_id, exc)

    def _on_finished(self, run_id: str, exit_code: int, upto: int) -> None:
        """The wandb run finished with everything up to journal index ``upto``. Compaction drops only those
        records: a trainer that came back meanwhile keeps its newer, acknowledged messages."""
        st = self.table.get(run_id)
        if st is None:
            return
        if st.last_index <= upto:  # nothing newer was accepted meanwhile
            st.state = "lost" if exit_code == LOST_EXIT_CODE else "finished"
            st.finished_at = time.time()
        done = {"incarnation": st.incarnation, "last_seq": st.journaled_seq, "last_index": upto,
                "ended": dict(st.ended), "finished_at": st.finished_at or time.time()}
        try:
            self.journal.compact(run_id, upto, done)
        except OSError as exc:
            log.warning("run %s: cannot compact journal: %s", run_id, exc)
        log.info("run %s: finished with exit code %d", run_id, exit_code)

    def _on_incomplete(self, run_id: str) -> None:
        """wandb's files miss part of a finished run: keep its journal, replay it later (with backoff)."""
        st = self.table.get(run_id)
        if st is None:
            return
        delay = st.replay_delay or self.replay_backoff
        st.state = "incomplete"
        st.replay_at = time.monotonic() + delay
        log.error("run %s: replaying it from the journal in %.0f s", run_id, delay)
        st.replay_delay = min(delay * 2, 600.0)

    # ----------------------------------------------------------------------------- housekeeping

    def _housekeeping(self, now: float) -> None:
        """Once a second: dead trainers, failed wandb.init, incomplete runs to replay, expired runs."""
        for st in self.table:
            worker = st.worker
            if st.state == "active" and worker is not None and now - st.last_seen > self.heartbeat_timeout:
                st.state = "lost"
                log.error("run %s: no message or heartbeat for %.0f s; trainer declared dead, finishing the "
                          "run with exit code %d", st.run_id, now - st.last_seen, LOST_EXIT_CODE)
                worker.stop(LOST_EXIT_CODE)
            elif worker is not None and worker.state == "failed" and not st.refused:
                st.refused, st.state = "init_failed", "failed"
                st.refused_detail = worker.last_error
            elif st.state == "incomplete" and now >= st.replay_at and not (worker and worker.is_alive()):
                st.state = "replaying"  # not "active": no trainer heartbeats are expected
                log.info("run %s: replaying its journal into a resumed wandb run", st.run_id)
                self.start_worker(st, replay_upto=st.last_index)
        for st in self.table.expired(time.time(), self.retention):
            self.table.drop(st.run_id)
            self.journal.forget(st.run_id)
            log.info("run %s: finished more than %.0f s ago; forgotten (retention)", st.run_id, self.retention)

    # ----------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        return status_report(self)
