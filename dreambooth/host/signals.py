"""The training process's signals, in place before anything slow.

`python -m dreambooth train` installs these first, before the package's own imports: a signal
that comes while the process starts is then kept (a command, a stop), never the default action
(SIGUSR1's kills the process). Once the run's `CancelToken` exists, `attach` hands it what was
kept and every later signal goes to it.

- SIGINT (Ctrl-C, the host's Cancel) and SIGTERM (the OS, a service manager): a clean stop after
  the step that is running, which saves a checkpoint and a resume state. SIGTERM is never more.
- A second SIGINT (Ctrl-C again in a terminal) or SIGQUIT (the host's "Stop now", Ctrl-\\):
  stop at once without saving (KeyboardInterrupt, which the CLI turns into one sentence).
- SIGUSR1: a checkpoint at the next step; SIGUSR2: previews at the next step.

Standard library only, and no import of the rest of the package: this runs first.
"""
from __future__ import annotations

import os
import signal
import sys

COMMAND_SIGNALS = {"save": "SIGUSR1", "sample": "SIGUSR2"}  # how a host asks, by name (POSIX)
STOP_NOW = "SIGQUIT"  # how a host says "stop at once, without saving" (POSIX)


class ChildSignals:
    """The handlers of one process, and what they were told before the run could take it."""

    def __init__(self) -> None:
        self.token = None  # the run's CancelToken, once it exists
        self.kept: list[str] = []  # commands that came before it
        self.stopping = ""  # the signal that asked for the clean stop ("" until one did)
        self.at_once = False
        self.ended = False
        self.before: dict = {}  # the handlers ours replaced, by signal name
        self.owner = False  # this process is `python -m dreambooth`: it exits after the run

    def install(self, owner: bool = False) -> None:
        """Take the signals from here on (the main thread only; elsewhere nothing changes).
        `owner`: the process ends with the run (the CLI), see `end`."""
        self.owner = self.owner or owner
        if self.before:
            return
        table = {"SIGINT": self.on_stop, "SIGTERM": self.on_stop, STOP_NOW: self.on_stop_now}
        table.update({name: self.on_command for name in COMMAND_SIGNALS.values()})
        for name, handler in table.items():
            if hasattr(signal, name):
                try:
                    self.before[name] = signal.signal(getattr(signal, name), handler)
                except ValueError:  # not the main thread (embedded use)
                    return

    def attach(self, token) -> None:
        """Give the run's token what came before it; later signals go straight to it."""
        self.token, self.ended, self.at_once = token, False, False
        if self.stopping:
            token.cancel()
        for command in self.kept:
            token.request(command)
        self.kept = []

    def on_stop(self, signum, frame) -> None:
        if self.ended:
            return
        name = signal.Signals(signum).name
        if self.stopping == name == "SIGINT":  # Ctrl-C again
            return self.stop_now()
        if self.stopping and name == "SIGTERM":  # already stopping: nothing more to do
            return
        self.stopping = name
        if self.token is not None:
            self.token.cancel()
        again = " (Ctrl-C again: stop at once without saving)" if name == "SIGINT" else ""
        _say("Stopping after this step; then the run saves a checkpoint and its resume "
             f"state{again}.")

    def on_stop_now(self, signum, frame) -> None:
        if not self.ended:
            self.stop_now()

    def stop_now(self) -> None:
        if not self.at_once:  # once: the CLI's words about it are not cut by another
            self.at_once = True
            raise KeyboardInterrupt

    def on_command(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        command = next(c for c, n in COMMAND_SIGNALS.items() if n == name)
        if self.token is None:
            self.kept.append(command)
        elif not self.ended:
            self.token.request(command)  # set.add: safe in a handler

    def end(self) -> None:
        """The run is over. In the CLI's process commands and Stop now are ignored from here
        (Python restores the default actions while it shuts down: a late SIGUSR1 would kill
        it); in a Python caller's process its own handlers come back."""
        self.ended, self.token, self.stopping = True, None, ""
        for name, before in self.before.items():
            ignore = self.owner and name not in ("SIGINT", "SIGTERM")
            try:
                signal.signal(getattr(signal, name), signal.SIG_IGN if ignore else
                              before if before is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self.before = {}


def _say(text: str) -> None:
    """A line on stderr straight to the file (a handler may run while the main thread is
    inside a write to sys.stderr: the buffered object would refuse the nested call)."""
    try:
        os.write(sys.stderr.fileno(), (text + "\n").encode("utf-8", "replace"))
    except (OSError, ValueError, AttributeError):
        pass


CHILD = ChildSignals()  # the process's one set of handlers (installed by the CLI, not here)
