"""One training run per model folder: a lock file naming its process; a lock left by a killed
process (or one whose PID now belongs to another process) is detected and cleared."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..config.errors import DreamboothError
from ..config.folders import LOCK, claim_model_dir, held_here, lock_owner, pid_start_time


class ModelLock:
    """One training run per model folder. A lock left by a killed process is detected and cleared."""

    def __init__(self, model_dir: Path, say) -> None:
        self.path, self.say, self.held = model_dir / LOCK, say, False

    def __enter__(self) -> "ModelLock":
        claim_model_dir(self.path.parent)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            except OSError as e:
                raise DreamboothError(f"Can't create the training lock '{self.path}' "
                                      f"({e.strerror or e}).", "Check that the work folder is "
                                      "writable and has free space.") from None
            self.held = True
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": pid_start_time(os.getpid())}, fh)
            return self
        raise DreamboothError(f"Could not take the training lock '{self.path}'.",
                              "Delete that file if no training of this model is running.")

    def _refuse_or_clear(self) -> None:
        owner = lock_owner(self.path.parent)
        pid, host = owner.get("pid"), owner.get("host")
        same = held_here(owner)
        if same:
            raise DreamboothError(
                f"The model '{self.path.parent.name}' is already being trained (process {pid}, "
                f"lock file '{self.path}').",
                "Wait for that run to end or cancel it; two runs would overwrite each other. "
                "If no run of this model is going on, delete the lock file.")
        if host not in (None, socket.gethostname()):
            raise DreamboothError(
                f"The model '{self.path.parent.name}' is locked by a run on '{host}' (lock file "
                f"'{self.path}').", f"If no run is going on there, delete '{self.path}'.")
        self.say(f"Cleared a stale training lock '{self.path}' left by process {pid}, which is "
                 "no longer running.")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> bool:
        if self.held:
            self.path.unlink(missing_ok=True)
        return False
