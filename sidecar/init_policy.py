"""What a peer may ask of ``wandb.init``: only what describes a run, never where data goes.

A run start's ``init_kwargs`` come from a trainer, which may be another user of a shared machine. An
argument like ``settings.base_url`` would make the sidecar send its W&B API key to the peer's server; ``dir``
or ``root_dir`` would make it write outside its roots. So the run-describing arguments are allowed, each
with its type, and everything else is refused by name (reason ``init_refused``), before wandb sees it.
"""

from __future__ import annotations

from typing import Any, Callable

from protocol import ProtocolError


class InitRefused(ProtocolError):
    """A run start asks ``wandb.init`` for something a peer may not choose."""

    reason = "init_refused"


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


#: ``wandb.init`` arguments a peer may give, with a check of the value.
ALLOWED_INIT: dict[str, Callable[[Any], bool]] = {
    "project": _opt_str,
    "entity": _opt_str,
    "name": _opt_str,
    "notes": _opt_str,
    "tags": lambda v: v is None or _str_list(v),
    "group": _opt_str,
    "job_type": _opt_str,
    "config": lambda v: v is None or isinstance(v, dict),
    "config_exclude_keys": lambda v: v is None or _str_list(v),
    "config_include_keys": lambda v: v is None or _str_list(v),
    "id": _opt_str,
    "resume": lambda v: v is None or isinstance(v, bool) or v in ("allow", "must", "never", "auto"),
    "allow_val_change": lambda v: v is None or _bool(v),
    "mode": lambda v: v is None or v in ("offline", "online", "disabled"),
    "save_code": lambda v: v is None or _bool(v),
}
#: ``wandb.Settings`` fields a peer may give inside ``init_kwargs["settings"]``: presentation only.
ALLOWED_SETTINGS: dict[str, Callable[[Any], bool]] = {
    "disable_code": _bool,
    "disable_git": _bool,
    "disable_job_creation": _bool,
    "save_code": _bool,
    "quiet": _bool,
    "silent": _bool,
    "show_info": _bool,
    "show_warnings": _bool,
    "show_errors": _bool,
}


def check_init_kwargs(init_kwargs: dict[str, Any]) -> None:
    """Raise :class:`InitRefused` naming the first argument (or setting) a peer may not give."""
    for key, value in init_kwargs.items():
        if key == "settings":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise InitRefused("init_kwargs.settings must be a map of allowed settings")
            for name, setting in value.items():
                ok = ALLOWED_SETTINGS.get(name)
                if ok is None:
                    raise InitRefused(f"init_kwargs.settings.{str(name)[:64]} may not be set by a trainer "
                                      f"(allowed: {', '.join(sorted(ALLOWED_SETTINGS))})")
                if not ok(setting):
                    raise InitRefused(f"init_kwargs.settings.{name}: bad value {str(setting)[:64]!r}")
            continue
        ok = ALLOWED_INIT.get(key)
        if ok is None:
            raise InitRefused(f"init_kwargs.{str(key)[:64]} may not be set by a trainer "
                              f"(allowed: {', '.join(sorted(ALLOWED_INIT))}, settings)")
        if not ok(value):
            raise InitRefused(f"init_kwargs.{key}: bad value {str(value)[:64]!r}")
