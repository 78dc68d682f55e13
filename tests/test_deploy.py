"""What a real ``docker compose`` deployment found, checked without Docker: a sidecar of another uid than the
trainer's (the image's uid 1000 beside a root trainer), retried uploads, keys made as root, files a checkout
must not show, paths a host trainer sends. ``tests/test_compose.py`` runs the same things in the real stack.

The uid tests start the real sidecar as uid 1000 (``tests.sidecar_as_user``): they need root.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import wandb
import yaml
from click.testing import CliRunner

from protocol import Kind, Message, decode, encode
from protocol.limits import SPOOL_DIR_NAME
from sidecar import cli
from sidecar.readback import read_runs
from sidecar.wandb_sink import FileGuard, WandbSink
from tests.sidecar_as_user import setpriv_argv
from tests.sidecar_process import SidecarProcess
from trainer_hook import SidecarClient
from trainer_hook.spool import spool_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SIDECAR_UID = 1000  # the image's user (Dockerfile: useradd --uid 1000 sidecar)
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="runs processes as another uid: needs root and setpriv (util-linux)")


def _as_user(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run this Python as ``uid`` (see ``tests.sidecar_as_user``)."""
    return subprocess.run([*setpriv_argv(uid), sys.executable, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def _readable_by(uid: int, path: Path) -> bool:
    """Can a process of ``uid`` (gid ``uid``, no groups, no capabilities) open ``path``? Asked of the kernel."""
    pid = os.fork()
    if pid == 0:  # the child only drops privileges, opens and exits: nothing else of this process runs
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with open(path, "rb"):
                os._exit(0)
        except OSError:
            os._exit(1)
        os._exit(2)
    return os.waitpid(pid, 0)[1] == 0


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary folder other users can traverse (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="sidecar-deploy-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _uid_sidecar(base: Path, work: Path, groups: str) -> SidecarProcess:
    """The real sidecar as uid 1000 (in ``groups``), allowed to read ``work``; its own files under base."""
    home = base / "sidecar"
    home.mkdir()
    (home / "wandb_dir").mkdir()
    for path in (home, home / "wandb_dir"):
        os.chown(path, SIDECAR_UID, SIDECAR_UID)
    env = {"SIDECAR_AS_UID": str(SIDECAR_UID), "SIDECAR_AS_GROUPS": groups,
           "HOME": str(home), "WANDB_CONFIG_DIR": str(home / "wandb_config"), "PYTHONPATH": str(ROOT)}
    return SidecarProcess(home, module="tests.sidecar_as_user", allow_roots=[work], env=env)


def _root_trainer_checkpoint(proc: SidecarProcess, work: Path, run_id: str) -> dict[str, Any]:
    """A root trainer logs one checkpoint; returns the run's status once the sidecar finished it."""
    ckpt = work / "epoch_1.pth"
    ckpt.write_bytes(np.arange(4096, dtype=np.int64).tobytes())
    ckpt.chmod(0o644)
    client = SidecarClient(proc.addr, run_id=run_id, init_kwargs={"project": "deploy"})
    client.log({"loss": 1.0}, step=0)
    client.log_checkpoint(ckpt, aliases=["epoch_1", "latest"])
    assert client.finish(timeout=60)
    status = proc.wait_for(lambda s: s["runs"].get(run_id, {}).get("state") == "finished", timeout=90)
    return status["runs"][run_id]


@needs_root
def test_a_sidecar_in_the_trainers_group_frees_a_root_trainers_spool_link(shared_tmp: Path) -> None:
    """The usual compose case (root trainer, sidecar uid 1000 with group_add 0): uploaded once, link freed."""
    work = shared_tmp / "work"
    work.mkdir(mode=0o755)
    proc = _uid_sidecar(shared_tmp, work, groups="0")
    with proc:
        run = _root_trainer_checkpoint(proc, work, "grouped")
        assert proc.stop() == 0
    assert not any(k.startswith("failed_") for k in run["wandb"]), run["wandb"]
    [artifact] = read_runs(proc.wandb_dir)["grouped"].artifacts_named("run_grouped_model")
    assert sorted(artifact.aliases) == ["epoch_1", "latest"]
    assert list((work / SPOOL_DIR_NAME).iterdir()) == []  # the hardlink is gone: max_keep_ckpts frees disk
    assert (work / "epoch_1.pth").is_file()


@needs_root
def test_a_spool_link_the_sidecar_cannot_remove_costs_disk_never_a_second_upload(shared_tmp: Path) -> None:
    """Sidecar uid 1000 outside the trainer's group: the real unlink fails after log_artifact. One artifact
    version, no failed checkpoint, the link stays and the log says what to do."""
    work = shared_tmp / "work"
    work.mkdir(mode=0o755)
    proc = _uid_sidecar(shared_tmp, work, groups="")
    with proc:
        run = _root_trainer_checkpoint(proc, work, "stranger")
        assert proc.stop() == 0
    assert run["wandb"].get("spool_unlink_failed") == 1, run["wandb"]
    assert run["wandb"].get("checkpoints") == 1 and "failed_checkpoint" not in run["wandb"], run["wandb"]
    artifacts = read_runs(proc.wandb_dir)["stranger"].artifacts_named("run_stranger_model")
    assert len(artifacts) == 1, [a.aliases for a in artifacts]
    assert len(list((work / SPOOL_DIR_NAME).iterdir())) == 1
    assert "cannot remove the spool link" in proc.log() and "TRAINER_GID" in proc.log()


def test_spool_folder_is_group_writable_and_not_sticky(tmp_path: Path) -> None:
    """Removing another user's link needs write permission on the folder and no sticky bit."""
    ckpt = tmp_path / "epoch_1.pth"
    ckpt.write_bytes(b"w" * 100)
    old = os.umask(0o022)  # the usual umask: 0755 folders
    try:
        spooled = Path(spool_checkpoint(str(ckpt), "run", 1))
    finally:
        os.umask(old)
    mode = spooled.parent.stat().st_mode
    assert mode & stat.S_IWGRP and mode & stat.S_IXGRP and mode & stat.S_IRGRP, oct(mode)
    assert not mode & stat.S_ISVTX and not mode & stat.S_IWOTH, oct(mode)  # others gain nothing
    assert os.path.samefile(spooled, ckpt)


# ------------------------------------------------------------------------ a retried upload never repeats


@pytest.fixture
def sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WandbSink]:
    """A sink on a real offline wandb run, everything under tmp_path."""
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    s = WandbSink("retry", FileGuard([tmp_path]))
    s.start(_msg(Kind.RUN_START, 1, {"init_kwargs": {"project": "deploy", "dir": str(tmp_path)}}))
    yield s
    if s.run is not None:
        s.finish(0)


def _msg(kind: Kind, seq: int, body: dict[str, Any]) -> Message:
    """A message of run "retry" as the sidecar gets it: encoded and decoded by the protocol, with its journal
    index (one incarnation: the index is the sequence number)."""
    msg = decode(encode(kind, "retry", seq, 0.0, body, incarnation="0123abcd"))
    msg.index = seq
    return msg


def _apply_twice(call: Any, msg: Message) -> None:
    """What the worker's retry does when a step after the upload raised: the same message again."""
    call(msg)
    call(msg)


def test_a_retried_checkpoint_table_or_prediction_message_logs_one_artifact_version(
        sink: WandbSink, tmp_path: Path) -> None:
    ckpt = tmp_path / "epoch_1.pth"
    ckpt.write_bytes(b"weights" * 50)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
    _apply_twice(sink.checkpoint, _msg(Kind.CHECKPOINT, 2, {"path": str(ckpt), "aliases": ["e1"]}))
    _apply_twice(sink.val_data, _msg(Kind.VAL_DATA, 3, {
        "class_names": ["cat"], "image_names": ["img.png"], "image_paths": [str(image)],
        "gt_boxes": [np.array([[1, 1, 5, 5]], np.float32)], "gt_labels": [np.array([0])]}))
    _apply_twice(sink.pred_batch, _msg(Kind.PRED_BATCH, 4, {
        "tag": "epoch_1", "indices": [0], "boxes": [np.array([[1, 1, 5, 5]], np.float32)],
        "scores": [np.array([0.9], np.float32)], "labels": [np.array([0])]}))
    # a later message of the same content is a new version: the guard is per message, not per content
    sink.checkpoint(_msg(Kind.CHECKPOINT, 5, {"path": str(ckpt), "aliases": ["e2"]}))
    sink.finish(0)
    artifacts = read_runs(tmp_path)["retry"].artifacts
    assert [(a.name, sorted(a.aliases)) for a in artifacts] == [
        ("run_retry_model", ["e1", "latest"]), ("val", ["latest"]), ("run_retry_pred", ["epoch_1", "latest"]),
        ("run_retry_model", ["e2", "latest"])]


def test_a_file_wandb_refuses_to_save_does_not_break_the_run_start(tmp_path: Path) -> None:
    """``run.save`` raising (a base_path that is not a parent) must not leave the run half-started: the
    retried run start would skip the rest, and every later table failed."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "cfg.py").write_text("x = 1\n")
    image = work / "img.png"
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
    with SidecarProcess(tmp_path, allow_roots=[work]) as proc:
        client = SidecarClient(proc.addr, run_id="files", init_kwargs={"project": "deploy"},
                               files=[{"path": str(work / "cfg.py"), "base_path": str(tmp_path / "elsewhere")}])
        client.send(Kind.VAL_DATA, {"class_names": ["cat"], "image_names": ["img.png"], "image_paths": [str(image)],
                                    "gt_boxes": [np.array([[1, 1, 5, 5]], np.float32)],
                                    "gt_labels": [np.array([0])]})
        client.log({"loss": 1.0}, step=0)
        assert client.finish(timeout=60)
        status = proc.wait_for(lambda s: s["runs"].get("files", {}).get("state") == "finished", timeout=90)
        assert proc.stop() == 0
    counters = status["runs"]["files"]["wandb"]
    assert counters.get("failed_file") == 1 and "failed_val_data" not in counters, counters
    run = read_runs(proc.wandb_dir)["files"]
    assert [a.name for a in run.artifacts] == ["val"] and run.steps() == [0]


# ------------------------------------------------------------------------------------------- keys


@needs_root
def test_keys_made_as_root_for_the_container_are_readable_by_its_user(tmp_path: Path, shared_tmp: Path) -> None:
    keys = shared_tmp / "keys"
    result = CliRunner().invoke(cli.main, ["keys", str(keys), "--name", "server", "--owner", str(SIDECAR_UID)])
    assert result.exit_code == 0, result.output
    secret = keys / "server.key_secret"
    st = secret.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (SIDECAR_UID, 0o600)
    assert _readable_by(SIDECAR_UID, secret) and _readable_by(SIDECAR_UID, keys / "server.key")
    # made as root without --owner: root's alone, which is what restart-looped the container
    CliRunner().invoke(cli.main, ["keys", str(keys), "--name", "rootonly"])
    assert not _readable_by(SIDECAR_UID, keys / "rootonly.key_secret")


@needs_root
def test_keys_owner_without_root_is_a_clear_error_and_leaves_no_half_pair(shared_tmp: Path) -> None:
    keys = shared_tmp / "userkeys"
    keys.mkdir()
    os.chown(keys, 65534, 65534)
    done = _as_user(65534, "-m", "sidecar", "keys", str(keys), "--name", "x", "--owner", str(SIDECAR_UID))
    assert done.returncode == 1 and "only root can" in done.stderr, (done.stdout, done.stderr)
    assert list(keys.iterdir()) == []
    done = _as_user(65534, "-m", "sidecar", "keys", str(keys), "--name", "x", "--owner", "65534")  # oneself: fine
    assert done.returncode == 0, done.stderr


def test_keys_owner_names_must_exist() -> None:
    result = CliRunner().invoke(cli.main, ["keys", "/nonexistent-never-made", "--owner", "no-such-user-here"])
    assert result.exit_code == 1 and "no such user or group here: 'no-such-user-here'" in result.output
    assert not Path("/nonexistent-never-made").exists()


def test_compose_key_recipe_gives_the_sidecars_keys_to_its_user() -> None:
    """The commands in docker-compose.yml's comments parse with the real CLI and give the keys the
    container reads (server, health) to the image's user."""
    text = (ROOT / "docker-compose.yml").read_text()
    commands = re.findall(r"wandb-sidecar keys [^#\n]+", re.sub(r"\\\n\s*#\s*", " ", text))
    owners = {}
    for command in commands:
        args = command.replace('"$(id -u):$(id -g)"', "0:0").split()[1:]
        ctx = cli.main.commands["keys"].make_context("keys", args[1:])
        owners[ctx.params["name"]] = ctx.params["owner"]
    assert owners["server"] == "sidecar" and owners.get("trainer-1") == "0:0", owners
    assert "--name health --owner sidecar" in text
    user = re.search(r"useradd [^&]*--uid (\d+) (\w+)", (ROOT / "Dockerfile").read_text())
    assert user and (int(user[1]), user[2]) == (SIDECAR_UID, "sidecar")


# ------------------------------------------------------------------------------------------- the checkout


def test_secrets_of_a_deployment_are_ignored_by_git() -> None:
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "rev-parse"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path]).returncode == 0

    assert ignored(".env") and ignored("keys/server.key_secret") and ignored("keys/authorized/health.key")
    assert not ignored(".env.example") and not ignored("docker-compose.yml")


def test_deploy_docs_say_the_compose_version_uids_and_work_dirs() -> None:
    readme = (ROOT / "README.md").read_text()
    deploy = readme[readme.index("## Deploy"):]
    deploy = deploy[: deploy.find("\n## ", 1) if "\n## " in deploy[1:] else len(deploy)]
    assert re.search(r"Compose (v2\.24|2\.24)", deploy) and "TRAINER_GID" in deploy and "WORK_DIRS" in deploy
    assert "healthy" in deploy and "--owner sidecar" in deploy
    assert "v2.24" in (ROOT / "docker-compose.yml").read_text().split("services:")[0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    sidecar = compose["services"]["sidecar"]
    assert [str(g) for g in sidecar["group_add"]] == ["${TRAINER_GID:-0}"]
    assert sidecar["command"][:4] == ["wandb-sidecar", "serve", "--bind", "tcp://0.0.0.0:5555"]  # no default relied on


def test_a_refused_path_says_the_trainer_must_send_it_by_its_absolute_path(tmp_path: Path) -> None:
    """A host trainer writing ./work_dirs sends a path the sidecar (compose: WORK_DIRS) refuses."""
    allowed = tmp_path / "work_dirs"
    allowed.mkdir()
    with SidecarProcess(tmp_path, allow_roots=[allowed]) as proc:
        client = SidecarClient(proc.addr, run_id="hostpath", spool_checkpoints=False)
        client.log_checkpoint("work_dirs/run/epoch_1.pth", aliases=["x"])
        assert client.finish(timeout=30)
        assert client.stats()["rejected_path_refused"] == 1
        assert proc.stop() == 0
    assert "write under a root, by its absolute path" in proc.log()
