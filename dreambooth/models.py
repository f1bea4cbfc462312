"""Model families as data, and the working model built from a single-file checkpoint.

A `ModelSpec` per type says what the architecture is: resolution, prediction type, and where
each text encoder lives in the single file and how it conditions the UNet. `Components` is the
working model (UNet, VAE, text encoder(s), tokenizer(s), scheduler config) the trainer uses.
Component configs come from the checkpoint's own metadata when we wrote it, else from the
configs shipped in dreambooth/assets: nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import assets, convert, openclip
from .checkpoint import read_checkpoint
from .detect import check_model_type, detect_model_type  # noqa: F401  (re-exported)
from .errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
COMPONENTS_KEY = "dreambooth.components"
TYPE_KEY = "dreambooth.model_type"


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder: its diffusers component, where it lives in the single file, its form."""
    component: str             # "text_encoder" / "text_encoder_2"
    prefix: str                # key prefix in the single file
    layout: str = "clip"       # "clip": transformers' keys; "openclip": OpenCLIP's (q/k/v fused)
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's pooled embedding)
    pad_token: str | None = None   # OpenCLIP pads with "!", CLIP with its end token
    extra_layers: int = 0      # layers in the file past the diffusers model (SD 2.x: the 24th)
    lora_prefix: str = "lora_te"   # kohya LoRA key prefix


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    family: str  # "v1", "v2", "sdxl": single-file layout, conditioning, LDM yaml, LoRA names
    resolution: int
    prediction_type: str  # the scheduler's: "epsilon" or "v_prediction"
    architecture: str  # modelspec.architecture id
    text_encoders: tuple = ()
    schedule_buffers: bool = True  # the LDM DDPM buffers (betas, alphas_cumprod, ...) in the file

    @property
    def components(self) -> tuple:
        return ("unet", "vae", *(s.component for s in self.text_encoders), "scheduler")


V1_TE = (TextEncoderSlot("text_encoder", CLIP_PREFIX),)
V2_TE = (TextEncoderSlot("text_encoder", "cond_stage_model.model.", "openclip", pad_token="!",
                         extra_layers=1),)
XL_TE = (TextEncoderSlot("text_encoder", "conditioner.embedders.0.transformer.",
                         lora_prefix="lora_te1"),
         TextEncoderSlot("text_encoder_2", "conditioner.embedders.1.model.", "openclip",
                         with_projection=True, pad_token="!", lora_prefix="lora_te2"))
SPECS = {
    "v1x": ModelSpec("v1x", "Stable Diffusion 1.x", "v1", 512, "epsilon", "stable-diffusion-v1",
                     V1_TE),
    "v2x-512": ModelSpec("v2x-512", "Stable Diffusion 2.x 512 (epsilon)", "v2", 512, "epsilon",
                         "stable-diffusion-v2-512", V2_TE),
    "v2x-768-v": ModelSpec("v2x-768-v", "Stable Diffusion 2.x 768-v (v-prediction)", "v2", 768,
                           "v_prediction", "stable-diffusion-v2-768-v", V2_TE),
    "sdxl": ModelSpec("sdxl", "Stable Diffusion XL", "sdxl", 1024, "epsilon",
                      "stable-diffusion-xl-v1-base", XL_TE, schedule_buffers=False),
}


def spec_for(model_type: str) -> ModelSpec:
    if model_type not in SPECS:
        raise CheckpointError(f"Model type '{model_type}' is not supported by this version.",
                              "Supported: " + ", ".join(SPECS))
    return SPECS[model_type]


@dataclass
class Components:
    model_type: str
    configs: dict  # component name -> config dict
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    extra: dict = field(default_factory=dict)  # single-file keys kept verbatim (SD2's 24th layer..)
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    source_yaml: str | None = None  # the WebUI's <name>.yaml beside the source checkpoint

    @property
    def spec(self) -> ModelSpec:
        return spec_for(self.model_type)

    @property
    def text_encoders(self) -> list:
        return [getattr(self, s.component) for s in self.spec.text_encoders]

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer if s.component == "text_encoder" else self.tokenizer_2
                for s in self.spec.text_encoders]

    def noise_scheduler(self):
        from diffusers import DDPMScheduler
        return DDPMScheduler.from_config(self.configs["scheduler"])


# -- conditioning: how each family's text encoders feed the UNet ------------------------------
def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt"
                     ).input_ids.to(device)


def encode_prompts(comp: Components, prompts: list[str], device, encoders=None) -> dict:
    """{"hidden": encoder states [B, 77, D]} and, for SDXL, "pooled" [B, P]. SD 1.x/2.x: the
    encoder's last hidden state (SD 2.x's model already ends at the penultimate layer); SDXL: the
    penultimate states of both encoders side by side, pooled from the second."""
    encoders = list(encoders) if encoders else comp.text_encoders
    if comp.spec.family != "sdxl":
        return {"hidden": encoders[0](_token_ids(comp.tokenizer, prompts, device))[0]}
    hidden = []
    for tokenizer, encoder in zip(comp.tokenizers, encoders):
        out = encoder(_token_ids(tokenizer, prompts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return {"hidden": torch.cat(hidden, dim=-1), "pooled": out[0]}


def unet_kwargs(comp: Components, cond: dict, geometry: list, device) -> dict:
    """Extra UNet inputs: SDXL's pooled text and (original size, crop top-left, target size)."""
    if comp.spec.family != "sdxl":
        return {}
    pooled = cond["pooled"].to(device)
    time_ids = torch.tensor([list(g) for g in geometry], dtype=pooled.dtype, device=device)
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


# -- building -----------------------------------------------------------------------------
def shipped_configs(model_type: str) -> dict:
    return {name: assets.load_config(model_type, name) for name in spec_for(model_type).components}


def _instantiate(model_type: str, configs: dict, empty: bool, meta: bool = False) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    ctx = torch.device("meta") if meta else _empty_weights() if empty else contextlib.nullcontext()
    with ctx:
        modules = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                   "vae": AutoencoderKL.from_config(configs["vae"])}
        for slot in spec_for(model_type).text_encoders:
            cls = CLIPTextModelWithProjection if slot.with_projection else CLIPTextModel
            cfg = {k: v for k, v in configs[slot.component].items()
                   if k not in ("architectures", "model_type")}
            modules[slot.component] = cls(CLIPTextConfig(**cfg))
    return modules


def _empty_weights():
    from accelerate import init_empty_weights
    return init_empty_weights(include_buffers=False)


def _components(model_type: str, configs: dict, modules: dict, extra: dict,
                source_yaml: str | None = None, tokenizers: bool = True) -> Components:
    slots = spec_for(model_type).text_encoders
    toks = {s.component: assets.load_tokenizer(pad_token=s.pad_token) if tokenizers else None
            for s in slots}
    return Components(model_type, configs, modules["unet"], modules["vae"],
                      modules["text_encoder"], toks["text_encoder"], extra,
                      modules.get("text_encoder_2"), toks.get("text_encoder_2"), source_yaml)


def standard_extras(model_type: str, configs: dict, device=None) -> dict:
    """Fresh values for the single-file keys no diffusers module holds (OpenCLIP's extras)."""
    out = {}
    for slot in spec_for(model_type).text_encoders:
        if slot.layout == "openclip":
            shapes = openclip.extra_shapes(configs[slot.component], slot.extra_layers,
                                           slot.with_projection)
            out.update(convert.prefixed(openclip.random_extras(shapes, device), slot.prefix))
    return out


def build_random(model_type: str, configs: dict, seed: int = 0) -> Components:
    """A randomly initialised model of the given configs (tests, demo, benchmarks)."""
    torch.manual_seed(seed)
    modules = _instantiate(model_type, configs, empty=False)
    return _components(model_type, configs, modules, standard_extras(model_type, configs))


def build_meta(model_type: str, configs: dict | None = None, extra: dict | None = None
               ) -> Components:
    """The model on the meta device: shapes without memory (reference layouts, checks)."""
    configs = configs or shipped_configs(model_type)
    modules = _instantiate(model_type, configs, empty=True, meta=True)
    extra = standard_extras(model_type, configs, "meta") if extra is None else \
        {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in extra.items()}
    return _components(model_type, configs, modules, extra, tokenizers=False)


def reference_layout(comp: Components) -> dict:
    """Key -> shape a single file of this model must hold: built from its configs on the meta
    device, independent of the live modules (which may be wrapped, e.g. by LoRA)."""
    meta = build_meta(comp.model_type, comp.configs, comp.extra)
    return {k: tuple(v.shape) for k, v in ldm_state(meta).items()}


# -- text encoder keys: 'text_model.'-prefixed on disk, whatever transformers does -------------
def te_state(text_encoder) -> dict:
    sd = text_encoder.state_dict()
    wrapped = any(k.startswith("text_model.") for k in sd)
    return {(k if wrapped else "text_model." + k): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def te_load(text_encoder, state: dict, what: str = "text encoder") -> None:
    wants_prefix = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if not wants_prefix:
        state = convert.unprefixed(state, "text_model.")
    _load_module(text_encoder, state, what)


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


def _te_from_ldm(slot: TextEncoderSlot, state: dict, config: dict) -> tuple[dict, dict]:
    """(transformers keys of one text encoder, single-file keys to keep verbatim)."""
    local = convert.unprefixed(state, slot.prefix)
    if slot.layout == "clip":
        return local, {}
    hf, rest = openclip.from_openclip(local, config["num_hidden_layers"], slot.with_projection)
    return hf, convert.prefixed(rest, slot.prefix)


def _te_to_ldm(slot: TextEncoderSlot, state: dict, config: dict) -> dict:
    if slot.layout == "openclip":
        return convert.prefixed(openclip.to_openclip(state), slot.prefix)
    state = dict(state)
    positions = config.get("max_position_embeddings", 77)
    state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return convert.prefixed(state, slot.prefix)


# -- single file <-> components -------------------------------------------------------------
def read_beside_yaml(path: str | Path) -> str | None:
    """The WebUI's config beside a checkpoint (<name>.yaml), when there is one."""
    yaml_path = Path(path).with_suffix(".yaml")
    return yaml_path.read_text(encoding="utf-8") if yaml_path.is_file() else None


def load_single_file(path: str, model_type: str) -> Components:
    """A WebUI single-file checkpoint as a working model (fp32), offline."""
    spec = spec_for(model_type)
    state, metadata = read_checkpoint(path)
    source_yaml = read_beside_yaml(path)
    check_model_type(state, metadata, source_yaml, model_type, Path(path).name,
                     {n: s.title for n, s in SPECS.items()})
    configs = json.loads(metadata[COMPONENTS_KEY]) if COMPONENTS_KEY in metadata \
        else shipped_configs(model_type)
    modules = _instantiate(model_type, configs, empty=True)
    _load_module(modules["unet"], convert.from_ldm(state, convert.unet_prefix_map(configs["unet"]),
                                                   UNET_PREFIX), "UNet")
    _load_module(modules["vae"], convert.from_ldm(state, convert.vae_prefix_map(configs["vae"]),
                                                  VAE_PREFIX, vae=True), "VAE")
    extra = {}
    for i, slot in enumerate(spec.text_encoders):
        hf, rest = _te_from_ldm(slot, state, configs[slot.component])
        te_load(modules[slot.component], hf, "text encoder" + (f" {i + 1}" if i else ""))
        extra.update(rest)
    return _components(model_type, configs, modules, extra, source_yaml)


def ldm_state(comp: Components, unet_state: dict | None = None,
              te_states: dict | None = None) -> dict:
    """The single-file (LDM) state dict of a working model, in the layout the WebUI loads.
    `unet_state` / `te_states` (component -> 'text_model.'-keyed state) replace the live ones."""
    unet_state = unet_state if unet_state is not None else comp.unet.state_dict()
    state = convert.to_ldm(unet_state, convert.unet_prefix_map(comp.configs["unet"]), UNET_PREFIX)
    state.update(convert.to_ldm(comp.vae.state_dict(), convert.vae_prefix_map(comp.configs["vae"]),
                                VAE_PREFIX, vae=True))
    for slot in comp.spec.text_encoders:
        te = (te_states or {}).get(slot.component)
        te = te if te is not None else te_state(getattr(comp, slot.component))
        state.update(_te_to_ldm(slot, te, comp.configs[slot.component]))
    state.update(comp.extra)
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
                     unet_state: dict | None = None, te_states: dict | None = None) -> Path:
    """Write the single file the WebUI loads (checked against the reference layout before it
    takes its name), and the WebUI's <name>.yaml beside it when the model needs one."""
    from . import ldm_yaml
    from .checkpoint import SAVE_DTYPES, cast_for_save
    from .filecheck import write_verified
    from .metadata import model_metadata
    meta = {COMPONENTS_KEY: json.dumps(comp.configs), TYPE_KEY: comp.model_type,
            **model_metadata(comp.spec, Path(path).stem, metadata or {})}
    state = cast_for_save(ldm_state(comp, unet_state, te_states), precision)
    write_verified(path, state, meta, reference_layout(comp), overwrite=overwrite,
                   dtype=SAVE_DTYPES[precision])
    ldm_yaml.write_beside(path, comp)
    return Path(path)


# -- the diffusers working folder (see workdir.py) ---------------------------------------------
def save_working_dir(comp: Components, folder: str | Path) -> Path:
    from .workdir import save_working_dir as save
    return save(comp, folder)


def load_working_dir(folder: str | Path) -> Components:
    from .workdir import load_working_dir as load
    return load(folder)
