"""The sidecar lists the installed packages once for all its runs: each run's requirements.txt is still
what wandb writes by itself, and a package installed meanwhile still shows up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import wandb.util

from sidecar import wandb_process
from tests.sidecar_process import SidecarProcess
from trainer_hook import SidecarClient

_PLAIN_RUN = """
import wandb
run = wandb.init(project="plain", settings=wandb.Settings(console="off"))
print(run.dir)
run.finish()
"""


def _requirements(run_dir: Path) -> list[str]:
    return sorted((run_dir / "files" / "requirements.txt").read_text().splitlines())


def test_requirements_of_a_sidecar_run_are_what_wandb_writes_alone(sidecar: SidecarProcess, tmp_path: Path) -> None:
    client = SidecarClient(sidecar.addr, init_kwargs={"project": "reqs"})
    client.log({"x": 1.0}, step=0)
    assert client.finish(timeout=60)
    assert sidecar.stop() == 0
    (run_dir,) = (sidecar.wandb_dir / "wandb").glob(f"offline-run-*-{client.run_id}")

    env = {**sidecar.env, "WANDB_DIR": str(tmp_path / "plain")}
    (tmp_path / "plain").mkdir()
    out = subprocess.run([sys.executable, "-c", _PLAIN_RUN], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    plain_dir = Path(out.stdout.strip().splitlines()[-1]).parent
    assert len(_requirements(run_dir)) > 10  # wandb, zmq, msgpack ... at least
    assert _requirements(run_dir) == _requirements(plain_dir)


def test_package_list_is_read_again_after_an_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()

    def install(name: str, version: str) -> None:
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        os.utime(site, ns=(0, site.stat().st_mtime_ns + 1_000_000_000))  # a coarse clock must still see it

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(wandb.util, "working_set", wandb.util.working_set)  # restored after the test
    monkeypatch.setattr(wandb_process, "_cache", None)
    monkeypatch.setattr(wandb_process, "_uncached", None)
    install("sweep-probe-one", "1.0")
    assert wandb_process.cache_package_list()
    assert wandb.util.working_set is wandb_process.cached_working_set
    names = {d.key for d in wandb.util.working_set()}
    assert "sweep-probe-one" in names and "wandb" in names
    assert wandb.util.working_set() is not wandb.util.working_set()  # a copy each time: callers may keep it

    install("sweep-probe-two", "2.0")
    assert {"sweep-probe-one", "sweep-probe-two"} <= {d.key for d in wandb.util.working_set()}
