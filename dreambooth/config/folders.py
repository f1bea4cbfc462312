"""Whose folder: the project writes into a model folder only once it carries the project's
marker file; an existing folder without it belongs to someone else and is never written into.

Standard library only (the WebUI process claims the folder before it starts the child)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .errors import DreamboothError

MARKER = ".dreambooth_model"
LOCK = ".train.lock"  # one training run per model folder (training.lock.ModelLock)


def owned(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def _made_by_us_before_markers(folder: Path) -> bool:
    """A model folder of a version before the marker: its working model, a saved state, a run
    folder, or our lock or config file are there."""
    if (folder / "working" / "dreambooth_model.json").is_file() \
            or (folder / ".train.lock").is_file() \
            or any((folder / "state").glob("step_*/trainer.json")) \
            or any((folder / "runs").glob("*/run.json")):
        return True
    if not (folder / "config.json").is_file():  # a FIFO there would block the read
        return False
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "schema_version" in data and "concepts" in data


def claim_model_dir(folder: str | os.PathLike) -> Path:
    """Make `folder` the model's folder: create it (with the marker), or accept it when it
    carries the marker, is empty, or was made by an older version; refuse any other existing
    folder."""
    folder = Path(folder)
    try:
        if folder.is_dir():
            if owned(folder):
                return folder
            if any(folder.iterdir()) and not _made_by_us_before_markers(folder):
                raise DreamboothError(
                    f"The folder '{folder}' already exists and was not made by Dreambooth (it "
                    f"has no '{MARKER}' file); nothing was written into it.",
                    "Choose another model_name or work_dir. If it really is a model folder of "
                    f"this extension, create an empty '{MARKER}' file in it.")
        elif folder.exists():
            raise DreamboothError(f"The model folder '{folder}' is a file, not a folder.",
                                  "Choose another model_name or work_dir.")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / MARKER, "w", encoding="utf-8") as fh:
            fh.write("This folder is a Dreambooth model folder.\n")
    except (OSError, ValueError) as e:
        raise DreamboothError(f"Can't create or write the model folder '{folder}' "
                              f"({getattr(e, 'strerror', None) or e}).", "Check that work_dir is "
                              "a folder you can write to (not a file, not read-only) with free "
                              "space.") from None
    return folder


def lock_owner(folder: Path) -> dict:
    """What the model's training lock says of its owner ({} when there is none or it can't be
    read): pid, host and the process's start time."""
    try:
        owner = json.loads((Path(folder) / LOCK).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return owner if isinstance(owner, dict) else {}


def held_here(owner: dict) -> bool:
    """The lock's owner is a live process of this machine (not a zombie, nor another process
    that has since been given its PID)."""
    pid, started = owner.get("pid"), owner.get("started")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) \
            or isinstance(pid, bool) or pid <= 0 or not _alive(pid):
        return False
    return started is None or pid_start_time(pid) in (None, started)


def pid_start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc; None where unknown): a
    lock whose PID was reused by another process is told apart by it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if os.name != "posix":  # no signal 0 there (os.kill would end the process): assume it lives
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a zombie (killed, not yet reaped) holds no lock
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
