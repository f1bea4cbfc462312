"""Stepping the optimizer a bucket of weights at a time: inside backward (no full gradient
buffer), and on bf16 weights with stochastic rounding (no fp32 copy of the model).

    opt = Bucketed(groups, build, in_backward=True, clip=1.0, seed=0)

The weights of each parameter group are cut into buckets in the order their gradients complete
in backward, each up to `bucket_bytes` of weights (a larger weight is a bucket alone) and of
one dtype. The first buckets follow the reverse of the order the weights were registered in;
in backward, the first step notes the order the gradients really arrive in and the buckets
follow it from then on (diffusers' UNet registers its up blocks before its middle block).
`build(params)` makes one torch-style optimizer per bucket (AdamW, fused on a GPU, 8-bit
AdamW, Adafactor, ...), so an update is a few ops per bucket, not per weight.

With `in_backward`, a hook counts each weight's gradient as it completes (a Python counter, no
tensor is read); when the last of a bucket's arrives, the bucket is clipped and updated and its
gradients are freed: the peak holds one bucket's gradients, not the model's (the
optimizer-in-backward pattern of the PyTorch tutorials). step() updates what backward left
over: a bucket whose weights got gradients only in part (a weight unused this step). Clipping
in backward is per bucket: the bucket's gradients are scaled to a norm of at most `clip`
together. That is not the global clipping of a plain step, which needs every gradient first:
a bucket is never scaled down by a large gradient elsewhere in the model.

A bf16 weight is updated through an fp32 stand-in: the bucket's weights and gradients are
copied into one fp32 scratch buffer (two foreach copies; the buffer is the size of the largest
bf16 bucket, shared by all of them), the inner optimizer steps those views, and the values are
written back with stochastic rounding: one draw of random low bits for the whole bucket (into
the gradient half of the buffer, no longer needed), added and cut on the flat buffer. Rounding
to nearest would drop every update smaller than half a bf16 step (about 0.4% of the weight),
which at DreamBooth's learning rates is all of them. The draws come from this object's
generator, which is saved with the state: a resume is exact.

The schedule's learning rate lives in this object's param_groups, as for any optimizer; the
inner optimizers take it at each update. The state is saved per weight (as torch saves it:
index -> moments) with the buckets, which a resume restores (the clipping and the rounding
draws are per bucket); snapshots of the earlier one-optimizer-per-weight layout convert.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config.errors import DreamboothError

BUCKET_BYTES = 64 * 2 ** 20  # of weights per bucket (measured: see README's step profile)


def stochastic_round_(target: torch.Tensor, value: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Write fp32 `value` into bf16 `target`, rounding down or up at random with the
    probabilities that make the expected result equal `value` exactly."""
    bits = value.detach().to(torch.float32, copy=True).contiguous().view(torch.int32)
    round_bits_(bits, torch.empty_like(bits), generator, target)  # the buckets' own kernel
    return target


def round_bits_(bits: torch.Tensor, noise: torch.Tensor, generator, target=None) -> None:
    """Stochastic rounding on the int32 view `bits` of fp32 values, in place: a bf16 number is
    the top 16 bits of an fp32 one, so add a random amount below the cut (drawn into `noise`,
    an int32 buffer of the same size), then cut. Written into `target` if given."""
    noise.random_(0, 1 << 16, generator=generator)
    bits.add_(noise).bitwise_and_(-65536)
    if target is not None:
        target.copy_(bits.view(torch.float32))


def split_buckets(params: list, cap_bytes: int) -> list[list]:
    """`params`, in the order their gradients complete, cut into runs of one dtype and device
    of at most `cap_bytes` each (a larger weight alone)."""
    buckets, size = [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > cap_bytes or \
                (p.dtype, p.device) != (buckets[-1][0].dtype, buckets[-1][0].device):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


class _Bucket:
    """Weights updated together by one inner optimizer; bf16 ones through fp32 stand-ins that
    are views of the shared scratch buffer (made once: no op per weight at an update)."""

    def __init__(self, params: list, group: dict, build: Callable, scratch) -> None:
        self.params, self.group, self.arrived = params, group, 0
        if params[0].dtype == torch.float32:
            self.stand_ins, self.grads, self.bits, self.noise = params, None, None, None
        else:
            self.stand_ins = None
            self.bind(scratch)
        self.inner = build([{"params": self.stand_ins, "lr": group["lr"]}])

    def bind(self, scratch) -> None:
        """(bf16) The stand-ins and gradients as views of `scratch`, the (values, gradients)
        buffers; the stand-ins keep their identity (the inner optimizer's state is keyed by
        them)."""
        sizes = [p.numel() for p in self.params]
        values, grads = (buffer[:sum(sizes)] for buffer in scratch)
        views = [v.view(p.shape) for v, p in zip(values.split(sizes), self.params)]
        if self.stand_ins is None:
            self.stand_ins = [torch.nn.Parameter(v) for v in views]
        else:
            for stand_in, view in zip(self.stand_ins, views):  # .data can't change device
                torch.utils.swap_tensors(stand_in, torch.nn.Parameter(view))
        self.grads = [g.view(p.shape) for g, p in zip(grads.split(sizes), self.params)]
        self.bits, self.noise = values.view(torch.int32), grads.view(torch.int32)


class Bucketed(torch.optim.Optimizer):
    """One inner optimizer per bucket of weights, stepped in backward (`in_backward`) as each
    bucket's gradients complete, or all by step()."""

    def __init__(self, groups: list[dict], build: Callable[[list], torch.optim.Optimizer],
                 in_backward: bool, clip: float = 0.0, seed: int = 0,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        super().__init__(groups, {})
        self.in_backward, self.clip, self.hooks = in_backward, clip, []
        self.park = None  # parked.GradPark: the gradients it keeps in bf16 come from it
        self.build, self.bucket_bytes = build, bucket_bytes
        first = self.param_groups[0]["params"][0]
        self.generator = torch.Generator(device=first.device)
        self.generator.manual_seed(seed)
        weights = [p for g in self.param_groups for p in g["params"]]
        self.index = {p: i for i, p in enumerate(weights)}
        self.group_of = {p: k for k, g in enumerate(self.param_groups) for p in g["params"]}
        self.make_buckets(weights[::-1])  # about the order gradients complete in
        self.seen = [] if in_backward else None
        if in_backward:
            self.hooks = [p.register_post_accumulate_grad_hook(self._arrived) for p in weights]

    def make_buckets(self, order: list) -> None:
        """Buckets over the weights in `order` (gradient-completion order), group by group."""
        plan = [(group, params) for k, group in enumerate(self.param_groups)
                for params in split_buckets([p for p in order if self.group_of[p] == k],
                                            self.bucket_bytes)]
        widest = max((sum(p.numel() for p in params) for _, params in plan
                      if params[0].dtype != torch.float32), default=0)
        device = self.param_groups[0]["params"][0].device
        scratch = [torch.empty(widest, dtype=torch.float32, device=device) for _ in "vg"] \
            if widest else None
        self.scratch = scratch
        self.buckets = [_Bucket(params, group, self.build, scratch) for group, params in plan]
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        # by id too: a tensor's hash is a Python call, and backward's hooks look each one up
        self.bucket_by_id = {id(p): b for b in self.buckets for p in b.params}
        self.order = [p for b in self.buckets for p in b.params]
        if getattr(self, "park", None) is not None:
            self.park.plan([b.params for b in self.buckets])

    def use_park(self, park) -> None:
        """Take the gradients parked.GradPark keeps in bf16 from `park` (each bucket as it
        completes)."""
        self.park = park
        park.plan([b.params for b in self.buckets])

    def _arrived(self, p: torch.Tensor) -> None:
        """backward's hook, once p.grad has accumulated: once a backward, after every use of
        the weight (it runs with no .grad for a weight whose gradient went to the park)."""
        if p.grad is None and (self.park is None or id(p) not in self.park.slots):
            return
        if self.seen is not None:
            self.seen.append(p)
        bucket = self.bucket_by_id[id(p)]
        bucket.arrived += 1
        if bucket.arrived == len(bucket.params):
            self._finish(bucket)

    def _finish(self, bucket: _Bucket) -> None:
        self.update(bucket)
        bucket.arrived = 0
        for p in bucket.params:
            p.grad = None

    @torch.no_grad()
    def update(self, bucket: _Bucket) -> None:
        """Update a bucket's weights from their gradients (those that have one)."""
        if self.park is not None:
            self.park.take(bucket.params)
        has = [p.grad is not None for p in bucket.params]
        if not any(has):
            return
        bucket.inner.param_groups[0]["lr"] = bucket.group["lr"]
        if bucket.bits is None:  # fp32: the weights themselves
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(bucket.params, self.clip, foreach=True)
            bucket.inner.step()
            return
        pick = (lambda xs: xs) if all(has) else (lambda xs: [x for x, h in zip(xs, has) if h])
        params, stand_ins, grads = pick(bucket.params), pick(bucket.stand_ins), \
            pick(bucket.grads)
        torch._foreach_copy_(stand_ins, params)
        torch._foreach_copy_(grads, [p.grad for p in params])
        for stand_in, grad in zip(stand_ins, grads):
            stand_in.grad = grad
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(stand_ins, self.clip, foreach=True)
        bucket.inner.step()
        for stand_in in stand_ins:
            stand_in.grad = None
        round_bits_(bucket.bits, bucket.noise, self.generator)
        torch._foreach_copy_(params, stand_ins)

    def step(self, closure=None):
        """Without `in_backward`: update every bucket. In backward the hooks have updated the
        complete buckets; this updates those that got only some of their gradients."""
        for bucket in self.buckets:
            if not self.in_backward:
                self.update(bucket)
            elif bucket.arrived:
                self._finish(bucket)
        if self.seen:  # the first step in backward: bucket in the order it saw
            seen, self.seen = list(dict.fromkeys(self.seen)), None
            noted = set(map(id, seen))
            self.rebucket(seen + [p for p in self.order if id(p) not in noted])
        return None

    def rebucket(self, order: list, keep_state: bool = True) -> None:
        """Bucket anew in `order`, the state going with its weights if `keep_state`."""
        if [id(p) for p in order] != [id(p) for p in self.order]:
            state = self.state_dict() if keep_state else None
            self.make_buckets(order)
            if keep_state:
                self.load_inner(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.order:
            p.grad = None

    def fused_parts(self) -> list:
        """The inner optimizers that take GradScaler's `found_inf` (fused ones)."""
        return [b.inner for b in self.buckets if b.inner.defaults.get("fused")
                and getattr(b.inner, "_step_supports_amp_scaling", False)]

    def state_dict(self) -> dict:
        """Per weight (global index -> state, as torch keeps it), with the buckets (each a list
        of global indices) and each bucket's inner group settings."""
        state, groups = {}, []
        for b in self.buckets:
            saved = b.inner.state_dict()
            state.update({self.index[b.params[i]]: s for i, s in saved["state"].items()})
            groups.append({k: v for k, v in saved["param_groups"][0].items() if k != "params"})
        return {"state": state, "inner_groups": groups,
                "buckets": [[self.index[p] for p in b.params] for b in self.buckets],
                "learning": self.seen is not None,
                "lr": [g["lr"] for g in self.param_groups],
                "initial_lr": [g.get("initial_lr") for g in self.param_groups],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        weights = list(self.index)
        state = bucketed_layout(state, len(weights))
        if not state["converted"]:  # its buckets, learnt or not (clipping is per bucket)
            self.rebucket([weights[i] for bucket in state["buckets"] for i in bucket], False)
            self.seen = [] if state["learning"] and self.in_backward else None
        self.load_inner(state)
        for group, lr, initial in zip(self.param_groups, state["lr"], state["initial_lr"]):
            group["lr"] = lr
            if initial is not None:
                group["initial_lr"] = initial
        self.generator.set_state(state["generator"].cpu())

    def load_inner(self, state: dict) -> None:
        """The inner optimizers' states from a state in Bucketed's layout."""
        saved_bucket = {i: k for k, bucket in enumerate(state["buckets"]) for i in bucket}
        for b in self.buckets:
            mine = [self.index[p] for p in b.params]
            b.inner.load_state_dict({  # with the settings of the bucket of its first weight
                "state": {i: state["state"][j] for i, j in enumerate(mine)
                          if j in state["state"]},
                "param_groups": [{**state["inner_groups"][saved_bucket[mine[0]]],
                                  "params": list(range(len(mine)))}]})

    def inner_states(self) -> list[dict]:
        """The inner optimizers' state tensors (for moving them between devices)."""
        return [b.inner.state for b in self.buckets]

    def move_scratch(self, device) -> None:
        """The bf16 buckets' fp32 scratch to `device` (the benchmark moves a run off the GPU
        between its rounds); nothing is kept in it between updates. The park's scratch
        (use_park) is dropped, made again where the weights are."""
        if self.park is not None:
            self.park.release()
        if self.scratch is not None and self.scratch[0].device != torch.device(device):
            self.scratch = [torch.empty(len(b), device=device) for b in self.scratch]
            for bucket in self.buckets:
                if bucket.bits is not None:
                    bucket.bind(self.scratch)

    def remove_hooks(self) -> None:
        """Stop updating in backward (step() updates everything from then on)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.in_backward = [], False


def bucketed_layout(state: dict, weights: int) -> dict:
    """A saved state in Bucketed's layout, "converted" saying whether it was: the
    one-optimizer-per-weight layout of earlier snapshots ("inner": one state per weight)
    converts, moments and all. One for another number of weights is refused."""
    converted = "inner" in state
    if converted:
        inner = state["inner"]
        state = {**state, "state": {i: s["state"][0] for i, s in enumerate(inner)
                                    if 0 in s["state"]},
                 "inner_groups": [{k: v for k, v in s["param_groups"][0].items()
                                   if k != "params"} for s in inner],
                 "buckets": [[i] for i in range(len(inner))]}
    saved = sorted(i for bucket in state["buckets"] for i in bucket)
    if saved != list(range(weights)) or any(j >= weights for j in state["state"]):
        raise DreamboothError(
            f"The saved optimizer state is for {len(saved)} weights, and this run trains "
            f"{weights}.", "Resume with the settings the snapshot was made with, or set "
            "resume to 'never'.")
    return {**state, "converted": converted}


def make_optimizer(cfg, groups: list, acc, warn) -> tuple:
    """(optimizer, its name for the log): the configured optimizer; by buckets of weights
    (Bucketed) with bf16 weights or fused into backward. A fused optimizer needs one process:
    DDP averages gradients after backward, which is too late for an update inside it."""
    from . import backends
    bucketed = cfg.fused_optimizer or (cfg.bf16_weights and cfg.method == "dreambooth")
    if bucketed and acc.distributed_type == "DEEPSPEED":
        warn("Under DeepSpeed, which owns the optimizer step, fused_optimizer and "
             "bf16_weights do not apply; the optimizer steps as usual.")
        bucketed = False
    if not bucketed:
        return backends.make_optimizer(cfg.optimizer, groups, cfg, acc.device, warn)
    fused = cfg.fused_optimizer and acc.num_processes == 1
    if cfg.fused_optimizer and not fused:
        warn("fused_optimizer needs a single process; with several, the optimizer "
             "steps after backward as usual.")
    build, name = backends.optimizer_builder(cfg.optimizer, cfg, acc.device, warn)
    name += " (bucketed, in backward)" if fused else " (bucketed)"
    return Bucketed(groups, build, fused, cfg.max_grad_norm if fused else 0.0, cfg.seed), name


def trainable_groups(cfg, comp, say=lambda text: None) -> list[dict]:
    """The parameter groups a run trains, set to train (and to checkpoint gradients, saying
    which blocks where the checkpointing is selective): a new
    token's embedding alone, the LoRA layers (in fp32; pivotal: and the embedding) with
    everything else frozen, or the UNet and, with train_text_encoder,
    the text encoders at their own learning rate."""
    from .embedding import embedding_groups
    from .adapters import add_lora
    from .leanlora import streamline
    from . import leanckpt, selective
    unet, tes = comp.unet, comp.text_encoders
    if cfg.method == "textual_inversion":
        unet.requires_grad_(False)
        groups = embedding_groups(cfg, comp)
    elif cfg.use_lora:
        groups = add_lora(comp, cfg)
        for p in (p for g in groups for p in g["params"]):
            p.data = p.data.float()
        streamline([unet, *tes])  # peft's LoRA layers: the same ops, less Python a call
        if cfg.trains_embedding:  # pivotal
            groups += embedding_groups(cfg, comp)
    else:
        groups = [{"params": list(unet.requires_grad_(True).parameters()),
                   "lr": cfg.learning_rate}]
        if cfg.train_text_encoder:
            groups.append({"params": [p for te in tes for p in te.requires_grad_(True)
                                      .parameters()], "lr": cfg.text_encoder_learning_rate})
    unet.train()
    if selective.selective(cfg):  # the UNet's blocks the estimate picks; the text encoder's none
        names = selective.chosen_blocks(comp.configs, cfg.resolution, cfg.attention)
        selective.checkpoint_blocks(unet, names)
        say(selective.describe(comp.configs, cfg.resolution, cfg.attention))
    elif cfg.gradient_checkpointing:  # each block: leanckpt's checkpoint (torch's, less Python)
        leanckpt.enable(unet)
    for te in tes if cfg.trains_text_encoder else ():
        te.train()
        if selective.full(cfg):
            te.gradient_checkpointing_enable(  # reentrant would leave it without grads
                gradient_checkpointing_kwargs={"use_reentrant": False})
    return groups
