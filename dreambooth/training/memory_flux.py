"""Will a Flux.1 or SD3.5 LoRA fit? Its peak GPU memory, counted on the meta device as memory.py
counts SD's (memory.estimate hands flux-* and sd3.5-* configs here and makes its Estimate of the
figures; the presets plan with it as with SD's: advice.py). The two flow transformers are
counted alike; what differs (the model's parts, its inputs, its kinds of blocks) is looked up.

What a Flux / SD3.5 LoRA run holds, phase by phase (the trainer's order, trainer.Trainer.setup):
- caching: the text encoders on the GPU in bf16 (T5-XXL 8.9 GiB; flow.frozen_dtype) to encode
  the prompts once, the autoencoder in fp32 to encode the images; then both leave the GPU;
- training: the frozen transformer (bf16: Flux 22.2 GiB, SD3.5 large 15.0, medium 4.2; with
  fp8_base each Linear weight in fp8 with its scale: about half), the network's layers (peft's
  LoRA; DoRA, LoHa, Full: networks.py's), their gradients and optimizer state in fp32, the
  cached latents and prompt states, and a step's activations: what autograd saves in one meta
  forward of the transformer with those layers (DoRA's, LoHa's, Full's: weight-sized copies too)
  at the resolution, per image (fp8_base's upcasting layers keep no more: their fp8 weight is
  the model's own); with gradient checkpointing, what the blocks outside keep (every block's
  inputs among it: the checkpoints keep them) and one block recomputed in backward; and what a
  block's backward adds while all that is kept.
The peak is the larger of the two. memory.ACTIVATION_FACTOR and CUDA_OVERHEAD, the GPU-only
parts, are SD's (not measured on these yet); without them (memory.estimate's `gpu=False`) the
estimate is within 10% of the step profile's count on fake tensors (bench/profile.py).
"""
from __future__ import annotations

import copy
import functools

import torch

from . import fp8
from .memory_count import (flash_like, network_settings, numel, optimizer_state_bytes, quiet,
                           saved_bytes)

BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock")


def _model(model_type: str, blocks: tuple | None):
    """(configs, meta Components) of a full-size, or `blocks` deep, Flux ((double, single)
    blocks) or SD3.5 ((dual-attention, other) blocks before the last)."""
    if model_type.startswith("flux"):
        from ..model.flux import build_meta_flux as build, full_size_configs
    else:
        from ..model.sd35 import build_meta_sd35 as build, full_size_configs
    configs = full_size_configs(model_type, blocks)
    return configs, build(model_type, configs)


def full_blocks(model_type: str) -> tuple:
    """The full size's blocks, as `blocks` counts them."""
    if model_type.startswith("flux"):
        from ..model.flux import FULL_TRANSFORMER as unet
        return unet["num_layers"], unet["num_single_layers"]
    from ..model.sd35 import FULL_MMDIT
    return FULL_MMDIT[model_type][1]


def text_tokens(model_type: str) -> int:
    """Tokens of a prompt's cached states: T5's (SD3.5: after CLIP's 77)."""
    from ..model.spec import spec_for
    spec = spec_for(model_type)
    return spec.t5_tokens + (77 if spec.family == "sd3" else 0)


@functools.lru_cache(maxsize=None)
def _parts(model_type: str, blocks: tuple | None) -> dict:
    """Counts of a (full-size, or `blocks` deep) model's parts on the meta device."""
    configs, comp = _model(model_type, blocks)
    linears = [m.weight.shape for p, m in comp.unet.named_modules() if fp8.storable(p, m)]
    return {"configs": configs, "transformer": numel(p.shape for p in comp.unet.parameters())
            + numel(b.shape for b in comp.unet.buffers()),  # (SD3.5's positions: 0.4 GiB)
            "linear": numel(linears), "linears": len(linears),
            "text encoders": sum(numel(p.shape for p in te.parameters())
                                 for te in comp.text_encoders),
            "vae": numel(p.shape for p in comp.vae.parameters()), "unet": comp.unet,
            "vae channels": configs["vae"]["block_out_channels"][0]}


def network_of(cfg):
    """What decides the trained layers beside the targets: the rank of a plain (peft) LoRA, or
    memory_count.network_settings of networks.py's (DoRA, LoHa, Full)."""
    from .networks import OURS
    return network_settings(cfg) if getattr(cfg, "network", "lora") in OURS else cfg.lora_rank


def _ours(model_type: str, net):
    """A config of networks.py's layers from network_of's settings (None: a plain LoRA)."""
    from types import SimpleNamespace
    return None if isinstance(net, int) else SimpleNamespace(**dict(net), model_type=model_type)


def _meta_transformer(model_type: str, blocks, net, targets: str):
    """The transformer on the meta device in bf16 with its network's layers (`net`:
    network_of)."""
    from .flux_lora import meta_transformer, target_paths
    from .lora import inject
    from .networks import inject_network
    with quiet():
        config = _parts(model_type, blocks)["configs"]["unet"]
        model = copy.deepcopy(meta_transformer(config)).to("meta", torch.bfloat16).train()
    paths, ours = target_paths(model, targets), _ours(model_type, net)
    if ours is None:
        inject(model, net, float(net), paths)
    else:
        inject_network(model, paths, ours)
    return model


@functools.lru_cache(maxsize=None)
def lora_shapes(model_type: str, blocks, net, targets: str) -> tuple:
    """Shapes of the trained tensors of `targets` in the transformer (`net`: network_of)."""
    from .flux_lora import target_paths
    from .networks import param_shapes
    unet, ours = _parts(model_type, blocks)["unet"], _ours(model_type, net)
    found = dict(unet.named_modules())
    if ours is not None:
        return tuple(s for path in target_paths(unet, targets) for s in param_shapes(
            ours, path, tuple(found[path].weight.shape), found[path].bias is not None).values())
    return tuple(s for path in target_paths(unet, targets)
                 for s in ((net, found[path].weight.shape[1]),
                           (found[path].weight.shape[0], net)))


def _inputs(config: dict, resolution: int, tokens: int) -> dict:
    """One image's inputs of the transformer (Flux: packed 2x2 patches with their positions;
    SD3.5: the latents as they are, patched inside)."""
    meta, bf16 = {"device": "meta"}, {"device": "meta", "dtype": torch.bfloat16}
    text = dict(encoder_hidden_states=torch.empty(1, tokens, config["joint_attention_dim"],
                                                  **bf16),
                pooled_projections=torch.empty(1, config["pooled_projection_dim"], **bf16),
                timestep=torch.empty(1, **meta), return_dict=False)
    if "num_single_layers" not in config:  # SD3.5
        side = resolution // 8
        return dict(hidden_states=torch.empty(1, config["in_channels"], side, side, **bf16),
                    **text)
    side = resolution // 16  # 8x the autoencoder, 2x2 patches
    extra = {"guidance": torch.empty(1, **meta)} if config["guidance_embeds"] else {}
    return dict(hidden_states=torch.empty(1, side * side, config["in_channels"], **bf16),
                txt_ids=torch.empty(tokens, 3, **meta),
                img_ids=torch.empty(side * side, 3, **meta), **text, **extra)


@functools.lru_cache(maxsize=None)
def activation_bytes(model_type: str, resolution: int, checkpointing: bool, net,
                     targets: str, blocks: tuple | None = None) -> int:
    """Bytes one image's forward keeps for backward (before ACTIVATION_FACTOR). The blocks of a
    kind are alike, so the full-size count is built from counts 2 or 3 blocks of each kind deep
    (extrapolated, tested against the direct count); fp8_base's upcasting layers keep no more
    (their fp8 weight is the model's)."""
    if blocks is not None:
        return _counted(model_type, resolution, checkpointing, net, targets, blocks)
    return extrapolated(model_type, resolution, checkpointing, net, targets,
                        full_blocks(model_type))


def extrapolated(model_type: str, resolution: int, checkpointing: bool, net,
                 targets: str, blocks: tuple) -> int:
    """_counted of a `blocks` deep model from counts at most 2 blocks of each kind deep and
    one more of each kind (from 2 on, each block of a kind keeps what the one before it kept:
    Flux's first double block's input was partly kept already). Flux (19, 38): the 2+2, 3+2
    and 2+3 deep ones' counts; SD3.5 large (0, 37): 0+2 and 0+3; medium (13, 10): 2+2, 3+2
    and 2+3, each with the last block."""
    args = (model_type, resolution, checkpointing, net, targets)
    base = tuple(min(n, 2) for n in blocks)
    two, total = _counted(*args, base), 0
    for i, n in enumerate(blocks):
        if n > base[i]:
            more = tuple(b + (j == i) for j, b in enumerate(base))
            total += (n - base[i]) * (_counted(*args, more) - two)
    return two + total


def _counted(model_type: str, resolution: int, checkpointing: bool, net, targets: str,
             blocks: tuple) -> int:
    """activation_bytes of a `blocks` deep model, counted on the meta device: what autograd
    keeps (with gradient checkpointing: what the blocks' outside keeps, the blocks' inputs
    among it, and the most one block keeps, recomputed in backward), and the gradients a
    block's backward makes while it is all kept, about half of what the block kept (the step
    profile's count: 0.23 GiB at 1024 px, at 2+2 blocks and at full depth, with and without
    checkpointing). The weight-sized copies DoRA's, LoHa's and Full's layers keep add nothing
    there (the step profile's count at 2+2 blocks: within 3% of this), so that half is of what
    the block keeps with plain LoRA layers of the network's rank."""
    total, block, kept = _saved(model_type, resolution, net, targets, blocks)
    plain = block if isinstance(net, int) else \
        _saved(model_type, resolution, dict(net)["lora_rank"], targets, blocks)[1]
    return (kept + block if checkpointing else total) + plain // 2


@functools.lru_cache(maxsize=None)
def _saved(model_type: str, resolution: int, net, targets: str, blocks: tuple) -> tuple:
    """(bytes a forward keeps, the most one block keeps, bytes a checkpointed forward keeps)."""
    import torch.nn.functional as F
    model = _meta_transformer(model_type, blocks, net, targets)
    kwargs = _inputs(dict(model.config), resolution, text_tokens(model_type))
    plain_sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _sdpa
    try:
        total, block = saved_bytes(model, lambda: model(**kwargs), BLOCKS)
        model.enable_gradient_checkpointing()
        kept, _ = saved_bytes(model, lambda: model(**kwargs))
    finally:
        F.scaled_dot_product_attention = plain_sdpa
    return total, block, kept


def _sdpa(query, key, value, *args, **kwargs):
    """memory_count.flash_like as diffusers' attention dispatch calls SDPA (by keyword)."""
    return flash_like(query, key, value)


def flow_peak(cfg, images: tuple[int, int], factor: float, overhead: int,
              blocks: tuple | None = None, caching: bool = True) -> tuple[int, dict, str]:
    """(peak GPU bytes, what makes them up, the phase at the peak) of a Flux or SD3.5 LoRA run
    with `cfg` and `images` (instance, class) images, memory.estimate's Estimate; `factor`,
    `overhead`: its GPU-only ACTIVATION_FACTOR and CUDA_OVERHEAD (1.0 and 0: what the step
    profile holds); `blocks`: a model this many blocks deep (_model) at full width (the tests' shorter profile);
    `caching` off: the training step's peak only (what the step profile counts)."""
    from .optim import BUCKET_BYTES
    wbytes = 2 if cfg.mixed_precision in ("fp16", "bf16", "auto") else 4  # (memory.HALF)
    parts_of = _parts(cfg.model_type, blocks)
    stored = fp8.applies(cfg)
    transformer = parts_of["linear"] + 4 * parts_of["linears"] + wbytes * (
        parts_of["transformer"] - parts_of["linear"]) if stored \
        else wbytes * parts_of["transformer"]
    net = network_of(cfg)
    trained = lora_shapes(cfg.model_type, blocks, net, cfg.lora_targets)
    lora_n = numel(trained)
    per_step = cfg.batch_size * (2 if any(c.uses_prior for c in cfg.concepts) else 1)
    acts = per_step * activation_bytes(cfg.model_type, cfg.resolution, cfg.gradient_checkpointing,
                                       net, cfg.lora_targets, blocks)
    bucket = min(lora_n, max(max(numel([s]) for s in trained), BUCKET_BYTES // 4))
    encode = 4 * parts_of["vae channels"] * cfg.resolution ** 2 * wbytes
    parts = {"weights": transformer + 4 * lora_n + (0 if cfg.cache_latents else 4 *
                                                    parts_of["vae"]),
             "optimizer": optimizer_state_bytes(cfg.optimizer, trained),
             "ema": 4 * lora_n if cfg.use_ema else 0,  # of the LoRA alone (ema_parameters)
             "caches": _caches(cfg, parts_of["configs"], text_tokens(cfg.model_type),
                               images, wbytes),
             "overhead": overhead,
             "gradients": 4 * (bucket if cfg.fused_optimizer else lora_n),
             "activations": acts,
             "GPU-only activations": int((factor - 1) * acts),
             "vae encode": 0 if cfg.cache_latents else encode}
    resident = sum(parts[k] for k in ("weights", "optimizer", "ema", "caches", "overhead"))
    grads, acts = parts["gradients"], parts["activations"] + parts["GPU-only activations"]
    phases = {"forward": acts, "backward": grads + min(acts, grads) // 2,
              "VAE encode": parts["vae encode"], "optimizer step": grads}
    phase = max(phases, key=phases.get)
    peak = resident + phases[phase]
    # before training (no transformer, no LoRA): the prompts, then the latents, are encoded
    before = {"prompt caching": 2 * parts_of["text encoders"],  # bf16 (flow.frozen_dtype)
              "latent caching": 4 * parts_of["vae"] + encode}
    for name, held in before.items() if caching else ():
        if held + parts["caches"] + parts["overhead"] > peak:
            phase, peak = name, held + parts["caches"] + parts["overhead"]
    return peak, parts, phase


def _caches(cfg, configs: dict, tokens: int, images: tuple[int, int], wbytes: int) -> int:
    """The cached latents (mean and std, fp32) and prompt states (T5's, SD3.5's after CLIP's;
    the pooled vector), in the text encoders' dtype, at most one prompt per image."""
    side = cfg.resolution // 8
    n = images[0] + images[1]
    latents = n * (2 if cfg.hflip else 1) * 2 * 4 * configs["vae"]["latent_channels"] * side ** 2 \
        if cfg.cache_latents else 0
    unet = configs["unet"]
    return latents + n * wbytes * (tokens * unet["joint_attention_dim"]
                                   + unet["pooled_projection_dim"])
