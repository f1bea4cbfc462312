"""Our training step: dreambooth.training.trainer.Trainer, set up by its own setup() over a model built
in memory (no checkpoint file), stepped exactly as Trainer.loop steps it."""
from __future__ import annotations

from unittest import mock

from .gpu_path import fused_adamw, implementation
from .measure import free, move


class OursStep:
    def __init__(self, name: str, comp, config) -> None:
        from dreambooth.config import events as ev
        from dreambooth.training import trainer as trainer_module
        self.name, self.messages = name, []
        def listener(event):
            if isinstance(event, ev.Message):
                self.messages.append(event.text)
        self.trainer = trainer_module.Trainer(config, ev.EventBus(listener), ev.CancelToken())
        # the model comes from memory, not from converting a 4 GB single file
        with mock.patch.object(trainer_module, "load_model",
                               lambda cfg, say, dtype=None: (comp, 0)), fused_adamw():
            self.trainer.setup()
        self.trainer.start_position()  # fresh generators and class cursor, as a new run
        self.order, self.b, self.updates = None, self.trainer.batches_per_epoch, 0

    def step(self):
        """One micro-step of the trainer itself (Trainer.micro_step), less events and snapshots;
        the loss stays on the device and is read every log_every_steps, as in a run."""
        t = self.trainer
        if self.b >= t.batches_per_epoch:
            self.order, self.b = t.rng.sample(range(len(t.feed.items)), len(t.feed.items)), 0
        with fused_adamw():  # (a rebucketing builds its AdamWs again)
            value = t.micro_step(self.order, self.b, self.updates + 1)
        self.b += 1
        if t.acc.sync_gradients:
            self.updates += 1
            t.after_update(self.updates)
            t.log.end_update(self.updates)
        return value

    def to(self, device) -> None:
        t = self.trainer
        parked = t.frozen_modules() if device != "cpu" and t.device.type == "cuda" else []
        kept = [m for m in (t.comp.vae, *t.comp.text_encoders) if all(m is not p for p in parked)]
        for obj in (t.comp.unet, *kept, t.optimizer, t.feed.latents, t.feed.embeddings):
            move(obj, device)
        if getattr(t, "park", None) is not None and t.device.type != "cpu":
            t.park.release()  # its fp32 scratch: made again where the weights are, at the next
            # step (not on a CPU, where nothing moves: a fresh buffer each round faulted its
            # pages in again, ~1 200 a step of the smoke's full_bs1, which no run pays)
        if t.ema is not None:
            t.ema.to(device)

    def settings(self) -> dict:
        t, cfg = self.trainer, self.trainer.cfg
        return {"resolution": cfg.resolution, "attention": t.attention,
                "optimizer": f"{t.optimizer_name} [{implementation(t.optimizer)}]",
                "fused_optimizer": t.fused, "bf16_weights": cfg.bf16_weights,
                "fp8_base": cfg.fp8_base,
                "latents": "cached" if cfg.cache_latents else "VAE every step",
                "text": "text encoder every step" if cfg.train_text_encoder else "cached",
                "gradient_checkpointing": cfg.gradient_checkpointing,
                "mixed_precision": t.precision, "messages": self.messages}

    def close(self) -> None:
        free(self.trainer.acc)
