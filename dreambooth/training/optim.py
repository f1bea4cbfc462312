"""Stepping the optimizer one weight at a time: inside backward (no full gradient buffer), and
on bf16 weights with stochastic rounding (no fp32 copy of the model).

    opt = PerWeight(groups, build, in_backward=True, clip=1.0, seed=0)

`build(groups)` makes any torch-style optimizer (AdamW, 8-bit AdamW, Adafactor, ...); PerWeight
makes one of them per weight. With `in_backward`, each weight is clipped and updated from a
hook that runs as soon as its gradient is complete, and its gradient is freed at once: the
peak holds one weight's gradient, not the model's (the optimizer-in-backward pattern of the
PyTorch tutorials). A bf16 weight is updated through an fp32 stand-in that exists only during
its own update, and written back with stochastic rounding: rounding to nearest would drop
every update smaller than half a bf16 step (about 0.4% of the weight), which at DreamBooth's
learning rates is all of them. The schedule's learning rate lives in this object's
param_groups, as for any optimizer; the inner optimizers take it at each update.
"""
from __future__ import annotations

from typing import Callable

import torch


def stochastic_round_(target: torch.Tensor, value: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Write fp32 `value` into bf16 `target`, rounding down or up at random with the
    probabilities that make the expected result equal `value` exactly."""
    bits = value.detach().to(torch.float32).contiguous().view(torch.int32)
    # a bf16 number is the top 16 bits of an fp32 one: add a random amount below the cut, cut
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device,
                          generator=generator)
    # in place: one weight-sized temporary (the noise), not three
    target.copy_(noise.add_(bits).bitwise_and_(-65536).view(torch.float32))
    return target


class PerWeight(torch.optim.Optimizer):
    """One optimizer per weight, stepped in backward (`in_backward`) or by step()."""

    def __init__(self, groups: list[dict], build: Callable[[list], torch.optim.Optimizer],
                 in_backward: bool, clip: float = 0.0, seed: int = 0) -> None:
        super().__init__(groups, {})
        self.in_backward, self.clip, self.inner, self.hooks = in_backward, clip, {}, []
        first = self.param_groups[0]["params"][0]
        self.generator = torch.Generator(device=first.device)
        self.generator.manual_seed(seed)
        # what a bf16 weight's fp32 stand-in holds between updates: one empty tensor made on the
        # device once (moving an empty host tensor there per update was a blocking copy each)
        self.nothing = torch.empty(0, device=first.device)
        for group in self.param_groups:
            for p in group["params"]:
                stand_in = p if p.dtype == torch.float32 else \
                    torch.nn.Parameter(self.nothing)
                self.inner[p] = (build([{"params": [stand_in], "lr": group["lr"]}]), stand_in,
                                 group)
                if in_backward:
                    self.hooks.append(p.register_post_accumulate_grad_hook(self._in_backward))

    def _in_backward(self, p: torch.Tensor) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_([p], self.clip)
        self.update(p)
        p.grad = None

    @torch.no_grad()
    def update(self, p: torch.Tensor) -> None:
        """Update one weight from its gradient."""
        optimizer, stand_in, group = self.inner[p]
        if p.grad is None:
            return
        optimizer.param_groups[0]["lr"] = group["lr"]
        if stand_in is p:
            optimizer.step()
            return
        stand_in.data, stand_in.grad = p.detach().float(), p.grad.float()
        optimizer.step()
        stand_in.grad = None  # freed before the rounding's temporary is made
        stochastic_round_(p, stand_in.data, self.generator)
        stand_in.data = self.nothing

    def step(self, closure=None):
        if not self.in_backward:  # in backward, the hooks have done it already
            for group in self.param_groups:
                for p in group["params"]:
                    self.update(p)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict:
        return {"inner": [opt.state_dict() for opt, _, _ in self.inner.values()],
                "lr": [g["lr"] for g in self.param_groups],
                "initial_lr": [g.get("initial_lr") for g in self.param_groups],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for (opt, _, _), saved in zip(self.inner.values(), state["inner"]):
            opt.load_state_dict(saved)
        for group, lr, initial in zip(self.param_groups, state["lr"], state["initial_lr"]):
            group["lr"] = lr
            if initial is not None:
                group["initial_lr"] = initial
        self.generator.set_state(state["generator"].cpu())

    def inner_states(self) -> list[dict]:
        """The inner optimizers' state tensors (for moving them between devices)."""
        return [opt.state for opt, _, _ in self.inner.values()]

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def make_optimizer(cfg, groups: list, acc, warn) -> tuple:
    """(optimizer, its name for the log): the configured optimizer; per weight (PerWeight) with
    bf16 weights or fused into backward. A fused optimizer needs one process: DDP averages
    gradients after backward, which is too late for an update inside it."""
    from . import backends
    per_weight = cfg.fused_optimizer or (cfg.bf16_weights and cfg.method == "dreambooth")
    if per_weight and acc.distributed_type == "DEEPSPEED":
        warn("Under DeepSpeed, which owns the optimizer step, fused_optimizer and "
             "bf16_weights do not apply; the optimizer steps as usual.")
        per_weight = False
    if not per_weight:
        return backends.make_optimizer(cfg.optimizer, groups, cfg, acc.device, warn)
    fused = cfg.fused_optimizer and acc.num_processes == 1
    if cfg.fused_optimizer and not fused:
        warn("fused_optimizer needs a single process; with several, the optimizer "
             "steps after backward as usual.")
    build, name = backends.optimizer_builder(cfg.optimizer, cfg, acc.device, warn)
    name += " (per weight, in backward)" if fused else " (per weight)"
    return PerWeight(groups, build, fused, cfg.max_grad_norm if fused else 0.0, cfg.seed), name


def trainable_groups(cfg, comp) -> list[dict]:
    """The parameter groups a run trains, set to train (and to checkpoint gradients): a new
    token's embedding alone, the LoRA layers (in fp32; pivotal: and the embedding) with
    everything else frozen, or the UNet and, with train_text_encoder,
    the text encoders at their own learning rate."""
    from .embedding import embedding_groups
    from .lora import add_lora
    unet, tes = comp.unet, comp.text_encoders
    if cfg.method == "textual_inversion":
        unet.requires_grad_(False)
        groups = embedding_groups(cfg, comp)
    elif cfg.use_lora:
        groups = add_lora(comp, cfg)
        for p in (p for g in groups for p in g["params"]):
            p.data = p.data.float()
        if cfg.trains_embedding:  # pivotal
            groups += embedding_groups(cfg, comp)
    else:
        groups = [{"params": list(unet.requires_grad_(True).parameters()),
                   "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            groups.append({"params": [p for te in tes for p in te.requires_grad_(True)
                                      .parameters()], "lr": cfg.text_encoder_learning_rate})
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    for te in tes if cfg.trains_text_encoder else ():
        te.train()
        if cfg.gradient_checkpointing:
            te.gradient_checkpointing_enable(  # reentrant would leave it without grads
                gradient_checkpointing_kwargs={"use_reentrant": False})
    return groups
