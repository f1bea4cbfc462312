"""Ways to show events: a console progress bar (a terminal), progress lines (a log a machine
keeps: a cloud job's, a pipe), a JSON-lines stream."""
from __future__ import annotations

import sys
import time

from ..config import events as ev
from ..config.errors import DreamboothError


class ConsoleProgress:
    """tqdm bar with step, loss, it/s and ETA; messages and saved files as lines above it."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream, self.bar, self.loss, self.lr = stream, None, None, "-"

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.Started):
            from tqdm import tqdm
            self.bar = tqdm(total=event.total_steps, desc=event.model_name, unit="step",
                            file=self.stream, dynamic_ncols=True)
            self.write(f"Training {event.instance_images} instance and {event.class_images} "
                       f"class images for {event.total_steps} steps ({event.epochs} epochs).")
        elif isinstance(event, ev.Step) and self.bar is not None:
            self.bar.n = event.step
            self.show_loss(event.loss, lr=f"{event.lr:.2e}")
        elif isinstance(event, ev.Stopping):
            self.show_loss(event.loss)
            self.write(f"Cancelled: the run stops at step {event.step} of {event.total_steps}.")
        elif isinstance(event, ev.StateSaved):
            self.write(f"resume state: {event.path}")
        elif isinstance(event, ev.Message):
            self.write(("warning: " if event.level == "warning" else "") + event.text)
        elif isinstance(event, ev.SampleSaved):
            self.write(f"sample: {event.path}")
        elif isinstance(event, ev.CheckpointSaved):
            self.write(f"saved: {event.path}")
        elif isinstance(event, ev.Failed):
            self.close()

    def show_loss(self, loss: float | None, lr: str = "") -> None:
        if loss is not None:  # read every log_every_steps: the last one shows
            self.loss = loss
        self.lr = lr or self.lr
        if self.bar is not None:
            self.bar.set_postfix(loss="-" if self.loss is None else f"{self.loss:.4f}",
                                 lr=self.lr, refresh=False)
            self.bar.refresh()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LineProgress(ConsoleProgress):
    """Progress as plain lines, never a redrawn bar: one every `every_steps` steps or every
    `every_s` seconds, whichever comes first, and the last step's. `clock`: time.monotonic
    (a test gives its own)."""

    def __init__(self, stream=sys.stderr, every_steps: int = 10, every_s: float = 60.0,
                 clock=time.monotonic) -> None:
        super().__init__(stream)
        self.every_steps, self.every_s, self.clock = max(1, every_steps), every_s, clock
        self.total, self.said_at = 0, clock()

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.Started):
            self.total, self.said_at = event.total_steps, self.clock()
            resumed = f", resumed from step {event.resumed_from_step}" \
                if event.resumed_from_step else ""
            self.write(f"Training {event.model_name}: {event.instance_images} instance and "
                       f"{event.class_images} class images for {event.total_steps} steps "
                       f"({event.epochs} epochs{resumed}).")
        elif isinstance(event, ev.Step):
            if event.loss is not None:
                self.loss = event.loss
            now = self.clock()
            if event.step % self.every_steps == 0 or event.step >= event.total_steps \
                    or now - self.said_at >= self.every_s:
                self.said_at = now
                self.write(step_line(event, self.loss))
        elif isinstance(event, ev.Stopping):
            self.write(f"Cancelled: the run stops at step {event.step} of {event.total_steps}.")
        else:
            super().__call__(event)

    def show_loss(self, loss: float | None, lr: str = "") -> None:
        pass  # no bar to redraw

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def step_line(event: ev.Step, loss: float | None) -> str:
    """`step 20/100 (20%) loss 0.1234 lr 1.00e-04 2.50 steps/s eta 32s`, plus VRAM on a GPU."""
    left = (event.total_steps - event.step) / event.it_per_s if event.it_per_s > 0 else None
    parts = [f"step {event.step}/{event.total_steps} "
             f"({100 * event.step // max(event.total_steps, 1)}%)",
             "loss -" if loss is None else f"loss {loss:.4f}", f"lr {event.lr:.2e}",
             f"{event.it_per_s:.2f} steps/s", "eta -" if left is None else f"eta {left:.0f}s"]
    if event.vram_gb:
        parts.append(f"vram {event.vram_gb:.1f} GB")
    return " ".join(parts)


def console_progress(stream=sys.stderr, every_steps: int = 10):
    """A redrawn bar on a terminal; lines anywhere else (a file, a pipe, a cloud job's log)."""
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        terminal = False
    return ConsoleProgress(stream) if terminal else LineProgress(stream, every_steps)


class JsonLines:
    """Every event as one JSON line, flushed at once (the WebUI tab reads this from the child)."""

    def __init__(self, target: str) -> None:
        self.own, self.target = target != "-", target
        try:
            self.fh = open(target, "a", encoding="utf-8") if self.own else sys.stdout
        except (OSError, ValueError) as e:
            raise DreamboothError(f"--events-jsonl '{target}' can't be written "
                                  f"({getattr(e, 'strerror', None) or e}).",
                                  "Give a file in an existing folder you can write to, or '-' "
                                  "for standard output.") from None

    def __call__(self, event: ev.Event) -> None:
        try:
            self.fh.write(event.to_json() + "\n")
            self.fh.flush()
        except (OSError, ValueError) as e:
            raise DreamboothError(f"Writing the events to --events-jsonl '{self.target}' failed "
                                  f"({getattr(e, 'strerror', None) or e}); they are no longer "
                                  "written there.", "Free space there or choose another file."
                                  ) from None

    def new_line(self) -> None:
        """End a line a signal may have cut short (the reader skips empty lines)."""
        try:
            self.fh.write("\n")
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self.own:
            try:
                self.fh.close()
            except OSError:  # what could not be written was said when it failed
                pass
