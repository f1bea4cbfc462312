"""The DreamBooth training run: load, set up, train, sample, save.

`train(config, on_event, cancel)` is the one entry point: the CLI, the WebUI tab (through the
CLI in a child process) and Python users all call it.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import backends, buckets, events as ev
from .buckets import load_bucketed
from .checkpoint import write_text
from .config import TrainingConfig
from .data import Item, instance_items
from .errors import DreamboothError, TrainingError
from .loss import compute_loss, noise_like
from .lora import add_lora, merged_state, save_lora, ss_metadata
from .metadata import training_metadata
from .models import Components, encode_prompts, load_single_file, load_working_dir, \
    save_single_file, save_working_dir, te_state, unet_kwargs
from .state import ModelLock, choose_snapshot, snapshot_info, clear_snapshots, fresh_rng, load_snapshot, \
    save_snapshot
from .sampling import ensure_class_images, generate_images, make_pipeline, slug


@dataclass
class TrainResult:
    path: Path | None
    steps: int
    saved: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    cancelled: bool = False


def train(config: TrainingConfig, on_event=None, cancel: ev.CancelToken | None = None
          ) -> TrainResult:
    """Train as `config` says; report through `on_event`; stop cleanly when `cancel` is set."""
    emit = ev.EventBus(on_event)
    trainer = None
    try:
        config.check()
        trainer = Trainer(config, emit, cancel or ev.CancelToken())
        return trainer.run()
    except DreamboothError as e:
        emit(ev.Failed(e.message, e.hint))
        raise
    except torch.cuda.OutOfMemoryError:
        release_memory()
        err = TrainingError("The GPU ran out of memory.",
                            oom_advice(trainer.cfg if trainer else config, gpu_total_memory()))
        emit(ev.Failed(err.message, err.hint))
        raise err from None
    except Exception as e:
        emit(ev.Failed(f"Training failed unexpectedly: {type(e).__name__}: {e}",
                       "This is a bug; please report it with the log."))
        raise
    finally:
        release_memory()


def gpu_total_memory() -> int | None:
    return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None


def oom_advice(cfg: TrainingConfig, total: int | None) -> str:
    """What to change after running out of GPU memory: the memory advice for the whole GPU."""
    kept = " Nothing was lost: the checkpoints and saved states written so far are intact."
    generic = ("Lower the batch size or resolution, turn on gradient checkpointing and latent "
               "caching, use 8-bit AdamW, stop training the text encoder, or set memory_preset "
               "to 'lowest'.")
    if total is None:
        return generic + kept
    try:
        from .memory import suggest
        advice = suggest(cfg, total, "fp16" if torch.cuda.is_available()
                         and not torch.cuda.is_bf16_supported() else "bf16")
    except Exception:  # the advice is a courtesy; the failure must still be reported
        return generic + kept
    if not advice.changes:
        return generic + kept
    return (f"With {total / 2**30:.1f} GiB on this GPU: " + advice.message.split(". ", 1)[1]
            + " Or set memory_preset to 'lowest' for the least memory." + kept)


def release_memory() -> None:
    """Give the GPU memory of a finished, failed or cancelled run back (the models are gone)."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def working_dir(config: TrainingConfig) -> Path:
    return config.model_dir / "working"


def _source_id(path: str) -> dict:
    p = Path(path).resolve()
    st = p.stat()
    return {"source": str(p), "source_size": st.st_size, "source_mtime": int(st.st_mtime)}


def load_model(config: TrainingConfig, say) -> tuple[Components, int]:
    """The working model: the model's own working folder when it came from this source (to go
    on training it), else a fresh conversion of the source checkpoint. Returns (model, revision)."""
    info_path = working_dir(config) / "dreambooth_model.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if {k: info.get(k) for k in ("source", "source_size", "source_mtime")} == \
                _source_id(config.source_checkpoint):
            say(f"Continuing from the working model at revision {info.get('revision', 0)}.")
            return load_working_dir(working_dir(config)), int(info.get("revision", 0))
    return load_single_file(config.source_checkpoint, config.model_type), 0


class Trainer:
    def __init__(self, cfg: TrainingConfig, emit, cancel: ev.CancelToken) -> None:
        self.cfg, self.emit, self.cancel = cfg, emit, cancel
        self.said: set[str] = set()

    def say(self, text: str, level: str = "info") -> None:
        if text not in self.said:
            self.said.add(text)
            self.emit(ev.Message(text, level))

    def warn(self, text: str) -> None:
        self.say(text, "warning")

    # -- set-up --------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator
        cfg = self.cfg
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg = cfg = self.plan_memory(cfg, device)
        self.precision = backends.resolve_precision(cfg.mixed_precision, device, self.warn)
        # a second run in one process (a notebook, the benchmark) may differ in precision:
        # accelerate keeps the first run's settings process-wide unless they are cleared
        # (the distributed state, which a launcher set up, is kept)
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state()
        GradientState._reset_state()
        # cpu=True on a machine without CUDA: else accelerate >= 1.x treats each of N launched
        # CPU processes as a separate single-process run (N copies racing on the same files)
        self.acc = Accelerator(mixed_precision=self.precision, cpu=device.type == "cpu",
                               gradient_accumulation_steps=cfg.gradient_accumulation_steps)
        self.device, self.dtype = self.acc.device, backends.WEIGHT_DTYPES[self.precision]
        self.comp, self.revision = load_model(cfg, self.say)
        self.resume_from = choose_snapshot(cfg, cfg.model_dir)
        if self.resume_from is not None:
            self.revision = snapshot_info(self.resume_from)["revision"]
        # trained weights in fp32 (bf16 with bf16_weights); frozen ones, a LoRA's base included,
        # in the mixed precision's dtype
        # in the mixed precision's dtype; the VAE and frozen text encoders stay as loaded (fp32:
        # their outputs are cached, and SDXL's VAE overflows in fp16) and leave the GPU once
        # cached; what gets saved of them is untouched
        trained = torch.bfloat16 if cfg.bf16_weights and not cfg.use_lora else torch.float32
        self.comp.vae.to(self.device).requires_grad_(False).eval()
        for te in self.comp.text_encoders:
            _move(te, self.device, self.dtype if cfg.use_lora and cfg.lora_text_encoder
                  else trained if cfg.train_text_encoder else torch.float32).requires_grad_(False)
        _move(self.comp.unet, self.device, self.dtype if cfg.use_lora else trained)
        self.scheduler = self.comp.noise_scheduler()
        self.attention = backends.set_attention(self.comp.unet, cfg.attention, self.warn)
        self.collect_data()
        self.cache()
        self.park_frozen()
        self.plan_steps()
        self.plan_outputs()
        self.setup_optimization()

    def free_gpu_memory(self, device: torch.device) -> int | None:
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None

    def plan_memory(self, cfg: TrainingConfig, device: torch.device) -> TrainingConfig:
        """The config to train with under its memory_preset, saying every change (and, on a
        GPU, whether the run fits in its free memory)."""
        from .memory import plan
        half = "fp16" if device.type == "cuda" and not torch.cuda.is_bf16_supported() else "bf16"
        planned, said = plan(cfg, self.free_gpu_memory(device), half)
        for text in said:
            self.say(text)
        return planned

    def frozen_modules(self) -> list:
        """What training itself no longer needs on the GPU: the VAE once the latents are cached,
        the text encoders once the prompts are."""
        cfg = self.cfg
        return ([self.comp.vae] if cfg.cache_latents else []) + \
            ([] if cfg.trains_text_encoder else list(self.comp.text_encoders))

    def park_frozen(self) -> None:
        if self.device.type == "cuda":
            for module in self.frozen_modules():
                module.to("cpu")
            release_memory()

    def collect_data(self) -> None:
        cfg, self.items, self.class_items = self.cfg, [], {}
        for i, concept in enumerate(cfg.concepts):
            found = instance_items(concept.instance_data_dir, concept.instance_prompt, self.warn)
            self.items += [Item(it.path, it.prompt, False, i) for it in found]
            if concept.uses_prior:
                folder = Path(concept.class_data_dir) if concept.class_data_dir else \
                    cfg.model_dir / "class_images" / slug(concept.class_prompt)
                with self.acc.main_process_first():  # rank 0 makes them, the others reuse them
                    paths = ensure_class_images(self.comp, concept, concept.class_images_per_instance
                                                * len(found), folder, cfg, self.device, self.dtype,
                                                self.say)
                self.class_items[i] = [Item(p, concept.class_prompt, True, i) for p in paths]
        self.bucket_of = buckets.plan([it.path for it in self.items], cfg.resolution,
                                      cfg.bucketing, cfg.bucket_no_upscale)
        if cfg.bucketing:
            self.say("Aspect-ratio buckets (width x height: images): "
                     + buckets.describe(list(self.bucket_of.values())) + ".")

    @torch.no_grad()
    def encode_images(self, pairs: list, flip: bool) -> list:
        """(mean, std, size conditioning) of each (item, bucket)'s latent distribution (sampled
        afresh every step)."""
        out, rng = [], random.Random(self.cfg.seed)
        for it, bucket in pairs:
            pixels, geometry = load_bucketed(it.path, bucket, self.cfg.center_crop, rng, flip)
            out.append((*self.vae_encode(pixels), geometry))
        return out

    @torch.no_grad()
    def vae_encode(self, pixels: torch.Tensor) -> tuple:
        """(mean, std) of an image's latent distribution, in fp32: the fp32 VAE runs under
        autocast in the mixed precision (not in fp16 for SDXL, whose VAE overflows there)."""
        vae, dtype = self.comp.vae, self.dtype
        if self.comp.spec.family == "sdxl" and dtype == torch.float16:
            dtype = torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            dist = vae.encode(pixels[None].to(self.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict:
        return encode_prompts(self.comp, prompts, self.device)

    def cache(self) -> None:
        """Latents of every (image, bucket) a batch can use (class images: every bucket of their
        concept's instance images), and the prompt embeddings when the text encoder is frozen."""
        cfg, self.latents = self.cfg, {}
        pairs = [(it, self.bucket_of[it.path]) for it in self.items]
        for concept, pool in self.class_items.items():
            used = sorted({self.bucket_of[it.path] for it in self.items if it.concept == concept})
            pairs += [(it, b) for b in used for it in pool]
        if cfg.cache_latents:
            for flip in ((False, True) if cfg.hflip else (False,)):
                for (it, b), lat in zip(pairs, self.encode_images(pairs, flip)):
                    self.latents[(it.path, flip, b)] = lat
        self.embeddings = {}
        if not cfg.trains_text_encoder:
            for prompt in sorted({it.prompt for it, _ in pairs}):
                self.embeddings[prompt] = {k: v[0] for k, v in
                                           self.encode_prompts([prompt]).items()}

    def plan_steps(self) -> None:
        cfg = self.cfg
        self.epochs = cfg.steps_per_image
        global_batch = cfg.batch_size * self.acc.num_processes
        self.batches_per_epoch = buckets.batch_count([self.bucket_of[it.path] for it in self.items],
                                                     global_batch, cfg.bucketing)
        ga = cfg.gradient_accumulation_steps
        self.total_steps = max(1, self.epochs * self.batches_per_epoch // ga)
        self.te_steps = round(cfg.text_encoder_steps_ratio * self.total_steps) \
            if cfg.trains_text_encoder else 0

    def epoch_end_step(self, epoch: int) -> int:
        return min(self.total_steps, (epoch + 1) * self.batches_per_epoch
                   // self.cfg.gradient_accumulation_steps)

    def output_path(self, step: int, merged: bool = False) -> Path:
        """The file a save at `step` writes: the checkpoint, or the LoRA (`merged`: the full
        checkpoint with the LoRA merged in)."""
        folder = self.cfg.resolved_lora_dir if self.cfg.use_lora and not merged \
            else self.cfg.resolved_output_dir
        return folder / f"{self.cfg.model_name}_{self.revision + step}.safetensors"

    def plan_outputs(self) -> None:
        """Refuse before training, not after hours, when an output would replace a file."""
        cfg = self.cfg
        steps = {self.total_steps}
        if cfg.save_every_epochs:
            steps |= {self.epoch_end_step(e) for e in range(self.epochs)
                      if (e + 1) % cfg.save_every_epochs == 0}
        merges = (False, True) if cfg.use_lora and cfg.lora_merge else (False,)
        clash = [self.output_path(s, m) for s in sorted(steps) for m in merges
                 if self.output_path(s, m).exists()]
        if clash and not cfg.overwrite:
            raise DreamboothError(f"'{clash[0]}' already exists; this run would replace it.",
                                  "Choose another model name or output folder, or turn on "
                                  "'overwrite'.")

    def setup_optimization(self) -> None:
        from diffusers.optimization import get_scheduler
        cfg, unet, tes = self.cfg, self.comp.unet, self.comp.text_encoders
        if cfg.use_lora:  # LoRA layers in (trained in fp32), everything else frozen
            groups = add_lora(self.comp, cfg)
            for p in (p for g in groups for p in g["params"]):
                p.data = p.data.float()
        else:
            groups = [{"params": list(unet.requires_grad_(True).parameters()),
                       "lr": cfg.learning_rate}]
            if cfg.train_text_encoder:
                groups.append({"params": [p for te in tes for p in te.requires_grad_(True)
                                          .parameters()], "lr": cfg.text_encoder_learning_rate})
        unet.train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        for te in tes if cfg.trains_text_encoder else ():
            te.train()
            if cfg.gradient_checkpointing:
                te.gradient_checkpointing_enable(  # reentrant would leave it without grads
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = self.make_optimizer(groups)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=self.total_steps)
        models = [unet, *tes] if cfg.trains_text_encoder else [unet]
        prepared = self.acc.prepare(*models, optimizer)
        self.models, self.optimizer = list(prepared[:-1]), prepared[-1]
        self.ema = None
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
            self.ema.to(self.device)

    def make_optimizer(self, groups: list):
        """The configured optimizer; per weight (optim.PerWeight) with bf16 weights or fused
        into backward. A fused optimizer needs one process: DDP averages gradients after
        backward, which is too late for an update inside it."""
        cfg = self.cfg
        if not (cfg.fused_optimizer or (cfg.bf16_weights and not cfg.use_lora)):
            optimizer, self.optimizer_name = backends.make_optimizer(
                cfg.optimizer, groups, cfg, self.device, self.warn)
            return optimizer
        from .optim import PerWeight
        fused = cfg.fused_optimizer and self.acc.num_processes == 1
        if cfg.fused_optimizer and not fused:
            self.warn("fused_optimizer needs a single process; with several, the optimizer "
                      "steps after backward as usual.")
        build, self.optimizer_name = backends.optimizer_builder(cfg.optimizer, cfg, self.device,
                                                                self.warn)
        self.optimizer_name += " (per weight, in backward)" if fused else " (per weight)"
        return PerWeight(groups, build, fused, cfg.max_grad_norm if fused else 0.0, cfg.seed)

    @property
    def fused(self) -> bool:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        return bool(getattr(inner, "in_backward", False))

    # -- one step ------------------------------------------------------------------------
    def global_batch(self, order: list[int], b: int) -> tuple[list[Item], list[int]]:
        """The b-th global batch (batch size x processes; the last one wraps around): instance
        items, then one class item per instance item whose concept has prior preservation.
        Returns (items, owner) where owner[i] is the instance row a row belongs to."""
        gbs = self.cfg.batch_size * self.acc.num_processes
        inst = [self.items[order[(b * gbs + k) % len(order)]] for k in range(gbs)]
        cls, owner = [], list(range(gbs))
        for row, it in enumerate(inst):
            pool = self.class_items.get(it.concept)
            if pool:
                cls.append(pool[self.class_cursor % len(pool)])
                owner.append(row)
                self.class_cursor += 1
        return inst + cls, owner

    def batch(self, order: list[int], b: int, rng: random.Random, gen: torch.Generator):
        """(latents, text conditioning, size conditioning, n_instance, rows, global size) of this
        process's share of the global batch, all of one bucket. Every random draw is made for the
        whole global batch on every process, so N processes see exactly what one process with N
        times the batch would."""
        items, owner = self.global_batch(order, b)
        bs, rank = self.cfg.batch_size, self.acc.process_index
        bucket = self.bucket_of[items[0].path]  # instance rows come first; class rows follow it
        rows = [i for i, o in enumerate(owner) if rank * bs <= o < (rank + 1) * bs]
        flips = [self.cfg.hflip and rng.random() < 0.5 for _ in items]
        seeds = [rng.getrandbits(32) for _ in items]
        eps = torch.randn((len(items), *buckets.latent_shape(self.comp.vae.config, bucket)),
                          generator=gen, device=gen.device)
        drawn = [self.latent_of(items[i], flips[i], seeds[i], eps[i:i + 1], bucket) for i in rows]
        chosen = [items[i] for i in rows]
        if self.cfg.trains_text_encoder:
            cond = self.encode_for_training([it.prompt for it in chosen])
        else:
            cond = {k: torch.stack([self.embeddings[it.prompt][k] for it in chosen])
                    for k in self.embeddings[chosen[0].prompt]}
        return torch.cat([d[0] for d in drawn]), cond, [d[1] for d in drawn], bs, rows, len(items)

    def latent_of(self, item: Item, flip: bool, seed: int, eps: torch.Tensor, bucket) -> tuple:
        """(scaled latent sample, SDXL size conditioning) of an image in a bucket."""
        if self.cfg.cache_latents:
            mean, std, geometry = self.latents[(item.path, flip, bucket)]
        else:
            with torch.no_grad():
                px, geometry = load_bucketed(item.path, bucket, self.cfg.center_crop,
                                             random.Random(seed), flip)
                mean, std = self.vae_encode(px)
        return (mean + std * eps.to(mean.device)) * self.comp.vae.config.scaling_factor, geometry

    def encode_for_training(self, prompts: list[str]) -> dict:
        return encode_prompts(self.comp, prompts, self.device, self.models[1:])

    def step_loss(self, order, b, rng, gen):
        latents, cond, geometry, n_inst, rows, n_global = self.batch(order, b, rng, gen)
        noise = noise_like(torch.empty((n_global, *latents.shape[1:])), gen,
                           self.cfg.offset_noise)[rows].to(self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (n_global,),
                                  generator=gen, device=gen.device)[rows].to(self.device)
        return compute_loss(self.models[0], self.scheduler, latents, cond["hidden"].to(self.device),
                            noise, timesteps, n_inst, self.cfg.prior_loss_weight,
                            self.cfg.min_snr_gamma,
                            unet_kwargs(self.comp, cond, geometry, self.device))

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> TrainResult:
        import contextlib
        import os
        # one lock per launch: its rank 0 takes it (torchrun / accelerate launch set RANK)
        with ModelLock(self.cfg.model_dir, self.say) if os.environ.get("RANK", "0") == "0" \
                else contextlib.nullcontext():
            self.setup()
            return self.loop(self.start_position())

    def start_position(self) -> dict:
        """Fresh generators at step 0, or everything restored from the chosen snapshot."""
        self.rng, self.gen = fresh_rng(self.cfg.seed)  # the same on every process: see batch()
        self.class_cursor = 0
        snapshot = self.resume_from
        if snapshot is None:
            return {"step": 0, "epoch": 0, "batch": 0, "order": None}
        position = load_snapshot(self, snapshot)
        self.say(f"Resuming from step {position['step']} of {self.total_steps} ({snapshot.name}).")
        if self.cfg.trains_text_encoder and position["step"] >= self.te_steps:
            for te in self.comp.text_encoders:
                te.requires_grad_(False)
        return position

    def loop(self, position: dict) -> TrainResult:
        cfg, acc, step = self.cfg, self.acc, position["step"]
        self.emit(ev.Started(cfg.model_name, self.total_steps, self.epochs, len(self.items),
                             sum(len(v) for v in self.class_items.values()), step))
        result, start, window, self.resumed_at = TrainResult(None, step), time.time(), [], step
        for epoch in range(position["epoch"], self.epochs):
            order, first = (position["order"], position["batch"]) \
                if epoch == position["epoch"] and position["order"] is not None else \
                (buckets.epoch_order([self.bucket_of[it.path] for it in self.items],
                                     cfg.batch_size * acc.num_processes, self.rng,
                                     cfg.bucketing), 0)
            next_batch = first
            for b in range(first, self.batches_per_epoch):
                at_boundary = acc.step % cfg.gradient_accumulation_steps == 0
                if step >= self.total_steps or (self.cancel.cancelled and at_boundary):
                    break
                window.append(self.micro_step(order, b, step + 1))
                next_batch = b + 1
                if acc.sync_gradients:
                    step += 1
                    self.after_update(step)
                    result.losses.append(sum(window) / len(window))
                    window = []
                    self.emit(ev.Step(step, self.total_steps, epoch + 1, result.losses[-1],
                                      self.lr_scheduler.get_last_lr()[0],
                                      (step - self.resumed_at) / max(time.time() - start, 1e-9),
                                      _vram_gb()))
                    if cfg.state_every_steps and step % cfg.state_every_steps == 0 \
                            and step < self.total_steps:
                        self.snapshot(step, epoch, b + 1, order)
            if self.cancel.cancelled:
                if step > self.resumed_at:
                    self.snapshot(step, epoch, next_batch, order)
                break
            self.epoch_end(epoch, step, result, last=step >= self.total_steps)
            if step >= self.total_steps:
                break
        return self.finish(step, start, result)

    def micro_step(self, order: list[int], b: int, step: int) -> float:
        """Forward, backward and (at an accumulation boundary) the update of batch b; the loss."""
        acc, cfg = self.acc, self.cfg
        with acc.accumulate(*self.models):
            loss, _, _ = self.step_loss(order, b, self.rng, self.gen)
            self.check_finite(loss, step)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0 and not self.fused:
                acc.clip_grad_norm_([p for m in self.models for p in m.parameters()],
                                    cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def snapshot(self, step: int, epoch: int, batch: int, order: list[int]) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_snapshot(self, step, epoch, batch, order)

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingError(
                f"The loss became {loss.item()} at step {step}; training stopped before the "
                "update, and the checkpoints already saved are kept.",
                "With fp16 this is usually an overflow: use bf16 or a lower learning rate.")

    def after_update(self, step: int) -> None:
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.comp.unet.parameters())
        if self.cfg.trains_text_encoder and step == self.te_steps:
            for te in self.comp.text_encoders:
                te.requires_grad_(False)
            self.say(f"Text encoder training ended at step {step} (ratio "
                     f"{self.cfg.text_encoder_steps_ratio}).")

    def epoch_end(self, epoch: int, step: int, result: TrainResult, last: bool) -> None:
        cfg = self.cfg
        if cfg.sample_every_epochs and (epoch + 1) % cfg.sample_every_epochs == 0 \
                and self.acc.is_main_process:
            self.sample(step)
        if not last and cfg.save_every_epochs and (epoch + 1) % cfg.save_every_epochs == 0:
            result.saved.append(self.save(step))

    def finish(self, step: int, start: float, result: TrainResult) -> TrainResult:
        result.steps, result.cancelled = step, self.cancel.cancelled
        if step > self.resumed_at or (step > 0 and not result.cancelled):
            result.path = self.save(step, final=True)
            result.saved.append(result.path)
        if not result.cancelled and self.acc.is_main_process:
            clear_snapshots(self.cfg.model_dir)
        if self.cancel.cancelled:
            self.say(f"Training was cancelled at step {step} of {self.total_steps}.")
        self.emit(ev.Finished(str(result.path or ""), step, time.time() - start,
                              self.cancel.cancelled))
        return result

    # -- outputs -------------------------------------------------------------------------
    def unet_state(self) -> dict:
        unet = self.comp.unet
        if self.ema is None:
            return unet.state_dict()
        self.ema.store(unet.parameters())
        self.ema.copy_to(unet.parameters())
        state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        self.ema.restore(unet.parameters())
        return state

    def save(self, step: int, final: bool = False) -> Path:
        cfg, path = self.cfg, self.output_path(step)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            meta = training_metadata(cfg, self.comp.spec, self.revision + step)
            if cfg.use_lora:
                self.save_lora(step, path, meta)
            else:
                save_single_file(self.comp, path, cfg.save_precision, meta,
                                 overwrite=cfg.overwrite, unet_state=self.unet_state())
            if final and not self.cancel.cancelled:
                self.save_working(step)
            self.emit(ev.CheckpointSaved(str(path), step))
        return path

    def save_lora(self, step: int, path: Path, meta: dict) -> None:
        """The LoRA file (and, with lora_merge, the full checkpoint with the LoRA merged in)."""
        cfg, comp = self.cfg, self.comp
        states = {"unet": self.unet_state()}
        if cfg.lora_text_encoder:
            states.update({s.component: te_state(getattr(comp, s.component))
                           for s in comp.spec.text_encoders})
        stats = ss_metadata(cfg, comp.spec, self.revision + step, self.epochs, self.items,
                            sum(len(v) for v in self.class_items.values()))
        save_lora(comp, path, cfg, states, {**meta, **stats}, cfg.save_precision,
                  overwrite=cfg.overwrite)
        if cfg.lora_merge:  # into the untouched weights: training ran on a half-precision copy
            base, _ = load_model(cfg, lambda *a: None)
            bases = {"unet": base.unet.state_dict(), **{
                s.component: te_state(getattr(base, s.component)) for s in comp.spec.text_encoders}}
            merged = {k: merged_state(states[k], cfg.lora_alpha / cfg.lora_rank, v)
                      if k in states else v for k, v in bases.items()}
            save_single_file(base, self.output_path(step, merged=True), cfg.save_precision, meta,
                             overwrite=cfg.overwrite, unet_state=merged.pop("unet"),
                             te_states=merged)

    def save_working(self, step: int) -> None:
        if not self.cfg.use_lora:  # a LoRA run leaves the model itself as it was
            folder = save_working_dir(self.comp, working_dir(self.cfg))
            info = {"model_type": self.comp.model_type, "revision": self.revision + step,
                    **_source_id(self.cfg.source_checkpoint)}
            write_text(folder / "dreambooth_model.json", json.dumps(info, indent=2))
        write_text(self.cfg.model_dir / "config.json", self.cfg.to_json())

    @torch.no_grad()
    def sample(self, step: int) -> None:
        cfg, comp = self.cfg, self.comp
        unet = self.acc.unwrap_model(self.models[0])
        unet.eval()
        for module in self.frozen_modules():
            module.to(self.device)
        pipe = make_pipeline(comp, unet=unet, text_encoder=comp.text_encoder)
        folder = cfg.model_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for i, concept in enumerate(cfg.concepts):
            prompt = concept.sample_prompt or concept.instance_prompt.replace("[filewords]", "")
            for path in generate_images(pipe, prompt, 1, folder, f"step{step:06d}_c{i}", 0,
                                        cfg.resolution, cfg.sample_steps, cfg.guidance_scale,
                                        cfg.seed, self.dtype):
                self.emit(ev.SampleSaved(str(path), step, prompt))
        unet.train()
        self.park_frozen()


def _vram_gb() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _move(module, device, dtype):
    module.to(device)
    return module.to(dtype) if dtype != torch.float32 else module
