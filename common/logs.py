"""fedssl's own log lines, visible whether Flower's logger is configured or not, and the
live status line a run shows on a terminal (server/progress.py) between them."""
from __future__ import annotations

import logging
import os


class _StatusHandler(logging.StreamHandler):
    """A stream handler that keeps one live status line below the log: a log line first
    clears it and then draws it again, so the two never share a line."""

    status = ""

    def emit(self, record: logging.LogRecord) -> None:
        if self.status:
            self.stream.write("\r\x1b[K")
        super().emit(record)
        if self.status:
            self.stream.write(self.status)
            self.flush()


def get_logger() -> logging.Logger:
    logger = logging.getLogger("fedssl")
    if not logger.handlers:
        handler = _StatusHandler()
        handler.setFormatter(logging.Formatter("fedssl %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("FEDSSL_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger


def _status_handler() -> _StatusHandler | None:
    handler = next(iter(get_logger().handlers), None)
    return handler if isinstance(handler, _StatusHandler) else None


def status_is_live() -> bool:
    """Whether the log goes to a terminal, where a status line can be rewritten in place."""
    handler = _status_handler()
    isatty = getattr(handler.stream, "isatty", None) if handler else None
    return bool(isatty and isatty() and get_logger().isEnabledFor(logging.INFO))


def show_status(text: str) -> None:
    """Replace the status line with `text` (no newline: the next one overwrites it)."""
    handler = _status_handler()
    if handler is None:
        return
    with handler.lock:  # other threads log through the same stream
        handler.status = text
        handler.stream.write("\r\x1b[K" + text)
        handler.flush()


def end_status() -> None:
    """Keep the last status line on screen and go on below it."""
    handler = _status_handler()
    if handler is None or not handler.status:
        return
    with handler.lock:
        handler.status = ""
        handler.stream.write("\n")
        handler.flush()
