"""Ask a running sidecar for its status (the same socket trainers use) and render it for people."""

from __future__ import annotations

import time
from typing import Any

import zmq

from protocol import Kind, ProtocolError, decode, encode
from protocol.curve import apply_client_keys, load_client_keys


class Unreachable(RuntimeError):
    """No status reply within the timeout."""


def fetch_status(addr: str, timeout: float = 3.0, server_key_file: str | None = None,
                 client_key_file: str | None = None) -> dict[str, Any]:
    """One STATUS request; raises :class:`Unreachable` when nothing answers in ``timeout`` seconds."""
    keys = load_client_keys(server_key_file, client_key_file)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    apply_client_keys(sock, keys)
    try:
        sock.connect(addr)
        sock.send_multipart(encode(Kind.STATUS, "", 0, time.time(), {}))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            try:
                msg = decode(sock.recv_multipart())
            except ProtocolError:
                continue
            if msg.kind is Kind.STATUS_REPLY:
                return msg.body["status"]
        raise Unreachable(f"no sidecar answered at {addr} within {timeout:g} s")
    finally:
        sock.close(0)
        ctx.term()


def render(status: dict[str, Any]) -> str:
    """A plain-text table: one line per run, then the sidecar's own counters."""
    cols = ["run", "state", "received", "journaled", "delivered", "lag", "queue", "dups", "rejected", "seen"]
    rows = [cols]
    for run_id, r in sorted(status["runs"].items()):
        rows.append([run_id, r["state"], r["received"], r["journaled_seq"], r["delivered_seq"], r["lag"],
                     r["queue"], r["duplicates"], r["rejected"], f"{r['last_seen_s']:.0f}s"])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
    lines = [f"wandb-sidecar on {status['bind']} (pid {status['pid']}, up {status['uptime_s']:.0f} s, "
             f"journal {status['journal']})"]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows]
    counters = ", ".join(f"{k}={v}" for k, v in sorted(status["counters"].items())) or "none"
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(status["rejected"].items())) or "none"
    lines.append(f"counters: {counters}")
    lines.append(f"rejected: {rejected}")
    errors = [f"{rid}: {r['last_error']}" for rid, r in status["runs"].items() if r["last_error"]]
    if status.get("last_error"):
        errors.insert(0, f"sidecar: {status['last_error']}")
    lines += [f"last error {e}" for e in errors]
    return "\n".join(lines)
