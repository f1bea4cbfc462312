"""What is benchmarked: the model, the synthetic images, the configurations and their settings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dreambooth.model.tiny import TINY_RESOLUTION as TINY  # noqa: F401  (cli reads C.TINY)

IMAGES = 8  # instance images, and as many class images (enough for batch 8)


@dataclass(frozen=True)
class Case:
    name: str
    batch_size: int = 1
    train_text_encoder: bool = False
    prior: bool = False
    lora_rank: int = 0  # 0: full fine-tune
    skip: str = ""  # why it is not run
    model_type: str = "v1x"
    resolution: int = 512  # on a GPU (smoke: the tiny size)
    # time each run alone, built and closed in turn, not alternating in rounds: four runs
    # parked on the host would not fit in its memory (SDXL full: about 135 GB)
    alone: bool = False

    @property
    def images_per_step(self) -> int:
        """Images through the UNet per step (the class half counts with prior preservation)."""
        return self.batch_size * (2 if self.prior else 1)


@dataclass(frozen=True)
class Data:
    instance: tuple
    classes: tuple
    resolution: int
    prompt: str = "photo of sks dog"
    class_prompt: str = "photo of a dog"

    @property
    def instance_dir(self) -> str:
        return str(Path(self.instance[0]).parent)

    @property
    def class_dir(self) -> str:
        return str(Path(self.classes[0]).parent)


def cases() -> list[Case]:
    lora = _lora_skip()
    sdxl = _sdxl_skip()
    return [Case("full_bs1"), Case("full_bs8", batch_size=8),
            Case("text_encoder_bs1", train_text_encoder=True),
            Case("prior_bs1", prior=True),
            Case("lora_r16_bs1", lora_rank=16, skip=lora),
            Case("sdxl_lora_1024", lora_rank=16, model_type="sdxl", resolution=1024,
                 skip="; ".join(x for x in (lora and f"LoRA {lora}", sdxl and f"SDXL {sdxl}")
                                if x)),
            Case("sdxl_full_1024", model_type="sdxl", resolution=1024, skip=sdxl,
                 alone=True)]


def _lora_skip() -> str:
    from dreambooth.config import TrainingConfig
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    wanted = {"use_lora", "lora_rank", "lora_alpha", "lora_learning_rate"}
    return "" if wanted <= names else "not implemented"


def _sdxl_skip() -> str:
    from dreambooth.model.spec import SPECS
    return "" if "sdxl" in SPECS else "not implemented (no 'sdxl' model type yet)"


def build_model(smoke: bool, model_type: str = "v1x"):
    """A randomly initialised model of the real architecture (or the tiny one)."""
    from dreambooth.model.components import build_random
    from dreambooth.model.spec import shipped_configs
    from dreambooth.model.tiny import tiny_configs
    configs = tiny_configs(model_type) if smoke else shipped_configs(model_type)
    return build_random(model_type, configs, seed=0)


class Models:
    """The base model of each type, built when first asked for; one held at a time (SDXL's
    is ~14 GB in fp32, and the runs copy it)."""

    def __init__(self, smoke: bool) -> None:
        self.smoke, self.model_type, self.comp = smoke, None, None

    def get(self, model_type: str):
        if model_type != self.model_type:
            from .measure import release
            self.model_type, self.comp = None, None  # the old one goes before the new one comes
            release()
            self.comp, self.model_type = build_model(self.smoke, model_type), model_type
        return self.comp


def write_data(folder: Path, resolution: int) -> Data:
    from dreambooth.model.tiny import write_images
    instance = write_images(folder / "instance", "checker", IMAGES, size=resolution)
    classes = write_images(folder / "class", "blob", IMAGES, size=resolution, seed=100)
    return Data(tuple(map(str, instance)), tuple(map(str, classes)), resolution)


def our_config(case: Case, data: Data, work: Path, precision: str, best: bool,
               preset: str = "off"):
    """Our settings matching the reference's (best=False), or our best ones (best=True); with
    preset='lowest', the memory preset applied on top of the best ones."""
    from dreambooth.config import Concept, TrainingConfig
    concept = Concept(data.instance_dir, data.prompt,
                      data.class_prompt if case.prior else "",
                      data.class_dir if case.prior else "", 1 if case.prior else 0)
    tag = preset if preset != "off" else "best" if best else "same"
    lora = {"use_lora": True, "lora_rank": case.lora_rank, "lora_alpha": float(case.lora_rank),
            "lora_learning_rate": 5e-4} if case.lora_rank else {}
    if lora and "lora_targets" in {f.name for f in dataclasses.fields(TrainingConfig)}:
        lora["lora_targets"] = "attention"  # the reference script's set, for a like-for-like run
    return TrainingConfig(**lora,
        model_name=f"bench_{case.name}_{tag}", source_checkpoint="(built in memory)",
        model_type=case.model_type,
        work_dir=str(work / "runs"), output_dir=str(work / "out"), concepts=(concept,),
        resolution=data.resolution, batch_size=case.batch_size,
        train_text_encoder=case.train_text_encoder, learning_rate=5e-6,
        text_encoder_learning_rate=5e-6, weight_decay=1e-2, max_grad_norm=1.0,
        lr_scheduler="constant", optimizer="adamw", mixed_precision=precision,
        attention="sdpa",  # the processor diffusers installs by default on torch 2
        gradient_checkpointing=False, cache_latents=best, steps_per_image=100000, seed=0,
        memory_preset=preset, state_every_steps=0)
