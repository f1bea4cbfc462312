"""A WebUI single-file checkpoint <-> the working model: the LDM key layout the WebUI loads,
the schedule buffers, the <name>.yaml beside it, and the check of every written file against the
layout its configs imply.
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import torch

from . import convert, ldm_yaml, openclip
from ..config.errors import CheckpointError
from .checkpoint import SAVE_DTYPES, LazyState, open_checkpoint, tensor_dtype
from .components import (
    Components,
    build_meta,
    instantiate,
    load_module,
    make_components,
    te_load,
    te_state,
)
from .detect import check_model_type
from .filecheck import write_verified
from .metadata import model_metadata
from .spec import (
    COMPONENTS_KEY,
    SPECS,
    TYPE_KEY,
    UNET_PREFIX,
    VAE_PREFIX,
    TextEncoderSlot,
    shipped_configs,
    spec_for,
)


def _te_from_ldm(slot: TextEncoderSlot, state: dict, config: dict) -> tuple[dict, dict]:
    """(transformers keys of one text encoder, single-file keys to keep verbatim)."""
    local = convert.unprefixed(state, slot.prefix)
    if slot.layout == "clip":
        return local, {}
    hf, rest = openclip.from_openclip(local, config["num_hidden_layers"], slot.with_projection)
    return hf, convert.prefixed(rest, slot.prefix)


def _te_to_ldm(slot: TextEncoderSlot, state: dict, config: dict,
               deferred: bool = False) -> dict:
    if slot.layout == "openclip":
        return convert.prefixed(openclip.to_openclip(state, deferred), slot.prefix)
    state = dict(state)
    positions = config.get("max_position_embeddings", 77)
    state["text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return convert.prefixed(state, slot.prefix)


# -- single file <-> components -------------------------------------------------------------
def read_beside_yaml(path: str | Path) -> str | None:
    """The WebUI's config beside a checkpoint (<name>.yaml), when there is one."""
    yaml_path = Path(path).with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    data = yaml_path.read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"'{yaml_path.name}' beside the checkpoint is not UTF-8 text "
                              f"(byte {e.start}).", "Save it as UTF-8, or move it away if the "
                              "checkpoint does not need it.") from None


_AHEAD: dict = {}  # (path, file identity, model type, dtype) -> a file opened by read_ahead
_AHEAD_LOCK = threading.Lock()  # (runs on several threads of one process: the UI's)


def _ahead_key(path, model_type: str, dtype) -> tuple:
    st = os.stat(path)  # a file replaced in place or by a rename is another file
    return (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns, model_type, dtype)


def _opened(path, model_type: str, dtype) -> tuple:
    """(state, metadata) of the file, its model weights being read on a thread."""
    state, metadata = open_checkpoint(path)
    if isinstance(state, LazyState):
        prefixes = (UNET_PREFIX, VAE_PREFIX) + tuple(s.prefix for s in spec_for(
            model_type).text_encoders)
        state.prefetch([k for k in state if k.startswith(prefixes)], dtype)
    return state, metadata


def read_ahead(path: str, model_type: str, dtype: torch.dtype | None = None) -> None:
    """Start reading a single file's weights now, on a thread, for the load_single_file of
    the same file (unchanged), model type and dtype later in this process: the trainer
    calls it before the imports and the memory plan, which the read then overlaps. A file
    that can't be opened is left for that load to report. One file at a time."""
    if Path(path).suffix.lower() != ".safetensors":  # a pickle loads whole: nothing to overlap
        return
    try:
        key = _ahead_key(path, model_type, dtype)
        with _AHEAD_LOCK:
            if key in _AHEAD:
                return
        drop_ahead()
        opened = _opened(path, model_type, dtype)
        with _AHEAD_LOCK:
            _AHEAD[key] = opened
    except (CheckpointError, OSError, ValueError):
        pass


def drop_ahead() -> None:
    """Forget what read_ahead opened and nothing took (a run that stopped before loading)."""
    with _AHEAD_LOCK:
        dropped = list(_AHEAD.values())
        _AHEAD.clear()
    for state, _ in dropped:
        state.close()


def load_single_file(path: str, model_type: str,
                     dtype: torch.dtype | None = torch.float32) -> Components:
    """A WebUI single-file checkpoint as a working model, offline: its floating weights in
    `dtype` (None: as the file stores them, for a caller that casts each component itself:
    an fp16 file then takes half the memory an fp32 copy would)."""
    try:
        with _AHEAD_LOCK:
            ahead = _AHEAD.pop(_ahead_key(path, model_type, dtype), None)
    except OSError:
        ahead = None
    drop_ahead()  # (another file's, or this one's before it changed)
    # read (and convert) while diffusers imports, unless read_ahead started it earlier
    state, metadata = ahead or _opened(path, model_type, dtype)
    try:
        return _load(state, metadata, path, model_type, dtype)
    finally:
        if isinstance(state, LazyState):
            state.close()


def _load(state, metadata: dict, path: str, model_type: str, dtype) -> Components:
    source_yaml = read_beside_yaml(path)
    name = Path(path).name
    quantized = [k for k in state if k.endswith(".weight")
                 and tensor_dtype(state, k) in (torch.int8, torch.uint8)]
    if quantized:
        raise CheckpointError(f"'{name}' holds {len(quantized)} 8-bit integer weights (e.g. "
                              f"{quantized[0]}): a quantized model, which can't be trained.",
                              "Choose the full-precision (fp16 or fp32) version of the model.")
    try:
        return _components_of(state, metadata, source_yaml, model_type, name, dtype)
    except CheckpointError as e:
        if name not in e.message:
            e.message = f"'{name}': {e.message}"
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError,
            OSError) as e:
        raise CheckpointError(f"'{name}' could not be read as a {model_type} model "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]}).",
                              "The file or its metadata is damaged, or it is another kind of "
                              "model: choose a full Stable Diffusion checkpoint.") from None


def _components_of(state: dict, metadata: dict, source_yaml: str | None, model_type: str,
                   name: str, dtype: torch.dtype | None = torch.float32) -> Components:
    spec = spec_for(model_type)
    check_model_type(state, metadata, source_yaml, model_type, name,
                     {n: s.title for n, s in SPECS.items()})
    configs = json.loads(metadata[COMPONENTS_KEY]) if COMPONENTS_KEY in metadata \
        else shipped_configs(model_type)
    modules = instantiate(model_type, configs, empty=True)
    load_module(modules["unet"], convert.from_ldm(state, convert.unet_prefix_map(configs["unet"]),
                                                   UNET_PREFIX), "UNet", dtype)
    load_module(modules["vae"], convert.from_ldm(state, convert.vae_prefix_map(configs["vae"]),
                                                  VAE_PREFIX, vae=True), "VAE", dtype)
    extra = {}
    for i, slot in enumerate(spec.text_encoders):
        hf, rest = _te_from_ldm(slot, state, configs[slot.component])
        te_load(modules[slot.component], hf, "text encoder" + (f" {i + 1}" if i else ""), dtype)
        del hf  # its tensors are the module's now (or freed as converted)
        extra.update(rest)
    return make_components(model_type, configs, modules, extra, source_yaml)


def ldm_state(comp: Components, unet_state: dict | None = None,
              te_states: dict | None = None, buffers: bool = True,
              deferred: bool = False) -> dict:
    """The single-file (LDM) state dict of a working model, in the layout the WebUI loads: the
    live weights (views of them), nothing copied but the tensors the layout fuses or
    transposes (`deferred`: not even those, made as a streamed write reaches them).
    `unet_state` / `te_states` (component -> 'text_model.'-keyed state) replace the live ones;
    `buffers`: with the computed schedule buffers of the family (fp32)."""
    unet_state = unet_state if unet_state is not None else comp.unet.state_dict()
    state = convert.to_ldm(unet_state, convert.unet_prefix_map(comp.configs["unet"]), UNET_PREFIX)
    state.update(convert.to_ldm(comp.vae.state_dict(), convert.vae_prefix_map(comp.configs["vae"]),
                                VAE_PREFIX, vae=True))
    for slot in comp.spec.text_encoders:
        te = (te_states or {}).get(slot.component)
        te = te if te is not None else te_state(getattr(comp, slot.component))
        state.update(_te_to_ldm(slot, te, comp.configs[slot.component], deferred))
    state.update(comp.extra)
    if buffers and comp.spec.family == "sdxl":
        state["denoiser.sigmas"] = denoiser_sigmas(comp.configs["scheduler"])
    elif buffers:
        state.update(schedule_buffers(comp.configs["scheduler"]))
    return state


def _alphas_cumprod(scheduler_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(betas, alphas_cumprod) of the scaled-linear schedule, in float64."""
    n = scheduler_config.get("num_train_timesteps", 1000)
    b0, b1 = scheduler_config.get("beta_start", 0.00085), scheduler_config.get("beta_end", 0.012)
    betas = torch.linspace(math.sqrt(b0), math.sqrt(b1), n, dtype=torch.float64) ** 2
    return betas, torch.cumprod(1.0 - betas, dim=0)


def denoiser_sigmas(scheduler_config: dict) -> torch.Tensor:
    """sgm's DiscreteDenoiser buffer (LegacyDDPMDiscretization, ascending): the noise levels the
    WebUI samples SDXL with; the ratio in float64, its square root in fp32, as sgm computes it."""
    _, alphas_cumprod = _alphas_cumprod(scheduler_config)
    return ((1 - alphas_cumprod) / alphas_cumprod).to(torch.float32) ** 0.5


def schedule_buffers(scheduler_config: dict) -> dict:
    """The DDPM schedule tensors the original LDM checkpoints carry (computed, not learned)."""
    betas, alphas_cumprod = _alphas_cumprod(scheduler_config)
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
    takes its name), and the WebUI's <name>.yaml beside it when the model needs one. The
    schedule buffers stay fp32 in a half model: the WebUI samples with the file's values.
    Written one tensor at a time, each converted and cast as its turn comes: the save holds
    about one tensor beside the model, not a copy of the whole state."""
    meta = {COMPONENTS_KEY: json.dumps(comp.configs), TYPE_KEY: comp.model_type,
            **model_metadata(comp.spec, Path(path).stem, metadata or {})}
    state = ldm_state(comp, unet_state, te_states, deferred=True)
    write_verified(path, state, meta, reference_layout(comp), overwrite=overwrite,
                   dtype=SAVE_DTYPES[precision], fp32_keys=comp.spec.buffers)
    ldm_yaml.write_beside(path, comp)
    return Path(path)


def reference_layout(comp: Components) -> dict:
    """Key -> shape a single file of this model must hold: the modules built from its configs on
    the meta device, independent of the live ones (which may be wrapped, e.g. by LoRA), and the
    buffers the original architecture declares (spec.buffers), not the ones our writer adds."""
    meta = build_meta(comp.model_type, comp.configs, comp.extra)
    n = comp.configs["scheduler"].get("num_train_timesteps", 1000)
    return {**{k: tuple(v.shape) for k, v in ldm_state(meta, buffers=False).items()},
            **{k: (n,) for k in comp.spec.buffers}}
