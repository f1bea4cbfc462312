"""Plain event objects the trainer emits, and the cancellation token it honours.

Standard library only: the WebUI process reads these from the child's JSON lines.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Event:
    @property
    def kind(self) -> str:
        return _KIND_OF[type(self)]

    def to_json(self) -> str:
        return json.dumps({"event": self.kind, **dataclasses.asdict(self)})


@dataclass(frozen=True)
class Ready(Event):
    """The training process takes commands from here on (its signal handlers are in place and
    what came before them is queued): hosts hold a Save now / Sample now / Cancel until then."""
    pid: int


@dataclass(frozen=True)
class Started(Event):
    model_name: str
    total_steps: int
    epochs: int
    instance_images: int
    class_images: int
    resumed_from_step: int = 0
    device: str = ""  # cpu | cuda | mps ... (the tab shows VRAM only on a GPU)


@dataclass(frozen=True)
class Message(Event):
    """Something the user should read: a fallback taken, class images found/generated, ..."""
    text: str
    level: str = "info"  # info | warning


@dataclass(frozen=True)
class Step(Event):
    step: int
    total_steps: int
    epoch: int
    loss: float | None  # read from the device every log_every_steps: None on the other steps
    lr: float
    it_per_s: float
    vram_gb: float = 0.0


@dataclass(frozen=True)
class SampleSaved(Event):
    path: str
    step: int
    prompt: str


@dataclass(frozen=True)
class Stopping(Event):
    """A cancel reached the end of the step that was running: from here the run saves (a
    checkpoint and its resume state) and ends. Hosts count a cancel's grace from this point
    and from the end of each save after it, never during one."""
    step: int
    total_steps: int
    loss: float | None = None  # the last step's loss (read for the save)


@dataclass(frozen=True)
class Saving(Event):
    """A file is being written: hosts show it, and never cut it off (a cancel's grace counts
    from its end). what: checkpoint (a model, LoRA or embedding) | state (the resume state;
    path: the folder it goes into)."""
    path: str
    step: int
    what: str = "checkpoint"


@dataclass(frozen=True)
class CheckpointSaved(Event):
    path: str
    step: int


@dataclass(frozen=True)
class StateSaved(Event):
    """A resume state was written (the next run of the model continues from it)."""
    path: str
    step: int


@dataclass(frozen=True)
class Stopped(Event):
    """The run stopped at once without saving, as asked (a second Ctrl-C, Stop now); `message`
    says what was lost and which earlier files remain."""
    step: int
    message: str


@dataclass(frozen=True)
class Finished(Event):
    path: str
    steps: int
    seconds: float
    cancelled: bool = False


@dataclass(frozen=True)
class Failed(Event):
    message: str
    hint: str = ""


_KIND_OF = {Ready: "ready", Started: "started", Message: "message", Step: "step",
            SampleSaved: "sample_saved", Stopping: "stopping", Saving: "saving",
            CheckpointSaved: "checkpoint_saved", StateSaved: "state_saved", Stopped: "stopped",
            Finished: "finished", Failed: "failed"}
_CLASS_OF = {v: k for k, v in _KIND_OF.items()}


def event_from_json(line: str) -> Event:
    """Parse one JSON line written by Event.to_json (the tab reads the child's stream this way)."""
    data = json.loads(line)
    cls = _CLASS_OF[data.pop("event")]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


COMMANDS = ("save", "sample")  # what a host can ask of a running job besides cancel


class CancelToken:
    """Set from any thread (or a signal handler); the trainer checks it between steps. It also
    carries the host's other commands ("save": a checkpoint now, "sample": previews now), each
    taken once by the trainer at the next optimizer step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._asked: set[str] = set()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def request(self, command: str) -> None:
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
        self._asked.add(command)  # set.add is atomic: safe from a signal handler

    def take(self, command: str) -> bool:
        """Whether `command` was asked for since the last take (and forget it)."""
        try:
            self._asked.remove(command)
            return True
        except KeyError:
            return False


Listener = Callable[[Event], Any]


class EventBus:
    """Calls each listener with each event; a failing listener is reported once, not silenced."""

    def __init__(self, *listeners: Listener) -> None:
        self.listeners = [l for l in listeners if l is not None]
        self._broken: set[int] = set()

    def __call__(self, event: Event) -> None:
        for i, listener in enumerate(self.listeners):
            if i in self._broken:
                continue
            try:
                listener(event)
            except Exception as e:  # a listener's bug must not stop training
                self._broken.add(i)
                import logging
                logging.getLogger("dreambooth").error(
                    "event listener %r failed and is disabled: %s", listener, e)
