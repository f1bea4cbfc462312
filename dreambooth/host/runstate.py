"""A run as plain data: its events folded into a `Progress`, and the words for how it ended.

The host folds the child's events (`apply_event`); the child's CLI folds its own the same way,
so a stop says the same files in the terminal, the tab and the API. Standard library only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import events as ev

MAX_LOSSES = 2000  # loss history kept for the chart (older points are thinned)


@dataclass
class Progress:
    """Everything the tab and the API show about a run, as plain data."""

    # idle | starting | running | cancelling | finished | cancelled | stopped (without its
    # save: at once, as asked, or forced) | failed
    state: str = "idle"
    model_name: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float = 0.0
    eta_s: float | None = None
    vram_gb: float = 0.0
    device: str = ""  # from Started: cpu | cuda | ...
    losses: list = field(default_factory=list)  # [step, loss] pairs
    samples: list = field(default_factory=list)  # newest last
    saved: list = field(default_factory=list)
    saving: str = ""  # the file being written now
    saving_what: str = ""  # checkpoint | state
    final_path: str = ""
    error: str = ""
    hint: str = ""
    messages: list = field(default_factory=list)
    returncode: int | None = None
    run_dir: str = ""
    resumed_from: int = 0  # the step the run began at (a resumed run's)
    stop_step: int | None = None  # where a cancel stopped the loop (the Stopping event)
    state_path: str = ""  # the newest resume state this run wrote
    state_step: int = 0
    stop: str = ""  # how a run ended early without its own save: at_once | forced
    stop_note: str = ""  # the host's words about a forced stop

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "cancelling")

    def to_dict(self) -> dict:
        """The fields, `active`, and `outcome`: how a run that ended early ended, in words (the
        steps it ran, the files it kept; "" otherwise)."""
        d = dataclasses.asdict(self)
        d["active"] = self.active
        d["outcome"] = outcome(self) if self.state in ("cancelled", "stopped") else ""
        return d


def apply_event(p: Progress, event: ev.Event) -> None:
    """Fold one event into the progress snapshot (a pure function of the stream)."""
    if isinstance(event, ev.Started):
        p.state, p.total_steps, p.model_name = "running", event.total_steps, event.model_name
        p.step, p.device, p.resumed_from = event.resumed_from_step, event.device, \
            event.resumed_from_step
    elif isinstance(event, ev.Step):
        p.step, p.total_steps, p.epoch = event.step, event.total_steps, event.epoch
        p.lr, p.it_per_s, p.vram_gb = event.lr, event.it_per_s, event.vram_gb
        left = max(event.total_steps - event.step, 0)
        p.eta_s = left / event.it_per_s if event.it_per_s > 0 else None
        _loss(p, event.step, event.loss)
    elif isinstance(event, ev.Stopping):
        p.state = "cancelling" if p.active else p.state
        p.step, p.stop_step, p.eta_s = event.step, event.step, None
        _loss(p, event.step, event.loss)
    elif isinstance(event, ev.SampleSaved):
        p.samples.append(event.path)
    elif isinstance(event, ev.Saving):
        p.saving, p.saving_what = event.path, event.what
    elif isinstance(event, ev.CheckpointSaved):
        p.saved.append(event.path)
        if event.path == p.saving:  # a LoRA's embedding is saved while the LoRA still is
            p.saving = p.saving_what = ""
    elif isinstance(event, ev.StateSaved):
        p.state_path, p.state_step = event.path, event.step
        p.saving = p.saving_what = ""
    elif isinstance(event, ev.Message):
        p.messages.append(("warning: " if event.level == "warning" else "") + event.text)
    elif isinstance(event, ev.Stopped):
        p.state, p.stop, p.saving, p.saving_what = "stopped", "at_once", "", ""
        p.step = max(p.step, event.step)
    elif isinstance(event, ev.Finished):
        p.final_path, p.saving, p.saving_what = event.path, "", ""
        p.state = "cancelled" if event.cancelled else "finished"
        p.eta_s = 0.0
    elif isinstance(event, ev.Failed):
        p.state, p.error, p.hint = "failed", event.message, event.hint


def _loss(p: Progress, step: int, loss: float | None) -> None:
    if loss is None:  # read every log_every_steps: the last known one stays
        return
    p.loss = loss
    if not p.losses or p.losses[-1][0] != step:
        p.losses.append([step, loss])
    if len(p.losses) > MAX_LOSSES:
        p.losses = p.losses[::2]


def kept(p: Progress) -> list[str]:
    """What a user still has after the run: each file it saved and its newest resume state."""
    lines = [f"saved: {s}" for s in dict.fromkeys(p.saved) if s != p.final_path]
    if p.state_path:
        lines.append(f"resume state: {p.state_path} (training this model again continues "
                     f"from step {p.state_step})")
    elif p.resumed_from:
        lines.append(f"the resume state of step {p.resumed_from} this run began from is kept "
                     "(training this model again continues from there)")
    return lines


def ending(p: Progress) -> tuple[str, list[str]]:
    """The title and lines for a run that ended early (cancelled or stopped), from the steps
    it ran and the files it wrote: never "nothing was saved" when something was."""
    at = f"at step {p.step} of {p.total_steps or '?'}"
    lines = kept(p)
    if p.state == "cancelled" and p.final_path:
        title = f"Cancelled {at}; saved what was trained to: {p.final_path}"
    elif p.stop == "forced" and p.state != "cancelled":
        title = f"Forced stop {at}: {p.stop_note or 'the training process was stopped hard.'}"
    elif p.stop == "at_once" and p.step <= p.resumed_from:
        title = "Stopped at once before the first step, as asked; nothing was trained."
    elif p.stop == "at_once":
        title = (f"Stopped at once {at} without saving, as asked; the steps after the last save "
                 "are lost.")
    elif p.step <= p.resumed_from and not p.saved:
        title = "Cancelled before the first step; nothing was saved."
    else:
        title = f"Cancelled {at}."
    if not lines and p.step > p.resumed_from and not p.final_path:
        lines = ["Nothing of this run was saved."]
    if p.stop == "forced" and p.state == "cancelled":  # it had ended its run: only the exit hung
        lines.append(f"Then it was stopped hard: {p.stop_note}")
    return title, lines


def outcome(p: Progress) -> str:
    """`ending` as one paragraph (the CLI's words, the API's `outcome`)."""
    title, lines = ending(p)
    return " ".join([title] + [line[0].upper() + line[1:] + "." for line in lines])
