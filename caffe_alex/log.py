"""Logging in glog's classic line format, which Caffe's log parsers (tools/extra/parse_log.py,
extract_seconds.py) expect: ``I1128 00:56:10.995409 12345 file.py:42] message`` (no year)."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime

LOGGER_NAME = "caffe_alex"
_LEVEL_LETTERS = {
    logging.DEBUG: "I",
    logging.INFO: "I",
    logging.WARNING: "W",
    logging.ERROR: "E",
    logging.CRITICAL: "F",
}


class GlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        letter = _LEVEL_LETTERS.get(record.levelno, "I")
        stamp = datetime.fromtimestamp(record.created).strftime("%m%d %H:%M:%S.%f")
        prefix = f"{letter}{stamp} {os.getpid():5d} {record.filename}:{record.lineno}] "
        return prefix + record.getMessage()


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(level: int = logging.INFO, stream=None) -> logging.Logger:
    """Send caffe_alex's log to ``stream`` (stderr, as glog does) in glog format; idempotent."""
    logger = get_logger()
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_caffe_alex", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(GlogFormatter())
    handler._caffe_alex = True
    logger.addHandler(handler)
    logger.propagate = False
    return logger
