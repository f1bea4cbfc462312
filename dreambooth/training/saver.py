"""What a training run writes: checkpoints, the LoRA file (and its merge), the working model
for the next run, preview samples. A part of Trainer (a mixin over its cfg, comp, acc, ema,
revision and events), kept apart so the loop reads on its own."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import events as ev
from ..config.errors import DreamboothError
from ..data.sampling import generate_images, make_pipeline
from ..model.checkpoint import write_text
from ..model.components import te_state
from ..model.metadata import training_metadata
from ..model.single_file import save_single_file
from ..model.workdir import save_working_dir, source_id, working_dir
from .lora import merged_state, save_lora, ss_metadata


class Outputs:
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

    # -- saving -------------------------------------------------------------------------
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
            from ..model.workdir import load_model
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
                    **source_id(self.cfg.source_checkpoint)}
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
