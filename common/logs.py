"""fedssl's own log lines, visible whether Flower's logger is configured or not."""
from __future__ import annotations

import logging
import os


def get_logger() -> logging.Logger:
    logger = logging.getLogger("fedssl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedssl %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("FEDSSL_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger
