"""One thread per trainer run: takes journaled messages in journal order and applies them to wandb.

wandb work is slow and sometimes fails; none of that reaches the receiver or the trainer. ``wandb.init``
failures are retried with exponential backoff while the messages wait (they are in the journal), except
the permanent ones (``TypeError``/``ValueError``: arguments wandb will never take), which end the run's
worker as ``failed`` (shown in status; the receiver reports it to the trainer). Delivery is tracked by journal
index (:mod:`sidecar.run_table`), one counter across the run's trainer incarnations.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from protocol import Kind, Message

from .journal_trim import JournalTrimmer, live_run_file
from .paths import FileGuard
from .wandb_log_tail import WandbLogTail
from .wandb_sink import SinkError, WandbSink

log = logging.getLogger("sidecar.worker")

_STOP = object()
_BACKLOG = object()  # queued as (_BACKLOG, first index): from here on, messages are read from the journal
_IDLE_TICK = 1.0  # seconds an idle worker waits before looking at its journal again
#: Seconds between delivery marks (status ``delivered``, the journal's delivered watermark): often enough
#: that the lag shown is the real one, rarely enough that a run keeping up does not write a file per message.
MARK_EVERY = 0.1
#: Exit code given to a run whose trainer stopped sending heartbeats.
LOST_EXIT_CODE = 255
#: Tries of a checkpoint or table upload before it is skipped (and counted as ``failed_<kind>``). A retry
#: never logs a second artifact version: the sink skips an upload wandb already took for that message, and
#: what follows an upload (removing the spool link) logs its failure instead of raising.
ARTIFACT_ATTEMPTS = 3
_ARTIFACT_KINDS = frozenset({Kind.CHECKPOINT, Kind.VAL_DATA, Kind.PRED_BATCH})


def _weight(msg: Message) -> int:
    return len(msg.body["rows"]) if msg.kind is Kind.METRIC_ROWS else 1


class RunWorker(threading.Thread):
    def __init__(
        self,
        run_id: str,
        file_guard: FileGuard,
        on_delivered: Callable[[str, int], None],
        on_finished: Callable[[str, int, int], None],
        on_incomplete: Callable[[str], None],
        delivered: int = 0,
        retry_max: float = 60.0,
        state_dir: Path | None = None,
        start: Message | None = None,
        replay: Callable[[], Iterable[Message]] | None = None,
        trimmer: JournalTrimmer | None = None,
        delivery_gate: threading.Event | None = None,
        max_queue: int = 10_000,
        journaled: Callable[[int, int], Iterable[Message]] | None = None,
    ) -> None:
        super().__init__(name=f"run-{run_id}", daemon=True)
        self.run_id = run_id
        self.sink = WandbSink(run_id, file_guard, state_dir)
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()  # C-implemented: cheap for the receiver
        self.delivered = delivered  # highest journal index applied to wandb
        self.on_delivered = on_delivered
        self.on_finished = on_finished
        self.on_incomplete = on_incomplete
        self.retry_max = retry_max
        self.last_error = ""
        self.state = "starting"  # starting | running | retrying | failed | incomplete | finished | paused
        self.finished_with: int | None = None
        self._stopping = threading.Event()
        self._end_lock = threading.Lock()
        self.wandb_run_finished = False  # just finished (by the trainer, as lost, or at SIGTERM)
        self.thread_done = False  # the thread is done; offer() refuses
        self._start_msg: Message | None = start  # the run start wandb.init uses (a resume after a restart)
        self._replay = replay  # journaled messages to apply before the queue (recovery, incomplete runs)
        #: Messages in memory are at most ``max_queue`` (a ``metric_rows`` message counts its rows: those are
        #: what hold memory); past it the worker reads them from the journal (``journaled(after, upto)``), so
        #: a burst or a slow wandb costs disk, never memory or acks. Each count is written by one thread.
        self.max_queue = max_queue
        self.offered = 0  # by the receiver
        self.taken = 0  # by this worker
        self._journaled = journaled
        self.backlog_upto = 0  # while non-zero: offered messages up to this index wait in the journal
        self.trimmer = trimmer  # compacts the open run's journal up to what wandb holds
        self._log_tail: WandbLogTail | None = None
        self._noted = 0
        self._last_mark = 0.0
        self._mark_due = False  # delivered more than the last mark says
        self._gate = delivery_gate  # set while delivery may run (the receiver clears it while it is busy)
        #: What each kind does in wandb (run start and finish are the worker's own steps, see _apply).
        self._apply_kind: dict[Kind, Callable[[Message], None]] = {
            Kind.METRICS: self.sink.metrics,
            Kind.METRIC_ROWS: lambda msg: self.sink.metric_rows(msg, msg.index <= self.delivered),
            Kind.CHECKPOINT: self.sink.checkpoint,
            Kind.VAL_DATA: self.sink.val_data,
            Kind.PRED_BATCH: self.sink.pred_batch,
            Kind.IMAGE: self.sink.image,
            Kind.CONFIG: self.sink.config,
        }

    def submit(self, msg: Message) -> None:
        self.offered += _weight(msg)
        self.queue.put(msg)

    def queued(self) -> int:
        """Messages in the queue (rows of ``metric_rows`` messages counted one by one)."""
        return max(0, self.offered - self.taken)

    def offer(self, msg: Message) -> bool:
        """Take ``msg`` (journaled already) unless this worker has ended (the server then starts a new one
        for the run): into the queue, or, while the queue is full or a backlog is being read, as a
        journal index to read later."""
        with self._end_lock:
            if self.thread_done:
                return False
            if self.backlog_upto:
                self.backlog_upto = msg.index
            elif self._journaled is not None and self.offered - self.taken >= self.max_queue:
                self.backlog_upto = msg.index
                self.queue.put((_BACKLOG, msg.index))
            else:
                self.offered += _weight(msg)
                self.queue.put(msg)
            return True

    def backlog(self) -> int:
        """Messages of this run waiting in the journal, not in the queue (0 or more; an upper bound)."""
        return self.backlog_upto and max(0, self.backlog_upto - self.delivered)

    def stop(self, exit_code: int | None = None) -> None:
        """Finish after what is queued; ``exit_code`` None means the trainer did not finish (SIGTERM).

        On SIGTERM a run still waiting for ``wandb.init`` gives up at once: its messages stay in the
        journal for the next start."""
        if exit_code is None:
            self._stopping.set()
        self.queue.put((_STOP, exit_code))

    # ------------------------------------------------------------------------------------ loop

    def run(self) -> None:
        if self._replay is not None:
            for msg in self._replay():  # drained at SIGTERM too, as the queue is: it was queued first
                self._apply_with_retry(msg)
                self._note_for_trim()
                if time.monotonic() - self._last_mark > MARK_EVERY:
                    self._mark_delivered()
            self._replay = None
        while True:
            try:  # a delivery mark still to write: wait at most until it is due
                item = self.queue.get(timeout=MARK_EVERY if self._mark_due else _IDLE_TICK)
            except queue.Empty:  # idle: wandb may have written what it held since, so the journal can shrink
                if self._mark_due:
                    self._mark_delivered()  # trims too
                else:
                    self._maybe_trim(self._delivery_mark())
                continue
            if isinstance(item, tuple) and item[0] is _STOP:
                self._finish(item[1])
            elif isinstance(item, tuple) and item[0] is _BACKLOG:
                self._read_backlog(item[1])
            else:
                assert isinstance(item, Message)
                self.taken += _weight(item)
                self._wait_for_ingest()
                self._apply_with_retry(item)
                self._note_for_trim()
            if self.wandb_run_finished:
                with self._end_lock:  # the server offers nothing new while we decide
                    if self.queue.empty():  # at SIGTERM the stop is the last thing queued
                        self.thread_done = True
                        return
                self.wandb_run_finished = False  # the trainer came back while its run was finishing: resume it
            self._mark_due = True
            if time.monotonic() - self._last_mark > MARK_EVERY:
                self._mark_delivered()

    def _read_backlog(self, first: int) -> None:
        """Apply the journaled messages from index ``first`` on, reading more as the receiver journals
        more, until none is left; then the receiver queues again (decided under ``_end_lock``)."""
        assert self._journaled is not None
        after = first - 1
        while True:
            with self._end_lock:
                upto = self.backlog_upto
                if upto <= after:
                    self.backlog_upto = 0
                    return
            for msg in self._journaled(after, upto):
                self.sink.count("read_from_journal")
                self._wait_for_ingest()
                self._apply_with_retry(msg)
                self._note_for_trim()
                if time.monotonic() - self._last_mark > MARK_EVERY:
                    self._mark_delivered()
            after = upto

    def _wait_for_ingest(self) -> None:
        """Ingest first (``SidecarServer.delivery_gate``): wait, bounded, while the receiver is in a burst.
        Not before ``wandb.init``: it mostly waits for wandb's service and git, and every moment it waits
        before starting adds to the run's lag (a sweep's trainers all start at once)."""
        if self._gate is not None and not self._gate.is_set() and self.sink.running:
            self._gate.wait(1.0)

    def _apply_with_retry(self, msg: Message) -> None:
        """``wandb.init`` is retried until it works (or SIGTERM); an artifact (checkpoint, table) a few
        times; metrics not (a failing ``log`` is a bad value, not a transient fault)."""
        delay, attempts = 1.0, 0
        while True:
            try:
                self._apply(msg)
                if self.state == "retrying":
                    self.state = "running"
                return
            except Exception as exc:  # wandb raises anything; a failed message must not kill the run
                attempts += 1
                self.last_error = f"{msg.kind} seq {msg.seq}: {type(exc).__name__}: {exc}"
                if isinstance(exc, SinkError) and isinstance(exc.__cause__, (TypeError, ValueError)):
                    self.state = "failed"  # wandb will never take these arguments: retrying cannot help
                    log.error("run %s: %s; permanent, not retried (the trainer is told)", self.run_id,
                              self.last_error)
                    return
                give_up = msg.kind is not Kind.RUN_START and (
                    msg.kind not in _ARTIFACT_KINDS or attempts >= ARTIFACT_ATTEMPTS or self._stopping.is_set())
                if give_up:
                    log.error("run %s: %s (skipped after %d attempt(s))", self.run_id, self.last_error, attempts)
                    self.sink.count(f"failed_{msg.kind}")
                    return
                self.state = "retrying"
                if self._stopping.is_set():  # only a run start gets here while stopping
                    log.error("run %s: %s; stopping: it stays in the journal for the next start",
                              self.run_id, self.last_error)
                    with self._end_lock:
                        self.thread_done = True
                    raise SystemExit from exc
                log.error("run %s: %s; retrying in %.0f s", self.run_id, self.last_error, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, self.retry_max)

    def _apply(self, msg: Message) -> None:
        kind = msg.kind
        if self.state == "failed":
            self.sink.count("skipped_init_failed")
            self.delivered = max(self.delivered, msg.index)
            return
        if kind is Kind.RUN_START:
            self._start_msg = msg
        if not self.sink.running:  # first message, or after a finish the trainer came back from
            if self._start_msg is None:
                raise RuntimeError("message before run start")
            self.sink.start(self._start_msg)
            self.state = "running"
            self.wandb_run_finished = False  # resumed: a finish read from a backlog is not the last word
        if kind is Kind.RUN_START:
            return
        if kind is not Kind.RUN_FINISH and self._already_in_wandb(msg):
            if kind is Kind.VAL_DATA:
                self.sink.val_data(msg, publish=False)  # prediction tables still need it in memory
            elif kind is Kind.CHECKPOINT:
                self.sink.release_replayed(msg)
            self.sink.count("replay_skipped")
            self.delivered = max(self.delivered, msg.index)
            return
        if kind is Kind.RUN_FINISH:
            self.delivered = msg.index
            self._finish(msg.body["exit_code"])
            return
        self._apply_kind[kind](msg)
        self.delivered = msg.index

    def _already_in_wandb(self, msg: Message) -> bool:
        """After a restart: wandb's own files decide where they can, the delivered mark elsewhere."""
        known = self.sink.already_logged(msg)
        return msg.index <= self.delivered if known is None else known

    def _delivery_mark(self) -> int:
        """Every journal index up to this one was handed to wandb (the open row's messages were not yet)."""
        held = self.sink.undelivered_from()
        return held - 1 if held else self.delivered

    def _mark_delivered(self) -> None:
        self._mark_due = False
        mark = self._delivery_mark()
        self._last_mark = time.monotonic()
        self.on_delivered(self.run_id, mark)
        self._maybe_trim(mark)

    def _note_for_trim(self) -> None:
        if self.trimmer is not None and self.delivered - self._noted >= 100:
            self._noted = self.delivered
            self.trimmer.note(self._delivery_mark(), self.sink.last_step_logged)

    def _maybe_trim(self, mark: int) -> None:
        run = self.sink.run
        if self.trimmer is None or run is None:
            return
        if self._log_tail is None or self._log_tail.path != live_run_file(run.dir, self.run_id):
            self._log_tail = WandbLogTail(live_run_file(run.dir, self.run_id))
        if self.sink.spool_links:
            self.sink.release_spool_links(self._log_tail.max_step())
        self.trimmer.maybe_trim(mark, self.sink.last_step_logged, run.offline, self._log_tail.max_step)

    def _finish(self, exit_code: int | None) -> None:
        missing = ""
        try:
            if self.sink.running:
                if exit_code == LOST_EXIT_CODE:
                    self.sink.mark_trainer_lost()
                missing = self.sink.finish(0 if exit_code is None else exit_code)
        except Exception as exc:
            self.last_error = f"finish: {type(exc).__name__}: {exc}"
            log.error("run %s: %s", self.run_id, self.last_error)
        self.finished_with = exit_code
        self.wandb_run_finished = True
        self.on_delivered(self.run_id, self.delivered)
        if missing:
            self.state = "incomplete"
            self.last_error = f"{missing} (WANDB_DIR full?); the journal keeps the run to replay it"
            log.error("run %s: %s", self.run_id, self.last_error)
            self.on_incomplete(self.run_id)
            return
        self.state = "finished" if exit_code is not None else "paused"
        if exit_code is not None:
            self.on_finished(self.run_id, exit_code, self.delivered)
