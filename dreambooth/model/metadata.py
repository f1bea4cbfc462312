"""The SAI model spec (`modelspec.*`) every output carries: what the WebUI, ComfyUI and model
sites read to know a file's architecture, resolution and prediction type without guessing."""
from __future__ import annotations

from datetime import datetime, timezone

SPEC_VERSION = "1.0.0"
IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"  # the single-file layout
IMPL_DIFFUSERS = "diffusers"  # module names of diffusers (kohya LoRAs of SD 1.x/2.x)
IMPL_BFL = "https://github.com/black-forest-labs/flux"  # Flux: BFL's module names
PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "v": "v", "flow": "flow"}


def model_metadata(spec, title: str, given: dict, lora: bool = False) -> dict:
    """modelspec.* for a file of `spec` (a LoRA when `lora`), completed with and overridden
    by `given` (title, trigger phrase, resolution, ...); prediction type in the spec's words."""
    impl = IMPL_BFL if spec.family == "flux" else \
        IMPL_STABILITY if not lora or spec.family in ("sdxl", "sd3") else IMPL_DIFFUSERS
    meta = {"modelspec.sai_model_spec": SPEC_VERSION,
            "modelspec.architecture": spec.architecture + ("/lora" if lora else ""),
            "modelspec.implementation": impl, "modelspec.title": title,
            "modelspec.resolution": f"{spec.resolution}x{spec.resolution}",
            "modelspec.prediction_type": PREDICTION[spec.prediction_type],
            "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    meta.update(given)
    kind = meta.get("modelspec.prediction_type")
    meta["modelspec.prediction_type"] = PREDICTION.get(kind, kind)
    return meta


def training_metadata(cfg, spec, steps: int) -> dict:
    """What a trained output says about its training: title, trigger phrase, resolution, the
    config as JSON and the step count (the trainer passes this to every save)."""
    trigger = ", ".join(dict.fromkeys(c.instance_prompt for c in cfg.concepts))
    return {"dreambooth.config": cfg.to_json(indent=0), "dreambooth.trigger_words": trigger,
            "dreambooth.steps": str(steps), "modelspec.title": cfg.model_name,
            "modelspec.trigger_phrase": trigger,
            "modelspec.description": f"DreamBooth of {spec.title}, {steps} steps",
            "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}"}
