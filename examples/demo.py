"""The main job on the embedded default: a sidecar (wandb offline) and a tiny real MMDetection training
streaming to it, then a summary of what the wandb run holds.

    .venv/bin/python -m examples.demo [--out demo-out] [--addr ADDR]   (default: the owner-only ipc:// socket)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from protocol import DEFAULT_ADDR

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out")
    p.add_argument("--addr", default=os.environ.get("WANDB_SIDECAR_ADDR", DEFAULT_ADDR))
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()

    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "WANDB_DIR": str(out), "PYTHONPATH": str(ROOT)}
    env.setdefault("WANDB_DATA_DIR", str(out / "wandb-data"))  # staged artifact files stay under --out
    env.setdefault("WANDB_MODE", "offline")  # the embedded default; set WANDB_MODE=online to upload
    py = sys.executable

    print(f"==> sidecar on {a.addr} (wandb {env['WANDB_MODE']}, run files under {out}/wandb)", flush=True)
    sidecar = subprocess.Popen([py, "-m", "sidecar", "serve", "--bind", a.addr, "--journal-dir",
                                str(out / "journal"), "--allow-root", str(out)], env=env, cwd=out)
    from sidecar.status_view import Unreachable, fetch_status

    deadline = time.monotonic() + 60
    while True:
        try:
            fetch_status(a.addr, timeout=0.5)
            break
        except Unreachable:
            if sidecar.poll() is not None or time.monotonic() > deadline:
                print("sidecar did not start", file=sys.stderr)
                return 1

    print("==> tiny Mask R-CNN (mmdet 2.x, CPU) training 2 epochs with MMDetWandbSidecarHook", flush=True)
    train = subprocess.run([py, "-m", "examples.mmdet2.train", "--work-dir", str(out / "work_dirs"),
                            "--data-root", str(out / "data"), "--logger", "sidecar", "--sidecar-addr", a.addr,
                            "--max-epochs", str(a.epochs), "--project", "mmdet-sidecar-demo"], env=env, cwd=ROOT)
    print("==> sidecar status", flush=True)
    subprocess.run([py, "-m", "sidecar", "status", "--connect", a.addr], env=env)
    sidecar.send_signal(signal.SIGTERM)
    rc = sidecar.wait(300)
    print(f"==> sidecar stopped (exit code {rc}); what the wandb run holds:", flush=True)
    subprocess.run([py, "-m", "sidecar", "inspect", str(out)], env=env)
    print(f"Upload later with: wandb sync {out}/wandb/offline-run-*")
    return train.returncode or rc


if __name__ == "__main__":
    sys.exit(main())
