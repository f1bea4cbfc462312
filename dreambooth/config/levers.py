"""The memory and speed levers of a run (attention, gradient checkpointing and which blocks it
recomputes, the memory preset,
the fused optimizer, bf16 weights, fp8 base, compile): their fields and choices. Standard
library only.
"""
from __future__ import annotations

from .fieldspec import spec_field

ATTENTION = ("default", "sdpa", "xformers")
MEMORY_PRESETS = ("auto", "lowest", "off")
COMPILE = ("off", "blocks", "full")
CHECKPOINT_BLOCKS = ("all", "selective")

ATTENTION_FIELD = spec_field(
    "sdpa", "Memory attention: default (plain), sdpa (PyTorch fused), xformers.",
    choices=ATTENTION)
GRADIENT_CHECKPOINTING = spec_field(
    False, "Recompute activations in backward: less memory, slower.")
CHECKPOINT_BLOCKS_FIELD = spec_field(
    "all", "Which UNet blocks gradient checkpointing recomputes: 'all' every transformer and "
           "ResNet block; 'selective' only those that free the most memory for the compute they "
           "cost at the resolution, as the memory estimate measures them (SD1.5 at 512 px: "
           "the transformer blocks of the two highest resolutions and the middle one, two "
           "thirds of the memory 'all' saves for 40% of its extra compute). The 'auto' memory "
           "preset chooses between no checkpointing, 'selective' and 'all'.",
    choices=CHECKPOINT_BLOCKS, advanced=True)
MEMORY_PRESET = spec_field(
    "auto", "'auto': on a GPU, estimate the memory the run needs before it starts and, when it "
            "won't fit, change the settings that make it fit at the least cost in training time "
            "(each change is said in the log); 'lowest': the least memory (frozen text encoder, "
            "cached latents, gradient checkpointing; a full fine-tune: fused optimizer, "
            "Adafactor on bf16 weights; a LoRA or textual inversion: fp8_base); 'off': the "
            "settings exactly as given.",
    choices=MEMORY_PRESETS)
FUSED_OPTIMIZER = spec_field(
    False, "Update the weights inside backward, a 64 MiB bucket at a time as soon as its "
           "gradients are ready, so no gradient buffer the size of the model is kept (SD1.5: "
           "3.4 GB less). Needs gradient_accumulation_steps 1; gradients are clipped per "
           "bucket.", advanced=True)
BF16_WEIGHTS = spec_field(
    False, "Keep the trained weights in bf16 instead of fp32 (half their memory), updated with "
           "stochastic rounding so that small updates are not lost. Needs mixed_precision bf16.",
    advanced=True)
FP8_BASE = spec_field(
    False, "LoRA or textual inversion: store the frozen UNet's (Flux, SD3.5: transformer's) Linear and "
           "Conv2d weights in fp8 (SD1.5: 0.8 GiB less than bf16; FLUX.1: 11.1 GiB instead of "
           "22.2), each upcast only while its layer runs. Costs "
           "precision of the frozen model (each weight within about 1/16); the LoRA file and "
           "the merged checkpoint are unaffected.", advanced=True)
COMPILE_FIELD = spec_field(
    "off", "torch.compile the UNet: 'blocks' compiles each transformer and ResNet block (a short "
           "start), 'full' the whole UNet as one graph (the longest start). Off by default until "
           "measured on GPUs.",
    choices=COMPILE, advanced=True)


def check_checkpoint_blocks(cfg) -> list:
    """checkpoint_blocks 'selective' needs gradient checkpointing on and a UNet (SD1.x, SD2.x,
    SDXL)."""
    from .errors import Problem
    from .flux import FLUX_TYPES
    from .sd35 import SD35_TYPES
    if cfg.checkpoint_blocks != "selective":
        return []
    if cfg.gradient_checkpointing is not True:
        return [Problem("checkpoint_blocks", "selective", "chooses which blocks gradient "
                        "checkpointing recomputes, but gradient_checkpointing is off",
                        "turn gradient_checkpointing on, or set checkpoint_blocks to 'all'")]
    if cfg.model_type in FLUX_TYPES + SD35_TYPES:
        return [Problem("checkpoint_blocks", "selective", "is done for the UNet of SD1.x, SD2.x "
                        "and SDXL, not yet for the transformers of Flux and SD3.5",
                        "set checkpoint_blocks to 'all'")]
    return []
