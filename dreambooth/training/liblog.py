"""The libraries' own words during a run go to the run's log, not the console: diffusers'
"modules that should be kept in float32", transformers' torchvision fallback, accelerate's
notes, Python warnings. A user reads our messages; what a library logs as an error still
shows where it did (and in the log)."""
from __future__ import annotations

import contextlib
import datetime
import logging
import warnings

# loggers of the training stack (each one's children log through it)
LIBRARIES = ("diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "torch",
             "torchao", "bitsandbytes", "xformers", "PIL", "urllib3", "filelock")


class _ToLog(logging.Handler):
    def __init__(self, log) -> None:
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log.write(f"{datetime.datetime.now():%H:%M:%S} [{record.name}] "
                           f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a log line must never stop a run
            self.handleError(record)


def _configure_defaults() -> None:
    """diffusers and transformers add their console handler on first use: make it happen now,
    so that it is there to be quieted (not added, loud, in the middle of the run)."""
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            __import__(module, fromlist=["get_logger"]).get_logger(module.split(".")[0])
        except (ImportError, AttributeError):
            pass


@contextlib.contextmanager
def to_log(log):
    """Within: the LIBRARIES' logging and Python's warnings are written to `log` (a RunLog);
    the libraries' own console handlers pass errors only. Everything is put back after."""
    _configure_defaults()
    handler, quieted = _ToLog(log), []
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for h in logger.handlers:
            quieted.append((h, h.level))
            h.setLevel(max(h.level, logging.ERROR))
        logger.addHandler(handler)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        log.write(f"{datetime.datetime.now():%H:%M:%S} [warning] {category.__name__}: "
                  f"{message} ({filename}:{lineno})")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        for name in LIBRARIES:
            logging.getLogger(name).removeHandler(handler)
        for h, level in reversed(quieted):  # (a handler two loggers share: its own level)
            h.setLevel(level)
