"""Selective gradient checkpointing (checkpoint_blocks 'selective'): backward recomputes only
the UNet blocks that free the most memory for the compute they cost, the rest keep their
activations.

The set is a fixed rule that the memory count decides, per model type and resolution: one
forward of the UNet on the meta device measures, for each block gradient checkpointing can
recompute (memory_count.BLOCKS: every ResnetBlock2D and BasicTransformerBlock), the bytes
autograd saves inside it and its forward FLOPs (what recomputing it costs); the blocks chosen
are those that save more bytes per FLOP than the blocks do together, i.e. those where
checkpointing buys more memory per recompute than full checkpointing does. At SD1.5 512 px
these are the transformer blocks of the two highest resolutions and the middle one (11 of 38
blocks: 67% of the blocks' saved bytes for 40% of their FLOPs; per image 0.45 GiB kept by the
estimate, 0.92 without checkpointing, 0.22 with every block); at 1024 px, where attention's
FLOPs grow with the square of the tokens, the ResNet blocks of the highest resolution instead
of its transformer blocks. The estimate (memory.py) counts what a forward with those blocks
checkpointed keeps, from the same forward (which blocks save each tensor, what each block takes
in), and the trainer checkpoints the same set (of its own UNet's config). This is a
fixed rule, not the smallest set that fits the free memory: the set stays a function of the
config (a resumed run recomputes the same blocks), and the 'auto' preset weighs it as one
lever between none and full (advice.py: its cost is full's, times the share of the FLOPs).

    names = chosen_blocks(comp.configs, 512, "sdpa")   # comp: model.components.Components
    checkpoint_blocks(comp.unet, names)                # what optim.trainable_groups does
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from .memory_count import BLOCKS, flash_like, quiet, unet_inputs


@dataclass(frozen=True)
class Block:
    name: str  # its path in the UNet
    saved: int  # bytes autograd saves inside it in one forward (per image)
    flops: int  # its forward FLOPs (per image): what recomputing it costs
    params: tuple = ()  # (values, a Linear/Conv2d weight or bias?) of each parameter inside


def full(cfg) -> bool:
    """Every block recomputed (gradient checkpointing as diffusers does it)."""
    return bool(cfg.gradient_checkpointing) and getattr(cfg, "checkpoint_blocks", "all") == "all"


def selective(cfg) -> bool:
    return bool(cfg.gradient_checkpointing) and \
        getattr(cfg, "checkpoint_blocks", "all") == "selective"


def _attention(attention: str) -> str:
    """What decides the saved bytes: the T x T matrix of plain attention, or none (fused)."""
    return "default" if attention == "default" else "sdpa"


def _key(configs: dict) -> str:
    """The UNet's and the VAE's configs (what decides the blocks), hashable for the caches."""
    return json.dumps({k: configs[k] for k in ("unet", "vae")}, sort_keys=True)


def _shipped(model_type: str, sizes: str = "") -> str:
    """The key of a model type's UNet at its shipped size, or at `sizes` (memory_count.sizes_of)."""
    from ..model.spec import shipped_configs
    return _key(json.loads(sizes) if sizes else shipped_configs(model_type))


def chosen_blocks(configs: dict, resolution: int, attention: str) -> tuple:
    """Names of the blocks selective checkpointing recomputes in the UNet of `configs` (a
    model's component configs: Components.configs) at `resolution` (see the module's text)."""
    return _chosen(_key(configs), resolution, _attention(attention))


@functools.lru_cache(maxsize=None)
def _chosen(key: str, resolution: int, attention: str) -> tuple:
    blocks = block_costs(key, resolution, attention)
    saved, flops = sum(b.saved for b in blocks), sum(b.flops for b in blocks)
    return tuple(b.name for b in blocks if b.saved * flops > saved * b.flops)


def recompute_share(model_type: str, resolution: int, attention: str) -> float:
    """The chosen blocks' share of the FLOPs full checkpointing recomputes (the model type's
    shipped UNet)."""
    return _shares(_shipped(model_type), resolution, _attention(attention))[1]


def _shares(key: str, resolution: int, attention: str) -> tuple[float, float]:
    """(share of the blocks' saved bytes, share of their FLOPs) in the chosen blocks."""
    blocks = block_costs(key, resolution, attention)
    chosen = set(_chosen(key, resolution, attention))
    return tuple(sum(getattr(b, k) for b in blocks if b.name in chosen)
                 / sum(getattr(b, k) for b in blocks) for k in ("saved", "flops"))


def describe(configs: dict, resolution: int, attention: str) -> str:
    """What the trainer says of its selective checkpointing."""
    key, attention = _key(configs), _attention(attention)
    saved, flops = _shares(key, resolution, attention)
    n, every = len(_chosen(key, resolution, attention)), len(block_costs(key, resolution,
                                                                         attention))
    return (f"Selective gradient checkpointing: {n} of the UNet's {every} blocks are recomputed "
            f"in backward, those that save {saved:.0%} of the blocks' activations at "
            f"{resolution} px for {flops:.0%} of their compute.")


def _meta_unet(key: str, attention: str):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    configs = json.loads(key)
    with torch.device("meta"), quiet():
        unet = UNet2DConditionModel.from_config(configs["unet"]).to(torch.bfloat16).train()
    unet.set_attn_processor(AttnProcessor() if attention == "default" else AttnProcessor2_0())
    return unet, configs


class _Counting:
    """Saved bytes (as memory_count._saved_bytes counts them) and FLOPs so far, of a forward
    with fused attention counted as its kernels keep it (memory_count.flash_like)."""

    def __init__(self, unet) -> None:
        self.params = {id(p) for p in unet.parameters()}
        self.saved, self.flops = 0, 0
        self.block = None  # the block running now (None: outside every block)
        # id of each saved tensor (its base) -> [bytes, the blocks that save it (None: outside)]
        self.saves: dict = {}
        self.inputs: dict = {}  # block -> ids and bytes of its tensor inputs
        self.alive: list = []  # (the inputs: no id used twice while counting)

    def pack(self, t):
        base = t._base if t._base is not None else t
        if id(base) not in self.params and id(t) not in self.params:
            if id(base) not in self.saves:
                self.saves[id(base)] = [base.numel() * base.element_size(), set()]
                self.saved += self.saves[id(base)][0]
            self.saves[id(base)][1].add(self.block)
        return t

    def enter(self, name: str, args, kwargs) -> None:
        self.block = name
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        self.alive += tensors
        self.inputs[name] = [(id(t._base if t._base is not None else t),
                              t.numel() * t.element_size()) for t in tensors]

    def count_flops(self, unet) -> list:
        """Hooks adding each matrix product's FLOPs (Linear, Conv2d, attention's two) to
        self.flops: what a block's compute is made of (torch's FlopCounterMode counts the same
        from the dispatched ops, seconds slower)."""
        def linear(m, args, out):
            self.flops += 2 * out.numel() * m.in_features

        def conv(m, args, out):
            self.flops += 2 * out.numel() * m.weight[0].numel()

        def attention(m, args, kwargs, out):  # q k^T and (.) v over every head
            context = kwargs.get("encoder_hidden_states")
            q, kv = args[0], args[0] if context is None else context
            self.flops += 4 * q[..., :1].numel() * kv.shape[-2] * m.to_q.out_features
        return [m.register_forward_hook(linear) if isinstance(m, torch.nn.Linear) else
                m.register_forward_hook(conv) if isinstance(m, torch.nn.Conv2d) else
                m.register_forward_hook(attention, with_kwargs=True)
                for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                or type(m).__name__ == "Attention"]


def block_costs(key: str, resolution: int, attention: str) -> tuple:
    """Every block's saved bytes and forward FLOPs at `resolution` (bf16), in forward order,
    of the UNet of `key` (_key), and the parameters inside it: (values, Linear/Conv2d?) each."""
    return _record(key, resolution, attention, True)[0]


@functools.lru_cache(maxsize=None)
def _record(key: str, resolution: int, attention: str, half: bool) -> tuple:
    """(block_costs, what each saved tensor weighs and which blocks save it, each block's
    inputs): one forward on the meta device, without checkpointing."""
    import torch.nn.functional as F
    unet, configs = _meta_unet(key, attention)
    dtype = torch.bfloat16 if half else torch.float32
    unet.to(dtype)
    names = {m: n for n, m in unet.named_modules() if type(m).__name__ in BLOCKS}
    count, start, rows = _Counting(unet), {}, []

    def enter(m, args, kwargs) -> None:
        start[m] = (count.saved, count.flops)
        count.enter(names[m], args, kwargs)

    def leave(m, args, out) -> None:
        count.block = None
        rows.append(Block(names[m], count.saved - start[m][0], count.flops - start[m][1],
                          _params(m)))
    hooks = [h for m in names for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                        m.register_forward_hook(leave))]
    hooks += count.count_flops(unet)
    args, kwargs = unet_inputs(configs, resolution, dtype)
    plain, F.scaled_dot_product_attention = F.scaled_dot_product_attention, flash_like
    try:
        with torch.autograd.graph.saved_tensors_hooks(count.pack, lambda t: t):
            unet(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = plain
        for h in hooks:
            h.remove()
    return tuple(rows), count.saves, count.inputs


def _params(block) -> tuple:
    return tuple((p.numel(), isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
                 for m in block.modules() for p in m.parameters(recurse=False))


def activation_bytes(cfg, half: bool, sizes: str = "") -> int:
    """Bytes the UNet holds for backward per image under selective checkpointing: what a
    forward with the chosen blocks checkpointed saves, their inputs (each checkpoint keeps its
    own), and the most one chosen block saves (recomputed in backward, one at a time)."""
    return _selective_saved(_shipped(cfg.model_type, sizes), cfg.resolution,
                            _attention(cfg.attention), half)


def recomputed_weights(cfg, recast: int | None, sizes: str = "") -> int:
    """Values of the UNet's weights inside the chosen blocks, whose half-precision copies
    backward does not keep (cast again in the recompute), less the Linear/Conv2d ones of
    `recast` values or more, which the gradient park casts again anyway (parked.RECAST_ELEMENTS
    where it applies, else None); 0 unless selective."""
    if not selective(cfg):
        return 0
    key, attention = _shipped(cfg.model_type, sizes), _attention(cfg.attention)
    chosen = set(_chosen(key, cfg.resolution, attention))
    return sum(n for b in block_costs(key, cfg.resolution, attention) if b.name in chosen
               for n, matrix in b.params if not (recast and matrix and n >= recast))


@functools.lru_cache(maxsize=None)
def _selective_saved(key: str, resolution: int, attention: str, half: bool) -> int:
    """What a forward with the chosen blocks checkpointed saves, from the forward without
    (_record): a tensor that some op outside them saves, and each chosen block's inputs (each
    checkpoint keeps its own), once each; and the most one chosen block saves."""
    chosen = set(_chosen(key, resolution, attention))
    blocks, saves, inputs = _record(key, resolution, attention, half)
    kept = {i: size for i, (size, savers) in saves.items() if not savers <= chosen}
    kept.update((i, size) for name in chosen for i, size in inputs[name])
    return sum(kept.values()) + max((b.saved for b in blocks if b.name in chosen), default=0)


# -- in the trainer ------------------------------------------------------------------------------
def checkpoint_blocks(unet, names) -> None:
    """Recompute the named blocks in backward (leanckpt's checkpoint: torch's non-reentrant one,
    as diffusers' gradient checkpointing runs each block, with less Python; torch's own for a
    block that draws random numbers), and mark their modules so that the gradient park keeps no
    saved tensors of its own inside them (parked.GradPark: its saved-tensor hooks would take the
    checkpoint's place)."""
    from . import leanckpt
    found = dict(unet.named_modules())
    for name in names:
        block = found[name]
        run = leanckpt.checkpoint if not leanckpt.draws(block) else _checkpointed
        block.forward = functools.partial(run, block.forward)
        for sub in block.modules():
            sub._recomputed = True


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
