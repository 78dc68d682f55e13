"""The receiver: ROUTER socket → validate → journal (batched fsync) → acknowledge → per-run worker.

One thread owns the socket. Each loop takes every message that is ready (up to ``BATCH``), journals the
accepted ones with one fsync, then acknowledges them, so an acknowledged message survives a SIGKILL.
Delivery is exactly-once per run by sequence number: duplicates are re-acknowledged and dropped, a gap
is not accepted (the client goes back and resends).
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from protocol import (
    SEQUENCED,
    Header,
    Kind,
    Message,
    ProtocolError,
    decode_body,
    decode_header,
    encode,
    split,
)
from protocol.limits import MAX_FRAME_BYTES

from .journal import Journal, JournalError
from .run_worker import LOST_EXIT_CODE, RunWorker
from .wandb_sink import FileGuard

log = logging.getLogger("sidecar")


class PathRefused(ProtocolError):
    """A message names a file outside the sidecar's allowed roots."""

    reason = "path_refused"


BATCH = 2000
#: Sidecar-wide counters always present in ``status()["counters"]`` (0 until they happen).
_COUNTERS = ("received", "journaled", "journal_errors", "backpressure", "replies_unsent")
_ERROR_CHARS = 2000  # a status reply stays well inside the protocol's string limit
try:
    _VERSION = importlib.metadata.version("wandb-sidecar")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    _VERSION = "unknown"


@dataclass
class RunState:
    run_id: str
    last_seq: int = 0  # journaled (and so acknowledged)
    delivered: int = 0  # reached wandb
    journaled: int = 0  # last_seq once its batch is on disk (status shows this; last_seq moves mid-batch)
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    rejected: int = 0
    rejected_by: dict[str, int] = field(default_factory=dict)  # reason -> count
    backpressure: int = 0  # messages not accepted because the worker was too far behind
    last_seen: float = field(default_factory=time.monotonic)
    peer: bytes = b""
    start: Message | None = None
    start_frames: list[bytes] | None = None
    worker: RunWorker | None = None
    state: str = "active"  # active | finished | lost | paused | incomplete | replaying
    replay_at: float = 0.0  # incomplete: when to replay the journal into wandb again
    replay_delay: float = 0.0  # the next wait before a replay (doubles, from the server's replay_backoff)


class SidecarServer:
    def __init__(
        self,
        bind: str,
        journal_dir: str,
        allow_roots: list[str],
        heartbeat_timeout: float = 60.0,
        max_run_queue: int = 200_000,
        fsync: bool = True,
        socket_setup: Any = None,
        replay_backoff: float = 10.0,
    ) -> None:
        self.bind = bind
        self.journal = Journal(journal_dir, fsync=fsync)
        self.guard = FileGuard(allow_roots)
        self.heartbeat_timeout = heartbeat_timeout
        self.max_run_queue = max_run_queue
        self.socket_setup = socket_setup
        self.replay_backoff = replay_backoff
        self.runs: dict[str, RunState] = {}
        self.rejected: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()
        self.last_error = ""
        self.started = time.time()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards RunState.delivered/state written by workers

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
        self._recover()
        log.info("serving on %s (journal %s, allowed roots %s)", self.bind, self.journal.root,
                 ", ".join(map(str, self.guard.roots)))
        last_check = time.monotonic()
        try:
            while not self._stop.is_set():
                if sock.poll(100, zmq.POLLIN):
                    self._handle_batch(sock)
                now = time.monotonic()
                if now - last_check > 1.0:
                    self._check_heartbeats(now)
                    self._retry_incomplete(now)
                    last_check = now
            # take what is already queued in the socket, then stop accepting
            while sock.poll(0, zmq.POLLIN):
                self._handle_batch(sock)
        finally:
            sock.close(linger=500)
            close = getattr(self.socket_setup, "close", None)
            if close is not None:
                close()
            ctx.term()
            self._drain_workers()
            self.journal.close()
        log.info("stopped: every run drained and finished")

    def _recover(self) -> None:
        """Rebuild run state from the journal and resume every unfinished run."""
        for run_id, done in self.journal.done_runs().items():
            st = self.runs[run_id] = RunState(run_id, last_seq=done["last_seq"], delivered=done["last_seq"])
            st.state = "finished"
            if done.get("start"):
                st.start_frames = list(done["start"])
                st.start = self._decode_frames(st.start_frames)
        for run_id in self.journal.runs():  # unfinished, or a trainer that came back after finishing
            st = self.runs.setdefault(run_id, RunState(run_id))
            st.state = "active"
            st.delivered = max(st.delivered, self.journal.delivered(run_id))
            n = self._replay_from_journal(st)
            log.info("run %s: recovered from journal, seq %d journaled, %d delivered, %d to replay",
                     run_id, st.last_seq, st.delivered, n)
        for st in self.runs.values():
            st.journaled = st.last_seq

    def _replay_from_journal(self, st: RunState) -> int:
        """A new worker for the run, fed its whole journal; it skips what wandb's files already hold."""
        replay: list[Message] = []
        for frames in self.journal.replay(st.run_id):
            msg = self._decode_frames(frames)
            if msg is None:
                continue
            st.last_seq = max(st.last_seq, msg.seq)
            if msg.kind is Kind.RUN_START:
                st.start, st.start_frames = msg, frames
            else:
                replay.append(msg)
        worker = self._worker(st)
        for msg in replay:
            worker.submit(msg)
        return len(replay)

    @staticmethod
    def _decode_frames(frames: list[bytes]) -> Message | None:
        try:
            header = decode_header(frames[0])
            return decode_body(header, frames[1:])
        except ProtocolError:
            return None  # a journaled message that was rejected on arrival stays rejected

    def _drain_workers(self) -> None:
        workers = [st.worker for st in self.runs.values() if st.worker is not None and st.worker.is_alive()]
        for w in workers:
            w.stop(None)
        for w in workers:
            w.join()

    # ----------------------------------------------------------------------------- receiving

    def _handle_batch(self, sock: zmq.Socket) -> None:
        to_journal: list[tuple[str, list[bytes]]] = []
        accepted: list[tuple[RunState, Message]] = []
        acks: dict[tuple[bytes, str], RunState] = {}
        for _ in range(BATCH):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            peer = parts[0]
            self.counters["received_multiparts"] += 1
            try:
                for header, frames in split(parts[1:]):
                    self._handle_one(sock, peer, header, frames, to_journal, accepted, acks)
            except ProtocolError as exc:  # broken framing: what came before it was handled
                self._reject(peer, exc)
            except Exception:  # a bug must cost one message, not the sidecar (the fuzz test wants 0)
                self.counters["internal_errors"] += 1
                log.exception("internal error handling a message from peer %s", peer.hex())
        if to_journal:
            try:
                self.journal.write_batch(to_journal)
            except JournalError as exc:
                self.counters["journal_errors"] += 1
                self.last_error = str(exc)
                log.error("%s; %d messages not acknowledged (the trainers keep and resend them)", exc,
                          len(to_journal))
                for st, msg in reversed(accepted):
                    st.last_seq = min(st.last_seq, msg.seq - 1)
                return
            self.counters["journaled"] += len(to_journal)
        for st in acks.values():
            st.journaled = st.last_seq
        for st, msg in accepted:
            self._dispatch(st, msg)
        for (peer, run_id), st in acks.items():
            self._send(sock, peer, Kind.ACK, run_id, st.last_seq, {"delivered": st.delivered})

    def _handle_one(self, sock, peer, header, frames, to_journal, accepted, acks) -> None:  # type: ignore[no-untyped-def]
        """One message of a multipart: ``frames`` are its own (header first)."""
        self.counters["received"] += 1
        if header.kind is Kind.STATUS:
            self._send(sock, peer, Kind.STATUS_REPLY, "", 0, {"status": self.status()})
            return
        if header.kind not in SEQUENCED and header.kind is not Kind.HEARTBEAT:
            self._reject(peer, ProtocolError(f"{header.kind} is not a trainer message"))
            return
        st = self.runs.get(header.run_id)
        if header.kind is Kind.HEARTBEAT:
            if st is not None:
                st.last_seen = time.monotonic()
                st.peer = peer
                acks[(peer, st.run_id)] = st
            return
        if st is None:
            st = self.runs[header.run_id] = RunState(header.run_id)
            if header.seq != 1:
                log.warning("run %s: first message has seq %d; its start was never journaled here",
                            header.run_id, header.seq)
                st.last_seq = header.seq - 1
        st.received += 1
        st.last_seen = time.monotonic()
        st.peer = peer
        acks[(peer, st.run_id)] = st
        if header.seq <= st.last_seq:
            st.duplicates += 1
            return
        if header.seq > st.last_seq + 1:
            st.out_of_order += 1
            return
        worker = st.worker
        if worker is not None and worker.queue.qsize() > self.max_run_queue:
            self.counters["backpressure"] += 1
            st.backpressure += 1
            return  # not accepted: the client keeps it and resends once wandb caught up
        try:
            msg = decode_body(header, frames[1:])
            refused = self._refused_path(msg)
            if refused:
                raise PathRefused(refused)
        except ProtocolError as exc:
            # consumed and journaled, so the sequence stays whole and a bad message does not block the
            # ones after it; never dispatched (the sink re-checks paths on replay too)
            st.last_seq = header.seq
            st.rejected += 1
            self._reject(peer, exc, header)
            self._send(sock, peer, Kind.REJECT, header.run_id, header.seq,
                       {"reason": exc.reason, "detail": exc.detail[:500], "rejected_seq": header.seq})
            to_journal.append((header.run_id, frames))
            return
        st.last_seq = header.seq
        to_journal.append((header.run_id, frames))
        accepted.append((st, msg))

    def _refused_path(self, msg: Message) -> str:
        """A path in the message that resolves outside the allowed roots, or ''."""
        body = msg.body
        if msg.kind is Kind.CHECKPOINT:
            paths = [body["path"]]
        elif msg.kind is Kind.VAL_DATA:
            paths = body.get("image_paths", [])
        else:  # a run start's saved files are checked by the sink: a refused one must not stop the run
            return ""
        for path in paths:
            if not isinstance(path, str) or self.guard.check(path) is None:
                return (f"{str(path)[:300]!r} is outside the allowed roots {[str(r) for r in self.guard.roots]}"
                        " (the sidecar opens the path the trainer sends: write under a root, by its absolute path)")
        return ""

    def _reject(self, peer: bytes, exc: ProtocolError, header: Header | None = None) -> None:
        self.rejected[exc.reason] += 1
        st = self.runs.get(header.run_id) if header else None
        if st is not None:
            st.rejected_by[exc.reason] = st.rejected_by.get(exc.reason, 0) + 1
        where = f" run {header.run_id} seq {header.seq}" if header else ""
        log.warning("rejected message from peer %s%s: %s", peer.hex(), where, exc)

    def _send(self, sock: zmq.Socket, peer: bytes, kind: Kind, run_id: str, seq: int, body: dict) -> None:
        try:
            sock.send_multipart([peer, *encode(kind, run_id, seq, time.time(), body)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters["replies_unsent"] += 1

    # ----------------------------------------------------------------------------- dispatching

    def _dispatch(self, st: RunState, msg: Message) -> None:
        if msg.kind is Kind.RUN_START:
            st.start, st.start_frames = msg, None
        if st.state in ("finished", "lost") and msg.kind is not Kind.RUN_START:
            log.info("run %s: trainer is back after %s; resuming the wandb run", st.run_id, st.state)
        st.state = "active"
        if st.worker is None or not st.worker.offer(msg):
            self._worker(st).submit(msg)

    def _worker(self, st: RunState) -> RunWorker:
        worker = RunWorker(st.run_id, self.guard, self._on_delivered, self._on_finished, self._on_incomplete,
                           delivered=st.delivered, state_dir=self.journal.root)
        st.worker = worker
        if st.start is not None:
            worker.submit(st.start)
        worker.start()
        return worker

    def _on_delivered(self, run_id: str, seq: int) -> None:
        st = self.runs[run_id]
        st.delivered = max(st.delivered, seq)
        try:
            self.journal.mark_delivered(run_id, st.delivered)
        except OSError as exc:
            log.warning("run %s: cannot record delivery watermark: %s", run_id, exc)

    def _on_finished(self, run_id: str, exit_code: int) -> None:
        st = self.runs[run_id]
        st.state = "lost" if exit_code == LOST_EXIT_CODE else "finished"
        if st.start_frames is None and st.start is not None:
            st.start_frames = encode(Kind.RUN_START, run_id, st.start.seq, st.start.header.time, st.start.body)
        try:
            self.journal.compact(run_id, st.delivered, st.start_frames)
        except OSError as exc:
            log.warning("run %s: cannot compact journal: %s", run_id, exc)
        log.info("run %s: finished with exit code %d", run_id, exit_code)

    def _on_incomplete(self, run_id: str) -> None:
        """wandb's files miss part of a finished run: keep its journal, replay it later (with backoff)."""
        st = self.runs[run_id]
        delay = st.replay_delay or self.replay_backoff
        st.state = "incomplete"
        st.replay_at = time.monotonic() + delay
        log.error("run %s: replaying it from the journal in %.0f s", run_id, delay)
        st.replay_delay = min(delay * 2, 600.0)

    def _retry_incomplete(self, now: float) -> None:
        for st in list(self.runs.values()):
            if st.state == "incomplete" and now >= st.replay_at and not (st.worker and st.worker.is_alive()):
                st.state = "replaying"  # not "active": no trainer heartbeats are expected
                log.info("run %s: replaying %d journaled messages into a resumed wandb run", st.run_id,
                         self._replay_from_journal(st))

    def _check_heartbeats(self, now: float) -> None:
        for st in self.runs.values():
            if st.state == "active" and st.worker is not None and now - st.last_seen > self.heartbeat_timeout:
                st.state = "lost"
                log.error("run %s: no message or heartbeat for %.0f s; trainer declared dead, finishing the "
                          "run with exit code %d", st.run_id, now - st.last_seen, LOST_EXIT_CODE)
                st.worker.stop(LOST_EXIT_CODE)

    # ----------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """Everything ``wandb-sidecar status`` and the Prometheus endpoint show.

        Called on the socket thread (STATUS requests) and on the metrics HTTP thread: it only reads ints
        and strings and copies dicts and lists with single C-level calls (atomic under the GIL), so it
        needs no lock and never blocks the receiver."""
        now = time.monotonic()
        runs = {}
        for st in list(self.runs.values()):
            w = st.worker
            start = st.start.body if st.start is not None else {}
            client = start.get("client") or {}
            runs[st.run_id] = {
                "state": st.state,
                "worker": w.state if w is not None else "none",
                "project": (start.get("init_kwargs") or {}).get("project"),
                "client": {"host": client.get("host"), "pid": client.get("pid")} if client else {},
                "received": st.received,
                "journaled_seq": st.journaled,
                "delivered_seq": st.delivered,
                "lag": max(0, st.journaled - st.delivered),
                "queue": w.queue.qsize() if w is not None else 0,
                "duplicates": st.duplicates,
                "out_of_order": st.out_of_order,
                "backpressure": st.backpressure,
                "rejected": st.rejected,
                "rejected_by": dict(st.rejected_by),
                "last_seen_s": round(now - st.last_seen, 1),
                "wandb": w.sink.all_counters() if w is not None else {},
                "last_error": w.last_error[:_ERROR_CHARS] if w is not None else "",
            }
        return {
            "version": _VERSION,
            "bind": self.bind,
            "pid": os.getpid(),
            "started": round(self.started, 3),
            "uptime_s": round(time.time() - self.started, 1),
            "serving": not self._stop.is_set(),
            "wandb_mode": os.environ.get("WANDB_MODE", "online"),
            "journal": str(self.journal.root),
            "counters": {**dict.fromkeys(_COUNTERS, 0), **self.counters},
            "rejected": dict(self.rejected),
            "last_error": self.last_error[:_ERROR_CHARS],
            "runs": runs,
        }
