"""The only place that talks to wandb: one ``WandbSink`` per trainer run, driven by its ``RunWorker``.

Metrics of the same step are coalesced into one ``run.log`` call (:mod:`sidecar.step_rows`). Images
(``Kind.IMAGE``) join rows the same way; several images of one name in one step become one list.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import wandb
from msgspec import UNSET

from protocol import Counters, Kind, Message
from protocol.limits import SPOOL_DIR_NAME

from .journal_trim import live_run_file
from .media import MediaBuilder
from .paths import FileGuard
from .step_rows import Row, StepRows
from .wandb_files import Persisted, persisted, wandb_root
from .wandb_log_tail import WandbLogTail

log = logging.getLogger("sidecar.wandb")
#: Checkpoints above this size get a log line before the upload starts, not only after it.
LARGE_FILE_BYTES = 100_000_000
#: Seconds a finished offline run's transaction log may take to get its exit record (its last rows and the
#: exit are written by wandb's service after ``run.finish`` returns); past it, the rows it holds are judged.
FINISH_WRITE_S = 10.0


def _written_step(run_file: Path, timeout: float = FINISH_WRITE_S) -> int:
    """The highest step in a finished run's transaction log, once wandb has written its exit record
    (``run.finish`` returns before wandb's service has written the last rows: seen, 3 of 100 steps)."""
    tail = WandbLogTail(run_file)
    deadline = time.monotonic() + timeout
    while True:
        step = tail.max_step()
        if tail.exited or time.monotonic() > deadline:
            return step
        time.sleep(0.02)


class SinkError(RuntimeError):
    """A wandb call failed in a way worth retrying (init) or reporting (artifact)."""


class WandbSink:
    def __init__(self, run_id: str, file_guard: FileGuard, state_dir: Path | None = None) -> None:
        self.run_id = run_id
        self.guard = file_guard
        self.state_dir = state_dir
        self.persisted = Persisted()  # what wandb's files of earlier run directories hold (resume)
        self._init_dir: str | None = None
        self.run: Any = None
        self.rows = StepRows()
        self.counters = Counters()
        self.media: MediaBuilder | None = None
        self._handed_index = -1  # the message whose artifact wandb took last: a retry of it must not log it again
        #: offline: spool links of uploaded checkpoints, freed once wandb's files show a step at least this
        #: high (the artifact was handed to wandb before any such row, and wandb writes in order)
        self.spool_links: list[tuple[int, Path]] = []

    @property
    def running(self) -> bool:
        """A wandb run is open (started, not finished)."""
        return self.run is not None

    def count(self, key: str, n: int = 1) -> None:
        """Count an event in this run's status counters (``failed_<kind>``, ``replay_skipped`` …)."""
        self.counters.add(key, n)

    def all_counters(self) -> dict[str, int]:
        """Sink and media counters together, for status."""
        return {**self.counters, **(self.media.counters if self.media is not None else {})}

    @property
    def last_step_logged(self) -> int:
        """Highest explicit step handed to ``run.log`` (-1: none)."""
        return self.rows.last_step_logged

    def mark_trainer_lost(self) -> None:
        """Say in the run's summary that its trainer stopped answering (before finishing it)."""
        if self.run is not None:
            self.run.summary["sidecar/trainer_lost"] = True

    # ------------------------------------------------------------------------------- run life

    def start(self, msg: Message) -> None:
        """``wandb.init`` (resuming the same id if it exists), define_metric, config, saved files."""
        body = msg.body
        init = dict(body["init_kwargs"])
        init["id"] = self.run_id
        if init.get("mode") == "online" and os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
            init["mode"] = "offline"  # the operator's offline sidecar stays offline whatever a trainer asks
            self.count("mode_kept_offline")
        settings = init.pop("settings", None)
        settings = wandb.Settings(**settings) if isinstance(settings, dict) else wandb.Settings()
        settings.console = "off"
        init.setdefault("resume", "allow")
        init["reinit"] = "create_new"
        if body.get("config"):
            init["config"] = {**(init.get("config") or {}), **body["config"]}
        try:
            self.run = wandb.init(settings=settings, **init)
        except Exception as exc:
            raise SinkError(f"wandb.init failed: {type(exc).__name__}: {exc}") from exc
        log.info("run %s: wandb run started (project %s, %s, files in %s)", self.run_id, self.run.project,
                 self.run.url or "offline", self.run.dir, extra={"run": self.run_id})
        self._init_dir = init.get("dir")
        self._find_persisted_steps(self._init_dir)
        # From here on nothing raises: a retried run start finds the run and would skip what follows.
        self.media = MediaBuilder(self.run, self.guard)
        for metric in body.get("define_metrics", []):
            self._best_effort("define_metric", self.run.define_metric, **metric)
        for f in body.get("files", []):
            self._best_effort("file", self._save_file, f)
        if body.get("code"):
            self._log_code(body["code"])

    def _best_effort(self, what: str, call: Any, *args: Any, **kwargs: Any) -> None:
        """One step of the run start; a failure is logged and counted (``failed_<what>``), not raised."""
        try:
            call(*args, **kwargs)
        except Exception as exc:  # wandb raises anything (ValueError for a base_path that is no parent...)
            self.count(f"failed_{what}")
            log.error("run %s: %s %r failed: %s: %s", self.run_id, what, args or kwargs, type(exc).__name__, exc)

    def _find_persisted_steps(self, init_dir: str | None) -> None:
        """Offline, a resumed run starts from step 0 in a new directory: learn from wandb's files of the
        earlier directories which steps are already there, so a replay after a crash repeats none.
        Online, wandb itself drops steps below the resumed run's current step."""
        if not self.run.offline or self.state_dir is None:
            return
        live = Path(self.run.dir).parent.name
        self.persisted = persisted(wandb_root(init_dir), self.run_id,
                                   self.state_dir / f"{self.run_id}.wandb-files.json", exclude=live)
        if self.persisted.max_step >= 0 or self.persisted.artifacts:
            log.info("run %s: resumed; wandb's files already hold steps up to %d and %d artifact(s)",
                     self.run_id, self.persisted.max_step, len(self.persisted.artifacts))

    def already_logged(self, msg: Message) -> bool | None:
        """Is this message's data in wandb's files already? None when that cannot be told from them."""
        body = msg.body
        if msg.kind is Kind.METRIC_ROWS:
            return False  # decided row by row (metric_rows)
        if msg.kind in (Kind.METRICS, Kind.IMAGE):
            return None if body.get("step") is None else body["step"] <= self.persisted.max_step
        if msg.kind is Kind.CHECKPOINT:
            name = body.get("artifact_name") or f"run_{self.run_id}_model"
            return self.persisted.has_artifact(name, list(body.get("aliases") or ["latest"]))
        if msg.kind is Kind.PRED_BATCH:
            return self.persisted.has_artifact(f"run_{self.run_id}_pred", list(body.get("aliases") or [body["tag"]]))
        if msg.kind is Kind.VAL_DATA:
            name = body.get("artifact_name") or "val"
            return any(n == name for n, _ in self.persisted.artifacts)
        return None

    def _save_file(self, f: dict[str, str]) -> None:
        path = self.guard.check(f.get("path", ""))
        if path is None:
            self.count("file_refused")
            log.error("run %s: file to save %r is outside the allowed roots; not saved", self.run_id, f.get("path"))
            return
        if not path.is_file():
            self.count("file_missing")
            log.warning("run %s: file to save %s is missing", self.run_id, path)
            return
        self.run.save(str(path), base_path=f.get("base_path") or str(path.parent), policy="now")

    def _log_code(self, code: dict[str, Any]) -> None:
        """``run.log_code`` of the trainer's source tree, as mmengine's ``WandbVisBackend.add_config`` does.

        Only files under the allowed roots are read (the root and every file, symlinks resolved). The
        default artifact name is wandb's own, from the trainer's program rather than the sidecar's."""
        root = self.guard.check(code.get("root") or "")
        if root is None or not root.is_dir():
            self.count("code_refused" if root is None else "code_missing")
            log.error("run %s: code root %r is outside the allowed roots or not a directory; code not logged",
                      self.run_id, code.get("root"))
            return
        name = code.get("name") or wandb.util.make_artifact_name_safe(
            f"source-{self.run.project}-{code.get('program')}")  # wandb's default, "None" included
        if any(n == name for n, _ in self.persisted.artifacts):
            return  # resumed: already logged by the first run directory

        def include(path: str, root: str) -> bool:  # wandb's default selection, within the allowed roots
            file = os.path.basename(path)
            wanted = file.endswith(".py") or file.startswith("Dockerfile") or file == "requirements.txt"
            return wanted and self.guard.check(path) is not None

        try:
            self.run.log_code(str(root), name=name, include_fn=include)
        except Exception as exc:  # an unreadable tree costs the code artifact, not the run
            self.count("failed_code")
            log.error("run %s: log_code of %s failed: %s: %s", self.run_id, root, type(exc).__name__, exc)

    def config(self, msg: Message) -> None:
        """A config update after the run start (mmengine's ``add_config`` after the first log)."""
        self.run.config.update(msg.body["config"], allow_val_change=True)

    def finish(self, exit_code: int) -> str:
        """Finish the wandb run; then, offline, read its transaction log back. Returns '' when it holds
        every step logged, else what is missing: wandb loses rows silently when its disk is full (seen
        here: init, log and finish all succeed on a full WANDB_DIR). Read in-process (~14 ms for 2,000
        steps): ``wandb leet inspect`` took 3-4 s a run when a sweep's 16 runs finished together."""
        self.flush_metrics()
        if self.run is None:
            return ""
        offline = self.run.offline
        run_file = live_run_file(self.run.dir, self.run_id)
        self.run.finish(exit_code=exit_code)
        self.run = None
        last = self.rows.last_step_logged
        if not offline or self.state_dir is None or last < 0:
            return ""
        on_disk = _written_step(run_file)
        if on_disk < last:
            return f"wandb's files end at step {on_disk} but step {last} was logged"  # links kept: replay
        self.release_spool_links()
        return ""

    # ------------------------------------------------------------------------------- metrics

    def metrics(self, msg: Message) -> None:
        body = msg.body
        self._log_rows(self.rows.add(body["data"], body.get("step"), body.get("commit", True), msg.index))

    def metric_rows(self, msg: Message, delivered: bool) -> None:
        """Each row as its own ``metrics`` message would be: a row whose step wandb's files hold already is
        skipped, and a row without a step (only ever the last) when the message was delivered (``delivered``:
        its journal index is at or below the worker's delivered mark, after a restart)."""
        persisted, rows = self.persisted.max_step, self.rows
        for row in msg.body["rows"]:
            step = row.step
            if step is None or step is UNSET:
                if delivered:
                    self.count("replay_skipped")
                    continue
                step = None
            elif step <= persisted:
                self.count("replay_skipped")
                continue
            commit = row.commit
            self._log_rows(rows.add(row.data, step, commit is not False, msg.index))

    def image(self, msg: Message) -> None:
        """An image joins its step's row like metrics (``wandb.Image`` encodes it when the row is logged)."""
        body = msg.body
        image = body["image"]
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        name, step, commit = body["name"], body.get("step"), body.get("commit", True)
        value: Any = wandb.Image(image)
        held = self.rows.held(name, step, commit)
        if isinstance(held, (wandb.Image, list)):  # several images of one name in one step: keep them all
            value = [*(held if isinstance(held, list) else [held]), value]
        self._log_rows(self.rows.add({name: value}, step, commit, msg.index))
        self.count("images")

    def _log_rows(self, rows: list[Row]) -> None:
        for row in rows:
            if row.late:
                self.count("late_step")
                log.warning("run %s: step %d arrived after step %d was logged; wandb drops it",
                            self.run_id, row.step, self.rows.step)
                self.run.log(row.data, step=row.step)
                continue
            self.run.log(row.data, step=row.step, commit=row.commit)
            self.count("log_calls")

    def flush_metrics(self) -> None:
        """Log the open row (the run is ending)."""
        self._log_rows(self.rows.flush())

    def undelivered_from(self) -> int:
        """First journal index only held in the open row (0 when none)."""
        return self.rows.undelivered_from()

    # ------------------------------------------------------------------------------- artifacts

    def checkpoint(self, msg: Message) -> None:
        """Log the checkpoint artifact once, then free the spool link. A retry of this message (the worker
        retries a raising upload) skips a finished upload; a failed clean-up is logged, never raised."""
        body = msg.body
        path = self.guard.check(body["path"])
        if path is None:
            self.count("checkpoint_refused")
            log.error("run %s: checkpoint %r is outside the allowed roots %s; not uploaded", self.run_id,
                      body["path"], [str(r) for r in self.guard.roots])
            return
        if msg.index != self._handed_index:
            if not path.is_file():
                self.count("checkpoint_missing")
                log.error("run %s: checkpoint %s does not exist; nothing to upload", self.run_id, path)
                return
            self._upload_checkpoint(body, path)
            self._handed_index = msg.index
        if body.get("spooled") and path.parent.name == SPOOL_DIR_NAME:
            if self.run.offline:  # the journal may need the file again until wandb's files hold the artifact
                self.spool_links.append((self.rows.last_step_logged + 1, path))
            else:
                self._release_spooled(path)

    def release_spool_links(self, persisted_step: int | None = None) -> None:
        """Free the spool links whose artifact wandb's files hold (``persisted_step``: the highest step in them;
        None: all of them, wandb has finished the run)."""
        keep = []
        for threshold, path in self.spool_links:
            if persisted_step is None or threshold <= persisted_step:
                self._release_spooled(path)
            else:
                keep.append((threshold, path))
        self.spool_links = keep

    def release_replayed(self, msg: Message) -> None:
        """A replayed checkpoint that wandb's files already hold: its spool link has done its job."""
        path = self.guard.check(msg.body["path"])
        if msg.body.get("spooled") and path is not None and path.parent.name == SPOOL_DIR_NAME:
            self._release_spooled(path)

    def _upload_checkpoint(self, body: dict[str, Any], path: Path) -> None:
        name = body.get("artifact_name") or f"run_{self.run.id}_model"
        aliases = list(body.get("aliases") or ["latest"])
        file_name = os.path.basename(body.get("source_path") or body["path"])
        size = path.stat().st_size
        where = {"run": self.run_id, "artifact": name, "path": str(path), "bytes": size}
        if size > LARGE_FILE_BYTES:
            log.info("run %s: checkpoint %s (%.0f MB) going to wandb as %s %s", self.run_id, file_name,
                     size / 1e6, name, aliases, extra=where)
        t0 = time.monotonic()
        artifact = wandb.Artifact(name, type="model", metadata=body.get("metadata") or None)
        artifact.add_file(str(path), name=file_name)
        self.run.log_artifact(artifact, aliases=aliases)
        took = time.monotonic() - t0
        # add_file hashes and stages the file; log_artifact hands it to wandb (which uploads in the background)
        log.info("run %s: checkpoint %s (%.1f MB) handed to wandb as %s %s in %.2f s (%.0f MB/s)", self.run_id,
                 file_name, size / 1e6, name, aliases, took, size / 1e6 / max(took, 1e-6),
                 extra={**where, "seconds": round(took, 3)})
        self.count("checkpoints")

    def _release_spooled(self, path: Path) -> None:
        """Remove the spool hardlink (add_file staged a copy). Removing it needs write permission on the
        spool directory: a sidecar of another uid must be in the trainer's group (the directory is made
        group-writable by the client). A failure costs the link's disk space, never the upload."""
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self.count("spool_unlink_failed")
            try:
                st = path.parent.stat()
                owner = f"owner uid {st.st_uid} gid {st.st_gid}, mode {stat.S_IMODE(st.st_mode):o}"
            except OSError:
                owner = "not readable"
            log.warning("run %s: uploaded, but cannot remove the spool link %s (%s: %s; directory %s; this "
                        "sidecar: uid %d, groups %s). The checkpoint keeps its disk space: run the sidecar in the "
                        "trainer's group (docker compose: TRAINER_GID in .env)", self.run_id, path,
                        type(exc).__name__, exc.strerror or exc, owner, os.getuid(), sorted({os.getgid(), *os.getgroups()}),
                        extra={"run": self.run_id, "path": str(path)})

    def val_data(self, msg: Message, publish: bool = True) -> None:
        """The validation table (its artifact once per message, a retry included)."""
        assert self.media is not None
        if msg.index == self._handed_index:
            return
        self.media.val_table(msg.body, publish=publish)
        if publish:
            self._handed_index = msg.index

    def pred_batch(self, msg: Message) -> None:
        """A prediction table (its artifact once per message, a retry included)."""
        assert self.media is not None
        if msg.index == self._handed_index:
            return
        self.media.pred_table(msg.body)
        self._handed_index = msg.index
