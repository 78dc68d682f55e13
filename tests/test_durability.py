"""Crashes on both sides: SIGKILLed sidecars, late sidecars, dead trainers. Nothing acknowledged is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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


def test_sidecar_sigkilled_five_times_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    steps, keys = 10_000, 10  # 100,000 metric values
    sidecar = SidecarProcess(tmp_path).start()
    client = SidecarClient(sidecar.addr, run_id="crashy", ack_timeout=0.3, max_pending=1_000_000)
    kills, delivered = 0, 0
    for step in range(steps):
        client.log({f"train/m{i}": value(step, i) for i in range(keys)}, step=step)
        if step % 1600 == 800 and kills < 6:
            # wait until the sidecar holds part of the stream and has handed more of it to wandb, then
            # kill it without warning (mid-delivery) and restart it
            target = client.stats()["acked_seq"] + 200
            status = sidecar.wait_for(lambda s: s["runs"].get("crashy", {}).get("journaled_seq", 0) >= target
                                      and s["runs"]["crashy"]["delivered_seq"] > delivered)
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


def test_sidecar_starting_late_and_going_away_loses_nothing(tmp_path: Path) -> None:
    port_holder = SidecarProcess(tmp_path)
    client = SidecarClient(port_holder.addr, run_id="patient", ack_timeout=0.3)
    for step in range(3000):  # the sidecar is not there yet
        client.log({f"train/m{i}": value(step, i) for i in range(4)}, step=step)
    assert client.stats()["acked_seq"] == 0
    sidecar = port_holder.start()
    assert client.flush(timeout=60)
    assert sidecar.stop() == 0  # a polite stop this time, in the middle of training
    for step in range(3000, 6000):
        client.log({f"train/m{i}": value(step, i) for i in range(4)}, step=step)
    sidecar = SidecarProcess(tmp_path, port=sidecar.port).start()
    assert client.finish(timeout=60), client.stats()
    assert sidecar.stop() == 0
    _assert_exact_history(read_runs(sidecar.wandb_dir)["patient"], 6000, 4)


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
    status = sidecar.wait_for(lambda s: s["runs"]["victim"]["state"] == "lost", timeout=6.5)  # 2 timeouts + 0.5
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
