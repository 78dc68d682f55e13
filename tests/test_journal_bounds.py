"""The journal of an open run stays small, and compaction never drops what wandb does not hold yet."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from protocol.limits import SPOOL_DIR_NAME

from sidecar.journal import Journal
from sidecar.readback import read_runs
from tests.sidecar_process import SidecarProcess
from tests.stream_client import value
from trainer_hook import SidecarClient


def _log_steps(client: SidecarClient, steps: range) -> None:
    for step in steps:
        client.log({f"train/m{i}": value(step, i) for i in range(3)}, step=step)


def _journal_bytes(sidecar: SidecarProcess, run_id: str) -> int:
    return Journal(sidecar.journal).size(run_id)


def test_an_open_runs_journal_is_trimmed_once_wandb_holds_it(tmp_path: Path) -> None:
    with SidecarProcess(tmp_path, "--journal-trim-bytes", "100000") as sidecar:
        client = SidecarClient(sidecar.addr, init_kwargs={"project": "trim"}, run_id="trim1")
        _log_steps(client, range(20_000))
        assert client.flush(120)
        untrimmed = 20_000 * 100  # ~2 MB of records were journaled
        # the run is still open: trimming, not finishing, keeps its journal small
        sidecar.wait_for(lambda s: s["runs"]["trim1"]["lag_steps"] == 1, timeout=180)  # all but the open row
        # more rows: wandb writes its transaction log in blocks, so its files show the candidate's step only
        # once more data follows it (a quiet run keeps its journal until it logs again or finishes)
        _log_steps(client, range(20_000, 23_000))
        assert client.flush(60)
        status = sidecar.wait_for(lambda s: _journal_bytes(sidecar, "trim1") < untrimmed / 4, timeout=120)
        assert status["runs"]["trim1"]["state"] == "active"
        assert status["runs"]["trim1"]["journal_trimmed_bytes"] > 0
        sidecar.kill()  # after a trim: what the journal no longer has must be in wandb's files already
    with SidecarProcess(tmp_path, "--journal-trim-bytes", "100000", port=sidecar.port) as sidecar:
        _log_steps(client, range(23_000, 23_100))
        assert client.finish(timeout=120)
        # after a SIGKILL the killed sidecar's wandb service may hold the run a while ("run ID is in use"):
        # wandb.init is retried; a SIGTERM before it succeeds would leave the rest in the journal
        sidecar.wait_for(lambda s: s["runs"]["trim1"]["state"] == "finished", timeout=600)
        assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["trim1"]
    assert run.steps() == list(range(23_100))


def test_compaction_keeps_messages_newer_than_the_finish(tmp_path: Path) -> None:
    """The race: a trainer declared lost comes back after its stop was queued; its new, acknowledged
    messages must survive the finish's compaction."""
    journal = Journal(tmp_path)
    journal.write_batch([("r", i, [b"old%d" % i]) for i in range(1, 11)])
    journal.write_batch([("r", i, [b"new%d" % i]) for i in range(11, 14)])  # journaled while finishing
    journal.compact("r", 10, {"last_index": 10})
    assert [i for i, _ in journal.replay("r")] == [11, 12, 13]
    assert journal.done_runs()["r"]["last_index"] == 10


def test_trim_unlinks_delivered_segments_and_keeps_the_last_for_a_restart(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=1)  # every batch begins a segment
    for i in range(1, 6):
        journal.write_batch([("r", i, [b"m%d" % i])])
    assert len(journal.segments("r")) == 5
    size = journal.size("r")
    freed = journal.trim("r", 3)
    assert freed > 0 and journal.size("r") == size - freed
    assert [i for i, _ in journal.replay("r")] == [4, 5]
    journal.trim("r", 5)  # everything delivered: the last segment stays (the run's last sequence number)
    assert [i for i, _ in journal.replay("r")] == [5]
    journal.write_batch([("r", 6, [b"m6"])])
    assert [i for i, _ in journal.replay("r", after=5)] == [6]
    assert [i for i, _ in Journal(tmp_path).replay("r")] == [5, 6]  # a restart reads the same


def test_a_journal_from_before_segments_is_read_and_continued(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.write_batch([("r", i, [b"m%d" % i]) for i in range(1, 4)])
    journal.close()
    (segment,) = [p for _, p in journal.segments("r")]
    segment.rename(tmp_path / "r.log")  # how the journal was named before it had segments
    journal = Journal(tmp_path, segment_bytes=1)
    assert journal.runs() == ["r"] and [i for i, _ in journal.replay("r")] == [1, 2, 3]
    journal.write_batch([("r", 4, [b"m4"])])
    assert [i for i, _ in journal.replay("r", after=2)] == [3, 4]
    journal.compact("r", 4, {"last_index": 4})
    assert journal.runs() == [] and journal.segments("r") == []


def _kill_with_its_wandb_service(sidecar: SidecarProcess) -> None:
    """What ``kill -9`` of a container's main process does: the sidecar and its wandb service die at once."""
    children = subprocess.run(["pgrep", "-P", str(sidecar.proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    sidecar.kill()


def test_a_spool_link_stays_until_wandbs_files_hold_its_artifact(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    sidecar = SidecarProcess(tmp_path).start()
    client = SidecarClient(sidecar.addr, init_kwargs={"project": "spool"}, run_id="spoolkeep")
    _log_steps(client, range(10))
    ckpt = work / "epoch_1.pth"
    ckpt.write_bytes(b"weights" * 10_000)
    client.log_checkpoint(ckpt, aliases=["epoch_1", "latest"])
    assert client.flush(60)
    sidecar.wait_for(lambda s: s["runs"]["spoolkeep"]["wandb"].get("checkpoints") == 1)
    _kill_with_its_wandb_service(sidecar)
    spool = work / SPOOL_DIR_NAME
    assert len(list(spool.iterdir())) == 1  # wandb may not have written the artifact: the journal needs the file
    ckpt.unlink()  # max_keep_ckpts removes the original
    with SidecarProcess(tmp_path, port=sidecar.port) as sidecar:
        _log_steps(client, range(10, 20))
        assert client.finish(timeout=120)
        sidecar.wait_for(lambda s: s["runs"]["spoolkeep"]["state"] == "finished", timeout=600)
        assert "checkpoint_missing" not in sidecar.status()["runs"]["spoolkeep"]["wandb"]
        assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["spoolkeep"]
    assert run.steps() == list(range(20))
    assert [sorted(a.aliases) for a in run.artifacts_named("run_spoolkeep_model")] == [["epoch_1", "latest"]]
    assert list(spool.iterdir()) == []  # freed once wandb held it


def test_finished_runs_are_forgotten_after_their_retention(tmp_path: Path) -> None:
    with SidecarProcess(tmp_path, "--retention", "2") as sidecar:
        client = SidecarClient(sidecar.addr, init_kwargs={"project": "retention"}, run_id="brief1")
        _log_steps(client, range(5))
        assert client.finish(timeout=60)
        sidecar.wait_for(lambda s: s["runs"].get("brief1", {}).get("state") == "finished")
        assert any(p.name.startswith("brief1.") for p in sidecar.journal.iterdir())
        sidecar.wait_for(lambda s: "brief1" not in s["runs"], timeout=60)  # status and metrics forget it
        assert not any(p.name.startswith("brief1.") for p in sidecar.journal.iterdir())
        assert sidecar.stop() == 0
    assert read_runs(sidecar.wandb_dir)["brief1"].steps() == list(range(5))  # wandb's run stays, of course


def test_a_run_past_its_queue_bound_is_read_back_from_the_journal_exactly_once(tmp_path: Path) -> None:
    """The receiver never waits for wandb: past ``--max-run-queue`` a run's messages stay on disk and its
    worker reads them from the journal, across a SIGKILL too; every step lands once, in order."""
    steps = 6_000
    with SidecarProcess(tmp_path, "--max-run-queue", "10") as sidecar:
        client = SidecarClient(sidecar.addr, init_kwargs={"project": "backlog"}, run_id="backlog1", ack_timeout=0.5)
        _log_steps(client, range(steps // 2))  # acknowledged while wandb.init still runs: 10 fit in memory
        assert client.flush(120)
        status = sidecar.wait_for(lambda s: s["runs"]["backlog1"]["wandb"].get("read_from_journal", 0) > 0
                                  and s["runs"]["backlog1"]["wandb"].get("log_calls", 0) > 100, timeout=300)
        assert status["runs"]["backlog1"]["queue"] <= 10 + 1024  # the bound, and at most one message of rows
        sidecar.kill()  # mid-backlog
    with SidecarProcess(tmp_path, "--max-run-queue", "10", port=sidecar.port) as sidecar:
        _log_steps(client, range(steps // 2, steps))
        assert client.finish(timeout=300)
        sidecar.wait_for(lambda s: s["runs"]["backlog1"]["state"] == "finished", timeout=600)
        assert sidecar.stop() == 0
    assert read_runs(sidecar.wandb_dir)["backlog1"].steps() == list(range(steps))
