"""Which model type a single-file checkpoint is, from its keys and shapes; refusals in words.

SD 2.x 512 (epsilon) and 768-v (v-prediction) checkpoints have the same keys and shapes: only
the file's metadata or the WebUI's `<name>.yaml` beside it tells them apart (the WebUI itself
runs the UNet once to guess). Without such evidence either v2 type is accepted as chosen.
"""
from __future__ import annotations

import re

from ..config.errors import CheckpointError

FAMILY = {"v1x": "v1", "v2x-512": "v2", "v2x-768-v": "v2", "sdxl": "sdxl", "flux-dev": "flux",
          "flux-schnell": "flux", "sd3.5-medium": "sd3", "sd3.5-large": "sd3"}
ARCHITECTURE_TYPES = {"stable-diffusion-v1": "v1x", "stable-diffusion-v2-512": "v2x-512",
                      "stable-diffusion-v2-768-v": "v2x-768-v",
                      "stable-diffusion-xl-v1-base": "sdxl"}
TEXT_WIDTH_KEYS = {"v1": ("cond_stage_model.transformer.text_model.final_layer_norm.weight",),
                   "v2": ("cond_stage_model.model.ln_final.weight",),
                   "sdxl": ("conditioner.embedders.0.transformer.text_model.final_layer_norm"
                            ".weight",
                            "conditioner.embedders.1.model.ln_final.weight")}
INPUT_CHANNELS = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth model"}
OTHER_KINDS = {"embedder.model.": "an unCLIP (image variation) model",
               "depth_model.": "a depth model",
               "cond_stage_model.roberta.": "an AltDiffusion model",
               "control_model.": "a ControlNet", "lora_unet_": "a LoRA, not a checkpoint"}


FLUX_MARK = "double_blocks.0.img_attn.norm.key_norm.scale"  # BFL's original transformer layout
FLUX_PREFIX = "model.diffusion_model."  # of the all-in-one files


def flux_type(state) -> str | None:
    """'flux-dev' (it has the guidance embedding), 'flux-schnell', or None: a Flux.1
    transformer in BFL's key layout, with or without the all-in-one files' prefix."""
    for prefix in ("", FLUX_PREFIX):
        if prefix + FLUX_MARK in state:
            return "flux-dev" if prefix + "guidance_in.in_layer.weight" in state \
                else "flux-schnell"
    return None


SD3_MARK = "joint_blocks.0.context_block.adaLN_modulation.1.bias"  # SAI's MMDiT layout
SD35_QK_NORM = "joint_blocks.0.x_block.attn.ln_q.weight"  # SD3.5's (3.0 had none)


def sd3_prefix(state) -> str | None:
    """'' or 'model.diffusion_model.' where the state holds an MMDiT in SAI's layout."""
    return next((p for p in ("", FLUX_PREFIX) if p + SD3_MARK in state), None)


def sd35_type(state) -> str | None:
    """'sd3.5-medium' (MMDiT-X: some x_blocks have a second attention, attn2), 'sd3.5-large'
    (none, 38 blocks; also its turbo), or None: no SD3.5 MMDiT (SD3.0 medium has no qk norm)."""
    prefix = sd3_prefix(state)
    if prefix is None or prefix + SD35_QK_NORM not in state:
        return None
    dual = any(".x_block.attn2." in k for k in state if k.startswith(prefix + "joint_blocks."))
    return "sd3.5-medium" if dual else "sd3.5-large"


def family_of(state: dict) -> str | None:
    """'v1', 'v2' or 'sdxl' from the text encoder keys, or None when none is there."""
    if "conditioner.embedders.1.model.ln_final.weight" in state:
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.transformer.") for k in state):
        return "v2"
    if any(k.startswith("cond_stage_model.transformer.") for k in state):
        return "v1"
    return None


def unsupported(state: dict) -> str | None:
    """What a checkpoint is when it is a kind of model this trainer does not handle, else None."""
    for prefix, what in OTHER_KINDS.items():
        if any(k.startswith(prefix) for k in state):
            return what
    if sd3_prefix(state) is not None and sd35_type(state) is None:
        return "a Stable Diffusion 3.0 model (SD3.5 medium and large are trained)"
    if "conditioner.embedders.0.model.ln_final.weight" in state and family_of(state) != "sdxl":
        return "an SDXL refiner"
    w = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if w is not None and w.ndim == 4 and w.shape[1] != 4:
        return INPUT_CHANNELS.get(w.shape[1], f"a model with {w.shape[1]} input channels")
    return None


def prediction_evidence(metadata: dict, yaml_text: str | None) -> str | None:
    """'v' or 'epsilon' when the file's metadata or the .yaml beside it says so, else None
    (metadata that is not a mapping, as a damaged header may hold, says nothing)."""
    metadata = metadata if isinstance(metadata, dict) else {}
    declared = str(metadata.get("dreambooth.model_type") or "") or ARCHITECTURE_TYPES.get(
        str(metadata.get("modelspec.architecture", "")).split("/")[0])
    if declared in FAMILY:
        return "v" if declared == "v2x-768-v" else "epsilon"
    kind = str(metadata.get("modelspec.prediction_type", ""))
    if kind in ("v", "v_prediction", "epsilon"):
        return "epsilon" if kind == "epsilon" else "v"
    if yaml_text is not None:
        v = re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*(#.*)?$", yaml_text, re.M)
        return "v" if v else "epsilon"
    return None


def detect_model_type(state: dict, metadata: dict | None = None,
                      yaml_text: str | None = None) -> str | None:
    """The model type of an LDM state dict (v2: 768-v only on evidence), or None (also for a
    `state` that is not a mapping: a damaged header)."""
    if not hasattr(state, "keys"):
        return None
    if flux := flux_type(state) or sd35_type(state):
        return flux
    family = family_of(state)
    if family == "v2":
        return "v2x-768-v" if prediction_evidence(metadata or {}, yaml_text) == "v" else "v2x-512"
    return {"v1": "v1x", "sdxl": "sdxl"}.get(family)


def check_model_type(state: dict, metadata: dict, yaml_text: str | None, chosen: str,
                     name: str, titles: dict) -> None:
    """Raise CheckpointError, in words, unless the checkpoint is of the chosen type."""
    what = unsupported(state)
    if what:
        raise CheckpointError(f"'{name}' is {what}; only base text-to-image checkpoints of "
                              "Stable Diffusion 1.x, 2.x and SDXL can be trained.",
                              "Choose a base text-to-image checkpoint.")
    found = detect_model_type(state, metadata, yaml_text)
    if found is None:
        raise CheckpointError(f"'{name}' is not a Stable Diffusion checkpoint (none of the "
                              "UNet/VAE/text encoder keys were found).",
                              "Choose a full Stable Diffusion checkpoint.")
    undecided = FAMILY[found] == FAMILY.get(chosen) == "v2" and \
        prediction_evidence(metadata, yaml_text) is None
    if found != chosen and not undecided:
        why = " (its metadata or the .yaml beside it says so)" if FAMILY[found] == "v2" else ""
        raise CheckpointError(f"'{name}' is a {found} checkpoint ({titles[found]}){why}, but "
                              f"the model type is set to {chosen} ({titles.get(chosen, chosen)}).",
                              f"Set the model type to {found}.")
    _check_widths(state, FAMILY[found], name)


def _check_widths(state: dict, family: str, name: str) -> None:
    """The UNet's cross-attention must take what the text encoder(s) give."""
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    widths = [state[k].shape[0] for k in TEXT_WIDTH_KEYS.get(family, ()) if k in state]
    if key in state and len(widths) == len(TEXT_WIDTH_KEYS[family]) \
            and state[key].shape[-1] != sum(widths):
        raise CheckpointError(f"'{name}' does not fit together: its UNet expects text features "
                              f"of width {state[key].shape[-1]}, its text encoder gives "
                              f"{sum(widths)}.", "The file may be a broken merge; choose "
                              "another checkpoint.")
