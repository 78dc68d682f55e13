"""Say a recurring problem once per object, loudly, instead of once per call (or never)."""

from __future__ import annotations

import logging
from typing import Any


class WarnOnce:
    """``warn(key, message, *args)`` logs the first time a key is seen and stays silent after."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.keys: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def warn(self, key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        if key not in self.keys:
            self.keys.add(key)
            self.logger.log(level, message, *args)
