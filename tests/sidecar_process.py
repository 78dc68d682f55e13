"""Run a real ``wandb-sidecar serve`` in its own process for a test, and stop it the way operators do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sidecar.status_view import Unreachable, fetch_status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_started: list["SidecarProcess"] = []


def kill_leftovers() -> None:
    """Kill sidecars a failed test left running (tests that start them without ``with``)."""
    while _started:
        proc = _started.pop()
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()


class SidecarProcess:
    def __init__(self, root: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None,
                 allow_roots: list[Path] | None = None, bind_host: str = "127.0.0.1",
                 module: str = "sidecar") -> None:
        self.root = root
        self.port = port or free_port()
        self.addr = f"tcp://127.0.0.1:{self.port}"  # where clients connect
        self.bind = f"tcp://{bind_host}:{self.port}"
        self.wandb_dir = root / "wandb_dir"
        self.journal = root / "journal"
        self.log_path = root / f"sidecar-{self.port}.log"
        self.args = list(args)
        self.module = module  # tests.fault_sidecar: the same sidecar with a fault injected
        self.allow_roots = allow_roots or [root]
        self.env = {
            **os.environ,
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(self.wandb_dir),
            "WANDB_DATA_DIR": str(root / "wandb_data"),
            "WANDB_CACHE_DIR": str(root / "wandb_cache"),
            "WANDB_SILENT": "true",
            **(env or {}),
        }
        # A process that ran wandb itself (a test's in-process run) exports its wandb-core service here;
        # a sidecar inheriting it would share that service, and a SIGKILLed sidecar's runs would stay "in
        # use" there. Each sidecar starts its own, as in production.
        self.env.pop("WANDB_SERVICE", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> "SidecarProcess":
        self.wandb_dir.mkdir(parents=True, exist_ok=True)
        # TCP needs keys or --insecure: tests on loopback say so explicitly unless they bring keys
        insecure = [] if "--curve-secret-key" in self.args or "--insecure" in self.args else ["--insecure"]
        cmd = [sys.executable, "-m", self.module, "serve", "--bind", self.bind, "--journal-dir", str(self.journal),
               *[a for r in self.allow_roots for a in ("--allow-root", str(r))], *insecure, *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        _started.append(self)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0, keys: tuple[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"sidecar exited:\n{self.log()}"
            try:
                fetch_status(self.addr, 0.5, *(keys or (None, None)))
                return
            except Unreachable:
                continue
        raise TimeoutError(f"sidecar not ready in {timeout} s:\n{self.log()}")

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        return fetch_status(self.addr, timeout=timeout)

    def wait_for(self, predicate, timeout: float = 60.0) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        """Poll status until ``predicate(status)`` holds."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status()
            if predicate(last):
                return last
            time.sleep(0.05)
        raise TimeoutError(f"condition not met in {timeout} s; last status {last}")

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM: the sidecar drains, finishes every run and exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "SidecarProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
