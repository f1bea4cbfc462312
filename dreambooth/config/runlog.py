"""The run's log file: what a run said, and the traceback of a failure, which the one-line
message names (`<work_dir>/<model>/logs/<time>.log`; a temp folder when the model's folder is
not ours or can't be written).

Standard library only. `failure(exc, log)` is what every boundary (CLI, `train()`, the runner's
child) uses to turn any exception into a `DreamboothError` with a sentence and a fix.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from pathlib import Path

from .errors import BugError, DreamboothError, TrainingError
from .folders import owned


def fallback_folder() -> Path:
    return Path(tempfile.gettempdir()) / "dreambooth_logs"


class RunLog:
    """Lines kept in memory until the log file is written (at a failure, or at `flush()` once
    the model's folder is known to be ours), then appended as they come."""

    def __init__(self, model_dir: Path | None = None, keep: bool = True) -> None:
        self.model_dir, self.lines, self.path, self.keep = model_dir, [], None, keep
        self.stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")

    @classmethod
    def for_config(cls, config) -> "RunLog":
        """The log of a run of `config`; under a launcher only rank 0 keeps one (the others
        write only a failure's traceback, to the temp folder)."""
        if os.environ.get("RANK", "0") != "0":
            return cls(None, keep=False)
        try:
            return cls(Path(config.work_dir) / config.model_name)
        except (TypeError, ValueError):
            return cls()

    def event(self, event) -> None:
        """An event listener: everything but the steps goes to the log."""
        if event.kind != "step":
            self.write(f"{datetime.datetime.now():%H:%M:%S} {event.to_json()}")

    def write(self, text: str) -> None:
        self.lines.append(text.rstrip("\n"))
        if self.path is not None:
            self.flush()

    def flush(self) -> Path | None:
        """Write what is kept; returns the log's path (None when no folder takes it)."""
        if not self.keep:
            return None
        for folder in self._folders():
            path = self.path or folder / f"{self.stamp}.log"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8", errors="backslashreplace") as fh:
                    fh.write("".join(line + "\n" for line in self.lines))
            except (OSError, ValueError):
                self.path = None
                continue
            self.lines, self.path = [], path
            return path
        return None

    def _folders(self) -> list[Path]:
        if self.path is not None:
            return [self.path.parent, fallback_folder()]
        try:
            mine = self.model_dir is not None and owned(self.model_dir)
        except (OSError, ValueError):
            mine = False
        return ([self.model_dir / "logs"] if mine else []) + [fallback_folder()]


def failure(exc: BaseException, log: RunLog | None = None,
            what: str = "Training") -> DreamboothError:
    """The exception as a DreamboothError; its traceback goes to the log. A DreamboothError
    keeps its words (the log path is added as `.log`); anything else is a bug, said as such
    ("<what> failed unexpectedly ...": the HTTP API says "The request")."""
    log = log or RunLog()
    log.keep = True
    log.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    path = log.flush()
    where = f"the log is at '{path}'" if path else "no log file could be written"
    if isinstance(exc, DreamboothError):
        exc.log = str(path) if path else ""
        return exc
    said = " ".join(str(exc).split())[:300]
    if host_out_of_memory(exc):
        err = out_of_host_memory("", exc)
        err.log = str(path) if path else ""
        return err
    err = BugError(f"{what} failed unexpectedly ({type(exc).__name__}: {said}). This is a "
                   f"bug; {where}.", "Please report it with that log file.")
    err.log = str(path) if path else ""
    return err


def log_file_hint(exc: DreamboothError) -> str:
    path = getattr(exc, "log", "")
    return f"log: {path}" if path and path not in exc.message else ""


def host_out_of_memory(exc: BaseException) -> bool:
    """The computer's memory (RAM, not the GPU's) ran out: Python's MemoryError, or torch's CPU
    allocator refusing ("DefaultCPUAllocator: can't allocate memory" / "not enough memory")."""
    text = str(exc)
    return isinstance(exc, MemoryError) or isinstance(exc, RuntimeError) and (
        "DefaultCPUAllocator" in text or "can't allocate memory" in text)


def out_of_host_memory(doing: str, exc: BaseException, hint: str = "") -> TrainingError:
    """The sentence for `host_out_of_memory`: what was being done, and the fix."""
    what = " ".join(str(exc).split())[:200] or type(exc).__name__
    return TrainingError(
        f"The computer ran out of memory (RAM){' while ' + doing if doing else ''} ({what}).",
        hint or "Lower resolution or batch_size, or close other programs to free memory.")
