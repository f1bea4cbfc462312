"""The counting behind the memory estimate: parameter and LoRA shapes of each model type on the
meta device, optimizer state per optimizer, and the activation bytes autograd saves in one
forward of the UNet or a text encoder at a resolution (with or without gradient checkpointing),
all without memory or weights. See memory.py for how these add up to a peak.
"""
from __future__ import annotations

import functools
import json

import torch


# Every count below is of a model type at its shipped size, or at the size `sizes` gives: the
# JSON of its component configs (sizes_of), e.g. a shallower SDXL that the step profile can
# count in seconds, to hold the estimate to (tests/test_profile.py).
def sizes_of(configs: dict | None) -> str:
    """The hashable form of a model's component configs ('' for the shipped ones)."""
    return json.dumps(configs, sort_keys=True) if configs else ""


def _configs(model_type: str, sizes: str) -> dict:
    from ..model.spec import shipped_configs
    return json.loads(sizes) if sizes else shipped_configs(model_type)


def _meta(model_type: str, sizes: str):
    from ..model.components import build_meta
    return build_meta(model_type, json.loads(sizes) if sizes else None)


# -- parameters ---------------------------------------------------------------------------------
def parameter_shapes(model_type: str, sizes: str = "") -> dict:
    """{component: tuple of parameter shapes} of a model type, from meta-device instantiation."""
    return _shapes(model_type, sizes)[0]


def linear_conv_shapes(model_type: str, sizes: str = "") -> dict:
    """{component: tuple of the shapes of its nn.Linear and nn.Conv2d weights and biases}: what
    bf16 autocast runs in bf16 (parked.py keeps their gradients in bf16)."""
    return _shapes(model_type, sizes)[1]


@functools.lru_cache(maxsize=None)
def _shapes(model_type: str, sizes: str) -> tuple[dict, dict]:
    comp = _meta(model_type, sizes)
    modules = {"unet": comp.unet, "vae": comp.vae}
    modules.update({s.component: getattr(comp, s.component) for s in comp.spec.text_encoders})
    every = {name: tuple(tuple(p.shape) for p in m.parameters()) for name, m in modules.items()}
    cast = {name: tuple(tuple(p.shape) for sub in m.modules()
                        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d))
                        for p in sub.parameters(recurse=False))
            for name, m in modules.items()}
    return every, cast


@functools.lru_cache(maxsize=None)
def lora_shapes(model_type: str, rank: int, component: str = "unet", targets: str = "attention",
                conv_rank: int | None = None, sizes: str = "") -> tuple:
    """Shapes of the LoRA A/B matrices peft adds to the `targets` of a component."""
    from .lora import is_conv_target, target_paths
    module = getattr(_meta(model_type, sizes), component)
    found = dict(module.named_modules())
    shapes = []
    for path in target_paths(module, component, targets):
        w = tuple(found[path].weight.shape)
        r = conv_rank if conv_rank and is_conv_target(path) else rank
        shapes += [(r, *w[1:]), (w[0], r) + tuple(1 for _ in w[2:])]
    return tuple(shapes)


NETWORK_SETTINGS = ("network", "lora_targets", "lora_rank", "lora_alpha", "lora_conv_rank",
                    "lora_conv_alpha", "loha_rank", "loha_alpha", "lokr_factor", "lokr_rank",
                    "lokr_alpha", "dora_wd", "glora_rank", "oft_block_size", "oft_constraint")


def network_settings(cfg) -> tuple:
    """What of cfg decides the shapes of its network's layers (hashable, for the cache)."""
    return tuple((k, getattr(cfg, k)) for k in NETWORK_SETTINGS)


@functools.lru_cache(maxsize=None)
def network_shapes(model_type: str, component: str, settings: tuple, sizes: str = ""
                   ) -> tuple[tuple, int]:
    """(shapes of the parameters our layers (LoHa, LoKr, DoRA, IA3, ...) add to a component,
    elements of the weights they adapt), `settings` from network_settings."""
    from types import SimpleNamespace

    from ..config.network import targets_of
    from .lora import target_paths
    from .networks import param_shapes
    cfg = SimpleNamespace(**dict(settings))
    module = getattr(_meta(model_type, sizes), component)
    found = dict(module.named_modules())
    shapes, adapted = [], 0
    for path in target_paths(module, component, targets_of(cfg)):
        w = tuple(found[path].weight.shape)
        layer = param_shapes(cfg, path, w, found[path].bias is not None)
        shapes += list(layer.values())
        adapted += numel([w]) if layer else 0
    return tuple(shapes), adapted


def numel(shapes) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def optimizer_state_bytes(choice: str, shapes) -> int:
    """Bytes of optimizer state for fp32 parameters of these shapes."""
    total = 0
    for shape in shapes:
        n = numel([shape])
        if choice == "adamw_8bit":  # bitsandbytes: 8-bit states from 4096 elements up
            total += 2 * n if n >= 4096 else 8 * n
        elif choice == "adafactor":  # no first moment; the second factored as the matrix
            total += 4 * (shape[0] + n // shape[0]) if len(shape) >= 2 else 4 * n  # (out, rest)
        else:
            total += {"adamw": 8, "lion": 4, "prodigy": 16}.get(choice, 8) * n
    return total


# -- activations --------------------------------------------------------------------------------
class _quiet:
    """diffusers warns on every dtype cast of a model; these casts are on the meta device."""

    def __enter__(self):
        import logging
        self.logger = logging.getLogger("diffusers")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False


def _flash_like(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """SDPA as the fused kernels keep it for backward (q, k, v, out, logsumexp; no T x T
    matrix), which the meta device would otherwise run as plain maths."""
    return _SavesLikeFlash.apply(q, k, v)


class _SavesLikeFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: only forward passes are counted
        return None, None, None


def _saved_bytes(module, run, block_types: tuple = ()) -> tuple[int, int]:
    """(bytes autograd saves during `run()`, most saved inside one module of `block_types`);
    parameters and repeated saves of one tensor are not counted."""
    params = {id(p) for p in module.parameters()}
    seen, state = set(), {"total": 0}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params and id(base) not in seen:
            seen.add(id(base))
            state["total"] += base.numel() * base.element_size()
        return t

    blocks, hooks = [0], []
    for sub in module.modules():
        if type(sub).__name__ in block_types:
            hooks.append(sub.register_forward_pre_hook(
                lambda m, a: state.__setitem__("start", state["total"])))
            hooks.append(sub.register_forward_hook(
                lambda m, a, o: blocks.append(state["total"] - state["start"])))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    return state["total"], max(blocks)


# what memory_flux.py counts Flux's activations with, the same way
saved_bytes, flash_like, quiet = _saved_bytes, _flash_like, _quiet

BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")  # what gradient checkpointing recomputes


def _unet_inputs(configs: dict, resolution: int, dtype) -> tuple:
    cfg, vae = configs["unet"], configs["vae"]
    side = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    args = (torch.empty(1, cfg.get("in_channels", 4), side, side, dtype=dtype, device="meta"),
            torch.zeros(1, dtype=torch.long, device="meta"),
            torch.empty(1, 77, cross, dtype=dtype, device="meta"))
    kwargs = {}
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 size numbers
        time_dim = 6 * cfg["addition_time_embed_dim"]
        pooled = cfg["projection_class_embeddings_input_dim"] - time_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(1, pooled, dtype=dtype, device="meta"),
            "time_ids": torch.empty(1, 6, dtype=dtype, device="meta")}
    return args, kwargs


def unet_activation_bytes(model_type: str, resolution: int, attention: str,
                          checkpointing: bool, half: bool, sizes: str = "") -> int:
    """Bytes the UNet saves for backward per image (before ACTIVATION_FACTOR)."""
    total, block = _unet_saved(model_type, resolution, attention, half, False, sizes)
    if not checkpointing:
        return total
    kept, _ = _unet_saved(model_type, resolution, attention, half, True, sizes)
    return kept + block  # block inputs kept, plus one block recomputed in backward


@functools.lru_cache(maxsize=None)
def _unet_saved(model_type: str, resolution: int, attention: str, half: bool,
                checkpointing: bool, sizes: str) -> tuple[int, int]:
    """(bytes one meta forward of the UNet saves, most saved inside one of BLOCKS); only the
    UNet is built (the plan's start-up time)."""
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    configs = _configs(model_type, sizes)
    dtype = torch.bfloat16 if half else torch.float32
    with torch.device("meta"), _quiet():
        unet = UNet2DConditionModel.from_config(configs["unet"]).to(dtype).train()
    unet.set_attn_processor(AttnProcessor() if attention == "default" else AttnProcessor2_0())
    if checkpointing:
        unet.enable_gradient_checkpointing()
    args, kwargs = _unet_inputs(configs, resolution, dtype)
    plain_sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _flash_like
    try:
        return _saved_bytes(unet, lambda: unet(*args, **kwargs), () if checkpointing else BLOCKS)
    finally:
        F.scaled_dot_product_attention = plain_sdpa


@functools.lru_cache(maxsize=None)
def text_encoder_activation_bytes(model_type: str, component: str, half: bool, sizes: str = ""
                                  ) -> int:
    """Bytes a trained text encoder saves for backward per prompt (77 tokens)."""
    te = getattr(_meta(model_type, sizes), component).to(
        torch.bfloat16 if half else torch.float32).train()
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    return _saved_bytes(te, lambda: te(ids, output_hidden_states=True))[0]


# the pieces selective.py counts its blocks with (names kept apart from the ones above so that
# edits to them and to this stay separate)
flash_like, quiet, unet_inputs = _flash_like, _quiet, _unet_inputs
