"""Will it fit? Peak GPU memory of a training run, estimated from its config before anything is
loaded, and the settings to change when it won't fit.

    from dreambooth.training.memory import estimate, suggest
    print(estimate(config).gib)                      # about how many GiB the run will need
    advice = suggest(config, torch.cuda.mem_get_info()[0])
    if advice.changes: config = config.replace(**dict(advice.changes)); print(advice.message)

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

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fp8
from .memory_count import (
    lora_shapes,
    numel,
    optimizer_state_bytes,
    parameter_shapes,
    text_encoder_activation_bytes,
    unet_activation_bytes,
)
from .optim import BUCKET_BYTES

GIB = 2 ** 30
HALF = ("fp16", "bf16", "auto")  # "auto" is half on every GPU this estimates for
ACTIVATION_FACTOR = 1.6  # measured / counted activation bytes: calibrate on a GPU (see above)
CUDA_OVERHEAD = int(0.6 * GIB)  # cuBLAS/cuDNN workspaces, allocator rounding (calibrate)
MARGIN = 0.10  # suggest() wants this much of the free memory to spare
MIN_SAVING = 0.02  # suggest() passes over a change that saves less than this share
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


def _trainable(cfg, shapes: dict) -> tuple[list, list]:
    """(shapes of the trained parameters, names of the text encoders that run with gradients)."""
    tes = [k for k in shapes if k.startswith("text_encoder")]
    if getattr(cfg, "use_lora", False):
        which = (getattr(cfg, "lora_targets", "attention"), getattr(cfg, "lora_conv_rank", None))
        trained = list(lora_shapes(cfg.model_type, cfg.lora_rank, "unet", *which))
        if cfg.lora_text_encoder:
            trained += [s for te in tes for s in lora_shapes(cfg.model_type, cfg.lora_rank, te,
                                                             *which)]
    else:
        trained = list(shapes["unet"]) + [s for te in tes if cfg.train_text_encoder
                                          for s in shapes[te]]
    grad_tes = tes if getattr(cfg, "trains_text_encoder", cfg.train_text_encoder) else []
    return trained, grad_tes


def _caches(cfg, shapes: dict, images: tuple[int, int], half: bool) -> int:
    vae = cfg.resolution // 8
    latents = (images[0] + images[1]) * (2 if cfg.hflip else 1) * 2 * 4 * 4 * vae * vae \
        if cfg.cache_latents else 0
    te_width = sum(s[0] for te in shapes if te.startswith("text_encoder")
                   for s in shapes[te][-1:])  # the final layer norm's width
    embeddings = 0 if cfg.trains_text_encoder else \
        (images[0] + images[1]) * 77 * te_width * 4  # at most one prompt per image
    return latents + embeddings


def estimate(config, n_images: tuple[int, int] | None = None, gpu: bool = True) -> Estimate:
    """Peak GPU memory of training with `config` (bytes), and what it is made of.

    Where the weights are: a trained model in fp32 (bf16 with bf16_weights), a LoRA's frozen
    base and every frozen model in the mixed precision's dtype (a frozen UNet's Linear/Conv2d
    weights in fp8 with fp8_base), the LoRA layers in fp32. The
    VAE leaves the GPU once the latents are cached, a frozen text encoder once the prompts are.
    `gpu=False`: without the two GPU-only constants (CUDA_OVERHEAD, and the share of
    ACTIVATION_FACTOR above 1), i.e. what the step profile's fake tensors hold; tests keep the
    two within 10% of each other.
    """
    cfg, half = config, config.mixed_precision in HALF
    lora = bool(getattr(cfg, "use_lora", False))
    shapes, wbytes = parameter_shapes(cfg.model_type), 2 if half else 4
    trained, grad_tes = _trainable(cfg, shapes)
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
    acts = unet_activation_bytes(cfg.model_type, cfg.resolution, cfg.attention,
                                 cfg.gradient_checkpointing, half) + sum(
        text_encoder_activation_bytes(cfg.model_type, te, half) for te in grad_tes)
    fused = cfg.fused_optimizer
    grad_bytes = 4 if lora else tbytes
    # bucketed (optim.Bucketed): the widest bucket's weights, a larger weight alone
    bucket = min(numel(trained), max(max(numel([s]) for s in trained),
                                     BUCKET_BYTES // (4 if lora else tbytes)))
    upcast = half and tbytes == 4 and not lora  # autocast's half copies of fp32 weights
    encode = 4 * _vae_channels(shapes) * cfg.resolution ** 2 * wbytes
    parts = {
        "weights": weights,
        "optimizer": optimizer_state_bytes(cfg.optimizer, trained),
        "ema": 4 * unet_n if cfg.use_ema and not lora else 0,
        "caches": _caches(cfg, shapes, n_images or count_images(cfg), half),
        "overhead": CUDA_OVERHEAD if gpu else 0,
        # bf16 weights: the fp32 stand-ins and gradients of the widest bucket, kept
        "stand-ins": 8 * bucket if tbytes == 2 else 0,
        # fused: one bucket's gradients
        "gradients": bucket * grad_bytes if fused else grad_bytes * numel(trained),
        # autocast's cache of half copies of fp32 weights lives through the forward (none under
        # gradient checkpointing: the trainer turns the cache off there)
        "autocast copies": 2 * (unet_n + sum(numel(shapes[te]) for te in full_tes))
        if upcast and not cfg.gradient_checkpointing else 0,
        "activations": int(per_step * acts),
        "GPU-only activations": int((ACTIVATION_FACTOR - 1) * per_step * acts) if gpu else 0,
        "vae encode": 0 if cfg.cache_latents else encode,
    }
    resident = sum(parts[k] for k in ("weights", "optimizer", "stand-ins", "ema", "caches",
                                      "overhead"))
    grads = parts["gradients"]
    acts = parts["activations"] + parts["GPU-only activations"]
    # forward's end: every saved activation and the autocast cache; backward: the gradients
    # arrive while the activations are freed (their largest overlap: about half the smaller)
    phases = {"forward": parts["autocast copies"] + acts,
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


def _vae_channels(shapes: dict) -> int:
    """Channels of the VAE's first stage: the output width of its first convolution."""
    return shapes["vae"][0][0]


# -- what to change -----------------------------------------------------------------------------
# The order users are told to try (the seed behaviour): cheapest in quality and speed first.
# A step that the config would refuse (e.g. a fused optimizer with fp16) is passed over.
STEPS = ((("train_text_encoder", False),), "stop training the text encoder"), \
    ((("optimizer", "adamw_8bit"),), "use 8-bit AdamW"), \
    ((("mixed_precision", "{half}"),), "train in {half} mixed precision"), \
    ((("gradient_checkpointing", True),), "turn on gradient checkpointing"), \
    ((("cache_latents", True),), "cache the latents"), \
    ((("fused_optimizer", True),), "update the weights inside backward (fused_optimizer)"), \
    ((("bf16_weights", True), ("optimizer", "adafactor")), "keep the weights in bf16 and use "
                                                           "Adafactor"), \
    ((("batch_size", 1),), "train with batch size 1")


@dataclass(frozen=True)
class Suggestion:
    changes: tuple  # ((field, value), ...): apply with config.replace(**dict(changes))
    fits: bool  # with the changes, within the free memory (less MARGIN)
    before: Estimate
    after: Estimate
    message: str  # one sentence for the user


# What each change costs, as how much longer training takes for the same result, on a GPU:
# assumed from the usual figures until a GPU probe calibrates them. Gradient checkpointing runs
# the forward twice (+33%); batch 1 leaves the GPU idle between small kernels; Adafactor on bf16
# weights is a different optimizer, stochastically rounded, assumed to need about a third more
# steps than AdamW for the same result. The other changes cost nothing (half precision and
# cached latents save compute; 8-bit AdamW and the fused optimizer take the same steps).
# suggest() picks the plan whose product is lowest.
SLOWER = {"gradient_checkpointing": 1.33, "batch_size": 1.25, "bf16_weights": 1.35}


def suggest(config, free_bytes: int, half: str = "bf16",
            n_images: tuple[int, int] | None = None) -> Suggestion:
    """The settings to change for `config` to fit in `free_bytes` of GPU memory, at the least
    compute: of the plans that fit and need every one of their changes (leave one out and it
    won't fit), the one that slows training the least (SLOWER), then the one with the fewest
    changes, then the one earliest in STEPS. When nothing fits, every change that saves memory,
    in STEPS order. `half` is the mixed precision the GPU has (bf16 or fp16)."""
    budget = free_bytes * (1 - MARGIN)
    before = estimate(config, n_images)
    if before.total <= budget:
        return Suggestion((), True, before, before,
                          _sentence(before, before, free_bytes, [], True))
    options = []  # (changes, words, slowdown) of each step that would change something
    for step, text in STEPS:
        step = {k: (half if v == "{half}" else v) for k, v in step}
        if any(getattr(config, k) != v for k, v in step.items()):
            options.append((step, text.format(half=half), SLOWER.get(next(iter(step)), 1.0)))
    plans = {}  # mask of options -> (cost, estimate) of each plan that fits
    for mask in range(1, 2 ** len(options)):
        chosen = [o for i, o in enumerate(options) if mask >> i & 1]
        candidate = config.replace(**{k: v for step, _, _ in chosen for k, v in step.items()})
        if _refused(candidate, config):
            continue
        trial = estimate(candidate, n_images)
        if trial.total <= budget:
            time = 1.0
            for _, _, factor in chosen:
                time *= factor
            order = tuple(i for i in range(len(options)) if mask >> i & 1)
            plans[mask] = ((round(time, 6), len(chosen), order), trial)
    minimal = [m for m in plans  # every change needed: leave one out and it does not fit
               if not any(m & ~(1 << i) in plans for i in range(len(options)) if m >> i & 1)]
    if not minimal:
        return _greedy(config, free_bytes, half, n_images, before)
    best = min(minimal, key=lambda m: plans[m][0])
    chosen = [o for i, o in enumerate(options) if best >> i & 1]
    changes = {k: v for step, _, _ in chosen for k, v in step.items()}
    return Suggestion(tuple(changes.items()), True, before, plans[best][1],
                      _sentence(before, plans[best][1], free_bytes,
                                [text for _, text, _ in chosen], True))


def _greedy(config, free_bytes: int, half: str, n_images, before: Estimate) -> Suggestion:
    """Every change in STEPS order that saves memory (at least MIN_SAVING): where no plan fits,
    the least memory, and what it would still need."""
    budget = free_bytes * (1 - MARGIN)
    after = before
    current, changes, words = config, {}, []
    for step, text in STEPS:
        if after.total <= budget:
            break
        step = {k: (half if v == "{half}" else v) for k, v in step}
        if all(getattr(current, k) == v for k, v in step.items()):
            continue
        candidate = current.replace(**step)
        if _refused(candidate, current):
            continue
        trial = estimate(candidate, n_images)
        if trial.total > after.total * (1 - MIN_SAVING):  # not worth a change (e.g. 8-bit
            continue                                     # AdamW on a LoRA's few weights)
        current, after = candidate, trial
        changes.update(step)
        words = [(k, w) for k, w in words if not k <= step.keys()]  # overridden: unsaid
        words.append((set(step), text.format(half=half)))
    words = [w for _, w in words]
    fits = after.total <= budget
    return Suggestion(tuple(changes.items()), fits, before, after,
                      _sentence(before, after, free_bytes, words, fits))


def _refused(candidate, current) -> bool:
    """The change makes the config invalid (where the current one was not)."""
    known = {(p.field, p.why) for p in current.validate(check_paths=False)}
    return any((p.field, p.why) not in known for p in candidate.validate(check_paths=False))


def lowest(config, half: str = "bf16") -> dict:
    """The 'lowest' preset's changes to `config`: everything that saves memory, in the order of
    STEPS, as far as the config allows (no bf16 weights on a GPU without bf16), and a frozen
    UNet (LoRA, textual inversion) stored in fp8 (fp8_base)."""
    current = config.replace(train_text_encoder=False, cache_latents=True, use_ema=False,
                             gradient_checkpointing=True, mixed_precision=half)
    if not config.use_lora:  # Adafactor's factored state is the smallest
        current = current.replace(optimizer="adafactor")
        for name in ("fused_optimizer", "bf16_weights"):
            candidate = current.replace(**{name: True})
            if not _refused(candidate, current):
                current = candidate
    if config.method != "dreambooth":  # the UNet is frozen: stored in fp8
        current = current.replace(fp8_base=True)
    return {f: getattr(current, f) for f in _FIELDS if getattr(current, f) != getattr(config, f)}


_FIELDS = ("train_text_encoder", "cache_latents", "use_ema", "gradient_checkpointing",
           "mixed_precision", "optimizer", "fused_optimizer", "bf16_weights", "fp8_base")


def plan(config, free_bytes: int | None, half: str = "bf16",
         n_images: tuple[int, int] | None = None) -> tuple:
    """(config to train with, what to tell the user) for the config's memory_preset, given the
    free GPU memory (None: no GPU, nothing to fit)."""
    preset, said = config.memory_preset, []
    if preset == "lowest":
        changes = lowest(config, half)
        if changes:
            config = config.replace(**changes)
            said.append("Memory preset 'lowest': " + ", ".join(
                f"{k} = {v}" for k, v in changes.items()) + ".")
    if free_bytes is None:
        return config, said
    advice = suggest(config, free_bytes, half, n_images)
    if preset == "auto" and advice.changes:
        config = config.replace(**dict(advice.changes))
        said.append(advice.message + " The 'auto' memory preset has made "
                    + ("this change." if len(advice.changes) == 1 else "these changes."))
    else:
        said.append(advice.message + (" (Set memory_preset to 'auto' to make these changes "
                                      "for you.)" if advice.changes else ""))
    return config, said


def _sentence(before: Estimate, after: Estimate, free: int, words: list, fits: bool) -> str:
    need, have = f"about {before.gib:.1f} GiB", f"{free / GIB:.1f} GiB"
    if not words and fits:
        return f"This run needs {need} of GPU memory; {have} are free."
    start = f"This run needs {need} of GPU memory, but only {have} are free."
    todo = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    if fits:
        return f"{start} It fits (about {after.gib:.1f} GiB) if you {todo}."
    if words:
        return (f"{start} Even if you {todo}, it needs about {after.gib:.1f} GiB: lower the "
                "resolution, train a LoRA instead, or use a GPU with more memory.")
    return f"{start} Lower the resolution, train a LoRA instead, or use a GPU with more memory."


# -- after running out of memory ------------------------------------------------------------
def oom_advice(cfg, total: int | None) -> str:
    """What to change after running out of GPU memory: the memory advice for the whole GPU."""
    kept = " Nothing was lost: the checkpoints and saved states written so far are intact."
    generic = ("Lower the batch size or resolution, turn on gradient checkpointing and latent "
               "caching, use 8-bit AdamW, stop training the text encoder, or set memory_preset "
               "to 'lowest'.")
    if total is None:
        return generic + kept
    try:
        from .backends import half_precision
        advice = suggest(cfg, total, half_precision(torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")))
    except Exception:  # the advice is a courtesy; the failure must still be reported
        return generic + kept
    if not advice.changes:
        return generic + kept
    return (f"With {total / 2**30:.1f} GiB on this GPU: " + advice.message.split(". ", 1)[1]
            + " Or set memory_preset to 'lowest' for the least memory." + kept)


def plan_run(cfg, resumed_config: dict | None, free_bytes: int | None, half: str, say):
    """The config to train with under its memory_preset, saying every change (and, on a GPU,
    whether the run fits in its free memory). A resumed 'auto' run goes on with the settings
    its preset chose when it began (`resumed_config`), whatever is free now; a resumed 'lowest'
    run keeps the settings the preset chose then, where this version's preset would choose
    others (fp8_base, new for a LoRA: a snapshot made without it resumes without it)."""
    if resumed_config is not None and cfg.memory_preset == "auto":
        kept = {k: resumed_config[k] for step, _ in STEPS for k, _ in step
                if k in resumed_config and resumed_config[k] != getattr(cfg, k)}
        if kept:
            say("Resuming with the settings the 'auto' memory preset chose for this run: "
                + ", ".join(f"{k} = {v}" for k, v in kept.items()) + ".")
        return cfg.replace(**kept)
    planned, said = plan(cfg, free_bytes, half)
    for text in said:
        say(text)
    if resumed_config is not None and cfg.memory_preset == "lowest":
        from .state import BEFORE_FIELD
        saved = {**BEFORE_FIELD, **resumed_config}
        kept = {k: saved[k] for k in _FIELDS if k in saved and saved[k] != getattr(planned, k)}
        if kept:
            say("Resuming with the settings the 'lowest' memory preset chose when this run "
                "began: " + ", ".join(f"{k} = {v}" for k, v in kept.items()) + ".")
            planned = planned.replace(**kept)
    return planned
