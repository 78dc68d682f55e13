"""The real ``docker compose`` stack, built from this checkout and run with a throwaway project name, port
and volumes: what a user gets from ``docker compose up``.

Skipped, with the reason, where no Docker engine with Compose v2.24+ answers (CI without an engine stays
green). Here: ``bash ../shared/tools/container-engine.sh start``. Needs root (it kills the sidecar's process
from the host and writes checkpoints as uid 0 and uid 1000). Takes a few minutes; marked ``compose`` and
``slow``. The tests share one stack and run in file order; the last one takes it down.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from protocol.limits import SPOOL_DIR_NAME
from sidecar.readback import RunRecords, read_runs
from sidecar.status_view import Unreachable, fetch_status
from tests import checkpoint_client
from tests.sidecar_as_user import setpriv_argv
from tests.sidecar_process import free_port
from trainer_hook import SidecarClient

ROOT = Path(__file__).resolve().parent.parent
MIN_COMPOSE = (2, 24)  # env_file with path/required
pytestmark = [pytest.mark.compose, pytest.mark.slow]


def _engine_problem() -> str:
    """Why the stack cannot run here ('' when it can)."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
        if info.returncode != 0:
            return f"no Docker engine answers: {(info.stderr.strip().splitlines() or ['?'])[-1]}"
        version = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True,
                                 timeout=30)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer within 30 s"
    if version.returncode != 0:
        return "no Docker Compose v2 (`docker compose version` fails)"
    found = tuple(int(n) for n in re.findall(r"\d+", version.stdout)[:2])
    if found < MIN_COMPOSE:
        return f"Docker Compose {version.stdout.strip()} is older than 2.24, which docker-compose.yml needs"
    if os.geteuid() != 0:
        return "needs root (kills the sidecar's process, writes checkpoints as uid 0 and 1000)"
    return ""


class Stack:
    """One throwaway compose project: this checkout's docker-compose.yml plus a small override (image tag,
    published port, build context, trainer image), everything else as a user has it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.project = f"sidecar-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.image = f"wandb-sidecar:{self.project}"
        self.port = free_port()
        self.addr = f"tcp://127.0.0.1:{self.port}"
        self.work = base / "work_dirs"  # WORK_DIRS: an absolute host path, the same in the containers
        self.work.mkdir(mode=0o755)
        (base / ".env").write_text(f"WANDB_MODE=offline\nWANDB_PROJECT=compose-test\nWORK_DIRS={self.work}\n")
        (base / "override.yml").write_text(f"""
services:
  sidecar:
    build:
      context: {ROOT}
    image: {self.image}
    ports: !override
      - "127.0.0.1:{self.port}:5555"
  trainer:
    image: {self.image}
    user: "0"
    volumes:
      - {ROOT}:/src/wandb-sidecar:ro
""")
        self.files = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(base / "override.yml")]
        # nothing from the caller's shell decides what the stack sees: only the .env above
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("COMPOSE_", "WANDB_")) and k not in ("WORK_DIRS", "TRAINER_GID", "TRAINER_IMAGE")}

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["docker", "compose", "-p", self.project, "--project-directory", str(self.base), *self.files, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
                                 f"\n{self.logs()}")
        return done

    def logs(self) -> str:
        cmd = ["docker", "compose", "-p", self.project, "--project-directory", str(self.base), *self.files,
               "logs", "--no-color", "--tail", "60", "sidecar"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        return "sidecar log (tail):\n" + done.stdout + done.stderr

    def container(self) -> str:
        return self.compose("ps", "-q", "sidecar").stdout.strip()

    def inspect(self, fmt: str) -> str:
        done = subprocess.run(["docker", "inspect", "--format", fmt, self.container()], capture_output=True,
                              text=True, timeout=30)
        return done.stdout.strip()

    def wait_healthy(self, timeout: float = 150) -> float:
        """Seconds until the container's healthcheck says healthy."""
        t0 = time.monotonic()
        state = ""
        while time.monotonic() - t0 < timeout:
            state = self.inspect("{{.State.Health.Status}}") if self.container() else "no container"
            if state == "healthy":
                return time.monotonic() - t0
            time.sleep(1)
        raise AssertionError(f"not healthy after {timeout} s (last: {state})\n{self.logs()}")

    def status(self, keys: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
        return fetch_status(self.addr, 3.0, *keys)

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 180,
                    keys: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status(keys)
                if predicate(last):
                    return last
            except Unreachable:
                pass
            time.sleep(0.5)
        raise AssertionError(f"status never matched: {json.dumps(last)[:3000]}\n{self.logs()}")

    def read_wandb(self) -> dict[str, RunRecords]:
        """The offline run files, copied out of the ``wandb`` volume and read with wandb's own reader."""
        out = self.base / f"wandb-out-{time.monotonic_ns()}"
        self.compose("cp", "sidecar:/var/lib/wandb-sidecar/wandb", str(out))
        return read_runs(out)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        found = {}
        for what in ("container", "volume", "network"):
            cmd = ["docker", what, "ls", "-q", "--filter", label] + (["-a"] if what == "container" else [])
            found[what] = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.split()
        return found

    def down(self) -> None:
        self.compose("--profile", "train", "down", "-v", "--remove-orphans", "--timeout", "60", check=False)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    base = Path(tempfile.mkdtemp(prefix="sidecar-compose-"))
    base.chmod(0o755)  # uid 1000 trainers write under it
    s = Stack(base)
    try:
        t0 = time.monotonic()
        s.compose("build", "sidecar", timeout=900)
        s.build_s = time.monotonic() - t0
        s.compose("up", "-d", "sidecar")
        yield s
    finally:
        s.down()
        subprocess.run(["docker", "image", "rm", "-f", s.image], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_image_runs_as_non_root_and_becomes_healthy(stack: Stack) -> None:
    took = stack.wait_healthy()
    print(f"build {stack.build_s:.0f} s, healthy after {took:.0f} s")
    uid, groups = stack.compose("exec", "-T", "sidecar", "sh", "-c", "id -u; id -G").stdout.split("\n", 1)
    assert uid.strip() == "1000"
    assert "0" in groups.split()  # group_add TRAINER_GID (default 0): may remove a root trainer's spool links
    assert stack.compose("exec", "-T", "sidecar", "wandb-sidecar", "status", "--connect", "tcp://127.0.0.1:5555",
                         "--json").returncode == 0


def _stream(client: SidecarClient, steps: range) -> None:
    for step in steps:
        client.log({"train/loss": checkpoint_client.value(step), "train/step": step}, step=step)


def _through(client: SidecarClient, steps: range, stop: Callable[[], object],
             start: Callable[[], object] | None = None) -> None:
    """Half of ``steps`` go out right before ``stop`` hits the sidecar (journaled, maybe not yet in wandb),
    the other half after it (sent while the sidecar is away or just back: buffered and resent), then
    ``start`` brings it back."""
    half = steps.start + len(steps) // 2
    _stream(client, range(steps.start, half))
    stop()
    _stream(client, range(half, steps.stop))
    if start is not None:
        start()


def test_a_stream_and_checkpoints_of_uid_0_and_1000_survive_restart_kill_and_down_up(stack: Stack) -> None:
    stack.wait_healthy()
    host_dir, user_dir = stack.work / "host-root", stack.work / "host-1000"
    host_dir.mkdir(mode=0o755)
    user_dir.mkdir(mode=0o755)
    os.chown(user_dir, 1000, 1000)

    client = SidecarClient(stack.addr, run_id="hoststream", init_kwargs={"project": "compose"})
    _stream(client, range(0, 50))
    assert client.flush(timeout=60)
    _through(client, range(50, 100), lambda: stack.compose("restart", "sidecar"))
    assert client.flush(timeout=120), stack.logs()

    # uid 0 writes a checkpoint (the trainer of a root MMDetection container does)
    ckpt = host_dir / "epoch_1.pth"
    ckpt.write_bytes(checkpoint_client.checkpoint_bytes("hoststream"))
    client.log_checkpoint(ckpt, aliases=["epoch_1", "latest"])
    pid = int(stack.inspect("{{.State.Pid}}"))
    _through(client, range(100, 150), lambda: os.kill(pid, signal.SIGKILL))  # the restart policy brings it back
    assert client.flush(timeout=120), stack.logs()
    assert int(stack.inspect("{{.RestartCount}}")) >= 1

    _through(client, range(150, 200), lambda: stack.compose("down", "--timeout", "120"),
             lambda: stack.compose("up", "-d", "sidecar"))
    assert client.finish(timeout=180), stack.logs()

    # uid 1000, another run, its own process
    user = subprocess.run([*setpriv_argv(1000), sys.executable, "-m",
                           "tests.checkpoint_client", stack.addr, "hostuser", str(user_dir / "epoch_1.pth")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert user.returncode == 0, user.stdout + user.stderr

    status = stack.wait_status(lambda s: all(s["runs"].get(r, {}).get("state") == "finished"
                                             for r in ("hoststream", "hostuser")))
    for run_id in ("hoststream", "hostuser"):
        counters = status["runs"][run_id]["wandb"]
        assert not any(k.startswith("failed_") or k == "spool_unlink_failed" for k in counters), counters
    runs = stack.read_wandb()
    stream = runs["hoststream"]
    assert stream.project == "compose"  # init_kwargs win over WANDB_PROJECT from .env
    assert stream.steps() == list(range(200)), "steps lost or duplicated"
    assert [row["train/loss"] for row in stream.history] == [checkpoint_client.value(s) for s in range(200)]
    assert len(stream.dirs) >= 3  # the restart and the down/up each resumed the run in a new wandb directory
    for run_id, folder in (("hoststream", host_dir), ("hostuser", user_dir)):
        models = runs[run_id].artifacts_named(f"run_{run_id}_model")
        assert [sorted(a.aliases) for a in models] == [["epoch_1", "latest"]], run_id
        assert list((folder / SPOOL_DIR_NAME).iterdir()) == [], f"{run_id}: spool link not removed"
        assert (folder / "epoch_1.pth").read_bytes() == checkpoint_client.checkpoint_bytes(run_id)
    assert (user_dir / "epoch_1.pth").stat().st_uid == 1000 and ckpt.stat().st_uid == 0


def test_a_trainer_container_on_the_compose_network_reaches_the_sidecar_by_name(stack: Stack) -> None:
    """The example trainer service (as root, the usual MMDetection image) with this checkout's trainer_hook."""
    ckpt = stack.work / "container" / "epoch_1.pth"
    done = stack.compose("--profile", "train", "run", "--rm", "trainer", "python", "-m", "tests.checkpoint_client",
                         "tcp://sidecar:5555", "incontainer", str(ckpt), "--steps", "20", check=False)
    assert done.returncode == 0, done.stdout + done.stderr + stack.logs()
    assert "uid 0 finish ok" in done.stdout
    stack.wait_status(lambda s: s["runs"].get("incontainer", {}).get("state") == "finished")
    run = stack.read_wandb()["incontainer"]
    assert run.steps() == list(range(20))
    [model] = run.artifacts_named("run_incontainer_model")
    assert model.metadata == {"uid": 0}
    assert list((ckpt.parent / SPOOL_DIR_NAME).iterdir()) == []


def _commented(text: str, key: str) -> str:
    """The value of a commented-out ``# key: ...`` (continuation lines too) in docker-compose.yml."""
    m = re.search(rf"^\s*# {key}: (.*(?:\n\s*#\s{{5,}}.*)*)", text, re.M)
    assert m, key
    return re.sub(r"\n\s*#\s+", " ", m[1])


def test_the_curve_variant_as_documented_refuses_a_client_without_a_key(stack: Stack) -> None:
    """Keys made as root following docker-compose.yml's comments, the commented command and healthcheck keys
    turned on: healthy (the container reads its keys), a keyless client gets nothing in, a keyed one does."""
    text = (ROOT / "docker-compose.yml").read_text()
    keys = stack.base / "keys"
    (keys / "authorized").mkdir(parents=True)
    for name, owner in (("server", "sidecar"), ("health", "sidecar"), ("trainer-1", "0:0")):
        stack.compose("run", "--rm", "--no-deps", "--user", "0", "-v", f"{keys}:/newkeys", "sidecar",
                      "wandb-sidecar", "keys", "/newkeys", "--name", name, "--owner", owner)
    for name in ("health", "trainer-1"):
        shutil.copy(keys / f"{name}.key", keys / "authorized")
    command = json.loads(_commented(text, "command"))
    env = {k: _commented(text, k) for k in ("WANDB_SIDECAR_SERVER_KEY", "WANDB_SIDECAR_CLIENT_KEY")}
    curve = stack.base / "curve.yml"
    curve.write_text(json.dumps({"services": {"sidecar": {"command": command, "environment": env}}}))
    stack.files += ["-f", str(curve)]
    stack.compose("up", "-d", "sidecar")
    stack.wait_healthy()

    server_key = str(keys / "server.key")
    rogue = SidecarClient(stack.addr, run_id="nokey", init_kwargs={"project": "compose"})
    rogue.log({"x": 1.0}, step=0)
    good = SidecarClient(stack.addr, run_id="withkey", init_kwargs={"project": "compose"},
                         curve_server_key=server_key, curve_client_key=str(keys / "trainer-1.key_secret"))
    good.log({"x": 1.0}, step=0)
    assert good.finish(timeout=60), stack.logs()
    assert rogue.finish(timeout=5) is False
    assert rogue.stats()["acked_seq"] == 0
    status = stack.wait_status(lambda s: s["runs"].get("withkey", {}).get("state") == "finished",
                               keys=(server_key, str(keys / "trainer-1.key_secret")))
    assert "nokey" not in status["runs"]


def test_down_v_leaves_nothing_behind(stack: Stack) -> None:
    assert all(stack.leftovers().values())  # the stack is there...
    stack.down()
    assert stack.leftovers() == {"container": [], "volume": [], "network": []}  # ...and then nothing is
