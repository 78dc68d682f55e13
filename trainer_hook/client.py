"""``SidecarClient``: the trainer's side of the pipe. The caller only appends to a deque; one I/O thread
does everything else (packing, spooling checkpoints, the ZeroMQ socket, acknowledgements, resends).

Memory is bounded in three places, each with a named policy (all counted in :meth:`stats`):

- ``pending`` (caller → I/O thread hand-off, ``max_pending`` items): when full, new metrics are
  refused (``dropped_queue_full``). Kinds in ``NEVER_DROPPED`` are always accepted.
- ``backlog`` (packed, not yet sent: the sidecar is down or slow): ``max_backlog_bytes`` in memory, then
  a spill file of up to ``max_spill_bytes`` in ``spill_dir`` (``spilled``); when both are full the
  oldest droppable message (metrics, prediction batches) is dropped (``dropped_backlog_full``). See
  :mod:`trainer_hook.outbox`. ``spill_dir=None`` keeps everything in memory.
- ``window`` (sent, awaiting acknowledgement, ``max_inflight`` messages): nothing is dropped here; it
  is resent after ``ack_timeout`` without progress (go-back-N), and the sidecar drops duplicates by
  sequence number, so each message lands in the wandb run exactly once.
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
    Kind,
    ProtocolError,
    decode,
    encode_body,
    encode_header,
)

from protocol.curve import apply_client_keys, load_client_keys

from .outbox import Outbox, Packed
from .spool import spool_checkpoint

log = logging.getLogger("trainer_hook")

_ID_ALPHABET = string.ascii_lowercase + string.digits
_FLUSH = "flush"  # pseudo-kind of a flush marker in ``pending``
_BATCH_BYTES = 4 * 1024 * 1024


_DEFAULT_SPILL: Any = object()


def _default_spill_dir() -> str:
    return os.environ.get("WANDB_SIDECAR_SPILL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wandb-sidecar", "spill")


def generate_run_id(length: int = 8) -> str:
    """A wandb-style run id (lowercase letters and digits)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


class _Marker:
    """A flush point: done once everything queued before it is acknowledged (or dropped by policy)."""

    __slots__ = ("lid", "event")

    def __init__(self) -> None:
        self.lid = -1
        self.event = threading.Event()


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

    ``init_kwargs`` are ``wandb.init``'s arguments, applied in the sidecar. ``init_kwargs["id"]`` (or
    ``run_id``) fixes the wandb run id; otherwise a fresh one is made. ``curve_server_key`` (the
    sidecar's public key file) and ``curve_client_key`` (this client's secret key file) turn on CurveZMQ;
    by default they come from ``WANDB_SIDECAR_SERVER_KEY`` / ``WANDB_SIDECAR_CLIENT_KEY``.
    ``code`` (``{"root": dir, "name": artifact name or None, "program": script path or None}``) asks the
    sidecar for ``run.log_code`` of that source tree, as mmengine's ``WandbVisBackend`` does.
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
        max_backlog_bytes: int = 64 * 1024 * 1024,
        spill_dir: str | os.PathLike[str] | None = _DEFAULT_SPILL,
        max_spill_bytes: int = 1024 * 1024 * 1024,
        max_inflight: int = 8192,
        ack_timeout: float = 2.0,
        heartbeat_interval: float = 2.0,
        spool_checkpoints: bool = True,
        finish_at_exit_timeout: float = 30.0,
        curve_server_key: str | None = None,
        curve_client_key: str | None = None,
    ) -> None:
        init = dict(init_kwargs or {})
        self.addr = addr
        self.run_id = str(run_id or init.get("id") or generate_run_id())
        init["id"] = self.run_id
        #: This client's random token: the sidecar counts sequence numbers per (run id, incarnation), so
        #: a resumed training (same run id, new process) is a new sequence, not a stream of duplicates.
        self.incarnation = secrets.token_hex(8)
        self.max_pending = max_pending
        self.max_backlog_bytes = max_backlog_bytes
        self.spill_dir = _default_spill_dir() if spill_dir is _DEFAULT_SPILL else spill_dir
        self.max_spill_bytes = max_spill_bytes
        self.max_inflight = max_inflight
        self.ack_timeout = ack_timeout
        self.heartbeat_interval = heartbeat_interval
        self.spool_checkpoints = spool_checkpoints
        self.finish_at_exit_timeout = finish_at_exit_timeout
        # CurveZMQ key files (default: named by the environment); a bad file is a configuration error
        self._curve = load_client_keys(curve_server_key, curve_client_key)

        self._inert = False
        self._finished = False
        self._pending: collections.deque[tuple] = collections.deque()
        self._counters: collections.Counter[str] = collections.Counter()
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._acked = 0
        self._delivered: int | None = None

        start: dict[str, Any] = {"init_kwargs": init, "client": {"pid": os.getpid(), "host": os.uname().nodename}}
        if config:
            start["config"] = dict(config)
        if define_metrics:
            start["define_metrics"] = [dict(m) for m in define_metrics]
        if files:
            start["files"] = [dict(f) for f in files]
        if code:
            start["code"] = dict(code)
        self._pending.append((Kind.RUN_START, start, time.time()))

        self._io = _IOThread(self)
        self._io.start()
        _clients.add(self)
        atexit.register(self._finish_at_exit)

    # ------------------------------------------------------------------------------- hot path

    def log(self, data: Mapping[str, Any], step: int | None = None, commit: bool = True) -> bool:
        """Queue metrics for ``run.log(data, step=step)``. Returns False (and counts why) if refused."""
        if self._inert or self._finished:
            self._counters["dropped_inactive"] += 1
            return False
        if len(self._pending) >= self.max_pending:
            self._counters["dropped_queue_full"] += 1
            return False
        body = {"data": dict(data), "step": step} if commit else {"data": dict(data), "step": step, "commit": False}
        self._pending.append((Kind.METRICS, body, time.time()))
        return True

    def log_checkpoint(
        self,
        path: str | os.PathLike[str],
        aliases: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        artifact_name: str | None = None,
    ) -> bool:
        """Announce a checkpoint file for a ``run_{id}_model`` artifact (type ``model``).

        The file is hardlinked into a spool on the I/O thread, so deleting it right after this call is
        safe. Never dropped.
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
            self._counters["dropped_inactive"] += 1
            return False
        if kind not in NEVER_DROPPED and len(self._pending) >= self.max_pending:
            self._counters["dropped_queue_full"] += 1
            return False
        self._pending.append((kind, body, time.time()))
        return True

    # ------------------------------------------------------------------------------- waiting

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is acknowledged by the sidecar (journaled there)."""
        if self._inert or not self._io.is_alive():
            return False
        marker = _Marker()
        self._pending.append((_FLUSH, marker, 0.0))
        return marker.event.wait(timeout)

    def finish(self, exit_code: int = 0, timeout: float = 30.0) -> bool:
        """Send the run's end and wait for the sidecar to acknowledge everything.

        Returns True when the sidecar has all of it; False on timeout (what was not delivered is counted
        in :meth:`stats` as ``undelivered``). The caller goes on either way.
        """
        if self._inert or self._finished:
            return False
        self._pending.append((Kind.RUN_FINISH, {"exit_code": int(exit_code)}, time.time()))
        self._finished = True
        ok = self.flush(timeout)
        self._stop.set()
        self._io.join(timeout=5)
        return ok

    def _finish_at_exit(self) -> None:
        if not self._inert and not self._finished:
            self.finish(exit_code=1 if _uncaught_exception else 0, timeout=self.finish_at_exit_timeout)

    # ------------------------------------------------------------------------------- reporting

    def stats(self) -> dict[str, int]:
        """Counters: sent, acked, resent, dropped_* by reason, rejected_* by the sidecar's reason..."""
        out = dict(self._counters)
        out["pending"] = len(self._pending)
        out["backlog"] = len(self._io.outbox)
        out["backlog_bytes"] = self._io.outbox.memory_bytes
        out["spill_bytes"] = self._io.outbox.spill_bytes
        out["unacked"] = len(self._io.window)
        out["acked_seq"] = self._acked
        if self._delivered is not None:
            out["delivered_seq"] = self._delivered  # the sidecar's word on what reached wandb
        return out

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)


class _IOThread(threading.Thread):
    """Owns the ZeroMQ socket (sockets are not thread-safe). Pack, spool, send, resend, read acks."""

    def __init__(self, client: SidecarClient) -> None:
        super().__init__(name=f"wandb-sidecar-client-{client.run_id}", daemon=True)
        self.c = client
        spill = None
        if client.spill_dir is not None:
            spill = Path(client.spill_dir) / f"{client.run_id}-{os.getpid()}.spill"
        self.outbox = Outbox(client.max_backlog_bytes, spill, client.max_spill_bytes, client._counters)
        self.window: collections.deque[Packed] = collections.deque()
        self.next_send = 0  # index in window of the first message not yet sent (since the last go-back)
        self.seq = 0
        self.lid = 0
        self.markers: list[_Marker] = []
        self.last_progress = time.monotonic()
        self.last_heartbeat = 0.0

    # -- socket

    def _connect(self) -> zmq.Socket:
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing into a connection that is not up: we keep it
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        apply_client_keys(sock, self.c._curve)
        sock.connect(self.c.addr)
        return sock

    def run(self) -> None:
        sock = self._connect()
        try:
            while True:
                self._pack_pending()
                self._fill_window()
                self._send(sock)
                self._heartbeat(sock)
                self._read_replies(sock, timeout_ms=1 if self.c._pending else 20)
                self._resolve_markers()
                if self.c._stop.is_set() and not self.c._pending:
                    break
        except Exception:  # never let an I/O bug surface in training; say it once, loudly
            log.exception("wandb sidecar client I/O thread failed; logging to the sidecar stops")
            self.c._counters["io_thread_failed"] += 1
        finally:
            undelivered = len(self.window) + len(self.outbox)
            if undelivered:
                self.c._counters["undelivered"] += undelivered
            self.outbox.close()
            sock.close(linger=0)
            self.ctx.term()

    # -- stages

    def _pack_pending(self) -> None:
        pending = self.c._pending
        while pending:
            kind, body, t = pending.popleft()
            if kind is _FLUSH:
                body.lid = self.lid
                self.markers.append(body)
                continue
            try:
                if kind is Kind.CHECKPOINT:
                    body = self._spool(body)
                frames = encode_body(body)
            except (TypeError, ValueError, OverflowError) as exc:
                self.c._counters["dropped_unencodable"] += 1
                self.c._warn_once(f"pack:{kind}", "wandb sidecar: cannot encode a %s message (%s); dropped", kind, exc)
                continue
            self.lid += 1
            self.outbox.put(Packed(kind, frames, t, sum(len(f) for f in frames), self.lid))

    def _spool(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self.c.spool_checkpoints:
            return body
        try:
            spooled = spool_checkpoint(body["path"], self.c.run_id, self.lid + 1)
        except OSError as exc:
            self.c._counters["checkpoint_spool_failed"] += 1
            self.c._warn_once("spool", "wandb sidecar: cannot spool checkpoint %s (%s)", body["path"], exc)
            return body
        return {**body, "path": spooled, "source_path": body["path"], "spooled": True}

    def _fill_window(self) -> None:
        while len(self.window) < self.c.max_inflight:
            item = self.outbox.pop()
            if item is None:
                return
            self.seq += 1
            item.seq = self.seq
            item.frames.insert(0, encode_header(item.kind, self.c.run_id, item.seq, item.time, len(item.frames),
                                                     self.c.incarnation))
            if not self.window:
                self.last_progress = time.monotonic()
            self.window.append(item)

    def _send(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        if self.window and self.next_send > 0 and now - self.last_progress > self.c.ack_timeout:
            self.c._counters["resent"] += self.next_send
            self.next_send = 0  # go back N: the sidecar drops what it already has
            self.last_progress = now
        while self.next_send < len(self.window):
            # what is ready goes out as one multipart of up to MAX_BATCH messages (see protocol.split)
            batch: list[bytes] = []
            end, size = self.next_send, 0
            while end < len(self.window) and end - self.next_send < MAX_BATCH and size < _BATCH_BYTES:
                batch += self.window[end].frames
                size += self.window[end].nbytes
                end += 1
            try:
                sock.send_multipart(batch, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return  # not connected, or the sidecar is slow: keep it, try again later
            self.c._counters["sent"] += end - self.next_send
            self.next_send = end

    def _heartbeat(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        if now - self.last_heartbeat < self.c.heartbeat_interval:
            return
        self.last_heartbeat = now
        try:
            sock.send_multipart([encode_header(Kind.HEARTBEAT, self.c.run_id, 0, time.time(), 1,
                                                             self.c.incarnation), *encode_body({})],
                                flags=zmq.NOBLOCK)
        except zmq.Again:
            self.c._counters["heartbeat_unsent"] += 1

    def _read_replies(self, sock: zmq.Socket, timeout_ms: int) -> None:
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frames)
            except ProtocolError as exc:
                self.c._counters["bad_reply"] += 1
                self.c._warn_once("bad_reply", "wandb sidecar sent a bad reply: %s", exc)
                continue
            if msg.kind is Kind.ACK:
                self._on_ack(msg.seq, msg.body.get("delivered"))
            elif msg.kind is Kind.REJECT:
                reason = msg.body["reason"]
                self.c._counters[f"rejected_{reason}"] += 1
                self.c._warn_once(f"reject:{reason}", "wandb sidecar rejected message %d: %s",
                                  msg.body["rejected_seq"], msg.body["detail"])

    def _on_ack(self, seq: int, delivered: int | None) -> None:
        if delivered is not None:
            self.c._delivered = delivered
        if seq <= self.c._acked:
            return
        self.c._acked = min(seq, self.seq)
        while self.window and self.window[0].seq <= self.c._acked:
            self.window.popleft()
            self.next_send = max(0, self.next_send - 1)
            self.c._counters["acked"] += 1
        self.last_progress = time.monotonic()

    def _resolve_markers(self) -> None:
        """A flush marker is done once nothing queued before it is outstanding (acked, or dropped)."""
        if not self.markers:
            return
        oldest = self.window[0].lid if self.window else self.outbox.oldest_lid()
        still = []
        for marker in self.markers:
            if oldest is None or oldest > marker.lid:
                marker.event.set()
            else:
                still.append(marker)
        self.markers = still
