"""Model families as data, and the working model built from a single-file checkpoint.

A `ModelSpec` per type says what the architecture is; `Components` is the working model
(UNet, VAE, text encoder, tokenizer, scheduler config) the trainer uses. Component configs
come from the checkpoint's own metadata when we wrote it, else from the configs shipped in
dreambooth/assets: nothing is downloaded.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import assets, convert
from .checkpoint import read_checkpoint, write_safetensors, write_text
from .errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
COMPONENTS_KEY = "dreambooth.components"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    resolution: int
    prediction_type: str
    architecture: str  # modelspec.architecture id
    schedule_buffers: bool = True  # the LDM DDPM buffers (betas, alphas_cumprod, ...) in the file


SPECS = {
    "v1x": ModelSpec("v1x", "Stable Diffusion 1.x", 512, "epsilon", "stable-diffusion-v1"),
}


def spec_for(model_type: str) -> ModelSpec:
    if model_type not in SPECS:
        raise CheckpointError(f"Model type '{model_type}' is not supported by this version.",
                              "Supported: " + ", ".join(SPECS))
    return SPECS[model_type]


def detect_model_type(state: dict) -> str | None:
    """The family of an LDM state dict from its keys, or None when it is none we know."""
    if any(k.startswith("conditioner.embedders.") for k in state):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in state):
        return "v2x-512"
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return "v1x"
    return None


@dataclass
class Components:
    model_type: str
    configs: dict  # component name -> config dict
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    extra: dict = field(default_factory=dict)

    @property
    def spec(self) -> ModelSpec:
        return spec_for(self.model_type)

    def noise_scheduler(self):
        from diffusers import DDPMScheduler
        return DDPMScheduler.from_config(self.configs["scheduler"])


# -- building -----------------------------------------------------------------------------
def shipped_configs(model_type: str) -> dict:
    return {name: assets.load_config(model_type, name)
            for name in ("unet", "vae", "text_encoder", "scheduler")}


def _instantiate(configs: dict, empty: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    ctx = _empty_weights() if empty else _nullcontext()
    with ctx:
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        te = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    return unet, vae, te


def _empty_weights():
    from accelerate import init_empty_weights
    return init_empty_weights(include_buffers=False)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def build_random(model_type: str, configs: dict, seed: int = 0) -> Components:
    """A randomly initialised model of the given configs (tests, demo, benchmarks)."""
    torch.manual_seed(seed)
    unet, vae, te = _instantiate(configs, empty=False)
    return Components(model_type, configs, unet, vae, te, assets.load_tokenizer())


# -- text encoder keys: 'text_model.'-prefixed on disk, whatever transformers does -------------
def te_state(text_encoder) -> dict:
    sd = text_encoder.state_dict()
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def te_load(text_encoder, state: dict) -> None:
    wants_prefix = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if not wants_prefix:
        state = convert.unprefixed(state, "text_model.")
    _load_module(text_encoder, state, "text encoder")


def _load_module(module, state: dict, what: str) -> None:
    expected = set(module.state_dict())
    expected = {k for k in expected if not k.endswith("position_ids")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing:
        raise CheckpointError(
            f"The checkpoint lacks {len(missing)} weights of the {what} "
            f"(e.g. {sorted(missing)[0]}).",
            "It may be a UNet-only or pruned file, or another model type: choose a full "
            "checkpoint of the selected type.")
    bad = [k for k, p in module.state_dict().items() if k in state and state[k].shape != p.shape]
    if bad or unexpected:
        k = (bad or sorted(unexpected))[0]
        raise CheckpointError(
            f"The {what} in the checkpoint has a different shape than the model type expects "
            f"(at {k}).", "Choose the model type that matches the checkpoint.")
    module.load_state_dict(state, strict=False, assign=True)
    for p in module.parameters():
        if p.dtype != torch.float32:
            p.data = p.data.float()


# -- single file <-> components -------------------------------------------------------------
def load_single_file(path: str, model_type: str) -> Components:
    """A WebUI single-file checkpoint as a working model (fp32), offline."""
    state, metadata = read_checkpoint(path)
    found = detect_model_type(state)
    if found is None:
        raise CheckpointError(f"'{Path(path).name}' is not a Stable Diffusion checkpoint "
                              "(none of the UNet/VAE/text encoder keys were found).",
                              "Choose a full Stable Diffusion checkpoint.")
    family = {"v2x-768-v": "v2x-512"}.get(model_type, model_type)
    if found != family:
        raise CheckpointError(f"'{Path(path).name}' is a {found} checkpoint, but the model type "
                              f"is set to {model_type}.", f"Set the model type to {found}.")
    spec_for(model_type)
    configs = json.loads(metadata[COMPONENTS_KEY]) if COMPONENTS_KEY in metadata \
        else shipped_configs(model_type)
    unet, vae, te = _instantiate(configs, empty=True)
    _load_module(unet, convert.from_ldm(state, convert.unet_prefix_map(configs["unet"]),
                                        UNET_PREFIX), "UNet")
    _load_module(vae, convert.from_ldm(state, convert.vae_prefix_map(configs["vae"]), VAE_PREFIX,
                                       vae=True), "VAE")
    te_load(te, convert.unprefixed(state, CLIP_PREFIX))
    return Components(model_type, configs, unet, vae, te, assets.load_tokenizer())


def ldm_state(comp: Components, unet_state: dict | None = None) -> dict:
    """The single-file (LDM) state dict of a working model, in the layout the WebUI loads."""
    unet_state = unet_state if unet_state is not None else comp.unet.state_dict()
    state = convert.to_ldm(unet_state, convert.unet_prefix_map(comp.configs["unet"]), UNET_PREFIX)
    state.update(convert.to_ldm(comp.vae.state_dict(), convert.vae_prefix_map(comp.configs["vae"]),
                                VAE_PREFIX, vae=True))
    te = te_state(comp.text_encoder)
    positions = comp.configs["text_encoder"].get("max_position_embeddings", 77)
    te["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    state.update(convert.prefixed(te, CLIP_PREFIX))
    if comp.spec.schedule_buffers:
        state.update(schedule_buffers(comp.configs["scheduler"]))
    return state


def schedule_buffers(scheduler_config: dict) -> dict:
    """The DDPM schedule tensors the original LDM checkpoints carry (computed, not learned)."""
    n = scheduler_config.get("num_train_timesteps", 1000)
    b0, b1 = scheduler_config.get("beta_start", 0.00085), scheduler_config.get("beta_end", 0.012)
    betas = torch.linspace(math.sqrt(b0), math.sqrt(b1), n, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {k: v.to(torch.float32) for k, v in buffers.items()}


def save_single_file(comp: Components, path: str | Path, precision: str = "fp32",
                     metadata: dict | None = None, overwrite: bool = False,
                     unet_state: dict | None = None) -> Path:
    from .checkpoint import cast_for_save
    meta = {COMPONENTS_KEY: json.dumps(comp.configs), "dreambooth.model_type": comp.model_type}
    meta.update(metadata or {})
    state = cast_for_save(ldm_state(comp, unet_state), precision)
    return write_safetensors(path, state, meta, overwrite=overwrite)


# -- the diffusers working folder (readable by old and new diffusers/transformers) ----------------
def save_working_dir(comp: Components, folder: str | Path) -> Path:
    """A diffusers-layout folder; text encoder keys 'text_model.'-prefixed, tokenizer as vocab+merges."""
    import shutil
    folder = Path(folder)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    parts = {"unet": (comp.unet.state_dict(), "diffusion_pytorch_model.safetensors", "config.json"),
             "vae": (comp.vae.state_dict(), "diffusion_pytorch_model.safetensors", "config.json"),
             "text_encoder": (te_state(comp.text_encoder), "model.safetensors", "config.json")}
    for name, (state, weights, cfg_name) in parts.items():
        cfg = dict(comp.configs[name])
        if name == "text_encoder":
            cfg.setdefault("architectures", ["CLIPTextModel"])
            cfg.setdefault("model_type", "clip_text_model")
        write_text(folder / name / cfg_name, json.dumps(cfg, indent=2))
        write_safetensors(folder / name / weights, {k: v.contiguous() for k, v in state.items()},
                          {"format": "pt"}, overwrite=True)
    write_text(folder / "scheduler" / "scheduler_config.json",
               json.dumps(comp.configs["scheduler"], indent=2))
    tok = folder / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for f in assets.tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copyfile(f, tok / f.name)
    write_text(folder / "model_index.json", json.dumps(index, indent=2))
    write_text(folder / "dreambooth_model.json", json.dumps({"model_type": comp.model_type}))
    return folder


def load_working_dir(folder: str | Path) -> Components:
    from safetensors.torch import load_file
    folder = Path(folder)
    model_type = json.loads((folder / "dreambooth_model.json").read_text())["model_type"]
    configs = {n: json.loads((folder / n / "config.json").read_text())
               for n in ("unet", "vae", "text_encoder")}
    configs["text_encoder"] = {k: v for k, v in configs["text_encoder"].items()
                               if k not in ("architectures", "model_type")}
    configs["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    unet, vae, te = _instantiate(configs, empty=True)
    _load_module(unet, load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")), "UNet")
    _load_module(vae, load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")), "VAE")
    te_load(te, load_file(str(folder / "text_encoder" / "model.safetensors")))
    return Components(model_type, configs, unet, vae, te, assets.load_tokenizer())
