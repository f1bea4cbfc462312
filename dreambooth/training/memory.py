"""Will it fit? Peak GPU memory of a training run, estimated from its config before anything is
loaded (what to change when it won't: advice.py).

    from dreambooth.training.memory import estimate
    print(estimate(config).gib)                      # about how many GiB the run will need

How it counts: parameter counts and shapes come from the model type's shipped configs,
instantiated on the meta device (no memory, no weights); optimizer state from those shapes per
optimizer; activations by running the UNet (and a trained text encoder) forward on the meta
device and adding up the tensors autograd saves for backward, per image at the resolution,
with or without gradient checkpointing and for the chosen attention. The peak is what stays
resident (weights, optimizer state, EMA, caches) plus the largest phase of a step: the end of
the forward (activations and autocast's half-precision weight copies), the backward (gradients
arriving as activations are freed), the VAE encode (without cached latents) and the optimizer
step.

Calibration: the meta count is exact for what autograd saves in the model's own dtype, and
`estimate(..., gpu=False)` agrees within 10% with the step profile's count of a whole step on
fake tensors (bench/profile.py; tests/test_profile.py holds it for every profiled configuration).
A real GPU step holds more (CUDA autocast keeps group norm and softmax outputs in fp32, kernel
workspaces, allocator rounding), which the share of ACTIVATION_FACTOR above 1 stands for. Its value,
and CUDA_OVERHEAD, come from the H100 numbers in the issue (the batch 1 -> 8 slope of a bf16
step: 1.59 GB per image measured, 0.98 GB counted here) and must be re-measured with
`python -m bench` on a GPU: the goal is within 15% of the measured peak in every benchmark
configuration. Standard library and torch only at
import time; diffusers and transformers are imported (lazily) only to build meta models.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fp8, parked, selective
from .memory_count import (
    linear_conv_shapes,
    lora_shapes,
    network_settings,
    network_shapes,
    numel,
    optimizer_state_bytes,
    parameter_shapes,
    sizes_of,
    text_encoder_activation_bytes,
    unet_activation_bytes,
)
from ..config.network import targets_of
from ..config.sd35 import FLOW_TYPES
from .networks import OURS
from .optim import BUCKET_BYTES, split_buckets

GIB = 2 ** 30
HALF = ("fp16", "bf16", "auto")  # "auto" is half on every GPU this estimates for
ACTIVATION_FACTOR = 1.6  # measured / counted activation bytes: calibrate on a GPU (see above)
CUDA_OVERHEAD = int(0.6 * GIB)  # cuBLAS/cuDNN workspaces, allocator rounding (calibrate)
DEFAULT_IMAGES = 20  # instance images assumed where the folders can't be counted
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# -- the estimate -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    total: int  # bytes at the peak
    parts: dict = field(default_factory=dict)  # what makes it up, bytes
    phase: str = ""  # the phase of a step where the peak is

    @property
    def gib(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.parts.items() if v)
        return f"about {self.gib:.1f} GiB at the {self.phase} ({parts})"


def count_images(config) -> tuple[int, int]:
    """(instance images, class images) of the config's concepts; folders that can't be read
    count as DEFAULT_IMAGES."""
    instance = classes = 0
    for concept in config.concepts:
        folder = Path(concept.instance_data_dir)
        n = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if folder.is_dir() else DEFAULT_IMAGES
        instance += n
        if concept.uses_prior:
            classes += n * concept.class_images_per_instance
    return instance or DEFAULT_IMAGES, classes


def _trainable(cfg, shapes: dict, sizes: str) -> tuple[list, list]:
    """(shapes of the trained parameters, names of the text encoders that run with gradients)."""
    tes = [k for k in shapes if k.startswith("text_encoder")]
    if getattr(cfg, "use_lora", False) and getattr(cfg, "network", "lora") in OURS:
        parts = ["unet"] + (tes if cfg.lora_text_encoder else [])
        trained = [s for c in parts for s in network_shapes(cfg.model_type, c,
                                                             network_settings(cfg), sizes)[0]]
    elif getattr(cfg, "use_lora", False):
        which = (targets_of(cfg), getattr(cfg, "lora_conv_rank", None))
        trained = list(lora_shapes(cfg.model_type, cfg.lora_rank, "unet", *which, sizes))
        if cfg.lora_text_encoder:
            trained += [s for te in tes for s in lora_shapes(cfg.model_type, cfg.lora_rank, te,
                                                             *which, sizes)]
    else:
        trained = list(shapes["unet"]) + [s for te in tes if cfg.train_text_encoder
                                          for s in shapes[te]]
    grad_tes = tes if getattr(cfg, "trains_text_encoder", cfg.train_text_encoder) else []
    return trained, grad_tes


def _network_updates(cfg, tes: list, wbytes: int, sizes: str) -> int:
    """Our layers build each adapted weight's update (or new weight) in forward, and backward
    needs it: its compute-dtype copy, one per adapted weight (DoRA, dora_wd: also V = W +
    update in fp32; (IA)3's W * (1 + w), GLoRA's W @ a2 and OFT's rotation of W: also W's
    compute-dtype copy); under
    gradient checkpointing, one block's at a time (left out)."""
    if not getattr(cfg, "use_lora", False) or getattr(cfg, "network", "lora") not in OURS \
            or selective.full(cfg):  # (selective: counted as if none)
        return 0
    parts = ["unet"] + (tes if cfg.lora_text_encoder else [])
    adapted = sum(network_shapes(cfg.model_type, c, network_settings(cfg), sizes)[1]
                  for c in parts)
    dora = cfg.network == "dora" or getattr(cfg, "dora_wd", False)
    base_copy = cfg.network in ("ia3", "glora", "oft")
    return adapted * (wbytes + (4 if dora else 0) + (wbytes if base_copy else 0))


def _caches(cfg, shapes: dict, images: tuple[int, int], half: bool) -> int:
    vae = cfg.resolution // 8
    latents = (images[0] + images[1]) * (2 if cfg.hflip else 1) * 2 * 4 * 4 * vae * vae \
        if cfg.cache_latents else 0
    te_width = sum(s[0] for te in shapes if te.startswith("text_encoder")
                   for s in shapes[te][-1:])  # the final layer norm's width
    embeddings = 0 if cfg.trains_text_encoder else \
        (images[0] + images[1]) * 77 * te_width * 4  # at most one prompt per image
    return latents + embeddings


def estimate(config, n_images: tuple[int, int] | None = None, gpu: bool = True,
             half: str = "bf16", configs: dict | None = None) -> Estimate:
    """Peak GPU memory of training with `config` (bytes), and what it is made of.

    Where the weights are: a trained model in fp32 (bf16 with bf16_weights), a LoRA's frozen
    base and every frozen model in the mixed precision's dtype (a frozen UNet's Linear/Conv2d
    weights in fp8 with fp8_base), the LoRA layers in fp32. The
    VAE leaves the GPU once the latents are cached, a frozen text encoder once the prompts are.
    `gpu=False`: without the two GPU-only constants (CUDA_OVERHEAD, and the share of
    ACTIVATION_FACTOR above 1), i.e. what the step profile's fake tensors hold; tests keep the
    two within 10% of each other (`configs`: of an SD model type at another size than its
    shipped one). `half`: what mixed precision 'auto' is on the GPU. Where the
    gradients are kept in bf16 (parked.py), a Linear/Conv2d weight's takes 2 bytes, and the
    bf16 copies of the largest weights are not held through the forward.
    """
    if config.model_type in FLOW_TYPES:  # Flux, SD3.5: memory_flux.py
        from .memory_flux import flow_peak
        return Estimate(*flow_peak(config, n_images or count_images(config), *(
            (ACTIVATION_FACTOR, CUDA_OVERHEAD) if gpu else (1.0, 0))))
    cfg, half = config, config.mixed_precision in HALF
    lora = bool(getattr(cfg, "use_lora", False))
    sizes = sizes_of(configs)
    shapes, wbytes = parameter_shapes(cfg.model_type, sizes), 2 if half else 4
    trained, grad_tes = _trainable(cfg, shapes, sizes)
    tbytes = 2 if cfg.bf16_weights and half and not lora else 4
    tes = [te for te in shapes if te.startswith("text_encoder")]
    full_tes = [] if lora else [te for te in grad_tes]
    unet_n = numel(shapes["unet"])
    lora_n = numel(trained) if lora else 0
    unet_bytes = _unet_bytes(cfg, shapes["unet"], wbytes if lora else tbytes, wbytes)
    frozen = {"vae": 4 * numel(shapes["vae"]),  # kept in fp32
              "text encoders": sum(4 * numel(shapes[te]) for te in tes if te not in grad_tes)}
    weights = unet_bytes + 4 * lora_n + sum(
        (tbytes if te in full_tes else wbytes) * numel(shapes[te]) for te in grad_tes) + \
        (0 if cfg.cache_latents else frozen["vae"]) + \
        (frozen["text encoders"] if cfg.trains_text_encoder else 0)
    per_step = cfg.batch_size * (2 if any(c.uses_prior for c in cfg.concepts) else 1)
    acts = selective.activation_bytes(cfg, half, sizes) if selective.selective(cfg) else \
        unet_activation_bytes(cfg.model_type, cfg.resolution, cfg.attention,
                              cfg.gradient_checkpointing, half, sizes)
    acts += sum(
        text_encoder_activation_bytes(cfg.model_type, te, half, sizes) for te in grad_tes)
    fused = cfg.fused_optimizer
    grad_bytes = 4 if lora else tbytes
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    park = parked.applies(cfg, half if cfg.mixed_precision == "auto" else cfg.mixed_precision,
                          processes)
    cast = linear_conv_shapes(cfg.model_type, sizes)
    matrices = list(cast["unet"]) + [s for te in full_tes for s in cast[te]]  # (not embeddings)
    recast = numel([s for s in matrices if numel([s]) >= parked.RECAST_ELEMENTS]) \
        if park and not selective.full(cfg) else 0
    # bucketed (optim.Bucketed): the widest bucket's weights, a larger weight alone
    bucket = min(numel(trained), max(max(numel([s]) for s in trained),
                                     BUCKET_BYTES // (4 if lora else tbytes)))
    upcast = half and tbytes == 4 and not lora  # autocast's half copies of fp32 weights
    encode = 4 * _vae_channels(shapes) * cfg.resolution ** 2 * wbytes
    parts = {
        "weights": weights,
        "optimizer": optimizer_state_bytes(cfg.optimizer, trained),
        # EMA: an fp32 copy of the UNet; over a LoRA, of every UNet weight as it is stored
        # (diffusers' EMAModel copies all the parameters it is given: the trainer's UNet's)
        "ema": (unet_bytes + 4 * lora_n if lora else 4 * unet_n) if cfg.use_ema else 0,
        "caches": _caches(cfg, shapes, n_images or count_images(cfg), half),
        "overhead": CUDA_OVERHEAD if gpu else 0,
        # bf16 weights: the fp32 stand-ins and gradients of the widest bucket, kept
        "stand-ins": 8 * bucket if tbytes == 2 else 0,
        # fused: one bucket's gradients; parked: 2 bytes a Linear/Conv2d weight's, and the
        # fp32 scratch the update steps a chunk from
        "gradients": bucket * grad_bytes if fused else grad_bytes * numel(trained) - (
            2 * numel(matrices) - 4 * _chunk(tuple(matrices)) if park else 0),
        # autocast's cache of half copies of fp32 weights lives through the forward (none under
        # gradient checkpointing: the trainer turns the cache off there; parked: but those of
        # the largest weights, cast again in backward)
        # (selective: but those of the weights in the blocks it recomputes)
        "autocast copies": 2 * (unet_n + sum(numel(shapes[te]) for te in full_tes) - recast
                                - selective.recomputed_weights(
                                    cfg, parked.RECAST_ELEMENTS if park else None, sizes))
        if upcast and not selective.full(cfg) else 0,
        "activations": int(per_step * acts),
        "GPU-only activations": int((ACTIVATION_FACTOR - 1) * per_step * acts) if gpu else 0,
        "vae encode": 0 if cfg.cache_latents else encode,
        "network updates": _network_updates(cfg, tes, wbytes, sizes),
    }
    resident = sum(parts[k] for k in ("weights", "optimizer", "stand-ins", "ema", "caches",
                                      "overhead"))
    grads = parts["gradients"]
    acts = parts["activations"] + parts["GPU-only activations"]
    # forward's end: every saved activation and the autocast cache; backward: the gradients
    # arrive while the activations are freed (their largest overlap: about half the smaller)
    phases = {"forward": parts["autocast copies"] + parts["network updates"] + acts,
              "backward": grads + min(acts, grads) // 2,
              "VAE encode": parts["vae encode"], "optimizer step": grads}
    if cfg.cache_latents:  # before training (no optimizer state, no UNet), the VAE encodes
        phases["latent caching"] = encode + frozen["vae"] - parts["optimizer"] - unet_bytes
    phase = max(phases, key=phases.get)
    return Estimate(resident + phases[phase], parts, phase)


def _unet_bytes(cfg, shapes: tuple, per_value: int, half_bytes: int) -> int:
    """The UNet's weights on the device: `per_value` bytes a value; with fp8_base (a frozen
    UNet), one byte a value of each Linear/Conv2d weight (the tensors of 2 or more dimensions)
    and 4 for its scale, and the rest (biases, norms) in the compute dtype."""
    if not fp8.applies(cfg):
        return per_value * numel(shapes)
    matrices = [s for s in shapes if len(s) >= 2]
    return numel(matrices) + 4 * len(matrices) + half_bytes * (numel(shapes) - numel(matrices))


@functools.lru_cache(maxsize=None)  # (the plan's search asks for the same ones)
def _chunk(shapes: tuple) -> int:
    """Values in the widest chunk parked.GradPark steps (its fp32 scratch buffer): the
    weights cut as it cuts them (optim.split_buckets), on the meta device."""
    weights = [torch.empty(s, device="meta") for s in shapes]
    return max((numel([w.shape for w in c]) for c in split_buckets(weights, parked.CHUNK_BYTES)),
               default=0)


def _vae_channels(shapes: dict) -> int:
    """Channels of the VAE's first stage: the output width of its first convolution."""
    return shapes["vae"][0][0]
