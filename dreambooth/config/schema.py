"""One configuration tree for the tab, the JSON file and the command line.

Standard library only: the WebUI process imports this module without torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import cloud
from .checks import (check_concept, check_embedding, check_fields, check_lora_and_buckets,
                     check_name, check_path_lengths, check_source, field_names, is_dir,
                     unknown_keys)
from .errors import ConfigError, Problem
from .fieldspec import spec_field as _f
from .flux import (FLUX_AE, FLUX_CLIP_L, FLUX_T5XXL, FLUX_TYPES, GUIDANCE_SCALE,
                   T5_TOKENIZER_DIR, check_flux)
from .sd35 import SD35_CLIP_G, SD35_CLIP_L, SD35_T5XXL, SD35_TYPES, SD35_VAE, check_sd35
from .levers import (ATTENTION_FIELD, BF16_WEIGHTS, CHECKPOINT_BLOCKS_FIELD, COMPILE_FIELD,
                     FP8_BASE, FUSED_OPTIMIZER, GRADIENT_CHECKPOINTING, MEMORY_PRESET)
from .migrate import SCHEMA_VERSION, migrate
from .network import (DORA_WD, GLORA_RANK, LOHA_ALPHA, LOHA_RANK, LOKR_ALPHA, LOKR_FACTOR,
                      LOKR_RANK, LORA_TARGETS, NETWORK, OFT_BLOCK_SIZE, OFT_CONSTRAINT,
                      TRAIN_NORM, check_network)
from .textfile import parse_json, read_config_text

MODEL_TYPES = ("v1x", "v2x-512", "v2x-768-v", "sdxl", *FLUX_TYPES, *SD35_TYPES)
OPTIMIZERS = ("adamw", "adamw_8bit", "lion", "prodigy", "adafactor")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine",
                 "cosine_with_restarts", "polynomial")
SAVE_PRECISION = ("fp32", "fp16", "bf16")
DETERMINISTIC = ("auto", "on", "off")
METHODS = ("dreambooth", "lora", "textual_inversion")


@dataclass(frozen=True)
class Concept:
    """One thing to teach: instance images + prompt, optionally a class for prior preservation."""

    instance_data_dir: str = _f("", "Folder with the images of your subject (jpg, png, webp).")
    instance_prompt: str = _f("", "Prompt for the instance images, e.g. 'photo of sks dog'. "
                                  "[filewords] is replaced by each image's caption (.txt beside it) "
                                  "or its file name.")
    class_prompt: str = _f("", "Prompt of the general class, e.g. 'photo of a dog'. Empty: no prior "
                               "preservation for this concept.")
    class_data_dir: str = _f("", "Folder for class images; missing ones are generated with the base "
                                 "model and saved there. Empty: a folder inside the model's work dir.")
    class_images_per_instance: int = _f(0, "Class images per instance image (0: no prior "
                                           "preservation).", minimum=0, maximum=1000)
    sample_prompt: str = _f("", "Prompt for preview images (empty: the instance prompt).")

    @property
    def uses_prior(self) -> bool:
        return bool(self.class_prompt.strip()) and self.class_images_per_instance > 0


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run needs. Defaults work; validate() lists every problem at once."""

    model_name: str = _f("my_model", "Name of the model; names the output files and the work folder.")
    source_checkpoint: str = _f("", "Single-file checkpoint to start from (.safetensors, or .ckpt "
                                    "loaded safely).")
    model_type: str = _f("v1x", "Architecture of the source checkpoint (flux-*: the transformer "
                                "file; its other parts are the flux_* fields; sd3.5-*: the "
                                "MMDiT file, other parts in it or the sd35_* fields).",
                         choices=MODEL_TYPES)
    flux_clip_l: str = FLUX_CLIP_L
    flux_t5xxl: str = FLUX_T5XXL
    flux_ae: str = FLUX_AE
    sd35_clip_l: str = SD35_CLIP_L
    sd35_clip_g: str = SD35_CLIP_G
    sd35_t5xxl: str = SD35_T5XXL
    sd35_vae: str = SD35_VAE
    t5_tokenizer_dir: str = T5_TOKENIZER_DIR
    method: str = _f("dreambooth", "What to train: 'dreambooth' (the whole model, a checkpoint to "
                                   "output_dir), 'lora' (a LoRA file to lora_dir; use_lora is the "
                                   "older spelling of this), 'textual_inversion' (only a new "
                                   "token's embedding, a file to embedding_dir).", choices=METHODS)
    output_dir: str = _f("", "Folder the trained .safetensors goes to (the WebUI's "
                             "models/Stable-diffusion from the tab). Empty: <work_dir>/<model_name>/output.")
    work_dir: str = _f("dreambooth_runs", "Folder holding each model's working copy, class images "
                                          "and samples.", advanced=True)
    concepts: tuple[Concept, ...] = field(default=(), metadata={
        "help": "What to train: a list of concepts.", "advanced": False, "choices": (),
        "minimum": None, "maximum": None})
    steps_per_image: int = _f(100, "Training steps per instance image (= epochs). Total steps = this "
                                   "x instance images / batch size.", minimum=1, maximum=100000)
    save_every_epochs: int = _f(0, "Save a checkpoint every N epochs (0: only at the end).",
                                minimum=0)
    sample_every_epochs: int = _f(0, "Write preview images every N epochs (0: never).", minimum=0)
    batch_size: int = _f(1, "Instance images per step.", minimum=1, maximum=256)
    gradient_accumulation_steps: int = _f(1, "Steps whose gradients add up before one update.",
                                          advanced=True, minimum=1, maximum=1024)
    learning_rate: float = _f(2e-6, "UNet learning rate.", minimum=0.0, maximum=1.0)
    text_encoder_learning_rate: float = _f(1e-6, "Text encoder learning rate.", advanced=True,
                                           minimum=0.0, maximum=1.0)
    lr_scheduler: str = _f("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS,
                           advanced=True)
    lr_warmup_steps: int = _f(0, "Warm-up steps of the schedule.", advanced=True, minimum=0)
    optimizer: str = _f("adamw", "Optimizer (adamw_8bit needs bitsandbytes; lion, prodigy need "
                                 "their packages).", choices=OPTIMIZERS)
    weight_decay: float = _f(1e-2, "AdamW weight decay.", advanced=True, minimum=0.0, maximum=1.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: off).", advanced=True, minimum=0.0)
    mixed_precision: str = _f("auto", "Mixed precision: auto (bf16 on a GPU that has it, else "
                              "fp16; none on a CPU), no (fp32), fp16, bf16 (fp16/bf16 need a "
                              "GPU that supports them).", choices=MIXED_PRECISION)
    attention: str = ATTENTION_FIELD
    gradient_checkpointing: bool = GRADIENT_CHECKPOINTING
    checkpoint_blocks: str = CHECKPOINT_BLOCKS_FIELD
    cache_latents: bool = _f(True, "Encode the images with the VAE once, not every step.")
    memory_preset: str = MEMORY_PRESET
    fused_optimizer: bool = FUSED_OPTIMIZER
    bf16_weights: bool = BF16_WEIGHTS
    fp8_base: bool = FP8_BASE
    compile: str = COMPILE_FIELD
    train_text_encoder: bool = _f(False, "Also train the text encoder.")
    text_encoder_steps_ratio: float = _f(1.0, "Train the text encoder for this fraction of the "
                                              "steps.", advanced=True, minimum=0.0, maximum=1.0)
    use_ema: bool = _f(False, "Keep an exponential moving average of the UNet and save it.",
                       advanced=True)
    ema_decay: float = _f(0.9999, "EMA decay.", advanced=True, minimum=0.0, maximum=1.0)
    prior_loss_weight: float = _f(1.0, "Weight of the class (prior preservation) loss.",
                                  minimum=0.0, maximum=100.0)
    resolution: int = _f(512, "Training resolution in pixels (multiple of 8).", minimum=8,
                         maximum=4096)
    center_crop: bool = _f(False, "Center crop instead of random crop.", advanced=True)
    hflip: bool = _f(False, "Randomly flip images horizontally.", advanced=True)
    offset_noise: float = _f(0.0, "Offset noise strength (0: off; 0.05-0.1 helps very dark/bright "
                                  "images).", advanced=True, minimum=0.0, maximum=1.0)
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma (0: off; 5 is usual).",
                              advanced=True, minimum=0.0, maximum=100.0)
    seed: int = _f(42, "Random seed (data order, noise, samples).", advanced=True, minimum=0,
                   maximum=2**32 - 1)
    deterministic: str = _f("auto", "'on': deterministic kernels, so the same config, images, "
                                    "machine, CPU thread count and package versions give "
                                    "bit-identical losses and weights, also across a kill and "
                                    "resume (some GPU kernels get slower); 'auto': on whenever "
                                    "training state is saved for resume (state_every_steps > 0); "
                                    "'off': the fastest kernels, results only statistically the "
                                    "same.", advanced=True, choices=DETERMINISTIC)
    cpu_threads: int = _f(0, "CPU threads for the maths (0: a CPU run takes the cores free at "
                             "its start, or OMP_NUM_THREADS; a GPU run, PyTorch's default). A "
                             "resume on another count goes on, close to but not bit-identical "
                             "with an uninterrupted run.", advanced=True, minimum=0, maximum=1024)
    save_precision: str = _f("fp32", "Precision of the saved checkpoint (fp16: 'half model').",
                             choices=SAVE_PRECISION)
    class_generation_steps: int = _f(20, "Denoising steps when generating class images.",
                                     advanced=True, minimum=1, maximum=1000)
    sample_steps: int = _f(20, "Denoising steps of preview images.", advanced=True, minimum=1,
                           maximum=1000)
    guidance_scale: float = GUIDANCE_SCALE
    overwrite: bool = _f(False, "Replace output files of the same name (otherwise refuse).",
                         advanced=True)
    state_every_steps: int = _f(500, "Save the full training state every N steps, so a run that "
                                     "was stopped or crashed can resume exactly (0: off).",
                                advanced=True, minimum=0)
    log_every_steps: int = _f(10, "Read the loss from the GPU every N steps (each read makes the "
                                  "computer wait for the GPU; 1: every step). Progress is "
                                  "reported every step either way; the loss chart gets a point "
                                  "per read.", advanced=True, minimum=1, maximum=100000)
    resume: str = _f("auto", "'auto': go on from the newest saved state of an unfinished run; "
                             "'never': start over; or the path of one saved state folder.",
                     advanced=True)
    use_lora: bool = _f(False, "Train a LoRA (a small file for the WebUI's Lora networks, "
                               "written to lora_dir) instead of the whole model: the older "
                               "spelling of method 'lora'.", advanced=True)
    network: str = NETWORK
    lora_rank: int = _f(16, "LoRA rank (dimension): larger learns more and makes a larger file.",
                        minimum=1, maximum=1024)
    lora_alpha: float = _f(16.0, "LoRA alpha: the LoRA's update is scaled by alpha / rank.",
                           advanced=True, minimum=0.001, maximum=10000.0)
    lora_targets: str = _f("transformer", "Which UNet layers the LoRA adapts. 'attention': the "
                                          "attention projections only; 'transformer' (kohya's "
                                          "default): every linear layer of the transformer blocks "
                                          "(attention, feed-forward, proj_in/out); "
                                          "'transformer+conv' (LoCon): also the ResNet blocks' "
                                          "convolutions, at lora_conv_rank / lora_conv_alpha. "
                                          "Text encoders: attention, plus the MLP unless "
                                          "'attention'.", advanced=True, choices=LORA_TARGETS)
    lora_conv_rank: int = _f(8, "With lora_targets 'transformer+conv', the rank of the ResNet "
                                "convolutions' LoRA.", advanced=True, minimum=1, maximum=1024)
    lora_conv_alpha: float = _f(8.0, "With lora_targets 'transformer+conv', the alpha of the "
                                     "ResNet convolutions' LoRA (scaled by alpha / rank).",
                                advanced=True, minimum=0.001, maximum=10000.0)
    loha_rank: int = LOHA_RANK
    loha_alpha: float = LOHA_ALPHA
    lokr_factor: int = LOKR_FACTOR
    lokr_rank: int = LOKR_RANK
    lokr_alpha: float = LOKR_ALPHA
    dora_wd: bool = DORA_WD
    glora_rank: int = GLORA_RANK
    oft_block_size: int = OFT_BLOCK_SIZE
    oft_constraint: float = OFT_CONSTRAINT
    train_norm: bool = TRAIN_NORM
    lora_text_encoder: bool = _f(False, "With use_lora, also train LoRA layers in the text "
                                        "encoder(s).")
    lora_learning_rate: float = _f(1e-4, "Learning rate of the UNet's LoRA layers.", minimum=0.0,
                                   maximum=1.0)
    lora_text_encoder_learning_rate: float = _f(5e-5, "Learning rate of the text encoder's LoRA "
                                                      "layers.", advanced=True, minimum=0.0,
                                                maximum=1.0)
    lora_dir: str = _f("", "Folder the LoRA file goes to (the WebUI's models/Lora from the tab). "
                           "Empty: <work_dir>/<model_name>/lora.")
    lora_merge: bool = _f(False, "With use_lora, also save a full checkpoint with the LoRA merged "
                                 "in (to output_dir; Flux: the transformer alone).", advanced=True)
    pivotal: bool = _f(False, "With method lora, pivotal tuning: also train an embedding of "
                              "embedding_token (written to embedding_dir beside the LoRA, same "
                              "step numbers).")
    embedding_token: str = _f("", "With textual_inversion or pivotal: the word in the instance "
                                  "prompts whose embedding is learnt, e.g. 'sks' in 'photo of sks "
                                  "dog'. In the WebUI you write the embedding's file name "
                                  "(<model_name>_<step>) in its place.")
    embedding_init_word: str = _f("*", "The word (one token) whose embedding the new one starts "
                                       "from, e.g. the class word 'dog'.")
    embedding_vectors: int = _f(1, "Vectors of the embedding (tokens of the prompt it takes).",
                                advanced=True, minimum=1, maximum=16)
    embedding_learning_rate: float = _f(5e-3, "Learning rate of the embedding.", minimum=0.0,
                                        maximum=1.0)
    embedding_dir: str = _f("", "Folder the embedding goes to (the WebUI's embeddings folder "
                                "from the tab). Empty: <work_dir>/<model_name>/embeddings.")
    bucketing: bool = _f(False, "Aspect-ratio bucketing: train each image at the size (multiples "
                                "of 64, about resolution x resolution pixels) closest to its shape "
                                "instead of a square crop; each batch comes from one size.")
    bucket_no_upscale: bool = _f(False, "With bucketing, never enlarge an image: a smaller image "
                                        "gets a size of its own.", advanced=True)
    log_with: str = cloud.LOG_WITH  # run tracking: defined in cloud.py
    logging_dir: str = cloud.LOGGING_DIR

    # -- derived ---------------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        return Path(self.work_dir) / self.model_name

    @property
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else self.model_dir / "output"

    @property
    def resolved_lora_dir(self) -> Path:
        return Path(self.lora_dir) if self.lora_dir else self.model_dir / "lora"

    @property
    def resolved_embedding_dir(self) -> Path:
        return Path(self.embedding_dir) if self.embedding_dir else self.model_dir / "embeddings"

    @property
    def trains_embedding(self) -> bool:
        """A new token's embedding learns: textual inversion, or a pivotal LoRA."""
        return self.method == "textual_inversion" or (self.method == "lora"
                                                      and self.pivotal is True)

    @property
    def is_deterministic(self) -> bool:
        return self.deterministic == "on" or (self.deterministic == "auto"
                                              and bool(self.state_every_steps))

    @property
    def trains_text_encoder(self) -> bool:
        """The text encoder(s) learn: fully, through LoRA layers, or a new token's embedding."""
        return self.train_text_encoder or (self.use_lora and self.lora_text_encoder) \
            or self.trains_embedding

    def __post_init__(self) -> None:
        # `use_lora` is the older spelling of method 'lora': the two agree after construction
        # (a conflict, use_lora with textual_inversion, is left for validate() to name)
        if self.use_lora is True and self.method == "dreambooth":
            object.__setattr__(self, "method", "lora")
        elif self.method == "lora" and self.use_lora is False:
            object.__setattr__(self, "use_lora", True)

    def replace(self, **changes: Any) -> "TrainingConfig":
        """A copy with `changes`; changing one of method / use_lora changes the other too."""
        if "method" in changes and "use_lora" not in changes:
            changes["use_lora"] = changes["method"] == "lora"
        elif "use_lora" in changes and "method" not in changes:
            changes["method"] = "lora" if changes["use_lora"] else \
                "dreambooth" if self.method == "lora" else self.method
        return dataclasses.replace(self, **changes)

    # -- validation ------------------------------------------------------------------------
    def validate(self, check_paths: bool = True) -> list["Problem"]:
        """Every problem with this config, in words a user understands. Empty list: all good."""
        problems = check_fields(self, "")
        problems += check_name(self.model_name)
        if not self.concepts:
            problems.append(Problem("concepts", [], "no concept is given",
                                    "add at least one concept with an instance folder and prompt"))
        for i, concept in enumerate(self.concepts):
            if not isinstance(concept, Concept):
                problems.append(Problem(f"concepts[{i}]", concept, "is not a concept",
                                        "give an object with instance_data_dir and instance_prompt"))
                continue
            problems += check_fields(concept, f"concepts[{i}].")
            problems += check_concept(concept, i, check_paths)
        if isinstance(self.resolution, int) and not isinstance(self.resolution, bool) \
                and self.resolution % 8:
            problems.append(Problem("resolution", self.resolution, "is not a multiple of 8",
                                    f"use {max(8, self.resolution // 8 * 8)}"))
        if check_paths:
            problems += check_source(self.source_checkpoint)
        problems += check_lora_and_buckets(self) + check_path_lengths(self) + check_network(self)
        problems += check_embedding(self) + check_flux(self, check_paths) + \
            check_sd35(self, check_paths)
        if isinstance(self.resume, str) and self.resume not in ("auto", "never") and (
                not self.resume.strip() or (check_paths and not is_dir(self.resume))):
            problems.append(Problem("resume", self.resume, "is not 'auto', 'never' or an "
                                    "existing saved-state folder",
                                    "use 'auto', 'never', or a step_* folder of the model's state"))
        return problems

    def check(self, check_paths: bool = True) -> "TrainingConfig":
        """Raise ConfigError listing every problem, or return self."""
        problems = self.validate(check_paths)
        if problems:
            raise ConfigError(problems)
        return self

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"schema_version": SCHEMA_VERSION}
        d.update(dataclasses.asdict(self))
        d["concepts"] = [dataclasses.asdict(c) for c in self.concepts]
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingConfig":
        if not isinstance(data, dict):
            raise ConfigError([Problem("(file)", type(data).__name__, "is not a JSON object",
                                       "the file must hold one {...} object")])
        data = migrate(dict(data))
        problems = unknown_keys(data, cls, "")
        concepts_raw = data.pop("concepts", [])
        if not isinstance(concepts_raw, list):
            problems.append(Problem("concepts", concepts_raw, "is not a list",
                                    "give a list of concept objects"))
            concepts_raw = []
        concepts = []
        for i, c in enumerate(concepts_raw):
            if not isinstance(c, dict):
                problems.append(Problem(f"concepts[{i}]", c, "is not an object",
                                        "give {\"instance_data_dir\": ..., \"instance_prompt\": ...}"))
                continue
            problems += unknown_keys(c, Concept, f"concepts[{i}].")
            concepts.append(Concept(**{k: v for k, v in c.items() if k in field_names(Concept)}))
        if problems:
            raise ConfigError(problems)
        known = {k: v for k, v in data.items() if k in field_names(cls)}
        return cls(concepts=tuple(concepts), **known)

    @classmethod
    def from_json(cls, text: str) -> "TrainingConfig":
        return cls.from_dict(parse_json(text, "(file)"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainingConfig":
        p = Path(path)
        if not p.is_file():
            raise ConfigError([Problem("--config", str(p), "does not exist",
                                       "give the path of a JSON config file")])
        return cls.from_json(read_config_text(p))


def field_help() -> list[tuple[str, str, Any, bool]]:
    """(name, help, default, advanced) of every setting: for the README and the UI."""
    rows = []
    for cls, prefix in ((TrainingConfig, ""), (Concept, "concepts[].")):
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append((prefix + f.name, f.metadata.get("help", ""), default,
                         bool(f.metadata.get("advanced"))))
    return rows
