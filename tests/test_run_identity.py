"""Who owns a run: incarnations, resumed trainings, two trainers on one id, what a peer may ask of wandb, and
who can reach a default sidecar. Real sidecar processes, real clients, wandb offline read back."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from sidecar.readback import read_runs
from sidecar.status_view import Unreachable, fetch_status
from tests.sidecar_process import SidecarProcess
from tests.stream_client import value
from trainer_hook import SidecarClient

ROOT = Path(__file__).resolve().parent.parent


def _trainer(addr: str, run_id: str, first: int, steps: int, exit_code: int, out: Path, prefix: str = "train",
             timeout: float = 120.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.stream_client", addr, run_id, "--steps", str(steps),
                             "--first-step", str(first), "--keys", "3", "--prefix", prefix, "--exit-code",
                             str(exit_code), "--finish-timeout", str(timeout), "--out", str(out),
                             "--init", json.dumps({"resume": "allow"})], cwd=ROOT)


def _assert_steps(run, steps: range, prefix: str = "train") -> None:  # type: ignore[no-untyped-def]
    assert run.steps() == list(steps), "gap or duplicate in the wandb history"
    for row in run.history:
        assert {k: v for k, v in row.items() if not k.startswith("_")} == {
            f"{prefix}/m{i}": value(row["_step"], i) for i in range(3)}


def _wait(predicate, timeout: float = 60.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise TimeoutError(f"{what} not met in {timeout} s")


def test_resume_after_a_crash_lands_every_step_once(sidecar: SidecarProcess, tmp_path: Path) -> None:
    first = _trainer(sidecar.addr, "resumed1", 0, 50, 1, tmp_path / "a.json")
    assert first.wait(120) == 0
    second = _trainer(sidecar.addr, "resumed1", 50, 50, 0, tmp_path / "b.json")
    assert second.wait(120) == 0
    stats = json.loads((tmp_path / "b.json").read_text())
    assert stats["ok"] and stats["acked"] == 52  # start, 50 metrics, finish
    assert stats["acked_seq"] <= 52  # its own sequence (from 1): metrics travel batched
    run_status = sidecar.status()["runs"]["resumed1"]
    assert run_status["incarnations"] == 2 and run_status["duplicates"] == 0
    assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["resumed1"]
    _assert_steps(run, range(100))
    assert run.exit_code == 0


@pytest.mark.slow
def test_resume_with_the_sidecar_sigkilled_during_the_second_incarnation(tmp_path: Path) -> None:
    sidecar = SidecarProcess(tmp_path).start()
    first = _trainer(sidecar.addr, "resumed2", 0, 500, 1, tmp_path / "a.json")
    assert first.wait(120) == 0
    second = _trainer(sidecar.addr, "resumed2", 500, 3000, 0, tmp_path / "b.json")
    sidecar.wait_for(lambda s: s["runs"]["resumed2"]["incarnations"] == 2
                     and s["runs"]["resumed2"]["last_step"] >= 800)
    sidecar.kill()
    sidecar = SidecarProcess(tmp_path, port=sidecar.port).start()
    assert second.wait(180) == 0, json.loads((tmp_path / "b.json").read_text())
    # wandb.init may be retried while the killed sidecar's wandb service still holds the run
    sidecar.wait_for(lambda s: s["runs"]["resumed2"]["state"] == "finished", timeout=600)
    assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["resumed2"]
    _assert_steps(run, range(3500))


def test_a_second_live_trainer_on_the_same_id_is_refused_and_told(sidecar: SidecarProcess) -> None:
    owner = SidecarClient(sidecar.addr, init_kwargs={"project": "ids"}, run_id="shared1")
    for step in range(10):
        owner.log({f"train/m{i}": value(step, i) for i in range(3)}, step=step)
    assert owner.flush(30)
    intruder = SidecarClient(sidecar.addr, init_kwargs={"project": "ids"}, run_id="shared1")
    for step in range(100, 110):
        intruder.log({"intruder/x": float(step)}, step=step)
    _wait(lambda: intruder.stats().get("rejected_run_in_use"), what="run_in_use reported to the second trainer")
    assert intruder.finish(timeout=2) is False
    assert intruder.stats()["acked_seq"] == 0
    for step in range(10, 20):
        owner.log({f"train/m{i}": value(step, i) for i in range(3)}, step=step)
    assert owner.finish(timeout=60)
    status = sidecar.status()
    assert status["rejected"].get("run_in_use", 0) >= 1
    assert status["runs"]["shared1"]["incarnations"] == 1
    assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["shared1"]
    _assert_steps(run, range(20))  # exactly its own: nothing of the intruder
    assert run.exit_code == 0


def test_heartbeats_of_another_incarnation_do_not_keep_a_dead_trainer_alive(tmp_path: Path) -> None:
    with SidecarProcess(tmp_path, "--heartbeat-timeout", "3") as sidecar:
        dead = subprocess.Popen([sys.executable, "-c", (
            "import sys, time\n"
            "from trainer_hook import SidecarClient\n"
            f"c = SidecarClient({sidecar.addr!r}, init_kwargs={{'project': 'ids'}}, run_id='shared2')\n"
            "c.log({'train/m0': 0.0, 'train/m1': 1.0, 'train/m2': 2.0}, step=0)\n"
            "print('flushed', c.flush(30), flush=True); time.sleep(600)\n")], cwd=ROOT, stdout=subprocess.PIPE,
            text=True)
        assert dead.stdout.readline().strip() == "flushed True"
        dead.kill()  # SIGKILL: no finish, no more heartbeats
        dead.wait()
        successor = SidecarClient(sidecar.addr, init_kwargs={"project": "ids", "resume": "allow"}, run_id="shared2")
        for step in range(1, 20):
            successor.log({f"train/m{i}": value(step, i) for i in range(3)}, step=step)
        # refused while the dead one still counts as live; its heartbeats must not refresh the dead one
        _wait(lambda: successor.stats().get("rejected_run_in_use"), what="run_in_use")
        assert successor.finish(timeout=60), successor.stats()  # taken over once the dead one is lost
        status = sidecar.status()["runs"]["shared2"]
        assert status["incarnations"] == 2
        assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["shared2"]
    _assert_steps(run, range(20))


class _FakeWandbServer(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                outer.requests.append(f"{self.command} {self.path} auth={bool(self.headers.get('Authorization'))}")
                self.send_response(500)
                self.end_headers()

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *args: object) -> None:
                return None

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.mark.parametrize("init_kwargs, key", [
    ({"settings": {"base_url": "FAKE"}}, "settings.base_url"),
    ({"settings": {"api_key": "a" * 40}}, "settings.api_key"),
    ({"dir": "/tmp/elsewhere"}, "dir"),
    ({"settings": {"root_dir": "/tmp/elsewhere"}}, "settings.root_dir"),
    ({"settings": {"x_files_dir": "/tmp/elsewhere"}}, "settings.x_files_dir"),
    ({"no_such_argument": 1}, "no_such_argument"),
])
def test_a_peer_cannot_steer_wandb(tmp_path: Path, init_kwargs: dict, key: str) -> None:
    fake = _FakeWandbServer()
    init = json.loads(json.dumps(init_kwargs).replace("FAKE", fake.url))
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "d" * 40}
    with SidecarProcess(tmp_path, env=env) as sidecar:
        client = SidecarClient(sidecar.addr, init_kwargs={"project": "steer", **init}, run_id="steer1")
        client.log({"x": 1.0}, step=0)
        _wait(lambda: client.stats().get("rejected_init_refused"), what="init_refused reported")
        assert client.finish(timeout=2) is False
        status = sidecar.status()
        assert status["rejected"]["init_refused"] >= 1
        assert status["runs"]["steer1"]["state"] == "refused"
        assert key in status["runs"]["steer1"]["last_error"]
        assert key in sidecar.log()
        assert sidecar.stop() == 0
    assert fake.requests == []
    assert not Path("/tmp/elsewhere").exists() or not any(Path("/tmp/elsewhere").iterdir())
    fake.shutdown()


@pytest.mark.slow
def test_the_fake_wandb_server_sees_requests_when_the_operator_points_wandb_at_it(tmp_path: Path) -> None:
    """The control for the test above: the operator's own WANDB_BASE_URL does reach it."""
    fake = _FakeWandbServer()
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "d" * 40, "WANDB_BASE_URL": fake.url,
           "WANDB_INIT_TIMEOUT": "5"}
    with SidecarProcess(tmp_path, env=env) as sidecar:
        client = SidecarClient(sidecar.addr, init_kwargs={"project": "steer"}, run_id="steer2")
        client.log({"x": 1.0}, step=0)
        _wait(lambda: fake.requests, timeout=90, what="a request at the operator's server")
        client.finish(timeout=1)
    fake.shutdown()
    assert any("auth=True" in r for r in fake.requests)


def test_init_that_wandb_will_never_take_fails_once_and_is_reported(tmp_path: Path) -> None:
    calls = tmp_path / "init-calls"
    env = {"FAULT_INIT_TYPEERROR": "1", "FAULT_INIT_CALLS_FILE": str(calls)}
    with SidecarProcess(tmp_path, env=env, module="tests.fault_sidecar") as sidecar:
        client = SidecarClient(sidecar.addr, init_kwargs={"project": "bad"}, run_id="badinit1")
        for step in range(5):
            client.log({"x": float(step)}, step=step)
        _wait(lambda: client.stats().get("rejected_init_failed"), what="init_failed reported to the trainer")
        assert client.finish(timeout=2) is False
        status = sidecar.status()["runs"]["badinit1"]
        assert status["state"] == "failed" and status["worker"] == "failed"
        assert "TypeError" in status["last_error"]
        assert sidecar.stop() == 0
    assert calls.read_text().count("init") == 1  # not retried


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user (setpriv)")
def test_another_local_user_cannot_reach_a_default_sidecar(tmp_path: Path) -> None:
    sock_dir = f"/tmp/wsc-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "WANDB_SIDECAR_SOCKET_DIR": sock_dir, "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true"}
    (tmp_path / "wandb_dir").mkdir()
    addr = f"ipc://{sock_dir}/sidecar.sock"
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--journal-dir", str(tmp_path / "journal"),
                             "--allow-root", str(tmp_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _answers(addr), what="the sidecar answering its owner")
        assert oct(os.stat(sock_dir).st_mode & 0o777) == "0o700"
        probe = (
            "import json, sys\n"
            "from trainer_hook import SidecarClient\n"
            "from sidecar.status_view import Unreachable, fetch_status\n"
            f"c = SidecarClient({addr!r}, init_kwargs={{'project': 'stranger'}}, run_id='stranger1', spill_dir=None)\n"
            "c.log({'x': 1.0}, step=0)\n"
            "ok = c.finish(timeout=3)\n"
            "try:\n"
            f"    fetch_status({addr!r}, 2); status = 'answered'\n"
            "except Unreachable:\n"
            "    status = 'unreachable'\n"
            "print(json.dumps({'finish': ok, 'status': status}))\n")
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                              probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             env={**env, "HOME": "/tmp", "PYTHONPATH": str(ROOT)})
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result == {"finish": False, "status": "unreachable"}, out.stderr
        assert fetch_status(addr, 5)["runs"] == {}  # no run was started for the stranger
    finally:
        proc.terminate()
        proc.wait(60)


def _answers(addr: str) -> bool:
    try:
        fetch_status(addr, 0.5)
        return True
    except Unreachable:
        return False


def test_tcp_without_keys_is_refused_even_on_loopback(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--bind", "tcp://127.0.0.1:5999",
                          "--journal-dir", str(tmp_path / "j")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "every local user can reach it" in out.stderr


def test_the_sidecar_owns_its_wandb_service_whatever_it_inherits(tmp_path: Path) -> None:
    """wandb exports WANDB_SERVICE to children of any process that ran it; a sidecar attached to such a
    service would leave its runs held there when SIGKILLed ("run ID is in use" ever after)."""
    env = {"WANDB_SERVICE": "2-1-tcp-localhost-9"}  # a service that does not exist
    with SidecarProcess(tmp_path, env=env) as sidecar:
        client = SidecarClient(sidecar.addr, init_kwargs={"project": "svc"}, run_id="ownsvc1")
        client.log({"train/m0": 0.0, "train/m1": 1.0, "train/m2": 2.0}, step=0)
        assert client.finish(timeout=60)
        sidecar.wait_for(lambda s: s["runs"]["ownsvc1"]["state"] == "finished")
        assert sidecar.stop() == 0
    assert read_runs(sidecar.wandb_dir)["ownsvc1"].steps() == [0]


def test_messages_journaled_whose_ack_was_lost_are_not_logged_twice_when_delivered_later(tmp_path: Path) -> None:
    """A trainer exits while the sidecar holds messages it never acknowledged (frozen here, then back): they
    are journaled after all, and also on the trainer's disk. The next trainer of the run delivers the disk's
    copy naming where each was sent first, and the sidecar takes those it has as duplicates. Rows without a
    step: nothing in wandb's files could tell a second copy of them (the origin is all there is)."""
    spill, init = tmp_path / "spill", {"resume": "allow"}
    with SidecarProcess(tmp_path, "--heartbeat-timeout", "3") as sidecar:
        assert sidecar.proc is not None
        first = SidecarClient(sidecar.addr, run_id="lostack", init_kwargs=init, spill_dir=str(spill))
        for i in range(1000):
            first.log({"train/i": i})
        assert first.flush(60)
        os.kill(sidecar.proc.pid, signal.SIGSTOP)
        try:
            for i in range(1000, 3000):
                first.log({"train/i": i})
            assert not first.finish(timeout=2)  # nothing acknowledged: kept on disk
        finally:
            os.kill(sidecar.proc.pid, signal.SIGCONT)
        # what reached the sidecar's socket before the trainer left is journaled now; its acks go nowhere
        sidecar.wait_for(lambda s: s["runs"]["lostack"]["journaled_seq"] > 1001, timeout=60)
        second = SidecarClient(sidecar.addr, run_id="lostack", init_kwargs=init, spill_dir=str(spill))
        for i in range(3000, 3100):
            second.log({"train/i": i})
        assert second.finish(timeout=120), second.stats()
        assert second.stats()["taken_over_from_earlier_trainer"] > 0
        status = sidecar.wait_for(lambda s: s["runs"]["lostack"]["state"] == "finished", timeout=300)
        assert status["runs"]["lostack"]["duplicates"] > 0  # some were journaled and on disk both
        assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["lostack"]
    assert [row["train/i"] for row in run.history if "train/i" in row] == list(range(3100))
