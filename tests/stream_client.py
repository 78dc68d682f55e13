"""A trainer stand-in run as its own process: streams deterministic metrics, then finishes.

``python -m tests.stream_client ADDR RUN_ID --steps N --keys K --prefix P --exit-code E --out stats.json``
Values are ``value(step, i)`` so a test can recompute every one of them.
"""

from __future__ import annotations

import argparse
import json
import sys

from trainer_hook import SidecarClient


def value(step: int, i: int) -> float:
    return step * 0.25 + i


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("addr")
    p.add_argument("run_id")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--first-step", type=int, default=0, help="a resumed training goes on from here")
    p.add_argument("--init", default="{}", help="extra init_kwargs as JSON (e.g. a resume)")
    p.add_argument("--keys", type=int, default=10)
    p.add_argument("--prefix", default="train")
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--finish-timeout", type=float, default=60.0)
    p.add_argument("--out")
    a = p.parse_args(argv)
    init = {"project": "tests", "config": {"prefix": a.prefix}, **json.loads(a.init)}
    client = SidecarClient(a.addr, init_kwargs=init, run_id=a.run_id)
    for step in range(a.first_step, a.first_step + a.steps):
        client.log({f"{a.prefix}/m{i}": value(step, i) for i in range(a.keys)}, step=step)
    ok = client.finish(exit_code=a.exit_code, timeout=a.finish_timeout)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"ok": ok, **client.stats()}, f)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
