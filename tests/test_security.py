"""Safe by default: loopback unless keys, CurveZMQ client authentication, file allow-list, no key in logs."""

from __future__ import annotations

import os
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
