"""The model's working folder: a diffusers-layout pipeline folder both old and new diffusers and
transformers read, plus what a single file needs that no diffusers module holds (extra.safetensors:
SD 2.x's unused last text layer, OpenCLIP's projection and logit scale; source.yaml)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from .. import assets
from ..config import TrainingConfig
from ..config.errors import DreamboothError, short_repr
from ..config.flux import FLUX_TYPES
from ..config.sd35 import SD35_TYPES
from .checkpoint import write_safetensors, write_text
from .components import Components, instantiate, load_module, make_components, te_load, te_state
from .single_file import load_single_file, read_ahead
from .spec import spec_for

WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors",
           "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
INFO = "dreambooth_model.json"


def _tokenizer(slot) -> str:
    return slot.component.replace("text_encoder", "tokenizer")


def _model_index(comp: Components) -> dict:
    xl = comp.spec.family == "sdxl"
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    for slot in comp.spec.text_encoders:
        cls = "CLIPTextModelWithProjection" if slot.with_projection else "CLIPTextModel"
        index[slot.component] = ["transformers", cls]
        index[_tokenizer(slot)] = ["transformers", "CLIPTokenizer"]
    if xl:
        index.update(force_zeros_for_empty_prompt=True, add_watermarker=None)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None],
                     requires_safety_checker=False)
    return index


def _write_tokenizer(folder: Path, pad_token: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in assets.tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copyfile(f, folder / f.name)
    if pad_token is not None:  # the OpenCLIP tokenizers of SD 2.x / SDXL pad with "!"
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            data = json.loads((folder / name).read_text(encoding="utf-8"))
            data["pad_token"] = pad_token
            write_text(folder / name, json.dumps(data, indent=2))


def save_working_dir(comp: Components, folder: str | Path) -> Path:
    """A diffusers-layout folder; text encoder keys 'text_model.'-prefixed, tokenizers as
    vocab + merges."""
    folder = Path(folder)
    parts = {"unet": comp.unet.state_dict(), "vae": comp.vae.state_dict()}
    for slot in comp.spec.text_encoders:
        parts[slot.component] = te_state(getattr(comp, slot.component))
    for name, state in parts.items():
        cfg = dict(comp.configs[name])
        if name.startswith("text_encoder"):
            cfg.setdefault("architectures", [_model_index(comp)[name][1]])
            cfg.setdefault("model_type", "clip_text_model")
        write_text(folder / name / "config.json", json.dumps(cfg, indent=2))
        write_safetensors(folder / name / WEIGHTS[name],
                          {k: v.contiguous() for k, v in state.items()}, {"format": "pt"},
                          overwrite=True)
    write_text(folder / "scheduler" / "scheduler_config.json",
               json.dumps(comp.configs["scheduler"], indent=2))
    for slot in comp.spec.text_encoders:
        _write_tokenizer(folder / _tokenizer(slot), slot.pad_token)
    extra = folder / "extra.safetensors"
    if comp.extra:
        write_safetensors(extra, {k: v.contiguous() for k, v in comp.extra.items()}, overwrite=True)
    else:
        extra.unlink(missing_ok=True)
    yaml_path = folder / "source.yaml"
    if comp.source_yaml is not None:
        write_text(yaml_path, comp.source_yaml)
    else:
        yaml_path.unlink(missing_ok=True)
    write_text(folder / "model_index.json", json.dumps(_model_index(comp), indent=2))
    write_text(folder / INFO, json.dumps({"model_type": comp.model_type}))
    return folder


def load_working_dir(folder: str | Path) -> Components:
    from safetensors.torch import load_file
    folder = Path(folder)
    model_type = json.loads((folder / INFO).read_text())["model_type"]
    spec = spec_for(model_type)
    names = [c for c in spec.components if c != "scheduler"]
    configs = {n: json.loads((folder / n / "config.json").read_text()) for n in names}
    for slot in spec.text_encoders:
        configs[slot.component] = {k: v for k, v in configs[slot.component].items()
                                   if k not in ("architectures", "model_type")}
    configs["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    modules = instantiate(model_type, configs, empty=True)
    for name, what in (("unet", "UNet"), ("vae", "VAE")):
        load_module(modules[name], load_file(str(folder / name / WEIGHTS[name])), what)
    for slot in spec.text_encoders:
        weights = folder / slot.component / WEIGHTS[slot.component]
        te_load(modules[slot.component], load_file(str(weights)))
    extra = folder / "extra.safetensors"
    yaml_path = folder / "source.yaml"
    return make_components(model_type, configs, modules,
                       load_file(str(extra)) if extra.is_file() else {},
                       yaml_path.read_text(encoding="utf-8") if yaml_path.is_file() else None)


# -- a model's working folder: where the next run of the same model goes on ---------------
def working_dir(config: TrainingConfig) -> Path:
    return config.model_dir / "working"


def source_id(path: str) -> dict:
    p = Path(path).resolve()
    st = p.stat()
    return {"source": str(p), "source_size": st.st_size, "source_mtime": int(st.st_mtime)}


def load_model(config: TrainingConfig, say,
               dtype: torch.dtype | None = torch.float32) -> tuple[Components, int]:
    """The working model: the model's own working folder when it came from this source (to go
    on training it), else a fresh conversion of the source checkpoint, its weights in `dtype`
    as load_single_file takes it (None: as the file stores them). Returns (model, revision)."""
    if config.model_type in FLUX_TYPES:  # a LoRA of its files, no working folder
        from .flux import load_flux
        return load_flux(config, dtype), 0
    if config.model_type in SD35_TYPES:  # the same: a LoRA of its file(s)
        from .sd35 import load_sd35
        return load_sd35(config, dtype), 0
    info = _working_info(config)
    if info is not None:
        say(f"Continuing from the working model at revision {info.get('revision', 0)}.")
        try:
            return load_working_dir(working_dir(config)), int(info.get("revision", 0))
        except MemoryError:
            raise
        except (DreamboothError, OSError, ValueError, KeyError, TypeError, AttributeError,
                RuntimeError, SafetensorError) as e:
            if "can't allocate memory" in str(e):  # the host's RAM, not the folder
                raise
            raise damaged_working_dir(config, e) from None
    return load_single_file(config.source_checkpoint, config.model_type, dtype), 0


def damaged_working_dir(config: TrainingConfig, e: Exception) -> DreamboothError:
    """The working folder can't be read: named, with what was wrong and the way out."""
    why = e.message if isinstance(e, DreamboothError) else " ".join(str(e).split())[:200]
    return DreamboothError(
        f"The working model '{working_dir(config)}' is damaged ({type(e).__name__}: {why}); "
        "it can't be read.", "Delete that folder: the next run rebuilds it from the source "
        "checkpoint (what earlier runs of this model trained into it is lost; their saved "
        "checkpoints stay), or choose that checkpoint as the source.")


def read_source_ahead(config: TrainingConfig, dtype: torch.dtype | None = None) -> None:
    """Start reading what load_model(config, dtype=dtype) will load from the source file, if
    it will (single_file.read_ahead): not when the working folder goes on from it."""
    try:
        if _working_info(config) is None and config.model_type not in \
                FLUX_TYPES + SD35_TYPES:
            read_ahead(config.source_checkpoint, config.model_type, dtype)
    except (OSError, ValueError, DreamboothError):  # load_model says what is wrong
        pass


def _working_info(config: TrainingConfig) -> dict | None:
    """The working folder's record, when the folder came from this source."""
    info_path = working_dir(config) / INFO
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise damaged_working_dir(config, e) from None
        if not isinstance(info, dict) or not isinstance(info.get("model_type"), str):
            raise damaged_working_dir(config, ValueError(
                f"{INFO} holds {short_repr(info)}, not the model's record"))
        if {k: info.get(k) for k in ("source", "source_size", "source_mtime")} == \
                source_id(config.source_checkpoint):
            return info
    return None
