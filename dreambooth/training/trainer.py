"""The DreamBooth training run: plan -> load -> feed -> loop -> save.

`train(config, on_event, cancel)` is the one entry point: the CLI, the WebUI tab (through the
CLI in a child process) and Python users all call it. `Trainer` owns the model, the optimizer and
the step; it holds a `DataFeed` (images, caches, batches) and a `Saver` (output paths, files)
and hands them what they need.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainingConfig
from ..config import events as ev
from ..config.errors import DreamboothError, TrainingError
from ..config.runlog import RunLog, failure
from ..data import buckets
from ..data.feed import DataFeed
from ..model.components import unet_kwargs
from ..model.workdir import load_model, read_source_ahead
from . import backends, embedding, flow, fp8, liblog, parked
from .advice import plan_run, text_encoder_stop
from .backends import gpu_total_memory
from .optim import make_optimizer, trainable_groups
from .loss import compute_loss, step_draws
from .losslog import LossLog
from .saver import Saver, ema_parameters, ema_state
from .housekeeping import refuse_idle_accumulation, remove_leftovers, snapshot_failed
from .resume import choose_snapshot, resume_position
from .sourcehash import hash_source_ahead
from .state import (STATE_DIR, ModelLock, end_snapshots, fresh_rng, frozen_base, save_snapshot,
                    snapshot_info)


@dataclass
class TrainResult:
    path: Path | None
    steps: int
    saved: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    cancelled: bool = False


def train(config: TrainingConfig, on_event=None, cancel: ev.CancelToken | None = None
          ) -> TrainResult:
    """Train as `config` says; report through `on_event`; stop cleanly when `cancel` is set.
    Any failure leaves as a DreamboothError naming the run's log (which holds the traceback)."""
    log = RunLog.for_config(config)
    emit = ev.EventBus(on_event, log.event)
    trainer = None
    try:
        config.check()
        trainer = Trainer(config, emit, cancel or ev.CancelToken())
        trainer.runlog = log
        with liblog.to_log(log):  # the libraries' words: into the log, not on the console
            return trainer.run()
    except DreamboothError as e:
        emit(ev.Failed(e.message, e.hint))
        raise failure(e, log)
    except torch.cuda.OutOfMemoryError:
        from .advice import oom_advice
        backends.release_memory()
        advice = oom_advice(trainer.cfg if trainer else config, gpu_total_memory())
        err = TrainingError("The GPU ran out of memory.", advice)
        emit(ev.Failed(err.message, err.hint))
        raise failure(err, log) from None
    except Exception as e:
        err = failure(e, log)
        emit(ev.Failed(err.message, err.hint))
        raise err from e
    finally:
        log.flush()
        backends.release_memory()


class Trainer:
    def __init__(self, cfg: TrainingConfig, emit, cancel: ev.CancelToken) -> None:
        self.cfg, self.emit, self.cancel = cfg, emit, cancel
        self.said: set[str] = set()
        self.machine: dict = {}
        self.saved_steps: set[int] = set()

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
        read_source_ahead(cfg)  # the file is read while the plan below imports and counts
        hash_source_ahead(cfg, frozen_base(cfg))  # a LoRA/TI snapshot names its base by it
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cfg = cfg.replace(mixed_precision=backends.auto_precision(cfg, device, self.say))
        self.resume_from = choose_snapshot(cfg, cfg.model_dir, self.warn)
        saved = snapshot_info(self.resume_from)["config"] if self.resume_from else None
        self.cfg = cfg = plan_run(cfg, saved, self.free_gpu_memory(device),
                                  backends.half_precision(device), self.say)
        self.precision = backends.resolve_precision(cfg.mixed_precision, device, self.warn)
        # a second run in one process (a notebook, the benchmark) may differ in precision:
        # accelerate keeps the first run's settings process-wide unless they are cleared
        # (the distributed state, which a launcher set up, is kept)
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state()
        # cpu=True on a machine without CUDA: else accelerate >= 1.x treats each of N launched
        # CPU processes as a separate single-process run (N copies racing on the same files)
        self.acc = Accelerator(mixed_precision=self.precision, cpu=device.type == "cpu",
                               gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                               kwargs_handlers=backends.autocast_kwargs(cfg))
        self.device, self.dtype = self.acc.device, backends.WEIGHT_DTYPES[self.precision]
        # as stored (fp16: half of fp32's host memory); each is cast as it goes to the device
        self.comp, self.base_revision = load_model(cfg, self.say, dtype=None)
        self.stored = backends.stored_dtypes([self.comp.vae, *self.comp.text_encoders])
        embedding.install(cfg, self.comp)  # a new token's vectors (textual inversion, pivotal)
        self.revision = snapshot_info(self.resume_from)["revision"] if self.resume_from \
            else self.base_revision
        # trained weights in fp32 (bf16 with bf16_weights); a LoRA's frozen base in the mixed
        # precision's dtype; the VAE and frozen text encoders run in fp32 (their outputs are
        # cached, and SDXL's VAE overflows in fp16; Flux's T5 on a GPU: bf16, flow.frozen_dtype)
        # and leave the GPU once cached, back as loaded, so what
        # gets saved of them is untouched. The UNet comes to the GPU after the caching (unless
        # class images are to be made), so the two never share it.
        trained = torch.bfloat16 if cfg.bf16_weights and not cfg.use_lora else torch.float32
        self.comp.vae.to(self.device, torch.float32).requires_grad_(False).eval()
        for te in self.comp.text_encoders:
            te.to(self.device, self.dtype if cfg.use_lora and cfg.lora_text_encoder
                  else trained if cfg.train_text_encoder else
                  flow.frozen_dtype(self.comp, te, self.device)).requires_grad_(False)
        self.unet_dtype = self.dtype if cfg.method != "dreambooth" else trained
        self.scheduler = self.comp.noise_scheduler()
        self.feed = DataFeed(cfg, self.comp, self.acc, self.dtype, self.say, self.warn)
        self.feed.collect(lambda: flow.ready_to_generate(self))  # Flux/SD3.5: T5 parked
        self.feed.cache()
        self.park_frozen()
        self.place_unet()
        self.attention = backends.apply_attention(self.comp, cfg.attention, self.warn)
        self.plan_steps()
        self.saver = Saver(cfg, self.comp, self.acc, self.emit, self.revision)
        self.saver.refuse_clashes(self.save_steps())
        self.setup_optimization()
        self.saver.refuse_no_room()

    def place_unet(self) -> None:  # tensor by tensor; fp8_base: the frozen weights in fp8
        fp8.place_unet(self.comp.unet, self.cfg, self.device, self.unet_dtype, self.say)

    def free_gpu_memory(self, device: torch.device) -> int | None:
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None

    def frozen_modules(self) -> list:
        """What training itself no longer needs on the GPU: the VAE once the latents are cached,
        the text encoders once the prompts are."""
        cfg = self.cfg
        return ([self.comp.vae] if cfg.cache_latents else []) + \
            ([] if cfg.trains_text_encoder else list(self.comp.text_encoders))

    def park_frozen(self) -> None:
        if self.device.type == "cuda":
            backends.park(self.frozen_modules(), self.stored)

    def plan_steps(self) -> None:
        cfg = self.cfg
        self.epochs = cfg.steps_per_image
        global_batch = cfg.batch_size * self.acc.num_processes
        feed = self.feed
        self.batches_per_epoch = buckets.batch_count([feed.bucket_of[it.path] for it in feed.items],
                                                     global_batch, cfg.bucketing)
        ga = cfg.gradient_accumulation_steps
        refuse_idle_accumulation(ga, self.epochs * self.batches_per_epoch)
        self.total_steps = max(1, self.epochs * self.batches_per_epoch // ga)
        self.te_steps = round(cfg.text_encoder_steps_ratio * self.total_steps) \
            if cfg.trains_text_encoder else 0

    def epoch_end_step(self, epoch: int) -> int:
        return min(self.total_steps, (epoch + 1) * self.batches_per_epoch
                   // self.cfg.gradient_accumulation_steps)

    def save_steps(self) -> set[int]:
        """Every step a checkpoint will be saved at: each save_every_epochs, and the last."""
        every = self.cfg.save_every_epochs
        return {self.total_steps} | ({self.epoch_end_step(e) for e in range(self.epochs)
                                      if (e + 1) % every == 0} if every else set())

    def setup_optimization(self) -> None:
        from diffusers.optimization import get_scheduler
        cfg, unet, tes = self.cfg, self.comp.unet, self.comp.text_encoders
        groups = trainable_groups(cfg, self.comp, self.say)
        optimizer, self.optimizer_name = make_optimizer(cfg, groups, self.acc, self.warn)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=self.total_steps)
        models = [unet, *tes] if cfg.trains_text_encoder else [unet]
        fp8.leave_out_of_sync(unet)  # with fp8_base: never sent between processes by DDP
        prepared = self.acc.prepare(*models, optimizer)
        self.models, self.optimizer = list(prepared[:-1]), prepared[-1]
        self.park = parked.attach(cfg, self.precision, self.acc, self.models, optimizer)
        backends.compile_unet(unet, cfg.compile, self.device, self.say)
        self.ema, self.ema_params = None, ema_parameters(self.comp, unet)
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(self.ema_params, decay=cfg.ema_decay)
            self.ema.to(self.device)

    @property
    def fused(self) -> bool:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        return bool(getattr(inner, "in_backward", False))

    # -- one step ------------------------------------------------------------------------
    def step_loss(self, order, b, rng, gen):
        if self.comp.spec.prediction_type == "flow":  # Flux, SD3.5 (flow.py)
            return flow.flow_step(self, order, b, rng, gen)
        encoders = self.models[1:] if self.cfg.trains_text_encoder else None
        latents, cond, geometry, n_inst, rows, n_global = self.feed.batch(order, b, rng, gen,
                                                                          encoders)
        noise, timesteps = step_draws(gen, (n_global, *latents.shape[1:]), self.scheduler,
                                      self.cfg.offset_noise, rows)  # on the device
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
                else contextlib.nullcontext(), \
                backends.reproducible(self.cfg.is_deterministic, backends.cpu_threads(
                    self.cfg.cpu_threads, torch.cuda.is_available(), self.say),
                    not self.cfg.bucketing) as machine:
            self.machine = machine  # recorded in snapshots: a resume elsewhere is said
            if getattr(self, "runlog", None) is not None:
                self.runlog.flush()
            remove_leftovers(self.cfg, self.say)
            self.setup()
            return self.loop(self.start_position())

    def start_position(self) -> dict:
        """Fresh generators at step 0, or everything restored from the chosen snapshot."""
        self.rng, self.gen = fresh_rng(self.cfg.seed, self.device)  # same on every process
        self.log = LossLog(self.cfg.log_every_steps)
        self.feed.class_cursor = 0
        position = resume_position(self)  # checked first: a damaged snapshot is skipped
        if self.cfg.trains_text_encoder and position["step"] >= self.te_steps:
            for te in self.comp.text_encoders:
                te.requires_grad_(False)
            if self.te_steps == 0:
                self.say(text_encoder_stop(self.cfg, 0, self.total_steps))
        return position

    def loop(self, position: dict) -> TrainResult:
        cfg, acc, step = self.cfg, self.acc, position["step"]
        self.emit(ev.Started(cfg.model_name, self.total_steps, self.epochs, len(self.feed.items),
                             self.feed.class_count, step, self.device.type))
        result, start, self.resumed_at = TrainResult(None, step, losses=self.log.values), \
            time.time(), step  # losses: complete once the last one is read (at the last save)
        for epoch in range(position["epoch"], self.epochs):
            order, first = (position["order"], position["batch"]) \
                if epoch == position["epoch"] and position["order"] is not None else \
                (buckets.epoch_order([self.feed.bucket_of[it.path] for it in self.feed.items],
                                     cfg.batch_size * acc.num_processes, self.rng,
                                     cfg.bucketing), 0)
            next_batch = first
            for b in range(first, self.batches_per_epoch):
                at_boundary = acc.step % cfg.gradient_accumulation_steps == 0
                if step >= self.total_steps or (self.cancel.cancelled and at_boundary):
                    break
                self.micro_step(order, b, step + 1)
                next_batch = b + 1
                if acc.sync_gradients:
                    step += 1
                    self.after_update(step)
                    self.log.end_update(step, last=step >= self.total_steps)  # read when due
                    self.run_commands(step, result)
                    self.emit(ev.Step(step, self.total_steps, epoch + 1, self.log.loss_at(step),
                                      self.lr_scheduler.get_last_lr()[0],
                                      (step - self.resumed_at) / max(time.time() - start, 1e-9),
                                      backends.vram_gb()))
                    if cfg.state_every_steps and step % cfg.state_every_steps == 0 \
                            and step < self.total_steps:
                        self.snapshot(step, epoch, b + 1, order)
            if self.cancel.cancelled:
                self.stop_here(step, epoch, next_batch, order)
                break
            self.epoch_end(epoch, step, result, last=step >= self.total_steps)
            if step >= self.total_steps:
                break
        return self.finish(step, start, result)

    def micro_step(self, order: list[int], b: int, step: int) -> torch.Tensor:
        """Forward, backward and (at an accumulation boundary) the update of batch b; the loss."""
        acc, cfg = self.acc, self.cfg
        with acc.accumulate(*self.models):
            loss, _, _ = self.step_loss(order, b, self.rng, self.gen)
            self.log.micro(loss, self.optimizer)
            acc.backward(loss)
            parked.update(acc, self.optimizer, self.park, self.models, cfg.max_grad_norm,
                          self.fused)
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def stop_here(self, step: int, epoch: int, batch: int, order: list[int]) -> None:
        """A cancel at the end of the running step: said, with its loss; the resume state."""
        self.log.read()
        self.emit(ev.Stopping(step, self.total_steps, self.log.loss_at(step)))
        if step > self.resumed_at:
            self.snapshot(step, epoch, batch, order)

    def snapshot(self, step: int, epoch: int, batch: int, order: list[int]) -> None:
        self.log.read()  # never a snapshot of weights after a non-finite loss
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.emit(ev.Saving(str(self.cfg.model_dir / STATE_DIR), step, "state"))
            try:
                path = save_snapshot(self, step, epoch, batch, order)
            except Exception as e:  # a full disk or a read-only folder fails in many ways
                raise snapshot_failed(self.cfg, self.models, self.optimizer, step, e) from None
            self.emit(ev.StateSaved(str(path), step))

    def after_update(self, step: int) -> None:
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.ema_params)
        if self.cfg.trains_text_encoder and step == self.te_steps:
            for te in self.comp.text_encoders:
                te.requires_grad_(False)
            if said := text_encoder_stop(self.cfg, step, self.total_steps):
                self.say(said)

    def epoch_end(self, epoch: int, step: int, result: TrainResult, last: bool) -> None:
        cfg = self.cfg
        if cfg.sample_every_epochs and (epoch + 1) % cfg.sample_every_epochs == 0 \
                and self.acc.is_main_process:
            self.sample(step)
        if not last and cfg.save_every_epochs and (epoch + 1) % cfg.save_every_epochs == 0 \
                and step not in self.saved_steps:
            result.saved.append(self.save(step))

    def run_commands(self, step: int, result: TrainResult) -> None:
        """What the host asked for since the last step: a checkpoint now, previews now."""
        if self.cancel.take("save") and step < self.total_steps:
            if refused := self.saver.save_now_refused(step):
                self.warn(refused)
            elif step not in self.saved_steps:
                result.saved.append(self.save(step))
        if self.cancel.take("sample") and self.acc.is_main_process:
            self.sample(step)

    # -- outputs (the Saver writes) ----------------------------------------------------------
    def unet_state(self) -> dict:
        """The UNet's weights to save: the EMA's, when one is kept (not copied)."""
        return ema_state(self.comp.unet, self.ema, self.ema_params)

    def save(self, step: int, final: bool = False) -> Path:
        self.log.read()  # never a save of weights after a non-finite loss
        self.saved_steps.add(step)
        facts = {"epochs": self.epochs, "items": self.feed.items,
                 "class_images": self.feed.class_count}
        return self.saver.save(step, self.unet_state(), facts,
                               keep_working=final and not self.cancel.cancelled)

    def sample(self, step: int) -> None:
        self.log.read()
        unet = self.acc.unwrap_model(self.models[0])
        unet.eval()
        for module in flow.preview_modules(self.comp, self.frozen_modules()):  # as they ran for
            module.to(self.device, flow.frozen_dtype(self.comp, module, self.device))  # caching
        self.saver.sample(step, unet, self.dtype, self.feed.embeddings)
        unet.train()
        self.park_frozen()

    def finish(self, step: int, start: float, result: TrainResult) -> TrainResult:
        result.steps, result.cancelled = step, self.cancel.cancelled
        if step > self.resumed_at or (step > 0 and not result.cancelled):
            if step in self.saved_steps:  # asked for at this very step: the file is there
                result.path = self.saver.output_path(step)
                if not result.cancelled and self.acc.is_main_process:
                    self.saver.save_working(step)
            else:
                result.path = self.save(step, final=True)
                result.saved.append(result.path)
        if self.acc.is_main_process:  # a cancelled run keeps its own, not partial ones
            end_snapshots(self.cfg.model_dir, keep=result.cancelled)
        if self.cancel.cancelled:
            self.say(f"Training was cancelled at step {step} of {self.total_steps}.")
        self.emit(ev.Finished(str(result.path or ""), step, time.time() - start,
                              self.cancel.cancelled))
        return result
