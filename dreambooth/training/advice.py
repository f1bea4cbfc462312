"""What to change when a run won't fit, and the memory presets: `suggest` (the changes that
make a config fit in the free GPU memory at the least cost in training time), `lowest` (the
'lowest' preset's changes), `plan_run` (the config a run trains with under its preset) and
`oom_advice` (what to say after running out of memory). The estimate they plan with is
memory.estimate.

    from dreambooth.training.advice import suggest
    advice = suggest(config, torch.cuda.mem_get_info()[0])
    if advice.changes: config = config.replace(**dict(advice.changes)); print(advice.message)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.sd35 import FLOW_TYPES
from .memory import GIB, Estimate, estimate

MARGIN = 0.10  # suggest() wants this much of the free memory to spare
MIN_SAVING = 0.02  # suggest() passes over a change that saves less than this share


# -- what to change -----------------------------------------------------------------------------
# The order users are told to try (the seed behaviour): cheapest in quality and speed first.
# A step that the config would refuse (e.g. a fused optimizer with fp16) is passed over.
STEPS = ((("train_text_encoder", False),), "stop training the text encoder"), \
    ((("optimizer", "adamw_8bit"),), "use 8-bit AdamW"), \
    ((("mixed_precision", "{half}"),), "train in {half} mixed precision"), \
    ((("checkpoint_blocks", "selective"), ("gradient_checkpointing", True)),
     "turn on gradient checkpointing for the blocks that hold the most memory "
     "(checkpoint_blocks 'selective')"), \
    ((("checkpoint_blocks", "all"), ("gradient_checkpointing", True)),
     "turn on gradient checkpointing"), \
    ((("cache_latents", True),), "cache the latents"), \
    ((("fused_optimizer", True),), "update the weights inside backward (fused_optimizer)"), \
    ((("bf16_weights", True), ("optimizer", "adafactor")), "keep the weights in bf16 and use "
                                                           "Adafactor"), \
    ((("batch_size", 1),), "train with batch size 1"), \
    ((("fp8_base", True),), "store the frozen UNet in fp8 (fp8_base)")


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
# fp8_base (a LoRA's or textual inversion's frozen UNet) is not slower but less exact (its
# weights within about 3%, where bf16 is within 0.4%): priced to come after the exact changes.
SLOWER = {"gradient_checkpointing": 1.33, "batch_size": 1.25, "bf16_weights": 1.35,
          "fp8_base": 1.4}


def suggest(config, free_bytes: int, half: str = "bf16",
            n_images: tuple[int, int] | None = None) -> Suggestion:
    """The settings to change for `config` to fit in `free_bytes` of GPU memory, at the least
    compute: of the plans that fit and need every one of their changes (leave one out and it
    won't fit), the one that slows training the least (SLOWER), then the one with the fewest
    changes, then the one earliest in STEPS. When nothing fits, every change that saves memory,
    in STEPS order. `half` is the mixed precision the GPU has (bf16 or fp16)."""
    budget = free_bytes * (1 - MARGIN)
    before = estimate(config, n_images, half=half)
    if before.total <= budget:
        return Suggestion((), True, before, before,
                          _sentence(before, before, free_bytes, [], True))
    options = [(step, text, _slower(config, step)) for step, text in _steps(half, config)
               if any(getattr(config, k) != v for k, v in step.items())
               and ("fp8_base" not in step or config.method != "dreambooth")]  # (refused)
    known = _problems(config)
    plans = {}  # mask of options -> (cost, estimate) of each plan that fits
    # fewest changes first; a plan holding a smaller one that fits is never the best (it takes
    # at least that one's time, with more changes): not estimated
    for mask in sorted(range(1, 2 ** len(options)), key=lambda m: bin(m).count("1")):
        if any(mask & fits == fits for fits in plans):
            continue
        chosen = [i for i in range(len(options)) if mask >> i & 1]
        candidate = config.replace(**{k: v for i in chosen for k, v in options[i][0].items()})
        if _refused(candidate, known):
            continue
        trial = estimate(candidate, n_images, half=half)
        if trial.total <= budget:
            time = 1.0
            for i in chosen:
                time *= options[i][2]
            plans[mask] = ((round(time, 6), len(chosen), tuple(chosen)), trial)
    minimal = [m for m in plans  # every change needed: leave one out and it does not fit
               if not any(m & ~(1 << i) in plans for i in range(len(options)) if m >> i & 1)]
    if not minimal:
        return _greedy(config, free_bytes, half, n_images, before)
    best = min(minimal, key=lambda m: plans[m][0])
    chosen = [o for i, o in enumerate(options) if best >> i & 1]
    changes = {k: v for step, _, _ in chosen for k, v in step.items()
               if getattr(config, k) != v}  # (checkpoint_blocks 'all' is the default)
    return Suggestion(tuple(changes.items()), True, before, plans[best][1],
                      _sentence(before, plans[best][1], free_bytes,
                                [text for _, text, _ in chosen], True))


def _slower(config, step: dict) -> float:
    """SLOWER of a step; selective checkpointing: full's extra time in the share of its
    recompute that the chosen blocks take (selective.py)."""
    if "gradient_checkpointing" not in step:
        return SLOWER.get(next(iter(step)), 1.0)
    full = SLOWER["gradient_checkpointing"]
    if step.get("checkpoint_blocks") != "selective" or \
            _refused(config.replace(**step), _problems(config)):  # (no UNet: never advised)
        return full
    from .selective import recompute_share
    return 1 + (full - 1) * recompute_share(config.model_type, config.resolution,
                                            config.attention)


def _greedy(config, free_bytes: int, half: str, n_images, before: Estimate) -> Suggestion:
    """Every change in STEPS order that saves memory (at least MIN_SAVING): where no plan fits,
    the least memory, and what it would still need."""
    budget = free_bytes * (1 - MARGIN)
    after = before
    current, changes, words = config, {}, []
    for step, text in _steps(half, config):
        if after.total <= budget:
            break
        if all(getattr(current, k) == v for k, v in step.items()):
            continue
        candidate = current.replace(**step)
        if _refused(candidate, _problems(current)):
            continue
        trial = estimate(candidate, n_images, half=half)
        if trial.total > after.total * (1 - MIN_SAVING):  # not worth a change (e.g. 8-bit
            continue                                     # AdamW on a LoRA's few weights)
        current, after = candidate, trial
        changes.update((k, v) for k, v in step.items() if getattr(config, k) != v)
        words = [(k, w) for k, w in words if not k <= step.keys()]  # overridden: unsaid
        words.append((set(step), text))
    words = [w for _, w in words]
    fits = after.total <= budget
    return Suggestion(tuple(changes.items()), fits, before, after,
                      _sentence(before, after, free_bytes, words, fits))


def _steps(half: str, config=None) -> list:
    """STEPS as (changes, words) with the GPU's half precision filled in; never fp16 for a flow
    transformer (Flux's, SD3.5's activations overflow it)."""
    return [({k: (half if v == "{half}" else v) for k, v in step}, text.format(half=half))
            for step, text in STEPS if not (dict(step).get("mixed_precision") == "{half}"
                                            and not _half_suits(config, half))]


def _half_suits(config, half: str) -> bool:
    """Whether the presets may switch `config` to the GPU's half precision."""
    return half != "fp16" or config is None or config.model_type not in FLOW_TYPES


def _problems(config) -> set:
    """What the config refuses, (field, why) each."""
    return {(p.field, p.why) for p in config.validate(check_paths=False)}


def _refused(candidate, known: set) -> bool:
    """The change makes the config invalid: a problem beyond the `known` ones of the config
    it was made to."""
    return bool(_problems(candidate) - known)


def lowest(config, half: str = "bf16") -> dict:
    """The 'lowest' preset's changes to `config`: everything that saves memory, in the order of
    STEPS, as far as the config allows (no bf16 weights on a GPU without bf16), and a frozen
    UNet (LoRA, textual inversion) stored in fp8 (fp8_base)."""
    current = config.replace(train_text_encoder=False, cache_latents=True, use_ema=False,
                             gradient_checkpointing=True, checkpoint_blocks="all",
                             mixed_precision=half if _half_suits(config, half)
                             else config.mixed_precision)
    if not config.use_lora:  # Adafactor's factored state is the smallest
        current = current.replace(optimizer="adafactor")
        for name in ("fused_optimizer", "bf16_weights"):
            candidate = current.replace(**{name: True})
            if not _refused(candidate, _problems(current)):
                current = candidate
    if config.method != "dreambooth":  # the UNet is frozen: stored in fp8
        current = current.replace(fp8_base=True)
    return {f: getattr(current, f) for f in _FIELDS if getattr(current, f) != getattr(config, f)}


_FIELDS = ("train_text_encoder", "cache_latents", "use_ema", "gradient_checkpointing",
           "checkpoint_blocks", "mixed_precision", "optimizer", "fused_optimizer",
           "bf16_weights", "fp8_base")


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


def text_encoder_stop(cfg, step: int, total: int) -> str:
    """What text_encoder_steps_ratio stops at `step` of `total`, said by what it is (the text
    encoder, its LoRA layers, the new token's embedding); '' when nothing stops before the end
    (the ratio 1.0, or nothing of the text encoder learns)."""
    parts = (["the text encoder"] if cfg.train_text_encoder else []) + \
        (["the text encoder's LoRA layers"] if cfg.use_lora and cfg.lora_text_encoder else []) + \
        ([f"the embedding of '{cfg.embedding_token.strip()}'"] if cfg.trains_embedding else [])
    if not parts or step >= total:
        return ""
    what = " and ".join(parts)
    what = what[0].upper() + what[1:]
    ratio = f"text_encoder_steps_ratio {cfg.text_encoder_steps_ratio} of {total} steps"
    verb = "are" if len(parts) > 1 or what.endswith("layers") else "is"
    return f"{what} {verb} not trained ({ratio} is 0)." if step == 0 else \
        f"{what} stopped training at step {step} ({ratio})."
