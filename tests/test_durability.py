"""Crashes on both sides: SIGKILLed sidecars, late sidecars, dead trainers. Nothing acknowledged is lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from sidecar.readback import read_runs
from tests.sidecar_process import SidecarProcess
from tests.stream_client import value
from trainer_hook import SidecarClient

ROOT = Path(__file__).resolve().parent.parent


def _assert_exact_history(run, steps: int, keys: int, prefix: str = "train") -> None:  # type: ignore[no-untyped-def]
    assert run.steps() == list(range(steps)), "gap or duplicate in the wandb history"
    for row in run.history:
        assert {k: v for k, v in row.items() if not k.startswith("_")} == {
            f"{prefix}/m{i}": value(row["_step"], i) for i in range(keys)
        }


@pytest.mark.slow
def test_sidecar_sigkilled_five_times_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    steps, keys = 10_000, 10  # 100,000 metric values
    sidecar = SidecarProcess(tmp_path).start()
    client = SidecarClient(sidecar.addr, run_id="crashy", ack_timeout=0.3, max_pending=1_000_000)
    kills, delivered = 0, 0
    for step in range(steps):
        client.log({f"train/m{i}": value(step, i) for i in range(keys)}, step=step)
        if step % 1600 == 800 and kills < 6:
            # wait until the sidecar holds the stream so far and has handed more of it to wandb, then kill
            # it without warning (mid-delivery: metrics travel in batches of rows) and restart it
            assert client.flush(timeout=60), client.stats()
            status = sidecar.wait_for(lambda s: s["runs"]["crashy"]["delivered_seq"] > delivered)
            delivered = status["runs"]["crashy"]["delivered_seq"]
            sidecar.kill()
            kills += 1
            sidecar = SidecarProcess(tmp_path, port=sidecar.port).start()
    assert kills >= 5
    assert client.finish(timeout=120), client.stats()
    assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["crashy"]
    assert len(run.dirs) > 1  # the wandb run was resumed after the crashes
    _assert_exact_history(run, steps, keys)
    assert run.exit_code == 0


@pytest.mark.slow
def test_sidecar_starting_late_and_going_away_loses_nothing(tmp_path: Path) -> None:
    port_holder = SidecarProcess(tmp_path)
    client = SidecarClient(port_holder.addr, run_id="patient", ack_timeout=0.3, heartbeat_interval=0.1)
    step = 0
    # training goes on before the sidecar exists until the client has found nobody there many times over
    # (heartbeats it could not send; ZeroMQ's reconnect interval at its 1 s cap): how long that takes
    # does not matter, only that the client kept everything meanwhile
    while step < 2000 or client.stats().get("heartbeat_unsent", 0) < 20:
        client.log({f"train/m{i}": value(step, i) for i in range(4)}, step=step)
        step += 1
        client.flush(timeout=0.001)  # paces the loop (returns False: nothing can be acknowledged yet)
    assert client.stats()["acked_seq"] == 0
    first = step
    sidecar = port_holder.start()
    assert client.flush(timeout=60)
    assert sidecar.stop() == 0  # a polite stop this time, in the middle of training
    for step in range(first, first + 3000):
        client.log({f"train/m{i}": value(step, i) for i in range(4)}, step=step)
    sidecar = SidecarProcess(tmp_path, port=sidecar.port).start()
    assert client.finish(timeout=60), client.stats()
    assert sidecar.stop() == 0
    _assert_exact_history(read_runs(sidecar.wandb_dir)["patient"], first + 3000, 4)


def test_sigkilled_trainer_is_declared_dead_and_others_untouched(tmp_path: Path) -> None:
    sidecar = SidecarProcess(tmp_path, "--heartbeat-timeout", "3").start()
    victim = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from trainer_hook import SidecarClient\n"
        f"c = SidecarClient({sidecar.addr!r}, run_id='victim', heartbeat_interval=0.5)\n"
        "[c.log({'x': float(s)}, step=s) for s in range(100)]\n"
        "c.flush(30); print('ready', flush=True); time.sleep(600)\n")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    survivor = SidecarClient(sidecar.addr, run_id="survivor", heartbeat_interval=0.5)
    assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    for step in range(200):
        survivor.log({"y": float(step)}, step=step)
    killed = time.monotonic()
    # a generous deadline (a loaded machine is slow); the lower bound is the behaviour: not declared lost
    # before --heartbeat-timeout (3 s) of silence, less the heartbeat interval it may have been into
    status = sidecar.wait_for(lambda s: s["runs"]["victim"]["state"] == "lost", timeout=120)
    assert time.monotonic() - killed >= 3 - 0.5
    assert status["runs"]["survivor"]["state"] == "active"
    assert survivor.finish(timeout=30)
    assert sidecar.stop() == 0
    runs = read_runs(sidecar.wandb_dir)
    assert runs["victim"].exit_code != 0
    assert runs["victim"].summary.get("sidecar/trainer_lost") is True
    assert [r["x"] for r in runs["victim"].history] == [float(s) for s in range(100)]
    assert runs["survivor"].exit_code == 0
    assert [r["y"] for r in runs["survivor"].history] == [float(s) for s in range(200)]


def test_checkpoint_deleted_right_after_announcement_is_uploaded_byte_for_byte(sidecar, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import base64
    import hashlib

    work = tmp_path / "work_dirs"
    work.mkdir()
    data = os.urandom(2_000_000)
    ckpt = work / "epoch_1.pth"
    ckpt.write_bytes(data)
    client = SidecarClient(sidecar.addr, run_id="ckptdel")
    client.log_checkpoint(ckpt, aliases=["epoch_1", "latest"])
    assert client.flush(timeout=30)  # acknowledged: the spool link was made before the send
    ckpt.unlink()  # the runner's max_keep_ckpts
    assert client.finish(timeout=30)
    assert sidecar.stop() == 0
    art = read_runs(sidecar.wandb_dir)["ckptdel"].artifacts[0]
    entry = art.files["epoch_1.pth"]
    assert int(entry["size"]) == len(data)
    assert entry["digest"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert Path(entry["local_path"]).read_bytes() == data


def test_trainer_that_comes_back_after_being_declared_dead_resumes_its_run(tmp_path: Path) -> None:
    sidecar = SidecarProcess(tmp_path, "--heartbeat-timeout", "2").start()
    script = (
        "import sys; from trainer_hook import SidecarClient\n"
        f"c = SidecarClient({sidecar.addr!r}, run_id='lazarus', heartbeat_interval=0.5)\n"
        "[c.log({'x': float(s)}, step=s) for s in range(100)]\n"
        "c.flush(30); print('paused', flush=True); sys.stdin.readline()\n"
        "[c.log({'x': float(s)}, step=s) for s in range(100, 200)]\n"
        "sys.exit(0 if c.finish(timeout=60) else 3)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert trainer.stdout is not None and trainer.stdin is not None
    assert trainer.stdout.readline().strip() == "paused"
    os.kill(trainer.pid, signal.SIGSTOP)  # frozen: no heartbeats
    sidecar.wait_for(lambda s: s["runs"]["lazarus"]["state"] == "lost", timeout=30)
    os.kill(trainer.pid, signal.SIGCONT)
    trainer.stdin.write("go\n")
    trainer.stdin.flush()
    assert trainer.wait(120) == 0
    assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["lazarus"]
    assert len(run.dirs) == 2  # finished as lost, then resumed
    assert [r["x"] for r in run.history] == [float(s) for s in range(200)]
    assert run.exit_codes == [255, 0]


@pytest.mark.slow
def test_memory_stays_bounded_with_the_sidecar_down_for_the_whole_run(tmp_path: Path) -> None:
    probe = (
        "import gc, json, sys\n"
        "from trainer_hook import SidecarClient\n"
        "from tests.sidecar_process import free_port\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "spill = sys.argv[1]\n"
        "c = SidecarClient(f'tcp://127.0.0.1:{free_port()}', max_backlog_bytes=8 << 20, max_pending=10_000,\n"
        "                  spill_dir=None if spill == '-' else spill, max_spill_bytes=32 << 20)\n"
        "for i in range(20_000): c.log({f'train/m{k}': i * 0.5 + k for k in range(10)}, step=i)\n"
        "gc.collect(); base = peak = rss()\n"
        "for i in range(20_000, 400_000):\n"
        "    c.log({f'train/m{k}': i * 0.5 + k for k in range(10)}, step=i)\n"
        "    if i % 20_000 == 0: peak = max(peak, rss())\n"
        "print(json.dumps({'growth': peak - base, **c.stats()}), flush=True)\n"
        "c.finish(timeout=0.1)\n")
    for spill in ("-", str(tmp_path / "spill")):
        out = subprocess.run([sys.executable, "-c", probe, spill], cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout.splitlines()[-1])
        assert stats["backlog_bytes"] <= 8 << 20
        assert stats["spill_bytes"] <= 32 << 20
        # 380,000 calls of ~250 bytes do not fit: refused when the hand-off queue is full, or oldest dropped
        assert stats.get("dropped_backlog_full", 0) + stats.get("dropped_queue_full", 0) > 0
        if spill != "-":
            assert stats["spilled"] > 0
        # 8 MiB backlog + 10,000 pending dicts (~1.2 KB each) + allocator slack; unbounded would be ~400 MB
        assert stats["growth"] < 48 << 20, stats


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real, small filesystem at ``path`` to fill up (needs root; skipped with the reason otherwise)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_journal_disk_full_is_a_clear_error_and_delivery_resumes_when_space_returns(tmp_path: Path) -> None:
    with _small_tmpfs(tmp_path / "journal", "512k") as journal:
        filler = journal / "filler"
        st = os.statvfs(journal)
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 64 * 1024))  # leave 64 KiB
        sidecar = SidecarProcess(tmp_path).start()
        client = SidecarClient(sidecar.addr, run_id="diskfull", ack_timeout=0.3)
        for step in range(3000):  # ~1 MB of journal: far more than the free space
            assert client.log({f"train/m{i}": value(step, i) for i in range(4)}, step=step)
        status = sidecar.wait_for(lambda s: s["counters"].get("journal_errors", 0) > 0)
        assert "No space left on device" in status["last_error"]
        assert "journal write failed" in sidecar.log()
        assert client.flush(timeout=1) is False  # not acknowledged: the client keeps it all
        assert client.stats().get("acked", 0) < 3001
        filler.unlink()  # space returns
        assert client.finish(timeout=120), client.stats()
        assert sidecar.stop() == 0
        _assert_exact_history(read_runs(sidecar.wandb_dir)["diskfull"], 3000, 4)


def test_wandb_init_failures_are_retried_and_never_reach_the_trainer(tmp_path: Path) -> None:
    reachable = tmp_path / "wandb-reachable"  # wandb.init fails until this file exists
    sidecar = SidecarProcess(tmp_path, module="tests.fault_sidecar",
                             env={"FAULT_INIT_FAILS_UNTIL": str(reachable)}).start()
    client = SidecarClient(sidecar.addr, run_id="flaky")
    for step in range(500):
        assert client.log({"x": float(step)}, step=step)
    assert client.flush(timeout=30)  # journaled and acknowledged while wandb is failing
    status = sidecar.wait_for(lambda s: sidecar.log().count("retrying in") >= 2)  # backoff 1 s, then 2 s
    assert "injected" in status["runs"]["flaky"]["last_error"]
    assert status["runs"]["flaky"]["delivered_seq"] == 0
    reachable.touch()
    # every step in wandb but the newest (its row stays open until the run ends)
    sidecar.wait_for(lambda s: s["runs"]["flaky"]["lag_steps"] == 1, timeout=120)
    assert client.finish(timeout=30)
    assert sidecar.stop() == 0
    assert sidecar.log().count("retrying in") >= 2
    assert [r["x"] for r in read_runs(sidecar.wandb_dir)["flaky"].history] == [float(s) for s in range(500)]


def test_a_failed_checkpoint_upload_is_retried(tmp_path: Path) -> None:
    sidecar = SidecarProcess(tmp_path, module="tests.fault_sidecar", env={"FAULT_ARTIFACT_FAILURES": "2"}).start()
    ckpt = tmp_path / "epoch_1.pth"
    ckpt.write_bytes(b"w" * 10_000)
    client = SidecarClient(sidecar.addr, run_id="uploads")
    client.log_checkpoint(ckpt, aliases=["epoch_1", "latest"])
    assert client.finish(timeout=30)
    sidecar.wait_for(lambda s: s["runs"]["uploads"]["state"] == "finished", timeout=60)  # after 1 s + 2 s
    assert sidecar.stop() == 0
    assert sidecar.log().count("injected: upload failed") >= 2
    [art] = read_runs(sidecar.wandb_dir)["uploads"].artifacts
    assert sorted(art.aliases) == ["epoch_1", "latest"] and int(art.files["epoch_1.pth"]["size"]) == 10_000


def test_full_wandb_dir_is_detected_and_the_run_replayed_when_space_returns(tmp_path: Path) -> None:
    with _small_tmpfs(tmp_path / "wandb_dir", "160k") as wandb_dir:
        # wandb itself loses rows silently on a full disk (init, log and finish all succeed)
        sidecar = SidecarProcess(tmp_path, "--replay-backoff", "1").start()
        client = SidecarClient(sidecar.addr, run_id="fulldisk")
        for step in range(4000):
            client.log({f"train/m{i}": value(step, i) for i in range(4)}, step=step)
        assert client.finish(timeout=60)  # the trainer is done and unaffected
        status = sidecar.wait_for(lambda s: s["runs"]["fulldisk"]["state"] == "incomplete", timeout=60)
        assert "wandb's files end at step" in status["runs"]["fulldisk"]["last_error"]
        assert any(p.name.startswith("fulldisk") for p in (tmp_path / "journal").iterdir())
        subprocess.run(["mount", "-o", "remount,size=64m", str(wandb_dir)], check=True)  # space returns
        sidecar.wait_for(lambda s: s["runs"]["fulldisk"]["state"] == "finished", timeout=120)
        assert sidecar.stop() == 0
        run = read_runs(wandb_dir)["fulldisk"]
        assert len(run.dirs) >= 2  # the replay resumed the run in a new directory
        _assert_exact_history(run, 4000, 4)
        assert run.exit_code == 0
