"""The losses of a run, left on the device and read in one go every few steps.

A value read on the host makes the host wait for the device, and a host that waits can't queue
the next step ahead of the device, which then idles between steps. So a step reads nothing: its
loss stays where it was computed, and `LossLog` reads every pending one at once (one wait) when
a read is due, every `log_every_steps` and at the last step, and before anything is sampled,
snapshotted or saved (the trainer asks). Progress (a Step event per step) never waits for it:
a step's event carries its loss only when that loss was read at that step.

A non-finite loss stops the run at the read, naming the first step it happened at
(`check_finite`). Until then, where the optimizer can skip an update on the device at no cost
(a fused torch optimizer over all the weights, AdamW's on a GPU, through the `found_inf` that
GradScaler uses: the weights, the moments and the step count stay as they were), the update of
a step whose loss is not finite is skipped; also by each bucket of a Bucketed optimizer whose
inner optimizer is fused (telling it costs no op; a skipped bf16 bucket rounds its unchanged
values back exactly). Elsewhere it is applied (the foreach/for-loop optimizers, 8-bit AdamW,
Adafactor, Prodigy, Lion): the weights go non-finite, which costs nothing but the steps until the read, as nothing is ever saved from
them: every save, sample and snapshot reads first, and the read stops the run.
"""
from __future__ import annotations

import torch

from .loss import check_finite


class LossLog:
    def __init__(self, every: int) -> None:
        self.every = max(1, every)
        self.window: list[torch.Tensor] = []  # this update's micro-step losses
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not read yet
        self.values: list[float] = []  # every read loss, in step order (TrainResult.losses)
        self.last: tuple[int, float] | None = None  # the newest (step, loss) read

    def micro(self, loss: torch.Tensor, optimizer) -> torch.Tensor:
        """Keep a micro-step's loss (call it before backward: a fused-in-backward optimizer
        updates during it); the update skips itself on the device if a loss of it is not
        finite, where the optimizer can."""
        loss = loss.detach()
        self.window.append(loss)
        skip_update_unless_finite(optimizer, self.window)
        return loss

    def end_update(self, step: int, last: bool = False) -> None:
        """An optimizer step is done: its loss (the mean over its micro-steps) joins the
        pending ones, which are read if a read is due."""
        w, self.window = self.window, []
        self.pending.append((step, w[0] if len(w) == 1 else torch.stack(w).mean()))
        if last or step % self.every == 0:
            self.read()

    def read(self) -> None:
        """Read every pending loss (one wait for the device); raises at the first non-finite
        one, naming its step."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        values = torch.stack([loss for _, loss in pending]).float().cpu().tolist()
        for (step, _), value in zip(pending, values):
            check_finite(value, step)
            self.values.append(value)
        self.last = (pending[-1][0], values[-1])

    def loss_at(self, step: int) -> float | None:
        """The loss of `step` if it has been read by now (a Step event's loss), else None."""
        return self.last[1] if self.last is not None and self.last[0] == step else None


def fused_parts(optimizer) -> list:
    """[the torch optimizer behind `optimizer` (accelerate's wrapper)] if it takes GradScaler's
    `found_inf` (a fused one), else []; a Bucketed optimizer's fused inner ones."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if hasattr(inner, "fused_parts"):  # Bucketed: its fused inner optimizers
        return inner.fused_parts()
    ok = isinstance(inner, torch.optim.Optimizer) and bool(inner.defaults.get("fused")) \
        and getattr(inner, "_step_supports_amp_scaling", False)
    return [inner] if ok else []


def skip_update_unless_finite(optimizer, losses: list[torch.Tensor]) -> bool:
    """Have the next update of a fused optimizer skip itself on the device when any of
    `losses` is not finite, with no wait; returns whether it could (see the module's text)."""
    parts = fused_parts(optimizer)
    if not parts:
        return False
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    found = torch.isfinite(loss).logical_not().float()  # a non-finite sum has a non-finite term
    for opt in parts:
        opt.found_inf = found
    return True
