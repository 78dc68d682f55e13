"""``wandb-sidecar``: serve trainers, or report what a running sidecar is doing."""

from __future__ import annotations

import json
import logging
import netrc
import os
import signal
import sys

import click
import zmq

from protocol import DEFAULT_ADDR

log = logging.getLogger("sidecar")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc"))
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return auth.authenticators(base) is not None


def _choose_wandb_mode() -> str:
    """wandb reads its own environment; with no credentials and no explicit mode we run offline."""
    if not os.environ.get("WANDB_MODE") and not _has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        log.info("no wandb credentials and no WANDB_MODE: running offline (upload later with `wandb sync`)")
    return os.environ.get("WANDB_MODE", "online")


def _already_served(bind: str) -> bool:
    """Is another sidecar answering at this ipc:// path? (ZeroMQ would silently replace its socket file.)"""
    if not bind.startswith("ipc://") or not os.path.exists(bind[len("ipc://"):]):
        return False
    from .status_view import Unreachable, fetch_status

    try:
        fetch_status(bind, 1.0)
        return True
    except Unreachable:
        return False


def _setup_logging(level: str, fmt: str = "text") -> None:
    from .logs import setup_logging

    setup_logging(level, fmt)


@click.group()
def main() -> None:
    """Asynchronous wandb logging sidecar for MMDetection and any training loop."""


@main.command()
@click.option("--bind", default=DEFAULT_ADDR, show_default=True, envvar="WANDB_SIDECAR_BIND",
              help="ZeroMQ address trainers connect to.")
@click.option("--journal-dir", default=".wandb-sidecar/journal", show_default=True,
              envvar="WANDB_SIDECAR_JOURNAL", type=click.Path(file_okay=False),
              help="Where messages are journaled before they are acknowledged.")
@click.option("--allow-root", "allow_roots", multiple=True, type=click.Path(file_okay=False),
              envvar="WANDB_SIDECAR_ALLOW_ROOTS",
              help="Only files under these directories are read (checkpoints, images). Repeatable. "
                   "Default: the working directory.")
@click.option("--heartbeat-timeout", default=60.0, show_default=True, type=float,
              help="Seconds without a message or heartbeat before a trainer is declared dead.")
@click.option("--no-fsync", is_flag=True, help="Do not fsync the journal (faster, not crash-safe).")
@click.option("--replay-backoff", default=10.0, show_default=True, type=float,
              help="Seconds before a run whose wandb files came out incomplete (full WANDB_DIR) is replayed "
                   "from the journal; doubles each time, up to 600.")
@click.option("--retention", default=7 * 24 * 3600.0, show_default=True, type=float, envvar="WANDB_SIDECAR_RETENTION",
              help="Seconds a finished run stays in status, the metrics and the journal's records (to "
                   "acknowledge late resends and resume it) before it is forgotten.")
@click.option("--journal-trim-bytes", default=4 * 1024 * 1024, show_default=True, type=click.IntRange(min=1),
              envvar="WANDB_SIDECAR_JOURNAL_TRIM_BYTES",
              help="An open run's journal is compacted, up to what wandb provably holds, once it is this large.")
@click.option("--max-run-queue", default=10_000, show_default=True, type=click.IntRange(min=1),
              envvar="WANDB_SIDECAR_MAX_RUN_QUEUE",
              help="Messages of a run held in memory for its wandb worker (a batch of log calls counts each call); "
                   "past it the worker reads them back from the journal.")
@click.option("--max-run-backlog-bytes", default=4 * 1024**3, show_default=True, type=click.IntRange(min=1),
              envvar="WANDB_SIDECAR_MAX_RUN_BACKLOG_BYTES",
              help="A run's journal (what wandb does not hold yet) beyond this stops being acknowledged: its "
                   "trainer keeps and resends (backpressure).")
@click.option("--max-runs", default=1000, show_default=True, type=click.IntRange(min=1),
              envvar="WANDB_SIDECAR_MAX_RUNS", help="Live runs served at once; a new run beyond it is refused.")
@click.option("--curve-secret-key", type=click.Path(dir_okay=False, exists=True), envvar="WANDB_SIDECAR_CURVE_SECRET",
              help="The server's secret key file (from `wandb-sidecar keys`): turns on CurveZMQ.")
@click.option("--curve-authorized-keys", type=click.Path(file_okay=False, exists=True),
              envvar="WANDB_SIDECAR_CURVE_AUTHORIZED", help="Directory of the client public keys (*.key) allowed in.")
@click.option("--insecure", is_flag=True,
              help="Allow a TCP bind without keys, or an ipc:// socket in a directory other users can enter "
                   "(logged loudly).")
@click.option("--log-level", default="INFO", show_default=True, envvar="WANDB_SIDECAR_LOG_LEVEL")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              envvar="WANDB_SIDECAR_LOG_FORMAT", help="json: one JSON object per line on stderr, for log collectors.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, envvar="WANDB_SIDECAR_METRICS_PORT",
              help="Serve Prometheus metrics (the counters of `status`) on this port. Default: off.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, envvar="WANDB_SIDECAR_METRICS_HOST",
              help="Address the metrics endpoint listens on (0.0.0.0 inside a container).")
def serve(bind: str, journal_dir: str, allow_roots: tuple[str, ...], heartbeat_timeout: float,
          no_fsync: bool, replay_backoff: float, retention: float, journal_trim_bytes: int,
          max_run_queue: int, max_run_backlog_bytes: int, max_runs: int,
          curve_secret_key: str | None, curve_authorized_keys: str | None, insecure: bool,
          log_level: str, log_format: str, metrics_port: int | None, metrics_host: str) -> None:
    """Receive from trainers and do all wandb work. SIGTERM drains, finishes every run, exits 0."""
    _setup_logging(log_level, log_format)
    if log_format == "json" and "WANDB_SILENT" not in os.environ:
        os.environ["WANDB_SILENT"] = "true"  # wandb's own "wandb: ..." lines would break one-JSON-per-line
    from .auth import InsecureBindRefused, socket_security

    try:
        security = socket_security(bind, curve_secret_key, curve_authorized_keys, insecure)
    except (InsecureBindRefused, ValueError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    if _already_served(bind):
        log.error("a sidecar already serves %s; stop it first or bind elsewhere (binding again would take its "
                  "socket away from it)", bind)
        sys.exit(2)
    # The sidecar owns its wandb service: one inherited through WANDB_SERVICE (set by wandb in any process
    # that ran it, for its children) would outlive a SIGKILLed sidecar holding its runs ("run ID is in use").
    os.environ.pop("WANDB_SERVICE", None)
    mode = _choose_wandb_mode()
    from .server import SidecarServer  # imports wandb: keep `status` fast
    from .wandb_process import prepare_wandb

    prepare_wandb()  # the wandb service and the package list, before the first run needs them

    server = SidecarServer(bind, journal_dir, list(allow_roots) or [os.getcwd()],
                           heartbeat_timeout=heartbeat_timeout, fsync=not no_fsync, socket_setup=security,
                           replay_backoff=replay_backoff, retention=retention, max_runs=max_runs,
                           trim_bytes=journal_trim_bytes, max_run_queue=max_run_queue,
                           max_backlog_bytes=max_run_backlog_bytes)

    def on_signal(signum: int, _frame: object) -> None:
        if server._stop.is_set():
            log.warning("second %s: exiting without waiting for wandb", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: draining and finishing every run", signal.Signals(signum).name)
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("wandb mode: %s", mode)
    metrics = None
    if metrics_port is not None:
        from .prometheus import start_metrics_server

        try:
            metrics = start_metrics_server(server.status, metrics_port, metrics_host)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", metrics_host, metrics_port, exc)
            sys.exit(2)
    try:
        server.serve()
    except zmq.ZMQError as exc:
        log.error("cannot serve on %s: %s", bind, exc)
        sys.exit(2)
    finally:
        if metrics is not None:
            metrics.shutdown()


@main.command()
@click.option("--connect", default=DEFAULT_ADDR, show_default=True, envvar="WANDB_SIDECAR_ADDR")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.option("--timeout", default=3.0, show_default=True, type=float)
@click.option("--watch", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]", help="Refresh every SECONDS (default 2) until Ctrl-C; with --json, one JSON "
                                        "object per line.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="With --watch: stop after this many refreshes (implies --watch).")
@click.option("--curve-server-key", type=click.Path(dir_okay=False, exists=True), envvar="WANDB_SIDECAR_SERVER_KEY",
              help="The sidecar's public key file, when it runs with CurveZMQ.")
@click.option("--curve-client-key", type=click.Path(dir_okay=False, exists=True), envvar="WANDB_SIDECAR_CLIENT_KEY",
              help="This client's secret key file, when the sidecar runs with CurveZMQ.")
def status(connect: str, as_json: bool, timeout: float, watch: float | None, count: int | None,
           curve_server_key: str | None, curve_client_key: str | None) -> None:
    """Report runs and counters of a running sidecar. Exit code 1 when it does not answer."""
    from .status_view import Unreachable, fetch_status, render, watch_status

    if watch is not None or count is not None:
        ok = watch_status(lambda: fetch_status(connect, timeout, curve_server_key, curve_client_key),
                          connect, 2.0 if watch is None else watch, count, as_json)
        sys.exit(0 if ok else 1)
    try:
        st = fetch_status(connect, timeout, curve_server_key, curve_client_key)
    except Unreachable as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo(json.dumps(st, indent=2, sort_keys=True) if as_json else render(st))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="server", show_default=True, help="Key pair name, e.g. server or trainer-node1.")
@click.option("--owner", metavar="USER[:GROUP]",
              help="Give the files to this user (needs root), e.g. `sidecar` for the image's keys, `$(id -u)` for yours.")
def keys(directory: str, name: str, owner: str | None) -> None:
    """Make a CurveZMQ key pair: NAME.key (public, hand it out) and NAME.key_secret (keep it)."""
    from .auth import make_keys

    try:
        public, secret = make_keys(directory, name, owner)
    except (ValueError, PermissionError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"public key: {public}\nsecret key: {secret}")


@main.command()
@click.argument("wandb_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run.")
def inspect(wandb_dir: str, as_json: bool) -> None:
    """Summarise the offline runs under WANDB_DIR (read with wandb's own reader)."""
    from .readback import describe, read_runs

    runs = read_runs(wandb_dir)
    if not runs:
        click.echo(f"no offline runs under {wandb_dir}", err=True)
        sys.exit(1)
    for run in runs.values():
        if as_json:
            click.echo(json.dumps({"run_id": run.run_id, "exit_code": run.exit_code, "steps": run.steps(),
                                   "config": run.config,
                                   "artifacts": [a.__dict__ for a in run.artifacts]}, default=str))
        else:
            click.echo(describe(run))


if __name__ == "__main__":
    main()
