"""``SidecarClient``: the trainer's side of the pipe. The caller only appends to a deque; one I/O thread
does everything else (packing, spooling checkpoints, the ZeroMQ socket, acknowledgements, resends).

Every stage is bounded in bytes (and items), each with a named policy, all counted in :meth:`stats`:

- ``pending`` (caller → I/O thread, ``max_pending`` items / ``max_pending_bytes``): when full, new
  droppable messages are refused (``dropped_queue_full``). Kinds in ``NEVER_DROPPED`` are always taken.
- ``backlog`` (packed, not yet sent: the sidecar is down or slow): ``max_backlog_bytes`` in memory, then
  spill segments of up to ``max_spill_bytes`` in total on disk (a hard limit), then the newest droppable
  message is dropped. See :mod:`trainer_hook.outbox` and :mod:`trainer_hook.spill`.
- ``window`` (sent, awaiting acknowledgement, ``max_inflight`` messages / ``max_inflight_bytes``): one
  message (the run start) until the sidecar has answered once, so a missing sidecar holds no window.
  Nothing is dropped here; it is resent after ``ack_timeout`` without progress (go-back-N), and the
  sidecar drops duplicates by (run id, incarnation, sequence number): each message lands exactly once.
- spooled checkpoints not yet acknowledged: ``max_spooled_checkpoints`` / ``max_spool_bytes``, see
  :mod:`trainer_hook.spool_budget`.

Exit: every client still running at interpreter exit is finished within ONE deadline for all of them
(the largest ``finish_at_exit_timeout``). What the sidecar has not acknowledged by then (and what a
``finish()`` that timed out leaves) is kept in the spill directory, and the next ``SidecarClient`` on this
machine delivers it as a new incarnation of the same run (see :mod:`trainer_hook.spill_owner`).
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import secrets
import string
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import zmq

from protocol import (
    DEFAULT_ADDR,
    MAX_BATCH,
    NEVER_DROPPED,
    PROTOCOL_VERSION,
    Header,
    Kind,
    ProtocolError,
    decode,
    decode_body,
    encode_body,
    encode_header,
)
from protocol.curve import apply_client_keys, load_client_keys

from .outbox import Outbox
from .packed import Packed
from .spill import SpillSegments
from .spill_owner import SpillOwner, claim_orphans, run_id_of
from .spool import spool_checkpoint
from .spool_budget import SpoolBudget
from .wandb_env import init_kwargs_from_env, is_disabled
from .warn_once import WarnOnce

log = logging.getLogger("trainer_hook")

_ID_ALPHABET = string.ascii_lowercase + string.digits
_FLUSH = "flush"  # pseudo-kind of a flush marker in ``pending``
_BATCH_BYTES = 4 * 1024 * 1024
#: Flags as plain ints: ``send_multipart`` ORs ``zmq.Flag`` enums per frame, which cost ~1.4 µs of the
#: ~1.9 µs it spends per small frame (measured); a plain ``send`` per frame with int flags takes 0.46 µs.
_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
#: Frames under this size are copied into ZeroMQ (cheaper than a zero-copy ``zmq.Frame`` for small ones).
_COPY_BELOW = 65536
#: Messages packed per turn of the I/O loop before what is packed is sent.
_PACK_CHUNK = 1024
#: ``log()`` calls packed into one ``metric_rows`` message at most (when that many are waiting).
_ROWS_PER_MESSAGE = 1024
#: ... and at most this much of the pending bound's cost (~200 calls of 10 scalars): a message is what
#: the buffers keep or drop whole, so it stays small next to them.
_ROWS_BYTES = 256 * 1024
#: Cost the pending bound counts for one ``log()`` call: per key, plus the message (no walk on the hot path).
_METRIC_KEY_BYTES = 96  # a fresh key string, a float, a dict slot
_MESSAGE_BYTES = 320  # the body dict, the tuple, the deque slot
#: Rejections after which nothing of this incarnation will ever be accepted.
PERMANENT_REJECTIONS = frozenset({"init_refused", "init_failed"})
_MAX_RESEND_INTERVAL = 30.0
#: Dead clients' spills one new client takes over (one thread and connection each); the rest wait for the next.
MAX_ORPHANS_TAKEN = 4

_DEFAULT_SPILL: Any = object()


def _default_spill_dir() -> str:
    return os.environ.get("WANDB_SIDECAR_SPILL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wandb-sidecar", "spill")


def generate_run_id(length: int = 8) -> str:
    """A wandb-style run id (lowercase letters and digits)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def _approx_nbytes(obj: Any, depth: int = 0) -> int:
    """Rough memory of a queued body: arrays, bytes and strings by size, containers walked 4 deep."""
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if depth < 4 and isinstance(obj, (list, tuple)):
        return 8 * len(obj) + sum(_approx_nbytes(x, depth + 1) for x in obj)
    if depth < 4 and isinstance(obj, dict):
        return 16 * len(obj) + sum(_approx_nbytes(v, depth + 1) for v in obj.values())
    return 16


class _Marker:
    """A flush point: done once everything queued before it is acknowledged (or dropped by policy).
    ``ok`` turns False when the sidecar refused the run for good (nothing will be acknowledged)."""

    __slots__ = ("order", "event", "ok")

    def __init__(self) -> None:
        self.order = -1
        self.event = threading.Event()
        self.ok = True


_clients: "weakref.WeakSet[SidecarClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._inert = True  # the run belongs to the parent; a dataloader worker must not speak for it


os.register_at_fork(after_in_child=_after_fork_in_child)

_uncaught_exception = False
_previous_excepthook = sys.excepthook


def _excepthook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
    global _uncaught_exception
    _uncaught_exception = True
    _previous_excepthook(exc_type, exc, tb)


sys.excepthook = _excepthook


class SidecarClient:
    """Streams one wandb run's data to a ``wandb-sidecar``. Never blocks or raises into the caller.

    ``init_kwargs`` are ``wandb.init``'s arguments, applied in the sidecar; the ``WANDB_*`` variables an
    in-process ``wandb.init`` would read (:mod:`trainer_hook.wandb_env`) fill in what they do not name.
    ``mode="disabled"`` (or ``WANDB_MODE=disabled``) makes the client a no-op that never connects:
    ``log``/``send``/``flush``/``finish`` return True at once and ``stats()`` is ``{"disabled": 1}``.
    ``init_kwargs["id"]`` (or ``run_id``, or ``WANDB_RUN_ID``) fixes the wandb run id; otherwise a fresh
    one is made. ``curve_server_key`` (the sidecar's public key file) and ``curve_client_key`` (this
    client's secret key file) turn on CurveZMQ; by default they come from ``WANDB_SIDECAR_SERVER_KEY`` /
    ``WANDB_SIDECAR_CLIENT_KEY``. ``code`` (``{"root": dir, "name": artifact name or None, "program": script
    path or None}``) asks the sidecar for ``run.log_code`` of that source tree, as mmengine's
    ``WandbVisBackend`` does. ``no_answer_warning_after``: seconds without any answer before the one
    warning that nobody answers.
    """

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        init_kwargs: Mapping[str, Any] | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        define_metrics: Sequence[Mapping[str, Any]] | None = None,
        files: Sequence[Mapping[str, str]] | None = None,
        code: Mapping[str, str | None] | None = None,
        max_pending: int = 100_000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_backlog_bytes: int = 64 * 1024 * 1024,
        spill_dir: str | os.PathLike[str] | None = _DEFAULT_SPILL,
        max_spill_bytes: int = 1024 * 1024 * 1024,
        max_inflight: int = 8192,
        max_inflight_bytes: int = 16 * 1024 * 1024,
        ack_timeout: float = 2.0,
        heartbeat_interval: float = 2.0,
        spool_checkpoints: bool = True,
        max_spooled_checkpoints: int | None = 10,
        max_spool_bytes: int | None = None,
        finish_at_exit_timeout: float = 30.0,
        no_answer_warning_after: float = 3.0,
        curve_server_key: str | None = None,
        curve_client_key: str | None = None,
        _orphan: SpillOwner | None = None,
        _curve: Any = None,
    ) -> None:
        init = dict(init_kwargs or {}) if _orphan is not None else {**init_kwargs_from_env(), **dict(init_kwargs or {})}
        self.addr = addr
        self.run_id = str(run_id or init.get("id") or generate_run_id())
        init["id"] = self.run_id
        #: This client's random token: the sidecar counts sequence numbers per (run id, incarnation), so
        #: a resumed training (same run id, new process) is a new sequence, not a stream of duplicates.
        self.incarnation = secrets.token_hex(8)
        self.init_kwargs = init
        self.disabled = is_disabled(init)
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_backlog_bytes = max_backlog_bytes
        self.spill_dir = _default_spill_dir() if spill_dir is _DEFAULT_SPILL else spill_dir
        self.max_spill_bytes = max_spill_bytes
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.ack_timeout = ack_timeout
        self.heartbeat_interval = heartbeat_interval
        self.spool_checkpoints = spool_checkpoints
        self.max_spooled_checkpoints = max_spooled_checkpoints
        self.max_spool_bytes = max_spool_bytes
        self.finish_at_exit_timeout = finish_at_exit_timeout
        self.no_answer_warning_after = no_answer_warning_after
        self._inert = self.disabled  # inert: the hot path returns at its first test
        self._finished = False
        if self.disabled:
            log.info("wandb sidecar client: wandb mode is disabled; run %s logs nothing and never connects",
                     self.run_id)
            return
        # CurveZMQ key files (default: named by the environment); a bad file is a configuration error
        self._curve = _curve if _curve is not None else load_client_keys(curve_server_key, curve_client_key)
        self._pending: collections.deque[tuple] = collections.deque()
        # bytes in pending = added - taken; each written by one thread, so no lock is needed
        self._pending_added_bytes = 0
        self._pending_taken_bytes = 0
        self._counters: collections.Counter[str] = collections.Counter()
        self._warnings = WarnOnce(log)
        self._stop = threading.Event()
        self._acked = 0
        self._delivered: int | None = None
        self._refused: str | None = None  # a permanent rejection's reason
        self._kept_in: str | None = None  # where undelivered messages were kept at the end
        self._orphan = _orphan

        start: dict[str, Any] = {"init_kwargs": init, "client": {"pid": os.getpid(), "host": os.uname().nodename}}
        if config:
            start["config"] = dict(config)
        if define_metrics:
            start["define_metrics"] = [dict(m) for m in define_metrics]
        if files:
            start["files"] = [dict(f) for f in files]
        if code:
            start["code"] = dict(code)
        self._start_body = start

        self._io = _IOThread(self)
        self._io.start()
        _clients.add(self)

    @classmethod
    def _deliver_orphan(cls, owner: SpillOwner, like: "SidecarClient") -> "SidecarClient | None":
        """Deliver a dead client's spill as a new incarnation of its run, to ``like``'s sidecar."""
        start = owner.read_start()
        if start is None:
            log.error("wandb sidecar client: spill %s has no readable run start; left on disk", owner.directory)
            owner.release()
            return None
        body = decode_body(Header(PROTOCOL_VERSION, Kind.RUN_START, "x", 1, 0.0, len(start.frames), ""), start.frames).body
        init = dict(body["init_kwargs"])
        if init.get("resume") != "must":
            init["resume"] = "allow"  # the run may exist already: resume it, never start it over
        log.warning("wandb sidecar client: delivering run %s's messages left in %s by a trainer that exited before "
                    "a sidecar acknowledged them", init.get("id"), owner.directory)
        return cls(like.addr, init, config=body.get("config"), define_metrics=body.get("define_metrics"),
                   files=body.get("files"), code=body.get("code"), spill_dir=owner.directory.parent,
                   max_backlog_bytes=like.max_backlog_bytes, max_spill_bytes=like.max_spill_bytes,
                   max_inflight=like.max_inflight, max_inflight_bytes=like.max_inflight_bytes,
                   ack_timeout=like.ack_timeout, heartbeat_interval=like.heartbeat_interval,
                   finish_at_exit_timeout=like.finish_at_exit_timeout, spool_checkpoints=False,
                   _orphan=owner, _curve=like._curve)

    # ------------------------------------------------------------------------------- hot path

    def log(self, data: Mapping[str, Any], step: int | None = None, commit: bool = True) -> bool:
        """Queue metrics for ``run.log(data, step=step)``. Returns False (and counts why) if refused."""
        if self._inert or self._finished:
            if self.disabled:
                return True
            self._counters["dropped_inactive"] += 1
            return False
        cost = _MESSAGE_BYTES + _METRIC_KEY_BYTES * len(data)
        if (len(self._pending) >= self.max_pending
                or self._pending_added_bytes - self._pending_taken_bytes + cost > self.max_pending_bytes):
            self._counters["dropped_queue_full"] += 1
            return False
        body = {"data": dict(data), "step": step} if commit else {"data": dict(data), "step": step, "commit": False}
        self._pending_added_bytes += cost
        self._pending.append((Kind.METRICS, body, time.time(), cost))
        return True

    def log_checkpoint(
        self,
        path: str | os.PathLike[str],
        aliases: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        artifact_name: str | None = None,
    ) -> bool:
        """Announce a checkpoint file for a ``run_{id}_model`` artifact (type ``model``).

        The file is hardlinked (or copied, on its own thread) into a spool, so deleting it right after
        this call is safe. Never dropped, but bounded while unacknowledged (see ``spool_budget``).
        """
        body: dict[str, Any] = {"path": os.fspath(path), "aliases": list(aliases or ["latest"])}
        if metadata is not None:
            body["metadata"] = dict(metadata)
        if artifact_name is not None:
            body["artifact_name"] = artifact_name
        return self._submit(Kind.CHECKPOINT, body)

    def send(self, kind: Kind, body: dict[str, Any]) -> bool:
        """Queue a message of any sequenced kind (validation data, prediction batches...)."""
        return self._submit(kind, body)

    def _submit(self, kind: Kind, body: dict[str, Any]) -> bool:
        if self._inert or self._finished:
            if self.disabled:
                return True
            self._counters["dropped_inactive"] += 1
            return False
        cost = _MESSAGE_BYTES + _approx_nbytes(body)
        if kind not in NEVER_DROPPED and (
                len(self._pending) >= self.max_pending
                or self._pending_added_bytes - self._pending_taken_bytes + cost > self.max_pending_bytes):
            self._counters["dropped_queue_full"] += 1
            return False
        self._pending_added_bytes += cost
        self._pending.append((kind, body, time.time(), cost))
        return True

    # ------------------------------------------------------------------------------- waiting

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is acknowledged by the sidecar (journaled there)."""
        if self.disabled:
            return True
        if self._inert or not self._io.is_alive():
            return False
        marker = self._queue_marker()
        self._io.wake()
        return marker.event.wait(timeout) and marker.ok

    def _queue_marker(self) -> _Marker:
        marker = _Marker()
        self._pending.append((_FLUSH, marker, 0.0, 0))
        return marker

    def finish(self, exit_code: int = 0, timeout: float = 30.0) -> bool:
        """Send the run's end and wait for the sidecar to acknowledge everything.

        Returns True when the sidecar has all of it; False on timeout or when the sidecar refused the run
        (what was not delivered is counted in :meth:`stats` as ``undelivered``, logged with where it is
        kept, and delivered later by the next client on this machine). The caller goes on either way.
        """
        if self.disabled:
            return True
        if self._inert or self._finished:
            return False
        self._queue_finish(exit_code)
        ok = self.flush(timeout)
        self._stop.set()
        self._io.join(timeout=5)
        if not ok:
            self._report_undelivered()
        return ok

    def _queue_finish(self, exit_code: int) -> None:
        self._pending.append((Kind.RUN_FINISH, {"exit_code": int(exit_code)}, time.time(), 0))
        self._finished = True

    def _report_undelivered(self) -> None:
        n = self._counters.get("undelivered", 0)
        if self._refused:
            where = f"the run was refused ({self._refused}); not kept"
        elif self._kept_in:
            where = (f"kept in {self._kept_in}; the next SidecarClient on this machine delivers them once a "
                     f"sidecar answers")
        else:
            where = "lost (no spill_dir)" if n else "nothing was left undelivered"
        log.warning("wandb sidecar client: run %s not fully delivered to %s: %d message(s) not acknowledged, %s",
                    self.run_id, self.addr, n, where)

    # ------------------------------------------------------------------------------- reporting

    def stats(self) -> dict[str, int]:
        """Counters: sent, acked, resent, dropped_* by reason, rejected_* by the sidecar's reason..."""
        if self.disabled:
            return {"disabled": 1}
        io = self._io
        out = dict(self._counters)
        out["pending"] = len(self._pending)
        out["pending_bytes"] = self._pending_added_bytes - self._pending_taken_bytes
        out["backlog"] = len(io.outbox)
        out["backlog_bytes"] = io.outbox.memory_bytes
        out["spill_bytes"] = io.outbox.spill_bytes
        spill = io.outbox.spill
        out["spill_segments"] = len(spill.segments) if spill else 0
        out["spill_segments_deleted"] = spill.segments_deleted if spill else 0
        out["unacked"] = len(io.window)
        out["unacked_bytes"] = io.window_bytes
        out["spooled_checkpoint_bytes"] = io.spool_budget.spooled_bytes
        out["acked_seq"] = self._acked
        if self._delivered is not None:
            out["delivered_seq"] = self._delivered  # the sidecar's word on what reached wandb
        return out



def _finish_all_at_exit() -> None:
    """Finish every running client within ONE deadline for all (not one timeout per client in turn)."""
    clients = [c for c in list(_clients) if not c.disabled and not c._inert and c._io.is_alive()]
    if not clients:
        return
    started = time.monotonic()
    budget = max(c.finish_at_exit_timeout for c in clients)
    deadline = started + budget
    exit_code = 1 if _uncaught_exception else 0
    markers = []
    for client in clients:
        if not client._finished:
            client._queue_finish(exit_code)
        markers.append(client._queue_marker())
    keep_time = min(2.0, budget / 4)  # left at the end to write what is unacknowledged to disk
    for marker in markers:
        marker.event.wait(max(0.0, deadline - keep_time - time.monotonic()))
    for client in clients:
        client._stop.set()
    for client in clients:
        client._io.join(max(0.05, deadline - time.monotonic()))
    for client, marker in zip(clients, markers):
        if not (marker.event.is_set() and marker.ok):
            client._report_undelivered()


atexit.register(_finish_all_at_exit)


class _IOThread(threading.Thread):
    """Owns the ZeroMQ socket (sockets are not thread-safe). Pack, spool, send, resend, read acks."""

    def __init__(self, client: SidecarClient) -> None:
        super().__init__(name=f"wandb-sidecar-client-{client.run_id}", daemon=True)
        self.client = client
        self.spill_owner: SpillOwner | None = client._orphan
        self.outbox = Outbox(client.max_backlog_bytes, None, client._counters)
        self.spool_budget = SpoolBudget(client.max_spooled_checkpoints, client.max_spool_bytes, client._counters)
        self.window: collections.deque[Packed] = collections.deque()
        self.window_bytes = 0
        self.next_send = 0  # index in window of the first message not yet sent (since the last go-back)
        self.seq = 0
        self.highest_sent = 0
        self.order = 0  # order number of the last message packed
        self.markers: list[_Marker] = []
        self.start_item: Packed | None = None
        self.spooling: tuple[threading.Thread, dict[str, Any], tuple] | None = None  # a checkpoint being copied
        self.started = time.monotonic()
        self.answered = False  # the sidecar has answered at least once
        self.accepted = False  # ... and acknowledged something
        self.last_progress = time.monotonic()
        self.resend_interval = client.ack_timeout  # grows (to 30 s) while the run id is in use elsewhere
        self.in_use_refused = False
        self.last_heartbeat = 0.0
        #: ``flush()`` wakes the I/O thread from its wait for replies (up to 20 ms while idle), so a flush
        #: costs a round trip, not a poll interval: a PUSH socket of the caller's, a PULL of this thread's.
        self.wake_addr = f"inproc://wandb-sidecar-wake-{id(self):x}"
        self._waker: zmq.Socket | None = None
        self._wake_lock = threading.Lock()
        self._wake_closed = False

    # -- socket

    def wake(self) -> None:
        """Called by the caller's thread (any of them): never blocks, never raises."""
        ctx = getattr(self, "ctx", None)
        if ctx is None:
            return  # not connected yet: the thread looks at its queue before its first wait
        with self._wake_lock:
            if self._wake_closed:
                return
            try:
                if self._waker is None:
                    self._waker = ctx.socket(zmq.PUSH)
                    self._waker.setsockopt(zmq.LINGER, 0)
                    self._waker.connect(self.wake_addr)
                self._waker.send(b"", _LAST)
            except zmq.ZMQError:
                pass  # full (the thread is awake anyway) or ending

    def _close_waker(self) -> None:
        with self._wake_lock:
            self._wake_closed = True
            if self._waker is not None:
                self._waker.close(linger=0)

    def _connect(self) -> zmq.Socket:
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing into a connection that is not up: we keep it
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        apply_client_keys(sock, self.client._curve)
        sock.connect(self.client.addr)
        self.woken = self.ctx.socket(zmq.PULL)
        self.woken.setsockopt(zmq.LINGER, 0)
        self.woken.bind(self.wake_addr)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.woken, zmq.POLLIN)
        return sock

    def run(self) -> None:
        client = self.client
        sock: zmq.Socket | None = None
        try:
            if not self._open_buffers():
                return
            sock = self._connect()
            while True:
                self._pack_pending()
                self._fill_window()
                self._send(sock)
                self._heartbeat(sock)
                # more to pack at once: only look for replies; a checkpoint being copied: do not spin
                more = bool(client._pending) and self.spooling is None
                self._read_replies(sock, timeout_ms=0 if more else 1 if client._pending else 20)
                self._resolve_markers()
                self._warn_if_nobody_answers()
                if client._stop.is_set() or (client._orphan is not None and self._orphan_done()):
                    break
        except Exception:  # never let an I/O bug surface in training; say it once, loudly
            log.exception("wandb sidecar client I/O thread failed; logging to the sidecar stops")
            client._counters["io_thread_failed"] += 1
        finally:
            try:
                self._close()
            except Exception:
                log.exception("wandb sidecar client: ending the I/O thread failed")
            for marker in self.markers:  # nobody waits forever on a thread that is gone
                marker.ok = False
                marker.event.set()
            if sock is not None:
                self._close_waker()
                sock.close(linger=0)
                self.woken.close(linger=0)
                self.ctx.term()

    def _open_buffers(self) -> bool:
        """Pack the run start first; claim the spill directory; take over orphans a dead client left.
        False when the run start cannot be encoded (then nothing of the run can go)."""
        client = self.client
        try:
            frames = encode_body(client._start_body)
        except (TypeError, ValueError, OverflowError) as exc:
            client._counters["dropped_unencodable"] += 1
            log.error("wandb sidecar client: run %s: cannot encode the run start (init_kwargs, config...): %s; "
                      "nothing of this run is sent", client.run_id, exc)
            client._refused = "unencodable_run_start"
            return False
        self.order += 1
        self.start_item = Packed(Kind.RUN_START, frames, time.time(), sum(len(f) for f in frames), self.order)
        spill = None
        if client.spill_dir is not None:
            try:
                if self.spill_owner is None:
                    self.spill_owner = SpillOwner.create(Path(client.spill_dir), client.run_id, client.incarnation,
                                                         self.start_item, client.addr)
                else:
                    self.spill_owner.write_identity(client.run_id, client.incarnation, self.start_item, client.addr)
                spill = SpillSegments(self.spill_owner.directory, client.max_spill_bytes)
            except OSError as exc:
                client._counters["spill_failed"] += 1
                log.warning("wandb sidecar client: cannot use the spill directory %s (%s); memory only",
                            client.spill_dir, exc)
        self.outbox = Outbox(client.max_backlog_bytes, spill, client._counters)
        if client._orphan is not None and spill is None:  # cannot read it now: leave it for a later client
            client._orphan.release()
            self.spill_owner = None
            return False
        if client._orphan is not None:
            self.outbox.put_first(self.start_item)
            unread = list(spill.unread_kinds_and_orders()) if spill else []
            self.order = max([self.order, *(order for _, order in unread)])  # flush markers wait behind them
            if Kind.RUN_FINISH not in {kind for kind, _ in unread}:  # it died before finishing: end it as lost
                client._queue_finish(255)
            client._finished = True
        else:
            self.outbox.put(self.start_item)
            if spill is not None:  # (orphans are only taken over by a client that can spill itself)
                for owner in claim_orphans(Path(client.spill_dir), MAX_ORPHANS_TAKEN, client.run_id):
                    try:
                        if run_id_of(owner.directory) == client.run_id:
                            self._continue_from(owner)
                        else:
                            SidecarClient._deliver_orphan(owner, client)
                    except Exception:  # someone else's leftovers must never stop this run
                        log.exception("wandb sidecar client: cannot deliver the spill in %s; left on disk",
                                      owner.directory)
                        owner.release()
        return True

    def _continue_from(self, owner: SpillOwner) -> None:
        """A trainer of this same run id (a resumed training) left messages undelivered: they go first,
        in this incarnation, right after our run start (its own start and finish are not repeated)."""
        client = self.client
        left = SpillSegments(owner.directory, max_bytes=0)  # read only
        n = 0
        while (item := left.pop()) is not None:
            if item.kind in (Kind.RUN_START, Kind.RUN_FINISH):
                continue
            self.order += 1
            item.order = self.order
            self.outbox.put(item)
            n += item.calls
        left.close(keep=False)
        owner.remove()
        client._counters["taken_over_from_earlier_trainer"] += n
        log.warning("wandb sidecar client: run %s: %d messages an earlier trainer of this run left undelivered (in %s) "
                    "go first", client.run_id, n, owner.directory)

    def _orphan_done(self) -> bool:
        return client_idle(self) or self.client._refused is not None

    def _close(self) -> None:
        client = self.client
        self._pack_pending(final=True)
        undelivered = sum(p.calls for p in self.window) + self.outbox.calls()
        kept = 0
        if undelivered and client._refused is None and self.outbox.spill is not None:
            # sent here, maybe journaled with the acknowledgement lost: the client that delivers them later
            # names where they went first, and the sidecar takes those it has as duplicates
            unacked = [Packed(p.kind, p.frames[1:], p.time, p.nbytes, p.order, origin=(client.incarnation, p.seq),
                              calls=p.calls)
                       for p in self.window]
            try:
                kept = self.outbox.keep_on_disk(unacked)
            except OSError as exc:  # what was already spilled stays valid on disk (rewrites are atomic)
                kept = self.outbox.spill.calls if self.outbox.spill is not None else 0
                log.error("wandb sidecar client: cannot write %d undelivered messages to %s (%s); %d kept there, "
                          "the rest lost", undelivered, self.spill_owner.directory if self.spill_owner else None,
                          exc, kept)
        if undelivered:
            client._counters["undelivered"] += undelivered
        self.outbox.close(keep=bool(kept))
        if self.spill_owner is not None:
            if kept:
                client._kept_in = str(self.spill_owner.directory)
                self.spill_owner.release()  # ours no more: the next client on this machine takes it over
            else:
                self.spill_owner.remove()

    # -- stages

    def _pack_pending(self, final: bool = False) -> None:
        """Pack what the trainer queued: all of it when ending, else up to ``_PACK_CHUNK`` messages, so the
        first ones are on their way (and the sidecar busy with them) while the rest are packed."""
        client = self.client
        pending = client._pending
        budget = _PACK_CHUNK
        while True:
            if self.spooling is not None:
                thread, result, entry = self.spooling
                if thread.is_alive():
                    if not final:
                        return  # copying across filesystems: keep the loop (heartbeats, acks) going
                    thread.join(1.0)
                    if thread.is_alive():  # ending: keep the announcement (original path), not the copy
                        result = {"error": TimeoutError("still copying when the client ended")}
                self.spooling = None
                self._pack(*entry[:3], spooled=result)
            if not pending or (budget <= 0 and not final):
                return
            budget -= 1
            entry = pending.popleft()
            kind, body, t, cost = entry
            client._pending_taken_bytes += cost
            if kind is _FLUSH:
                body.order = self.order
                self.markers.append(body)
                continue
            if client._refused is not None:
                client._counters["undelivered"] += 1
                continue
            if kind is Kind.METRICS and pending and pending[0][0] is Kind.METRICS and _row_may_follow(body):
                rows, size = [body], cost
                while (pending and pending[0][0] is Kind.METRICS and len(rows) < _ROWS_PER_MESSAGE
                       and size < _ROWS_BYTES):
                    row, cost = pending.popleft()[1::2]
                    client._pending_taken_bytes += cost
                    size += cost
                    rows.append(row)
                    if not _row_may_follow(row):
                        break
                budget -= len(rows) - 1
                self._pack_rows(rows, t)
                continue
            if kind is Kind.CHECKPOINT and client.spool_checkpoints:
                result: dict[str, Any] = {}
                thread = threading.Thread(target=_spool_into,
                                          args=(body["path"], client.run_id, self.order + 1, result),
                                          name=f"wandb-sidecar-spool-{client.run_id}", daemon=True)
                thread.start()
                self.spooling = (thread, result, entry)
                continue
            self._pack(kind, body, t)

    def _pack(self, kind: Kind, body: dict[str, Any], t: float, spooled: dict[str, Any] | None = None) -> None:
        client = self.client
        if spooled is not None:
            if "error" in spooled:
                client._counters["checkpoint_spool_failed"] += 1
                client._warnings.warn("spool", "wandb sidecar: cannot spool checkpoint %s (%s)", body["path"],
                                  spooled["error"])
            else:
                body = {**body, "path": spooled["path"], "source_path": body["path"], "spooled": True}
        try:
            frames = encode_body(body)
        except (TypeError, ValueError, OverflowError) as exc:
            client._counters["dropped_unencodable"] += 1
            client._warnings.warn(f"pack:{kind}", "wandb sidecar: cannot encode a %s message (%s); dropped", kind, exc)
            return
        self.order += 1
        if spooled is not None and "path" in spooled:
            self.spool_budget.add(self.order, spooled["path"], list(body.get("aliases") or ["latest"]))
        self.outbox.put(Packed(kind, frames, t, sum(len(f) for f in frames), self.order))

    def _pack_rows(self, rows: list[dict[str, Any]], t: float) -> None:
        """Consecutive ``log()`` calls as one ``metric_rows`` message (one sequence number, one journal
        record and one admission at the sidecar for all of them); each alone where they cannot go together
        (a value that cannot be encoded, more than a body's bytes), so one bad call costs only itself."""
        try:
            frames = encode_body({"rows": rows})
        except (TypeError, ValueError, OverflowError):
            for row in rows:
                self._pack(Kind.METRICS, row, t)
            return
        self.order += 1
        self.outbox.put(Packed(Kind.METRIC_ROWS, frames, t, sum(len(f) for f in frames), self.order, calls=len(rows)))

    def _fill_window(self) -> None:
        client = self.client
        if client._refused is not None:
            return
        # nothing fills it before the sidecar has accepted something (the run start): not while nobody
        # answers, nor while it refuses the run id as in use
        max_items = client.max_inflight if self.accepted else 1
        while len(self.window) < max_items:
            item = self.outbox.pop()
            if item is None:
                return
            if item.kind is Kind.CHECKPOINT and item.order in self.spool_budget.given_up:
                self.spool_budget.given_up.discard(item.order)
                continue  # given up by the spool bound: its file is gone
            if item.kind is Kind.RUN_START and item is not self.start_item:
                continue  # a dead client's run start, in a spill taken over: ours went first
            if self.window and self.window_bytes + item.cost > client.max_inflight_bytes:
                self.outbox.put_first(item)
                return
            self.seq += 1
            item.seq = self.seq
            item.frames.insert(0, encode_header(item.kind, client.run_id, item.seq, item.time, len(item.frames),
                                                client.incarnation, item.origin))
            if not self.window:
                self.last_progress = time.monotonic()
            self.window.append(item)
            self.window_bytes += item.cost

    def _send(self, sock: zmq.Socket) -> None:
        client = self.client
        if client._refused is not None:
            return
        now = time.monotonic()
        if self.window and self.next_send > 0 and now - self.last_progress > self.resend_interval:
            if self.in_use_refused:  # the last round was refused as run_in_use: resend less and less often
                self.resend_interval = min(_MAX_RESEND_INTERVAL, self.resend_interval * 2)
                self.in_use_refused = False
            client._counters["resent"] += self.next_send
            self.next_send = 0  # go back N: the sidecar drops what it already has
            self.last_progress = now
        while self.next_send < len(self.window):
            # what is ready goes out as one multipart of up to MAX_BATCH messages (see protocol.split)
            batch: list[bytes] = []
            end, size, calls = self.next_send, 0, 0
            while end < len(self.window) and end - self.next_send < MAX_BATCH and size < _BATCH_BYTES:
                item = self.window[end]
                batch += item.frames
                size += item.nbytes
                calls += item.calls
                end += 1
            try:
                _send_frames(sock, batch)
            except zmq.Again:
                return  # not connected, or the sidecar is slow: keep it, try again later
            client._counters["sent"] += calls
            self.highest_sent = max(self.highest_sent, self.window[end - 1].seq)
            self.next_send = end

    def _heartbeat(self, sock: zmq.Socket) -> None:
        client = self.client
        now = time.monotonic()
        if now - self.last_heartbeat < client.heartbeat_interval or client._refused is not None:
            return
        self.last_heartbeat = now
        try:
            sock.send_multipart([encode_header(Kind.HEARTBEAT, client.run_id, 0, time.time(), 1, client.incarnation),
                                 *encode_body({})], flags=zmq.NOBLOCK)
        except zmq.Again:
            client._counters["heartbeat_unsent"] += 1

    # -- replies

    def _read_replies(self, sock: zmq.Socket, timeout_ms: int) -> None:
        client = self.client
        if timeout_ms:
            ready = dict(self.poller.poll(timeout_ms))
            if self.woken in ready:
                while True:
                    try:
                        self.woken.recv(_LAST)
                    except zmq.Again:
                        break
            if sock not in ready:
                return
        elif not sock.poll(0, zmq.POLLIN):
            return
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frames)
            except ProtocolError as exc:
                client._counters["bad_reply"] += 1
                client._warnings.warn("bad_reply", "wandb sidecar sent a bad reply: %s", exc)
                continue
            if msg.kind not in (Kind.ACK, Kind.REJECT):
                continue
            if msg.header.run_id != client.run_id or msg.header.incarnation != client.incarnation:
                client._counters["protocol_error_foreign_reply"] += 1
                client._warnings.warn("foreign", "wandb sidecar at %s: protocol error: a %s for run %s incarnation %r, "
                                  "but this client is run %s incarnation %s; ignored", client.addr, msg.kind.value,
                                  msg.header.run_id, msg.header.incarnation, client.run_id, client.incarnation)
                continue
            self._answered()
            if msg.kind is Kind.ACK:
                self._on_ack(msg.seq, msg.body.get("delivered"))
            else:
                self._on_reject(msg.body)

    def _answered(self) -> None:
        if not self.answered:
            self.answered = True
            if "no_answer" in self.client._warnings:
                log.warning("wandb sidecar client: the sidecar at %s answers now (run %s); sending what was "
                            "buffered", self.client.addr, self.client.run_id)

    def _warn_if_nobody_answers(self) -> None:
        client = self.client
        if self.answered or time.monotonic() - self.started < client.no_answer_warning_after:
            return
        spill = self.outbox.spill
        where = (f"then up to {client.max_spill_bytes / 2**20:.0f} MiB on disk in {spill.directory}"
                 if spill is not None else "no disk spill")
        client._warnings.warn(
            "no_answer", "wandb sidecar client: no answer from %s for %.0f s (run %s). Buffering up to %.0f MiB in "
            "memory, %s; nothing is lost until those fill. Start a sidecar with `wandb-sidecar serve --bind %s` "
            "(as the same user, with the same keys) or fix the address.", client.addr, client.no_answer_warning_after,
            client.run_id, (client.max_backlog_bytes + client.max_inflight_bytes + client.max_pending_bytes) / 2**20,
            where, client.addr)

    def _on_ack(self, seq: int, delivered: int | None) -> None:
        client = self.client
        if seq > self.highest_sent:
            client._counters["protocol_error_ack_unsent"] += 1
            client._warnings.warn("ack_unsent", "wandb sidecar at %s: protocol error: it acknowledged seq %d of run "
                              "%s, but this client has sent only up to %d; ignored", client.addr, seq, client.run_id,
                              self.highest_sent)
            return
        if delivered is not None:
            client._delivered = delivered
        if seq <= client._acked:
            return
        self.accepted = True
        client._acked = seq
        while self.window and self.window[0].seq <= seq:
            item = self.window.popleft()
            self.window_bytes -= item.cost
            if item.kind is Kind.CHECKPOINT:
                self.spool_budget.acknowledged(item.order)
            self.next_send = max(0, self.next_send - 1)
            client._counters["acked"] += item.calls
        self.last_progress = time.monotonic()
        self.resend_interval = client.ack_timeout

    def _on_reject(self, body: dict[str, Any]) -> None:
        client = self.client
        reason = body["reason"]
        client._counters[f"rejected_{reason}"] += 1
        if reason == "run_in_use":
            # nothing of ours was accepted: keep everything, resend (less and less often) until it is
            self.in_use_refused = True
            client._warnings.warn(
                "reject:run_in_use", "wandb sidecar at %s refuses run %s: another live trainer owns that run id "
                "(%s). This trainer keeps its data and resends it; it lands once the other trainer has ended. "
                "Two trainers at once need two run ids.", client.addr, client.run_id, body["detail"],
                level=logging.ERROR)
        elif reason in PERMANENT_REJECTIONS:
            client._warnings.warn(
                f"reject:{reason}", "wandb sidecar at %s refused run %s for good (%s: %s); nothing of this run will "
                "be delivered. Fix the run's init_kwargs / settings (or WANDB_* variables) and start again.",
                client.addr, client.run_id, reason, body["detail"], level=logging.ERROR)
            self._refused_for_good(reason)
        else:
            client._warnings.warn(f"reject:{reason}", "wandb sidecar rejected message %d: %s", body["rejected_seq"],
                              body["detail"])

    def _refused_for_good(self, reason: str) -> None:
        """Stop sending: count what will never be accepted, release every waiter with ok=False."""
        client = self.client
        client._refused = reason
        client._counters["undelivered"] += sum(p.calls for p in self.window) + self.outbox.discard()
        self.window.clear()
        self.window_bytes = 0
        self.next_send = 0
        for marker in self.markers:
            marker.ok = False
            marker.event.set()
        self.markers = []

    def _resolve_markers(self) -> None:
        """A flush marker is done once nothing queued before it is outstanding (acked, or dropped)."""
        if not self.markers:
            return
        if self.client._refused is not None:
            for marker in self.markers:
                marker.ok = False
                marker.event.set()
            self.markers = []
            return
        oldest = self.window[0].order if self.window else self.outbox.oldest_order()
        still = []
        for marker in self.markers:
            if oldest is None or oldest > marker.order:
                marker.event.set()
            else:
                still.append(marker)
        self.markers = still


def _row_may_follow(body: dict[str, Any]) -> bool:
    """Can another row follow this one in a ``metric_rows`` message? Not after a row without a step or with
    ``commit=False`` (see ``protocol.schema.MetricRows``)."""
    return body.get("step") is not None and body.get("commit", True) is not False


def _send_frames(sock: zmq.Socket, frames: Sequence[bytes]) -> None:
    """``send_multipart(frames, NOBLOCK)``, 4× cheaper for small frames. A multipart stays atomic: the
    high-water mark counts whole messages, and where a later frame cannot be queued ZeroMQ rolls the
    earlier ones back and raises ``zmq.Again``, so nothing is ever half sent."""
    send = sock.send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send(frame, _MORE if i < last else _LAST, copy=len(frame) < _COPY_BELOW)


def client_idle(io: _IOThread) -> bool:
    """Nothing left to send or to wait for (pending, backlog, window all empty)."""
    return not io.client._pending and io.spooling is None and not io.window and not len(io.outbox)


def _spool_into(path: str, run_id: str, order: int, result: dict[str, Any]) -> None:
    """Thread body: hardlink (or copy) a checkpoint into the spool; the I/O loop polls ``result``."""
    try:
        result["path"] = spool_checkpoint(path, run_id, order)
    except OSError as exc:
        result["error"] = exc
