"""The working model (`Components`: UNet, VAE, text encoder(s), tokenizer(s), scheduler config),
built from configs (random, or on the meta device for shapes) and filled from state dicts; how
each family's text encoders condition the UNet.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import assets
from ..config.errors import CheckpointError
from . import convert, openclip
from .spec import ModelSpec, shipped_configs, spec_for


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
    # a prompt's text before tokenizing (a trained embedding: its word -> its placeholder tokens)
    rewrite_prompt: Any = None
    text_encoder_3: Any = None  # SD3.5's T5
    tokenizer_3: Any = None

    @property
    def spec(self) -> ModelSpec:
        return spec_for(self.model_type)

    @property
    def text_encoders(self) -> list:
        return [getattr(self, s.component) for s in self.spec.text_encoders]

    @property
    def tokenizers(self) -> list:
        names = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2",
                 "text_encoder_3": "tokenizer_3"}
        return [getattr(self, names[s.component]) for s in self.spec.text_encoders]

    def noise_scheduler(self):
        if self.spec.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler
            return FlowMatchEulerDiscreteScheduler.from_config(self.configs["scheduler"])
        from diffusers import DDPMScheduler
        return DDPMScheduler.from_config(self.configs["scheduler"])


# -- conditioning: how each family's text encoders feed the UNet ------------------------------
def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt"
                     ).input_ids.to(device, non_blocking=True)  # no wait for the device


def encode_prompts(comp: Components, prompts: list[str], device, encoders=None) -> dict:
    """{"hidden": encoder states [B, 77, D]} and, for SDXL and Flux, "pooled" [B, P] (Flux:
    T5's states [B, tokens, D], CLIP-L's pooled output). SD 1.x/2.x: the
    encoder's last hidden state (SD 2.x's model already ends at the penultimate layer); SDXL: the
    penultimate states of both encoders side by side, pooled from the second."""
    encoders = list(encoders) if encoders else comp.text_encoders
    if comp.rewrite_prompt is not None:
        prompts = [comp.rewrite_prompt(p) for p in prompts]
    if comp.spec.family == "sd3":
        return _sd3_prompts(comp, prompts, device, encoders)
    if comp.spec.family == "flux":  # as diffusers' FluxPipeline: CLIP's pooled, T5's states
        pooled = encoders[0](_token_ids(comp.tokenizer, prompts, device))[1]
        return {"hidden": encoders[1](_token_ids(comp.tokenizer_2, prompts, device))[0],
                "pooled": pooled}
    if comp.spec.family != "sdxl":
        return {"hidden": encoders[0](_token_ids(comp.tokenizer, prompts, device))[0]}
    hidden = []
    for tokenizer, encoder in zip(comp.tokenizers, encoders):
        out = encoder(_token_ids(tokenizer, prompts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return {"hidden": torch.cat(hidden, dim=-1), "pooled": out[0]}


def _sd3_prompts(comp: Components, prompts: list[str], device, encoders) -> dict:
    """As diffusers' StableDiffusion3Pipeline: CLIP-L's and CLIP-G's penultimate states side by
    side, zero-padded to T5's width, then T5's states after them; pooled: both projections."""
    hidden, pooled = [], []
    for tokenizer, encoder in zip(comp.tokenizers[:2], encoders[:2]):
        out = encoder(_token_ids(tokenizer, prompts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    t5 = encoders[2](_token_ids(comp.tokenizer_3, prompts, device))[0]
    clip = torch.cat(hidden, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"hidden": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled": torch.cat(pooled, dim=-1)}


def unet_kwargs(comp: Components, cond: dict, geometry: list, device) -> dict:
    """Extra UNet inputs: SDXL's pooled text and (original size, crop top-left, target size)."""
    if comp.spec.family != "sdxl":
        return {}
    pooled = cond["pooled"].to(device)
    time_ids = torch.tensor([list(g) for g in geometry], dtype=pooled.dtype).to(
        device, non_blocking=True)  # no wait for the device
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


# -- building -----------------------------------------------------------------------------
def instantiate(model_type: str, configs: dict, empty: bool, meta: bool = False) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    ctx = torch.device("meta") if meta else empty_weights() if empty else contextlib.nullcontext()
    wanted = ["unet", "vae", "scheduler"] + [s.component for s in spec_for(model_type).text_encoders]
    bad = [n for n in wanted if not isinstance(configs, dict) or not isinstance(configs.get(n), dict)]
    if bad:  # diffusers takes a config that is not a dict for a model hub name: never go there
        raise TypeError(f"the component configs {bad} are not JSON objects")
    with ctx:
        modules = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                   "vae": AutoencoderKL.from_config(configs["vae"])}
        for slot in spec_for(model_type).text_encoders:
            cls = CLIPTextModelWithProjection if slot.with_projection else CLIPTextModel
            cfg = {k: v for k, v in configs[slot.component].items()
                   if k not in ("architectures", "model_type")}
            modules[slot.component] = cls(CLIPTextConfig(**cfg))
    return modules


def empty_weights():
    from accelerate import init_empty_weights
    return init_empty_weights(include_buffers=False)


def make_components(model_type: str, configs: dict, modules: dict, extra: dict,
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
    modules = instantiate(model_type, configs, empty=False)
    return make_components(model_type, configs, modules, standard_extras(model_type, configs))


def build_meta(model_type: str, configs: dict | None = None, extra: dict | None = None
               ) -> Components:
    """The model on the meta device: shapes without memory (reference layouts, checks)."""
    configs = configs or shipped_configs(model_type)
    modules = instantiate(model_type, configs, empty=True, meta=True)
    extra = standard_extras(model_type, configs, "meta") if extra is None else \
        {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in extra.items()}
    return make_components(model_type, configs, modules, extra, tokenizers=False)


# -- text encoder keys: 'text_model.'-prefixed on disk, whatever transformers does -------------
def te_state(text_encoder) -> dict:
    sd = text_encoder.state_dict()
    wrapped = any(k.startswith("text_model.") for k in sd)
    return {(k if wrapped else "text_model." + k): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def te_load(text_encoder, state: dict, what: str = "text encoder",
            dtype: torch.dtype | None = torch.float32) -> None:
    wants_prefix = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if not wants_prefix:
        state = convert.unprefixed(state, "text_model.")
    load_module(text_encoder, state, what, dtype)


def load_module(module, state: dict, what: str,
                dtype: torch.dtype | None = torch.float32) -> None:
    """Load `state` (emptied: its tensors go into the module, floating ones in `dtype`; None:
    as they are) into `module`, after checking that its names and shapes are the module's."""
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
    for k in list(state):  # one tensor at a time; `state` gives up each as it goes, so the
        value = state.pop(k)  # file's copy is freed as its converted one is made
        convert_it = dtype is not None and value.is_floating_point()
        state[k] = value.to(dtype) if convert_it else value
        del value
    module.load_state_dict(state, strict=False, assign=True)
    state.clear()
    for p in module.parameters():  # any the state did not hold (made by the module itself)
        if dtype is not None and p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)


