"""Safe by default: loopback unless keys, CurveZMQ client authentication, file allow-list, no key in logs."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.readback import read_runs
from sidecar.status_view import Unreachable, fetch_status
from tests.sidecar_process import SidecarProcess, free_port
from trainer_hook import SidecarClient

ROOT = Path(__file__).resolve().parent.parent


def test_non_loopback_bind_without_keys_is_refused_at_start(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--bind", f"tcp://0.0.0.0:{free_port()}",
                          "--journal-dir", str(tmp_path / "j")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 2
    assert "refusing to bind" in out.stderr and "wandb-sidecar keys" in out.stderr


def test_insecure_flag_allows_it_and_says_so_loudly(tmp_path: Path) -> None:
    with SidecarProcess(tmp_path, "--insecure", bind_host="0.0.0.0") as proc:
        assert "INSECURE" in proc.log()
        assert proc.stop() == 0


def _keys(tmp_path: Path, name: str) -> tuple[Path, Path]:
    subprocess.run([sys.executable, "-m", "sidecar", "keys", str(tmp_path / "keys"), "--name", name], check=True,
                   capture_output=True)
    return tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.key_secret"


def test_curve_keys_admit_the_right_client_only(tmp_path: Path) -> None:
    server_pub, server_secret = _keys(tmp_path, "server")
    good_pub, good_secret = _keys(tmp_path, "trainer")
    _, rogue_secret = _keys(tmp_path, "rogue")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "trainer.key").write_bytes(good_pub.read_bytes())
    proc = SidecarProcess(tmp_path, "--curve-secret-key", str(server_secret), "--curve-authorized-keys",
                          str(authorized), bind_host="0.0.0.0")
    proc.start(wait=False)
    proc.wait_ready(keys=(str(server_pub), str(good_secret)))
    try:
        with pytest.raises(Unreachable):
            fetch_status(proc.addr, timeout=1.0)  # no keys at all: nothing answers
        with pytest.raises(Unreachable):
            fetch_status(proc.addr, 1.0, str(server_pub), str(rogue_secret))
        rogue = SidecarClient(proc.addr, run_id="rogue", curve_server_key=str(server_pub),
                              curve_client_key=str(rogue_secret))
        rogue.log({"x": 1.0}, step=0)
        good = SidecarClient(proc.addr, run_id="good", curve_server_key=str(server_pub),
                             curve_client_key=str(good_secret))
        for step in range(20):
            good.log({"x": float(step)}, step=step)
        assert good.finish(timeout=60)
        assert rogue.finish(timeout=2) is False
        assert rogue.stats()["acked_seq"] == 0
        status = fetch_status(proc.addr, 3.0, str(server_pub), str(good_secret))
        assert "rogue" not in status["runs"]
        assert proc.stop() == 0
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.kill()
    runs = read_runs(proc.wandb_dir)
    assert list(runs) == ["good"]
    assert [r["x"] for r in runs["good"].history] == [float(s) for s in range(20)]


def test_paths_outside_the_roots_are_refused_and_never_uploaded(tmp_path: Path) -> None:
    allowed = tmp_path / "work_dirs"
    outside = tmp_path / "secrets"
    allowed.mkdir()
    outside.mkdir()
    secret = outside / "id_rsa"
    secret.write_bytes(b"secret" * 100)
    (allowed / "escape.pth").symlink_to(secret)
    ok = allowed / "epoch_1.pth"
    ok.write_bytes(b"weights" * 100)
    with SidecarProcess(tmp_path, allow_roots=[allowed]) as proc:
        client = SidecarClient(proc.addr, run_id="paths", spool_checkpoints=False)
        client.log_checkpoint(secret, aliases=["direct"])
        client.log_checkpoint(allowed / "escape.pth", aliases=["symlink"])
        client.log_checkpoint(f"{allowed}/../secrets/id_rsa", aliases=["dotdot"])
        client.log_checkpoint(ok, aliases=["fine"])
        assert client.finish(timeout=30)
        assert client.stats()["rejected_path_refused"] == 3  # reported back to the trainer
        status = proc.status()
        assert status["rejected"] == {"path_refused": 3}
        assert proc.stop() == 0
        assert proc.log().count("outside the allowed roots") >= 3
    run = read_runs(proc.wandb_dir)["paths"]
    assert [sorted(a.aliases) for a in run.artifacts] == [["fine", "latest"]]


def test_api_key_never_appears_in_logs(tmp_path: Path) -> None:
    key = "local-" + "f3a9c2" * 7  # shaped like a real key; offline mode never uses it
    with SidecarProcess(tmp_path, env={"WANDB_API_KEY": key}, ) as proc:
        client = SidecarClient(proc.addr, run_id="secret", init_kwargs={"project": "p"})
        for step in range(10):
            client.log({"x": float(step)}, step=step)
        assert client.finish(timeout=30)
        st = proc.status()
        assert proc.stop() == 0
        text = proc.log()
    assert text.strip()  # it did log
    assert key not in text and key not in str(st)
    for path in proc.wandb_dir.rglob("*.log"):
        assert key not in path.read_text(errors="replace"), path


def _mutations(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """One random corruption of a valid message: flipped bytes, cuts, extra or missing frames."""
    frames = list(frames)
    choice = rng.randrange(6)
    i = rng.randrange(len(frames))
    f = bytearray(frames[i])
    if choice == 0 and f:
        for _ in range(rng.randint(1, 4)):
            f[rng.randrange(len(f))] = rng.randrange(256)
        frames[i] = bytes(f)
    elif choice == 1:
        frames[i] = bytes(f[: rng.randrange(len(f) + 1)])
    elif choice == 2:
        frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(rng.randint(0, 64)))
    elif choice == 3 and len(frames) > 1:
        del frames[i]
    elif choice == 4:
        frames = frames * rng.randint(2, 4)
    else:
        frames[i] = bytes(f) + rng.randbytes(rng.randint(1, 32))
    return frames


@pytest.mark.slow
def test_fuzzing_a_live_sidecar_rejects_garbage_and_keeps_serving(sidecar: SidecarProcess, tmp_path: Path) -> None:
    import numpy as np
    import zmq

    from protocol import Kind, encode

    rng = random.Random(1234)
    valid = [
        encode(Kind.RUN_START, "fuzz", 1, 0.0, {"init_kwargs": {"project": "fuzz"}}, incarnation="0123abcd"),
        encode(Kind.METRICS, "fuzz", 2, 0.0, {"data": {"loss": 0.5, "acc": 1}, "step": 3}, incarnation="0123abcd"),
        encode(Kind.CHECKPOINT, "fuzz", 3, 0.0, {"path": str(tmp_path / "x.pth"), "aliases": ["latest"]}, incarnation="0123abcd"),
        encode(Kind.PRED_BATCH, "fuzz", 4, 0.0, {"tag": "epoch_1", "indices": [0], "boxes": [np.ones((2, 4), np.float32)],
                                                 "scores": [np.ones(2, np.float32)], "labels": [np.zeros(2, np.int64)]}, incarnation="0123abcd"),
        encode(Kind.HEARTBEAT, "fuzz", 0, 0.0, {}, incarnation="0123abcd"),
    ]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sidecar.addr)
    sent = 0
    for n in range(30_000):
        if n % 3 == 0:
            frames = [rng.randbytes(rng.randint(0, 80)) for _ in range(rng.randint(1, 4))]
        else:
            frames = _mutations(rng, rng.choice(valid))
        sock.send_multipart(frames)
        sent += 1
    status = sidecar.wait_for(lambda s: s["counters"]["received_multiparts"] >= sent, timeout=120)
    sock.close()
    ctx.term()
    assert status["counters"].get("internal_errors", 0) == 0
    rejected = sum(status["rejected"].values())
    assert rejected > 10_000, status["rejected"]
    assert {"malformed", "invalid_field"} <= set(status["rejected"])

    client = SidecarClient(sidecar.addr, run_id="survivor")
    for step in range(300):
        client.log({"x": float(step), "nan": math.nan, "inf": math.inf}, step=step)
    assert client.finish(timeout=60)
    assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["survivor"]
    assert [r["x"] for r in run.history] == [float(s) for s in range(300)]
    # NaN and inf keep wandb's own behaviour: stored as the strings wandb writes for them
    assert {str(r["nan"]).lower() for r in run.history} == {"nan"}
    assert {str(r["inf"]).lower() for r in run.history} in ({"inf"}, {"infinity"})
