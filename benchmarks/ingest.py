"""End-to-end ingest from one trainer process, against a raw ZeroMQ + MessagePack floor measured beside it.

- ours: ``SidecarClient.log`` of 10 scalars, ``calls`` times, in blocks of ``block`` calls each followed
  by ``flush()`` (returns once the sidecar has journaled with fsync and acknowledged everything), into a
  real sidecar process that also delivers into an offline wandb run;
- floor: the same bodies packed with msgpack, sent over a ZeroMQ PUSH socket to a PULL socket in another
  process that unpacks each one (no validation, no journal, no acknowledgement, no batching by us).

    python -m benchmarks.ingest [--calls 200000] [--block 10000] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, cpu_seconds

_PULL = """
import sys, msgpack, zmq
ctx = zmq.Context(); pull = ctx.socket(zmq.PULL); port = pull.bind_to_random_port("tcp://127.0.0.1")
done = ctx.socket(zmq.PUSH); done.connect(sys.argv[2])
done.send(str(port).encode())
n = int(sys.argv[1])
for _ in range(n):
    msgpack.unpackb(pull.recv())
done.send(b"done")
"""


def _body(step: int) -> dict:
    return {"data": {f"train/m{i}": step * 0.001 + i for i in range(10)}, "step": step}


def raw_floor(calls: int) -> float:
    """msg/s of msgpack pack → PUSH → PULL → unpack, the receiver in its own process."""
    import msgpack
    import zmq

    ctx = zmq.Context()
    done = ctx.socket(zmq.PULL)
    port = done.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-c", _PULL, str(calls), f"tcp://127.0.0.1:{port}"])
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect(f"tcp://127.0.0.1:{int(done.recv())}")
    data = _body(0)
    t0 = time.perf_counter()
    for step in range(calls):
        data["step"] = step
        push.send(msgpack.packb(data))
    assert done.recv() == b"done"
    seconds = time.perf_counter() - t0
    proc.wait(30)
    push.close(0)
    done.close(0)
    ctx.term()
    return calls / seconds


def trainer_to_sidecar(addr: str, calls: int, block: int, profile: str | None = None,
                       sidecar_pid: int | None = None) -> dict[str, float]:
    """msg/s of ``log()`` calls until the last ``flush()`` returned (everything journaled and acked), and
    the CPU time per message each side used meanwhile (a load-independent view on a shared machine)."""
    from trainer_hook import SidecarClient

    client = SidecarClient(addr, init_kwargs={"project": "bench"}, spill_dir=None)
    assert client.flush(60)  # the run start is in: measure the metrics only
    data = _body(0)["data"]
    prof = cProfile.Profile() if profile else None
    side0 = cpu_seconds(sidecar_pid) if sidecar_pid else 0.0
    own0 = time.process_time()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for start in range(0, calls, block):
        for step in range(start, min(calls, start + block)):
            client.log(data, step=step)
        assert client.flush(300), client.stats()
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    seconds = time.perf_counter() - t0
    own = time.process_time() - own0
    side = cpu_seconds(sidecar_pid) - side0 if sidecar_pid else 0.0
    assert client.finish(timeout=300), client.stats()
    return {"per_s": calls / seconds, "trainer_cpu_us": own / calls * 1e6, "sidecar_cpu_us": side / calls * 1e6}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--block", type=int, default=10_000)
    p.add_argument("--profile", help="cProfile of the trainer process (its I/O thread is not seen by cProfile)")
    p.add_argument("--sidecar-profile", help="run the sidecar under cProfile, stats to this file")
    p.add_argument("--trainer-only", metavar="ADDR", help="only the trainer side, into the sidecar at ADDR: "
                   "prints its numbers as JSON (the benchmark runs it in a fresh process)")
    p.add_argument("--sidecar-pid", type=int, help="with --trainer-only: the sidecar's pid, for its CPU time")
    a = p.parse_args()
    if a.trainer_only:
        print(json.dumps(trainer_to_sidecar(a.trainer_only, a.calls, a.block, a.profile, a.sidecar_pid)))
        return
    from tests.sidecar_process import SidecarProcess

    with tempfile.TemporaryDirectory() as tmp:
        module = os.environ.get("BENCH_SIDECAR_MODULE", "sidecar")
        args: list[str] = []
        if a.sidecar_profile:
            module = "benchmarks.profiled_sidecar"
        with SidecarProcess(Path(tmp), *args, module=module,
                            env={"PROFILE_OUT": a.sidecar_profile or "", "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}) as sidecar:
            assert sidecar.proc is not None
            ours = trainer_to_sidecar(sidecar.addr, a.calls, a.block, a.profile, sidecar.proc.pid)
            assert sidecar.stop(600) == 0
    floor = raw_floor(a.calls)
    print(f"end to end: {ours['per_s']:,.0f} msg/s (CPU per message: trainer {ours['trainer_cpu_us']:.1f} µs, "
          f"sidecar {ours['sidecar_cpu_us']:.1f} µs); raw ZeroMQ+msgpack floor {floor:,.0f} msg/s; "
          f"ratio {ours['per_s'] / floor:.2f}")


if __name__ == "__main__":
    main()
