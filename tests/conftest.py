from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.sidecar_process import SidecarProcess, kill_leftovers  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leftover_sidecars():
    yield
    kill_leftovers()


@pytest.fixture(autouse=True)
def _own_spill_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test spills into its own directory: a spill a test leaves (kept for later delivery) must not be
    taken over and delivered by a client of another test."""
    monkeypatch.setenv("WANDB_SIDECAR_SPILL_DIR", str(tmp_path / "client-spill"))


@pytest.fixture
def sidecar(tmp_path: Path):
    """A running sidecar in its own process (wandb offline, everything under tmp_path)."""
    with SidecarProcess(tmp_path) as proc:
        yield proc
