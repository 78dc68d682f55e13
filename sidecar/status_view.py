"""Ask a running sidecar for its status (the same socket trainers use) and render it for people."""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any, Callable

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


def _fmt_counts(counts: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v) or "none"


def render(status: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    """A plain-text view: the sidecar, one table line per run, then per-run detail and sidecar-wide counters.

    With ``previous`` (the status of the last refresh, ``--watch``) the table adds the rates in and out
    (sequenced messages per second received from the trainer and delivered to wandb) since then."""
    dt = status.get("uptime_s", 0) - previous.get("uptime_s", 0) if previous else 0
    before = previous.get("runs", {}) if previous and dt > 0 else None
    cols = ["run", "state", "worker", "received", "journaled", "delivered", "lag", "queue", "dups", "gaps",
            "backpr", "rejected", "seen"]
    if before is not None:
        cols[4:4] = ["in/s", "out/s"]
    rows: list[list[Any]] = [cols]
    runs = status.get("runs", {})
    for run_id, r in sorted(runs.items()):
        row = [run_id, r["state"], r.get("worker", ""), r["received"], r["journaled_seq"], r["delivered_seq"],
               r["lag"], r["queue"], r["duplicates"], r["out_of_order"], r.get("backpressure", 0), r["rejected"],
               f"{r['last_seen_s']:.0f}s"]
        if before is not None:
            b = before.get(run_id, {})
            row[4:4] = [f"{(r['received'] - b.get('received', 0)) / dt:.0f}",
                        f"{(r['delivered_seq'] - b.get('delivered_seq', 0)) / dt:.0f}"]
        rows.append(row)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
    mode = f", wandb {status['wandb_mode']}" if status.get("wandb_mode") else ""
    draining = "" if status.get("serving", True) else " DRAINING"
    lines = [f"wandb-sidecar {status.get('version', '')} on {status['bind']} (pid {status['pid']}, "
             f"up {status['uptime_s']:.0f} s{mode}, journal {status['journal']}){draining}"]
    if runs:
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    else:
        lines.append("no runs yet")
    for run_id, r in sorted(runs.items()):
        client = r.get("client") or {}
        who = f" trainer {client.get('host')} pid {client.get('pid')}" if client else ""
        project = f" project {r['project']}" if r.get("project") else ""
        detail = [f"  {run_id}:{project}{who}", f"    wandb: {_fmt_counts(r.get('wandb', {}))}"]
        if r.get("rejected_by"):
            detail.append(f"    rejected: {_fmt_counts(r['rejected_by'])}")
        if r.get("last_error"):
            detail.append(f"    last error: {r['last_error']}")
        lines += detail
    counters = " ".join(f"{k}={v}" for k, v in sorted(status.get("counters", {}).items())) or "none"
    runs_by_state: dict[str, int] = {}
    for r in runs.values():
        runs_by_state[r["state"]] = runs_by_state.get(r["state"], 0) + 1
    lines.append(f"runs: {_fmt_counts(runs_by_state)}")
    lines.append(f"sidecar: {counters}")
    lines.append(f"rejected: {_fmt_counts(status.get('rejected', {}))}")
    if status.get("last_error"):
        lines.append(f"last error: {status['last_error']}")
    return "\n".join(lines)


def watch_status(fetch: Callable[[], dict[str, Any]], addr: str, interval: float, count: int | None = None,
                 as_json: bool = False, out: IO[str] | None = None) -> bool:
    """Refresh the view every ``interval`` seconds until Ctrl-C (or ``count`` refreshes); True if the last
    refresh got an answer.

    On a terminal each refresh clears the screen and redraws in place; into a pipe or file the frames
    follow each other, each under its own header line. With ``as_json`` every refresh is one JSON object
    on one line (an unreachable sidecar is reported on stderr, not on stdout)."""
    out = out or sys.stdout
    tty = out.isatty()
    previous: dict[str, Any] | None = None
    ok, n = False, 0
    try:
        while True:
            started = time.monotonic()
            try:
                st = fetch()
                ok = True
            except Unreachable as exc:
                st, ok = None, False
                error = f"{exc} (retrying every {interval:g} s)"
            n += 1
            if as_json:
                if st is not None:
                    out.write(json.dumps(st, sort_keys=True) + "\n")
                else:
                    sys.stderr.write(error + "\n")
            else:
                header = (f"{time.strftime('%Y-%m-%d %H:%M:%S')}  wandb-sidecar status {addr}, every {interval:g} s"
                          f"{f' ({n}/{count})' if count else ''}; Ctrl-C stops")
                body = render(st, previous) if st is not None else error
                out.write(("\x1b[H\x1b[J" if tty else "") + header + "\n" + body + "\n" + ("" if tty else "\n"))
            out.flush()
            previous = st if st is not None else previous
            if count is not None and n >= count:
                return ok
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return ok
