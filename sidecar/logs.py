"""The sidecar's own logs: one line per notable event, as text for people or JSON for log collectors.

``--log-format json`` writes one JSON object per line on stderr::

    {"time": "2026-11-03T10:15:02.123Z", "level": "INFO", "logger": "sidecar", "message": "serving on ...",
     "run": "abc123", ...}

``time`` is UTC (ISO 8601, milliseconds), ``level``/``logger``/``message`` are logging's own, anything a
call passes with ``extra={...}`` is added as its own key (e.g. ``run``, ``path``, ``bytes``, ``seconds``),
and a traceback goes into ``exception``. Python warnings and uncaught exceptions (main thread and worker
threads) go through the same handler, so stderr stays one JSON object per line. wandb prints its own
``wandb: ...`` lines straight to stderr: ``serve --log-format json`` sets ``WANDB_SILENT=true`` unless it is
set already (the sidecar logs each run's start, checkpoints and finish itself).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import IO, Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage().rstrip(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger (replacing its handlers) for ``fmt`` ("text" or "json"); return the handler."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    if fmt == "json":
        _route_uncaught_exceptions()
    return handler


def _route_uncaught_exceptions() -> None:
    """Uncaught exceptions become one log record each instead of a multi-line traceback on stderr."""
    crash = logging.getLogger("sidecar.crash")

    def excepthook(exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        crash.critical("uncaught %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        crash.critical("uncaught %s in thread %s: %s", args.exc_type.__name__, name, args.exc_value,
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
