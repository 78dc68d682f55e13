"""A trainer stand-in that writes one checkpoint and logs it, run as its own process (as another uid on the
host, or inside a trainer container on the compose network):

``python -m tests.checkpoint_client ADDR RUN_ID CHECKPOINT --steps N``: logs steps 0..N-1 (``value(step)``),
writes CHECKPOINT (its folder is made if missing), logs it with aliases ``epoch_1``/``latest``, finishes;
exit status 0 only when the sidecar has everything.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainer_hook import SidecarClient


def value(step: int) -> float:
    return step * 0.5 + 1.0


def checkpoint_bytes(run_id: str) -> bytes:
    return (run_id.encode() + b"-weights-") * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("addr")
    p.add_argument("run_id")
    p.add_argument("checkpoint")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--finish-timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    client = SidecarClient(a.addr, run_id=a.run_id, init_kwargs={"project": "compose"})
    for step in range(a.steps):
        client.log({"train/loss": value(step)}, step=step)
    ckpt = Path(a.checkpoint)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(checkpoint_bytes(a.run_id))
    client.log_checkpoint(ckpt, aliases=["epoch_1", "latest"], metadata={"uid": os.getuid()})
    ok = client.finish(timeout=a.finish_timeout)
    print(f"{a.run_id}: uid {os.getuid()} finish {'ok' if ok else 'timed out'} stats {client.stats()}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
