"""The embedded default: a tiny model and sample images, a real run, a checkpoint out."""
from __future__ import annotations

from pathlib import Path

from ..config import Concept, TrainingConfig
from ..config.sd35 import FLOW_TYPES
from ..model.tiny import TINY_RESOLUTION, make_tiny_checkpoint, write_images


def demo_config(out: Path, model_type: str = "v1x", steps_per_image: int = 30,
                lora: bool = False) -> TrainingConfig:
    """Write the demo's inputs under `out` and return the config that trains on them (a LoRA
    into out/output with `lora`)."""
    out.mkdir(parents=True, exist_ok=True)
    if model_type in FLOW_TYPES:
        return _flow_demo(out, model_type, steps_per_image)
    source = out / f"tiny_{model_type}.safetensors"
    if not source.exists():
        make_tiny_checkpoint(source, model_type)
    instance = out / "instance_images"
    if not instance.exists():
        write_images(instance, "checker", 4)
    return TrainingConfig(
        model_name=f"demo_{model_type}" + ("_lora" if lora else ""), source_checkpoint=str(source), model_type=model_type,
        work_dir=str(out / "models"), output_dir=str(out / "output"),
        concepts=(Concept(instance_data_dir=str(instance), instance_prompt="photo of sks pattern",
                          class_prompt="photo of a pattern", class_images_per_instance=1),),
        steps_per_image=steps_per_image, learning_rate=1e-4, resolution=TINY_RESOLUTION,
        center_crop=True, sample_every_epochs=steps_per_image, class_generation_steps=4,
        sample_steps=4, overwrite=True, seed=0,
        use_lora=lora, lora_dir=str(out / "output"), lora_rank=4, lora_alpha=4.0,
        lora_learning_rate=1e-3)


def _flow_demo(out: Path, model_type: str, steps_per_image: int) -> TrainingConfig:
    """A tiny Flux's files (transformer, clip_l, t5xxl, ae, a T5 tokenizer) or a tiny SD3.5's
    (an all-in-one file, a T5 tokenizer) and a LoRA run on them."""
    from ..model.tiny_flux import make_tiny_flux
    from ..model.tiny_sd35 import make_tiny_sd35
    files = make_tiny_flux(out / "flux", model_type) if model_type.startswith("flux") else \
        make_tiny_sd35(out / "sd35", model_type)
    instance = out / "instance_images"
    if not instance.exists():
        write_images(instance, "checker", 4)
    return TrainingConfig(
        model_name=f"demo_{model_type}_lora", model_type=model_type, method="lora",
        work_dir=str(out / "models"), lora_dir=str(out / "output"),
        concepts=(Concept(instance_data_dir=str(instance), instance_prompt="photo of sks dog"),),
        steps_per_image=steps_per_image, resolution=32, center_crop=True, overwrite=True,
        seed=0, lora_rank=4, lora_alpha=4.0, lora_learning_rate=1e-2, **files)
