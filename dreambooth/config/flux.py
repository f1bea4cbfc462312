"""Flux.1 (dev, schnell) settings: the separate files a Flux run is given beside the transformer
(the source checkpoint), and what this version trains of Flux. Standard library only.

A Flux run is a LoRA (or DoRA, LoHa, Full: FLOW_NETWORKS) on the transformer, with the text
encoders and the autoencoder frozen;
what that does not cover yet is refused here, before anything loads, one sentence each.
"""
from __future__ import annotations

from pathlib import Path

from .errors import Problem
from .fieldspec import spec_field

FLUX_TYPES = ("flux-dev", "flux-schnell")

FLUX_CLIP_L = spec_field("", "Flux: the CLIP-L text encoder file (e.g. Forge's "
                             "models/text_encoder/clip_l.safetensors).")
FLUX_T5XXL = spec_field("", "Flux: the T5-XXL text encoder file (e.g. Forge's "
                            "models/text_encoder/t5xxl_fp16.safetensors).")
FLUX_AE = spec_field("", "Flux: the autoencoder file (e.g. Forge's models/VAE/ae.safetensors).")
T5_TOKENIZER_DIR = spec_field("", "Flux, SD3.5: a folder holding T5's tokenizer "
                                  "(tokenizer.json or spiece.model, e.g. the tokenizer_2 folder "
                                  "of FLUX.1-dev or SD3's tokenizer_3); nothing is downloaded.")
FLUX_FILES = ("flux_clip_l", "flux_t5xxl", "flux_ae")
SD_GUIDANCE = 7.5  # guidance_scale's default: SD's classifier-free guidance
# what a flow model's class images and previews are guided by while guidance_scale keeps SD's
# default: Forge's defaults (modules_forge/main_entry.py, lllyasviel/stable-diffusion-webui-forge
# dfdcbab6): its 'flux' preset's distilled CFG 3.5 (CFG 1: none); SD3.5, which has no preset of
# its own, the CFG 7 of Forge's default preset ('sd') and of 'all'; schnell takes no guidance
FORGE_GUIDANCE = {"flux-dev": 3.5, "sd3.5-medium": 7.0, "sd3.5-large": 7.0}
GUIDANCE_SCALE = spec_field(SD_GUIDANCE, "Classifier-free guidance of class and preview images "
                                         "(Flux dev: its distilled guidance, with no CFG, as in "
                                         "Forge; schnell: none). At 7.5, SD's default, Flux dev "
                                         "and SD3.5 take Forge's defaults: 3.5 and 7.",
                            advanced=True, minimum=0.0, maximum=50.0)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# (field, value it must have, why not yet): what this version does not train of Flux
NOT_YET = (
    ("method", "lora", "only a LoRA of the transformer is trained for Flux so far",
     "set method to 'lora'"),
    ("lora_text_encoder", False, "Flux's text encoders are not trained yet",
     "turn lora_text_encoder off"),
    ("train_text_encoder", False, "Flux's text encoders are not trained yet",
     "turn train_text_encoder off"),
    ("compile", "off", "compiling is not done for Flux yet", "set compile to 'off'"),
    ("train_norm", False, "train_norm is not done for Flux yet", "turn train_norm off"),
    ("min_snr_gamma", 0.0, "Min-SNR weighting is for noise-prediction models, not Flux's flow "
     "matching", "set min_snr_gamma to 0"),
)


# The networks trained for Flux and SD3.5: those whose per-layer tensors stack exactly into the
# one weight BFL's / SAI's files hold for q, k, v (and a Flux single block's MLP input), the
# weight Forge applies a file's module to (training/flux_lora.py). The others, why not, the fix:
FLOW_NETWORKS = ("lora", "dora", "loha", "full")
_ALTERNATIVES = "choose network 'lora', 'dora', 'loha' or 'full'"
FLOW_REFUSED = {
    "locon": ("is LoRA plus the ResNet convolutions, and {model}'s transformer has none",
              "choose network 'lora' (the same layers)"),
    "lokr": ("trains a Kronecker product per layer, and those of q, k and v are not one "
             "Kronecker product of the stacked weight Forge applies the file to ({stacks}); "
             "the fix is one LoKr over each stacked weight, not done yet",
             "choose network 'loha' (small files too) or 'lora' / 'dora'"),
    "glora": ("has a W @ a2 @ a1 term whose a2, a1 a stacked weight's rows ({stacks}) would "
              "share, so q's, k's and v's own can't be put in one file entry", _ALTERNATIVES),
    "ia3": ("is not applied by Forge: its loader (backend/patcher/lora.py) has no (IA)3 patch, "
            "so every key of the file would be left unmatched", _ALTERNATIVES),
    "oft": ("is not applied by Forge: its loader (backend/patcher/lora.py) has no OFT patch "
            "(a TODO there), so every key of the file would be left unmatched", _ALTERNATIVES),
}


def network_problems(cfg, model: str, stacks: str) -> list[Problem]:
    """`network` where it is one {model} can't have (FLOW_REFUSED's sentence)."""
    network = getattr(cfg, "network", "lora")
    if network not in FLOW_REFUSED:
        return []
    why, fix = FLOW_REFUSED[network]
    return [Problem("network", network, f"'{network}' " + why.format(model=model,
                                                                       stacks=stacks), fix)]


def sample_guidance(model_type: str, value: float) -> float:
    """The guidance a model's class images and previews are drawn with, for `value` of
    guidance_scale (0: none, as for schnell, whose transformer takes none)."""
    if model_type == "flux-schnell":
        return 0.0
    return FORGE_GUIDANCE.get(model_type, value) if value == SD_GUIDANCE else value


def check_flux(cfg, check_paths: bool) -> list[Problem]:
    """What a Flux config lacks or asks for that is not done yet (nothing for other types)."""
    if cfg.model_type not in FLUX_TYPES:
        return []
    problems = [Problem(name, getattr(cfg, name), why, fix) for name, want, why, fix in NOT_YET
                if getattr(cfg, name, want) != want]
    problems += network_problems(cfg, "Flux", "img_attn.qkv, txt_attn.qkv, linear1")
    if cfg.lora_merge and getattr(cfg, "network", "lora") not in ("lora", *FLOW_REFUSED):
        problems.append(Problem("lora_merge", True, f"merging a Flux '{cfg.network}' into the "
                                "transformer is not done yet (a plain LoRA merges)",
                                "turn lora_merge off, or train network 'lora'"))
    if cfg.lora_targets == "transformer+conv":
        problems.append(Problem("lora_targets", cfg.lora_targets, "Flux's transformer has no "
                                "convolutions", "use 'attention' or 'transformer'"))
    if check_paths:
        problems += _missing_files(cfg)
    return problems


def _missing_files(cfg) -> list[Problem]:
    problems = []
    for name in FLUX_FILES:
        value = getattr(cfg, name)
        if not isinstance(value, str) or not is_file(value):
            problems.append(Problem(name, value, "is not an existing file; a Flux run needs the "
                                    "text encoders and the autoencoder as separate files",
                                    f"give the path of the {_WHAT[name]}"))
        else:
            problems += suffix_problems(name, value)
    return problems + tokenizer_problems(cfg.t5_tokenizer_dir)


# what a part file is read from: safetensors, or a pickle loaded safely (not GGUF, which Forge
# lists too)
PART_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def suffix_problems(name: str, value: str) -> list[Problem]:
    """A part file whose kind this version can't read, named before anything loads."""
    if Path(value).suffix.lower() in PART_SUFFIXES:
        return []
    return [Problem(name, value, f"is a {Path(value).suffix or 'suffix-less'} file, which is "
                    "not read here (only .safetensors, or .ckpt / .pt / .bin loaded safely)",
                    "choose the .safetensors version of this part")]


def tokenizer_problems(folder) -> list[Problem]:
    """The T5 tokenizer folder's problem, if it holds none (Flux and SD3.5 read the same)."""
    if isinstance(folder, str) and folder.strip() and any(
            is_file(str(Path(folder) / f)) for f in TOKENIZER_FILES):
        return []
    return [Problem("t5_tokenizer_dir", folder, "holds no T5 tokenizer (tokenizer.json or "
                    "spiece.model), and none is downloaded", "give a folder with T5's "
                    "tokenizer, e.g. the tokenizer_2 folder of FLUX.1-dev or of "
                    "google/t5-v1_1-xxl")]


_WHAT = {"flux_clip_l": "CLIP-L text encoder (clip_l.safetensors)",
         "flux_t5xxl": "T5-XXL text encoder (t5xxl_fp16.safetensors)",
         "flux_ae": "Flux autoencoder (ae.safetensors)"}


def is_file(path: str) -> bool:
    try:
        return bool(path) and Path(path).is_file()
    except (OSError, ValueError):
        return False
