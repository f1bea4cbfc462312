"""Which config field shows where, and widget values <-> TrainingConfig. Standard library only.

Widgets are keyed by field name ("learning_rate", "concepts[0].instance_prompt"), never by
position; the layout below only groups names. A field missing from the layout still gets a
widget (under "Advanced / other"), so a new config field can never be left out of the tab.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import Concept, TrainingConfig
from ..config.sd35 import FLOW_TYPES

MAX_CONCEPTS = 4

# Sections of the tab and the fields they hold, in order. BASIC: the ~15 controls a first-time
# user needs; every other field shows under the section's "Advanced" accordion.
SECTIONS: dict[str, tuple[str, ...]] = {
    "Model": ("model_name", "source_checkpoint", "model_type", "work_dir", "resume",
              "flux_clip_l", "flux_t5xxl", "flux_ae", "sd35_clip_l", "sd35_clip_g",
              "sd35_t5xxl", "sd35_vae", "t5_tokenizer_dir"),
    "Parameters": ("steps_per_image", "batch_size", "learning_rate", "resolution",
                   "optimizer", "mixed_precision", "attention", "cache_latents",
                   "memory_preset", "train_text_encoder", "prior_loss_weight", "sample_every_epochs",
                   "method", "network", "lora_rank", "embedding_token", "embedding_init_word",
                   "save_every_epochs", "gradient_checkpointing", "checkpoint_blocks",
                   "lr_scheduler", "lr_warmup_steps", "use_ema", "ema_decay",
                   "text_encoder_learning_rate", "text_encoder_steps_ratio",
                   "gradient_accumulation_steps", "weight_decay", "max_grad_norm", "center_crop",
                   "hflip", "bucketing", "bucket_no_upscale", "offset_noise", "min_snr_gamma",
                   "seed", "class_generation_steps", "sample_steps", "guidance_scale",
                   "lora_alpha", "lora_targets", "lora_conv_rank", "lora_conv_alpha",
                   "loha_rank", "loha_alpha", "lokr_factor", "lokr_rank", "lokr_alpha",
                   "dora_wd", "glora_rank", "oft_block_size", "oft_constraint", "train_norm",
                   "lora_learning_rate", "lora_text_encoder",
                   "lora_text_encoder_learning_rate", "pivotal",
                   "embedding_vectors", "embedding_learning_rate", "state_every_steps",
                   "log_every_steps", "fused_optimizer", "bf16_weights", "fp8_base",
                   "compile"),
    "Saving": ("output_dir", "save_precision", "lora_dir", "lora_merge", "embedding_dir",
               "overwrite", "log_with", "logging_dir"),
}
BASIC = frozenset({
    "model_name", "source_checkpoint", "model_type", "steps_per_image", "batch_size",
    "learning_rate", "resolution", "optimizer", "mixed_precision", "attention", "cache_latents",
    "memory_preset",
    "train_text_encoder", "prior_loss_weight", "sample_every_epochs", "method", "lora_rank",
    "output_dir", "save_precision",
})
CONCEPT_BASIC = frozenset({"instance_data_dir", "instance_prompt", "class_prompt",
                           "class_images_per_instance", "sample_prompt"})
LABELS = {
    "model_name": "Name", "source_checkpoint": "Source checkpoint",
    "model_type": "Model type", "steps_per_image": "Training steps per image (epochs)",
    "save_every_epochs": "Save a checkpoint every N epochs (0: at the end)",
    "sample_every_epochs": "Preview images every N epochs (0: never)",
    "batch_size": "Batch size", "learning_rate": "Learning rate",
    "mixed_precision": "Mixed precision", "attention": "Memory attention",
    "cache_latents": "Cache latents", "train_text_encoder": "Train text encoder",
    "use_ema": "EMA", "prior_loss_weight": "Prior loss weight", "resolution": "Resolution",
    "output_dir": "Save to folder", "save_precision": "Save precision (fp16: half model)",
    "lr_scheduler": "Learning-rate scheduler", "optimizer": "Optimizer",
    "instance_data_dir": "Instance images folder", "instance_prompt": "Instance prompt",
    "class_prompt": "Class prompt", "class_data_dir": "Class images folder",
    "class_images_per_instance": "Class images per instance image",
    "sample_prompt": "Sample prompt", "use_lora": "Train a LoRA (older switch: Method lora)",
    "lora_rank": "LoRA rank",
    "lora_targets": "LoRA layers", "lora_conv_rank": "LoRA conv rank",
    "lora_conv_alpha": "LoRA conv alpha",
    "network": "Network (LoRA, LoCon, LoHa, LoKr, DoRA, IA3, Full, GLoRA, OFT)", "loha_rank": "LoHa rank",
    "loha_alpha": "LoHa alpha", "lokr_factor": "LoKr factor (-1: balanced)",
    "lokr_rank": "LoKr rank (0: full matrix)", "lokr_alpha": "LoKr alpha",
    "dora_wd": "DoRA magnitude on LoHa / LoKr", "glora_rank": "GLoRA rank",
    "oft_block_size": "OFT block size", "oft_constraint": "OFT constraint (0: none)",
    "train_norm": "Also train the UNet's transformer norms",
    "lora_dir": "Save LoRA to folder", "resume": "Resume", "memory_preset": "GPU memory preset",
    "fused_optimizer": "Fused optimizer (update in backward)", "bf16_weights": "bf16 weights",
    "fp8_base": "fp8 frozen UNet (LoRA, textual inversion)",
    "work_dir": "Working folder", "gradient_accumulation_steps": "Gradient accumulation steps",
    "text_encoder_learning_rate": "Text encoder learning rate",
    "lr_warmup_steps": "Learning-rate warm-up steps", "weight_decay": "Weight decay",
    "max_grad_norm": "Gradient clipping (max norm)",
    "gradient_checkpointing": "Gradient checkpointing (less memory, slower)",
    "checkpoint_blocks": "Checkpointed blocks (selective: the memory-heavy ones only)",
    "text_encoder_steps_ratio": "Text encoder: share of the steps it trains",
    "ema_decay": "EMA decay", "center_crop": "Center crop", "hflip": "Random horizontal flip",
    "offset_noise": "Offset noise", "min_snr_gamma": "Min-SNR gamma", "seed": "Seed",
    "deterministic": "Reproducible (deterministic) maths", "cpu_threads": "CPU threads",
    "class_generation_steps": "Class image sampling steps",
    "sample_steps": "Preview sampling steps", "guidance_scale": "Guidance scale (CFG)",
    "overwrite": "Overwrite files of the same name",
    "state_every_steps": "Save the resumable state every N steps",
    "log_every_steps": "Read the loss every N steps",
    "lora_alpha": "LoRA alpha", "lora_text_encoder": "LoRA in the text encoder too",
    "lora_learning_rate": "LoRA learning rate",
    "lora_text_encoder_learning_rate": "LoRA text encoder learning rate",
    "lora_merge": "Also save a checkpoint with the LoRA merged in",
    "bucketing": "Aspect-ratio bucketing", "bucket_no_upscale": "Buckets: never upscale",
    "compile": "Compile the UNet (torch.compile)",
    "method": "Method (what to train)",
    "pivotal": "Pivotal tuning: train the token's embedding with the LoRA",
    "embedding_token": "Embedding token (the word in the instance prompt)",
    "embedding_init_word": "Embedding starts from the word",
    "embedding_vectors": "Embedding vectors per token",
    "embedding_learning_rate": "Embedding learning rate",
    "embedding_dir": "Save embedding to folder",
    "log_with": "Run tracking (TensorBoard, wandb, MLflow ...)",
    "logging_dir": "Tracking folder",
    "flux_clip_l": "Flux: CLIP-L file", "flux_t5xxl": "Flux: T5-XXL file",
    "flux_ae": "Flux: autoencoder (ae) file",
    "t5_tokenizer_dir": "Flux/SD3.5: T5 tokenizer folder",
    "sd35_clip_l": "SD3.5: CLIP-L file", "sd35_clip_g": "SD3.5: CLIP-G file",
    "sd35_t5xxl": "SD3.5: T5-XXL file", "sd35_vae": "SD3.5: VAE file",
}


# Older spellings of a field the tab shows: no widget of their own (two widgets for one setting
# would disagree, and the older one would win), the config keeps reading them from JSON/CLI.
ALIASES = {"use_lora": "method"}


@dataclass(frozen=True)
class WidgetSpec:
    """What the tab builds for one field: its key, kind and limits, from the field's metadata."""

    key: str  # "learning_rate" or "concepts[0].instance_prompt"
    name: str  # the dataclass field name
    kind: str  # dropdown | checkbox | int | float | text
    label: str
    help: str
    default: Any
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    advanced: bool = False


def _kind(f: dataclasses.Field) -> str:
    if f.metadata.get("choices"):
        return "dropdown"
    return {"bool": "checkbox", "int": "int", "float": "float"}.get(str(f.type), "text")


def _spec(f: dataclasses.Field, key: str, basic: frozenset) -> WidgetSpec:
    meta = f.metadata
    return WidgetSpec(key=key, name=f.name, kind=_kind(f),
                      label=LABELS.get(f.name, f.name.replace("_", " ").capitalize()),
                      help=meta.get("help", ""), default=f.default,
                      choices=tuple(meta.get("choices") or ()), minimum=meta.get("minimum"),
                      maximum=meta.get("maximum"), advanced=f.name not in basic)


def config_specs() -> dict[str, list[WidgetSpec]]:
    """Section name -> widget specs of the TrainingConfig fields (all but `concepts`)."""
    by_name = {f.name: f for f in dataclasses.fields(TrainingConfig)
               if f.name != "concepts" and f.name not in ALIASES}
    out: dict[str, list[WidgetSpec]] = {}
    placed: set[str] = set()
    for section, names in SECTIONS.items():
        out[section] = [_spec(by_name[n], n, BASIC) for n in names if n in by_name]
        placed.update(n for n in names if n in by_name)
    rest = [_spec(f, n, frozenset()) for n, f in by_name.items() if n not in placed]
    if rest:
        out["Other"] = rest
    return out


def host_model_types(spec: WidgetSpec, host) -> WidgetSpec:
    """The model type widget as `host` can use it: only the types it loads (Host.model_types),
    and, where that leaves out Flux or SD3.5, its note why."""
    allowed = getattr(host, "model_types", None)
    if allowed is None:
        return spec
    left_out = [c for c in spec.choices if c not in allowed]
    note = f" {host.no_flux_note}" if any(c in FLOW_TYPES for c in left_out) \
        else ""
    return dataclasses.replace(spec, choices=tuple(c for c in spec.choices if c in allowed),
                               help=spec.help + note)


def concept_specs(index: int) -> list[WidgetSpec]:
    return [_spec(f, f"concepts[{index}].{f.name}", CONCEPT_BASIC)
            for f in dataclasses.fields(Concept)]


def all_keys() -> list[str]:
    keys = [s.key for specs in config_specs().values() for s in specs]
    return keys + [s.key for i in range(MAX_CONCEPTS) for s in concept_specs(i)]


def coerce(spec: WidgetSpec, value: Any) -> Any:
    """A widget's value as the field's type (gradio's Number gives floats; text may be None)."""
    if value is None:
        return spec.default
    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if spec.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if spec.kind == "text" and isinstance(value, str):
        return value.strip()
    return value


def _is_blank(concept: dict) -> bool:
    return not any(str(v).strip() for k, v in concept.items()
                   if k in ("instance_data_dir", "instance_prompt"))


def values_to_config(values: dict[str, Any], concept_count: int = MAX_CONCEPTS
                     ) -> TrainingConfig:
    """Widget values (by key) -> TrainingConfig. Concepts past `concept_count` and concepts
    with neither folder nor prompt are left out. Raises ConfigError for unknown/bad types."""
    specs = {s.key: s for ss in config_specs().values() for s in ss}
    data: dict[str, Any] = {k: coerce(specs[k], v) for k, v in values.items() if k in specs}
    data.update({k: v for k, v in values.items() if k in ALIASES})  # a caller's older spelling
    concepts = []
    for i in range(min(concept_count, MAX_CONCEPTS)):
        c = {s.name: coerce(s, values[s.key]) for s in concept_specs(i) if s.key in values}
        if c and not _is_blank(c):
            concepts.append(c)
    data["concepts"] = concepts
    unknown = set(values) - set(specs) - set(ALIASES) - {s.key for i in range(MAX_CONCEPTS)
                                                         for s in concept_specs(i)}
    if unknown:
        raise KeyError(f"values for unknown widgets: {sorted(unknown)}")
    return TrainingConfig.from_dict(data)


def config_to_values(config: TrainingConfig) -> tuple[dict[str, Any], int]:
    """TrainingConfig -> widget values by key, and how many concept panels to show."""
    values = {s.key: getattr(config, s.name) for ss in config_specs().values() for s in ss}
    for i in range(MAX_CONCEPTS):
        concept = config.concepts[i] if i < len(config.concepts) else Concept()
        values.update({s.key: getattr(concept, s.name) for s in concept_specs(i)})
    return values, max(1, min(len(config.concepts), MAX_CONCEPTS))
