"""Stable Diffusion 3.5 (medium, large) settings: the parts an SD3.5 run reads beside the MMDiT
file (the source checkpoint) where that file does not hold them, and what this version trains
of SD3.5. Standard library only.

An SD3.5 run is a LoRA on the MMDiT with the three text encoders and the VAE frozen, as for
Flux (config/flux.py): what it does not cover yet is refused before anything loads, in Flux's
words with SD3.5's name. Each part comes from the checkpoint where it holds it (the all-in-one
files: text_encoders.clip_l / clip_g / t5xxl, first_stage_model), else from its sd35_* file.
"""
from __future__ import annotations

from .errors import Problem
from .fieldspec import spec_field
from .flux import NOT_YET as FLUX_NOT_YET
from .flux import FLUX_TYPES, is_file, network_problems, suffix_problems, tokenizer_problems

SD35_TYPES = ("sd3.5-medium", "sd3.5-large")
FLOW_TYPES = FLUX_TYPES + SD35_TYPES  # the flow transformers (memory_flux, the demo, presets)
# what Flux does not do yet (fp8_base: done for both, training/fp8.py), and the merge Flux has
# (training/flux_merge.py: SD3.5's file for Forge would be the all-in-one with its encoders)
NOT_YET = FLUX_NOT_YET + (("lora_merge", False, "merging into an SD3.5 checkpoint is not done "
                           "yet", "turn lora_merge off"),)

_EMPTY = " Empty: the one inside the checkpoint (all-in-one files)."
SD35_CLIP_L = spec_field("", "SD3.5: the CLIP-L text encoder file (e.g. Forge's "
                             "models/text_encoder/clip_l.safetensors)." + _EMPTY)
SD35_CLIP_G = spec_field("", "SD3.5: the CLIP-G text encoder file (e.g. Forge's "
                             "models/text_encoder/clip_g.safetensors)." + _EMPTY)
SD35_T5XXL = spec_field("", "SD3.5: the T5-XXL text encoder file (e.g. Forge's "
                            "models/text_encoder/t5xxl_fp16.safetensors)." + _EMPTY)
SD35_VAE = spec_field("", "SD3.5: the VAE file (its 16-channel autoencoder, LDM layout, e.g. "
                          "from Forge's models/VAE)." + _EMPTY)
SD35_FILES = ("sd35_clip_l", "sd35_clip_g", "sd35_t5xxl", "sd35_vae")


def check_sd35(cfg, check_paths: bool) -> list[Problem]:
    """What an SD3.5 config asks for that is not done yet, or names that is not there
    (nothing for other types)."""
    if cfg.model_type not in SD35_TYPES:
        return []
    problems = [Problem(name, getattr(cfg, name), why.replace("Flux", "SD3.5"), fix)
                for name, want, why, fix in NOT_YET if getattr(cfg, name, want) != want]
    problems += network_problems(cfg, "SD3.5", "attn.qkv")
    if cfg.lora_targets == "transformer+conv":
        problems.append(Problem("lora_targets", cfg.lora_targets, "SD3.5's MMDiT has no "
                                "convolutions to adapt", "use 'attention' or 'transformer'"))
    if not check_paths:
        return problems
    for name in SD35_FILES:
        value = getattr(cfg, name)
        if not isinstance(value, str) or (value.strip() and not is_file(value)):
            problems.append(Problem(name, value, "is not an existing file", "give the path of "
                                    "the file, or leave it empty when the checkpoint holds it"))
        elif value.strip():
            problems += suffix_problems(name, value)
    return problems + tokenizer_problems(cfg.t5_tokenizer_dir)
