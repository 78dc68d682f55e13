"""End to end: real client, real ZeroMQ sockets, a real sidecar process, real wandb offline run files."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import zmq

from protocol import Kind, encode
from tests.sidecar_process import SidecarProcess, free_port
from tests.stream_client import value
from sidecar.readback import read_runs
from trainer_hook import SidecarClient

ROOT = Path(__file__).resolve().parent.parent


def _checkpoint(path: Path, seed: int, size: int = 300_000) -> str:
    """Write a checkpoint-like file; return its digest as wandb's manifest writes it (base64 md5)."""
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32)
    path.write_bytes(data)
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_metrics_and_checkpoints_reach_wandb_exactly(sidecar: SidecarProcess, tmp_path: Path) -> None:
    client = SidecarClient(sidecar.addr, init_kwargs={"project": "e2e", "config": {"lr": 0.01}})
    digests = []
    for step in range(1000):
        assert client.log({f"train/m{i}": value(step, i) for i in range(10)}, step=step)
        if step % 400 == 399:
            epoch = step // 400 + 1
            ckpt = tmp_path / "work" / f"epoch_{epoch}.pth"
            ckpt.parent.mkdir(exist_ok=True)
            digests.append(_checkpoint(ckpt, epoch))
            client.log_checkpoint(ckpt, aliases=[f"epoch_{epoch}", "latest"], metadata={"epoch": epoch, "bbox_mAP": epoch / 10})
    assert len(digests) == 2
    extra = tmp_path / "work" / "final.pth"
    digests.append(_checkpoint(extra, 99))
    client.log_checkpoint(extra, aliases=["final"], metadata={"epoch": 3})
    assert client.finish(exit_code=0, timeout=60)
    stats = client.stats()
    assert stats["acked"] == 1 + 1000 + 3 + 1  # calls: start, metrics, checkpoints, finish
    assert sidecar.stop() == 0

    runs = read_runs(sidecar.wandb_dir)
    assert list(runs) == [client.run_id]
    run = runs[client.run_id]
    assert run.steps() == list(range(1000))
    for row in run.history:
        assert {k: v for k, v in row.items() if not k.startswith("_")} == {
            f"train/m{i}": value(row["_step"], i) for i in range(10)
        }
    assert run.config["lr"] == 0.01 and run.project == "e2e"
    models = run.artifacts
    assert [a.name for a in models] == [f"run_{client.run_id}_model"] * 3
    assert all(a.type == "model" for a in models)
    assert [sorted(a.aliases) for a in models] == [["epoch_1", "latest"], ["epoch_2", "latest"], ["final", "latest"]]
    assert [a.metadata for a in models] == [{"epoch": 1, "bbox_mAP": 0.1}, {"epoch": 2, "bbox_mAP": 0.2}, {"epoch": 3}]
    assert [list(a.files) for a in models] == [["epoch_1.pth"], ["epoch_2.pth"], ["final.pth"]]
    assert [next(iter(a.files.values()))["digest"] for a in models] == digests
    assert run.exit_code == 0
    # the spool hardlinks were removed once uploaded; the originals are untouched
    spool = tmp_path / "work" / ".wandb_sidecar_spool"
    assert spool.is_dir() and list(spool.iterdir()) == []
    assert (tmp_path / "work" / "epoch_1.pth").exists()


def test_two_trainers_get_two_separate_runs(sidecar: SidecarProcess, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.stream_client", sidecar.addr, run_id, "--steps", "300",
                          "--keys", "5", "--prefix", prefix, "--exit-code", str(code)], cwd=ROOT)
        for run_id, prefix, code in (("trainera", "a", 3), ("trainerb", "b", 4))
    ]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert sidecar.stop() == 0
    runs = read_runs(sidecar.wandb_dir)
    assert sorted(runs) == ["trainera", "trainerb"]
    for run_id, prefix, code in (("trainera", "a", 3), ("trainerb", "b", 4)):
        run = runs[run_id]
        assert run.exit_code == code
        assert run.config["prefix"] == prefix
        assert run.steps() == list(range(300))
        for row in run.history:
            assert {k: v for k, v in row.items() if not k.startswith("_")} == {
                f"{prefix}/m{i}": value(row["_step"], i) for i in range(5)
            }


def test_no_sidecar_listening_never_blocks_or_raises(tmp_path: Path) -> None:
    client = SidecarClient(f"tcp://127.0.0.1:{free_port()}", max_pending=5000, max_backlog_bytes=200_000)
    accepted = sum(client.log({"loss": float(i)}, step=i) for i in range(20_000))
    assert accepted >= 5000  # the rest is refused and counted, not raised
    t0 = time.monotonic()
    assert client.finish(exit_code=0, timeout=2) is False
    elapsed = time.monotonic() - t0
    # it waits its timeout, then gives up: the upper bound only catches a hang (a loaded machine is slow)
    assert elapsed >= 2.0
    assert elapsed < 60.0
    stats = client.stats()
    assert stats.get("acked_seq") == 0
    assert stats["undelivered"] > 0
    assert stats.get("dropped_backlog_full", 0) + stats.get("dropped_queue_full", 0) > 0
    assert client.log({"loss": 1.0}, step=1) is False  # finished: refused, counted
    assert client.stats()["dropped_inactive"] == 1


def test_malformed_frames_are_rejected_and_counted(sidecar: SidecarProcess) -> None:
    ctx = zmq.Context()
    bad = ctx.socket(zmq.DEALER)
    bad.connect(sidecar.addr)
    garbage = [
        [b"\xc1\xc1\xc1"],  # not msgpack
        [msgpack.packb([99, "metrics", "abc", 1, 0.0, 1]), msgpack.packb({})],  # unknown version
        [msgpack.packb([2, "explode", "abc", 1, 0.0, 1, "0123abcd"]), msgpack.packb({})],  # unknown kind
        [msgpack.packb([2, "metrics", "../../etc", 1, 0.0, 1, "0123abcd"]), msgpack.packb({})],  # bad run id
        encode(Kind.RUN_START, "badrun", 1, 0.0, {"init_kwargs": {}}, incarnation="0123abcd"),
        encode(Kind.METRICS, "badrun", 2, 0.0, {"data": {"x": [1, 2]}}, incarnation="0123abcd"),  # not a scalar
        encode(Kind.METRICS, "badrun", 3, 0.0, {"data": {"x": 1.0}, "bogus": 1}, incarnation="0123abcd"),  # unknown field
    ]
    for frames in garbage:
        bad.send_multipart(frames)
    status = sidecar.wait_for(lambda s: sum(s["rejected"].values()) >= 6)
    assert status["rejected"] == {"malformed": 1, "unsupported_version": 1, "unknown_kind": 1, "invalid_field": 3}
    assert status["runs"]["badrun"]["rejected"] == 2
    bad.close(0)
    ctx.term()

    client = SidecarClient(sidecar.addr, run_id="goodrun")
    for step in range(50):
        client.log({"x": float(step)}, step=step)
    assert client.finish(timeout=30)
    assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["goodrun"]
    assert [row["x"] for row in run.history] == [float(s) for s in range(50)]


def test_sigterm_mid_stream_keeps_everything_acknowledged(sidecar: SidecarProcess) -> None:
    client = SidecarClient(sidecar.addr, run_id="sigterm", ack_timeout=0.5)
    step = 0
    while client.stats().get("acked", 0) < 3000:
        client.log({"x": float(step)}, step=step)
        step += 1
        if step % 1000 == 0:
            client.flush(timeout=5)
    sidecar.proc.send_signal(15)  # SIGTERM while the client keeps streaming
    while sidecar.proc.poll() is None:
        client.log({"x": float(step)}, step=step)
        step += 1
        if step % 1000 == 0:
            client.flush(timeout=0.2)
    assert sidecar.proc.returncode == 0
    acked = client.stats()["acked"]
    run = read_runs(sidecar.wandb_dir)["sigterm"]
    steps = run.steps()
    # the run start, then one call per step: every acknowledged step is in the run, once, in order
    assert steps == list(range(len(steps)))
    assert len(steps) >= acked - 1
    assert [row["x"] for row in run.history] == [float(s) for s in steps]
    assert run.exit_code == 0


def test_uncaught_exception_finishes_the_run_as_failed(sidecar: SidecarProcess) -> None:
    script = ("from trainer_hook import SidecarClient\n"
              f"c = SidecarClient({sidecar.addr!r}, run_id='crashed')\n"
              "[c.log({'x': float(s)}, step=s) for s in range(20)]\n"
              "raise RuntimeError('CUDA out of memory')\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "CUDA out of memory" in out.stderr
    sidecar.wait_for(lambda s: s["runs"]["crashed"]["state"] == "finished")
    assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["crashed"]
    assert run.exit_code == 1
    assert len(run.history) == 20  # what was logged before the crash is there


def test_forked_children_are_inert_and_the_parent_goes_on(sidecar: SidecarProcess) -> None:
    import os

    client = SidecarClient(sidecar.addr, run_id="forky")
    client.log({"x": 0.0}, step=0)
    pid = os.fork()
    if pid == 0:  # a dataloader worker: must not speak for the parent's run
        ok = client.log({"x": 99.0}, step=1) or client.finish(timeout=1)
        os._exit(1 if ok else 0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for step in range(1, 10):
        client.log({"x": float(step)}, step=step)
    assert client.finish(timeout=30)
    assert sidecar.stop() == 0
    assert [r["x"] for r in read_runs(sidecar.wandb_dir)["forky"].history] == [float(s) for s in range(10)]


def test_trainer_side_imports_no_wandb_and_no_torch() -> None:
    code = ("import sys, time; t = time.perf_counter(); import trainer_hook; "
            "print(time.perf_counter() - t, 'wandb' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    _, has_wandb, has_torch = out.stdout.split()
    assert (has_wandb, has_torch) == ("False", "False")


def test_log_calls_travel_batched_and_a_bad_one_costs_only_itself(sidecar: SidecarProcess) -> None:
    """Calls that wait together travel as one ``metric_rows`` message; each still lands once, in order, and
    a call the sidecar refuses is refused alone."""
    client = SidecarClient(sidecar.addr, run_id="rows")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(60)  # the I/O thread waits for this thread to block: every call waits together
    try:
        for step in range(3000):
            client.log({"x": float(step)}, step=step)
            if step == 1000:
                client.log({"k" * 300: 1.0}, step=step)  # a key over the protocol's limit
        client.log({"last": 1.0})  # without a step: it ends its message
    finally:
        sys.setswitchinterval(switch)
    assert client.finish(timeout=60), client.stats()
    stats = client.stats()
    assert stats["acked"] == 1 + 3001 + 1 + 1  # calls: start, metrics, finish
    assert stats["acked_seq"] < 30, "the calls travelled batched, not one message each"
    assert stats["rejected_limit_exceeded"] == 1
    assert sidecar.status()["runs"]["rows"]["rejected_by"] == {"limit_exceeded": 1}
    assert sidecar.stop() == 0
    history = read_runs(sidecar.wandb_dir)["rows"].history
    assert [row["x"] for row in history[:-1]] == [float(s) for s in range(3000)]
    assert "k" * 300 not in history[1000] and history[-1]["last"] == 1.0 and "x" not in history[-1]
