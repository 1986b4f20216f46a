"""Route log records into the node: a ring buffer for `GET /v1/logs` and `log` events on the event bus."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from shoal.mesh.events import EventBus


class LogBridge(logging.Handler):
    """A logging handler; thread-safe (records from executor threads reach the bus via its loop)."""

    def __init__(self, bus: EventBus, capacity: int = 2000, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._bus = bus
        self._lines: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._installed_on: list[logging.Logger] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message = f"{message}: {record.exc_info[1]!r}"
            line = {
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": message,
            }
            with self._lock:
                self._lines.append(line)
            self._bus.publish("log", level=record.levelname, logger=record.name, message=message)
        except RuntimeError:
            pass  # the loop is closed: the node is gone, nobody listens any more
        except Exception:  # a logging handler must never raise into the code that logged
            self.handleError(record)

    def lines(self, level: str = "INFO", limit: int = 200) -> list[dict[str, Any]]:
        """The newest `limit` lines at `level` or above, oldest first."""
        floor = logging.getLevelName(level)
        with self._lock:
            snapshot = list(self._lines)
        picked = [line for line in snapshot if logging.getLevelName(line["level"]) >= floor]
        return picked[-limit:] if limit else []

    def install(self, *names: str) -> None:
        """Attach to the named loggers (e.g. `mesh`, `models`), lowering them to this handler's level."""
        for name in names:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            if logger.getEffectiveLevel() > self.level:
                logger.setLevel(self.level)
            self._installed_on.append(logger)

    def uninstall(self) -> None:
        for logger in self._installed_on:
            logger.removeHandler(self)
        self._installed_on.clear()
