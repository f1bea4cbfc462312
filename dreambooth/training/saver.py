"""What a training run writes: checkpoints, the LoRA file (and its merge), the embedding of a
new token (textual inversion, pivotal), the working model for the next run, preview samples.

`Saver` owns the output paths and every write. It is given the config, the working model, the
accelerator (who writes, and the unwrapped UNet), the event bus and the model's revision; the
trainer hands it the states to write (the UNet's, EMA applied) and what the run learnt from.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import events as ev
from ..config.errors import DreamboothError
from ..data.sampling import (cached_states, generate_images, make_pipeline, preview_prompt,
                             sample_settings)
from ..model.checkpoint import write_text
from ..model.components import te_state
from ..model.metadata import training_metadata
from ..model.single_file import save_single_file
from ..model.streamed import Deferred
from ..model.workdir import load_model, save_working_dir, source_id, working_dir
from .embedding import activation_text, save_embedding
from .housekeeping import (no_room_for_extra_save, refuse_no_space,
                           refuse_save_without_space)
from .adapters import merged_states, save_lora, ss_metadata
from .flux_merge import save_merged_flux


def _same_file(path: Path, source: str) -> bool:
    try:
        return path.exists() and path.samefile(source) or path.resolve() == Path(source).resolve()
    except OSError:
        return False


def _same_folder(a: Path, b: Path) -> bool:
    """The same folder, however spelt (relative, through a link; on a case-blind disk, in
    another case)."""
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


PIVOTAL_SUFFIX = "_emb"


def ema_parameters(comp, unet) -> list:
    """The parameters an EMA averages: a flow transformer's trained ones alone (its LoRA: not
    a second copy of a frozen 12B base); SD's UNet: all of them."""
    params = list(unet.parameters())
    return [p for p in params if p.requires_grad] if comp.spec.flow else params


def ema_state(unet, ema, params: list | None = None) -> dict:
    """The UNet's state to save: its own, or with the EMA's weights in place of its
    parameters (`params`, the EMA's: ema_parameters), the EMA's tensors themselves (one cast
    to the parameter's dtype as a streamed save reaches it, where they differ), not a copy of
    the UNet."""
    if ema is None:
        return unet.state_dict()
    params = list(unet.parameters()) if params is None else params
    shadow = {id(p): s for p, s in zip(params, ema.shadow_params)}
    state, found = {}, set()
    for key, value in unet.state_dict(keep_vars=True).items():
        s = shadow.get(id(value))
        if s is None:
            state[key] = value.detach()
            continue
        found.add(id(value))
        state[key] = s.detach() if s.dtype == value.dtype else Deferred(
            tuple(value.shape), value.dtype, lambda s=s, dtype=value.dtype: s.to(dtype))
    if len(found) == len(shadow):
        return state
    ema.store(params)  # parameters the state dict names otherwise: copied back
    ema.copy_to(params)
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema.restore(params)
    return state


class Saver:
    def __init__(self, cfg, comp, acc, emit, revision: int) -> None:
        self.cfg, self.comp, self.acc, self.emit, self.revision = cfg, comp, acc, emit, revision
        self.planned: set[int] = set()  # the steps refuse_no_room checked the room of

    def output_path(self, step: int, merged: bool = False) -> Path:
        """The file a save at `step` writes: the checkpoint, or the LoRA (`merged`: the full
        checkpoint with the LoRA merged in, `_merged` so it can't be taken for the LoRA)."""
        if self.cfg.method == "textual_inversion":
            return self.embedding_path(step)
        folder = self.cfg.resolved_lora_dir if self.cfg.use_lora and not merged \
            else self.cfg.resolved_output_dir
        tail = "_merged" if merged else ""
        return folder / f"{self.cfg.model_name}_{self.revision + step}{tail}.safetensors"

    def embedding_path(self, step: int) -> Path:
        """The embedding file of a save at `step` (textual inversion, pivotal): its name is the
        word a WebUI prompt uses it by. A pivotal embedding saved into the LoRA's own folder is
        `<model>_<step>_emb`, so the LoRA (`<model>_<step>`, used as <lora:<model>_<step>:1>)
        does not take its name; in its own folder it keeps the LoRA's name."""
        cfg, name = self.cfg, f"{self.cfg.model_name}_{self.revision + step}"
        if cfg.method != "textual_inversion" and _same_folder(cfg.resolved_embedding_dir,
                                                                cfg.resolved_lora_dir):
            name += PIVOTAL_SUFFIX
        return cfg.resolved_embedding_dir / f"{name}.safetensors"

    def refuse_clashes(self, steps: set[int]) -> None:
        """Refuse before training, not after hours, when a save at one of `steps` would replace
        a file."""
        cfg = self.cfg
        merges = (False, True) if cfg.use_lora and cfg.lora_merge else (False,)
        paths = [self.output_path(s, m) for s in sorted(steps) for m in merges]
        if cfg.trains_embedding and cfg.use_lora:  # pivotal: the embedding beside the LoRA
            paths += [self.embedding_path(s) for s in sorted(steps)]
        self.refuse_source(paths)
        twice = [p for p in dict.fromkeys(paths) if paths.count(p) > 1]
        if twice:  # two files of one run under one name: the second would replace the first
            raise DreamboothError(f"This run would write two files as '{twice[0]}'.",
                                  "Choose different folders for the LoRA, the embedding and "
                                  "the checkpoints.")
        clash = [p for p in paths if p.exists()]
        if clash and not cfg.overwrite:
            raise DreamboothError(f"'{clash[0]}' already exists; this run would replace it.",
                                  "Choose another model name or output folder, or turn on "
                                  "'overwrite'.")
        self.planned = set(steps)

    def refuse_no_room(self) -> None:
        """Refuse before training when the planned saves won't fit (once the run's trained
        layers are added: a network's file is counted from them)."""
        refuse_no_space(self.cfg, self.comp, len(self.planned))

    def save_now_refused(self, step: int) -> str:
        """Why a Save now at `step` is not made ('' when it is): its file exists and overwrite
        is off, or it would take the room the planned saves were checked to have."""
        path = self.output_path(step)
        if path.exists() and not self.cfg.overwrite:
            return f"Not saved now: '{path}' already exists (turn on 'overwrite' to replace it)."
        if step in self.planned:
            return ""
        return no_room_for_extra_save(self.cfg, self.comp, step,
                                      len([s for s in self.planned if s > step]))

    def refuse_source(self, paths: list[Path]) -> None:
        """The source checkpoint is never replaced, whatever 'overwrite' says."""
        source = [p for p in paths if _same_file(p, self.cfg.source_checkpoint)]
        if source:
            raise DreamboothError(f"'{source[0]}' is the source checkpoint; this run would "
                                  "replace it (the source is never replaced, whatever "
                                  "'overwrite' says).", "Choose another model name or output "
                                  "folder.")

    # -- saving -------------------------------------------------------------------------
    def save(self, step: int, unet_state: dict, facts: dict, keep_working: bool) -> Path:
        """Write what a save at `step` writes (on the main process; the others wait); with
        `keep_working`, also the working model the next run of this model goes on from.
        `facts`: what the run learnt from (epochs, items, class_images), for the LoRA's
        metadata."""
        cfg, path = self.cfg, self.output_path(step)
        self.refuse_source([path, self.output_path(step, merged=True)])
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            refuse_save_without_space(cfg, self.comp, path, step, keep_working)
            self.emit(ev.Saving(str(path), step))
            meta = training_metadata(cfg, self.comp.spec, self.revision + step)
            if cfg.method == "textual_inversion":
                save_embedding(self.comp, path, cfg, self.revision + step, meta,
                               cfg.save_precision, overwrite=cfg.overwrite)
            elif cfg.use_lora:
                self.save_lora(step, path, meta, unet_state, facts)
            else:
                save_single_file(self.comp, path, cfg.save_precision, meta,
                                 overwrite=cfg.overwrite, unet_state=unet_state)
            if keep_working:
                self.save_working(step)
            self.emit(ev.CheckpointSaved(str(path), step))
        return path

    def save_lora(self, step: int, path: Path, meta: dict, unet_state: dict, facts: dict) -> None:
        """The LoRA file (and, with lora_merge, the full checkpoint with the LoRA merged in)."""
        cfg, comp = self.cfg, self.comp
        states = {"unet": unet_state}
        if cfg.lora_text_encoder:
            states.update({s.component: te_state(getattr(comp, s.component))
                           for s in comp.spec.text_encoders})
        if cfg.trains_embedding:  # pivotal: the embedding first; the card's prompt names it
            out = save_embedding(comp, self.embedding_path(step), cfg, self.revision + step,
                                 meta, cfg.save_precision, overwrite=cfg.overwrite)
            self.emit(ev.CheckpointSaved(str(out), step))
            meta = {**meta, "modelspec.trigger_phrase": activation_text(cfg, out.stem)}
        stats = ss_metadata(cfg, comp.spec, self.revision + step, facts["epochs"],
                            facts["items"], facts["class_images"])
        save_lora(comp, path, cfg, states, {**meta, **stats}, cfg.save_precision,
                  overwrite=cfg.overwrite)
        if cfg.lora_merge and comp.spec.family == "flux":  # the file, as Forge applies it, into
            # the source transformer, streamed (flux_merge)
            out = save_merged_flux(comp, cfg, path, self.output_path(step, merged=True), meta)
            self.emit(ev.CheckpointSaved(str(out), step))
        elif cfg.lora_merge:  # into the untouched weights: training ran on a half-precision copy
            base, _ = load_model(cfg, lambda *a: None)
            bases = {"unet": base.unet.state_dict(), **{
                s.component: te_state(getattr(base, s.component)) for s in comp.spec.text_encoders}}
            merged = merged_states(cfg, states, bases)
            out = save_single_file(base, self.output_path(step, merged=True), cfg.save_precision,
                                   meta, overwrite=cfg.overwrite, unet_state=merged.pop("unet"),
                                   te_states=merged)
            self.emit(ev.CheckpointSaved(str(out), step))

    def save_working(self, step: int) -> None:
        if self.cfg.method == "dreambooth":  # LoRA, embedding: the model itself stays as it was
            folder = save_working_dir(self.comp, working_dir(self.cfg))
            info = {"model_type": self.comp.model_type, "revision": self.revision + step,
                    **source_id(self.cfg.source_checkpoint)}
            write_text(folder / "dreambooth_model.json", json.dumps(info, indent=2))
        write_text(self.cfg.model_dir / "config.json", self.cfg.to_json())

    @torch.no_grad()
    def sample(self, step: int, unet, dtype: torch.dtype, cached: dict | None = None) -> None:
        """Preview images of every concept with the UNet as it is now (the frozen modules must
        be on the UNet's device; Flux / SD3.5: but T5, its prompts' states `cached` by the feed)."""
        cfg, comp = self.cfg, self.comp
        pipe = make_pipeline(comp, unet=unet, text_encoder=comp.text_encoder)
        folder = cfg.model_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        guidance, extra = sample_settings(comp, cfg.guidance_scale)
        for i, concept in enumerate(cfg.concepts):
            prompt = preview_prompt(concept)
            text = comp.rewrite_prompt(prompt) if comp.rewrite_prompt else prompt
            embeds = cached_states(comp, cached, prompt)
            for path in generate_images(pipe, text, 1, folder, f"step{step:06d}_c{i}", 0,
                                        cfg.resolution, cfg.sample_steps, guidance, cfg.seed,
                                        dtype, extra=extra, embeds=embeds):
                self.emit(ev.SampleSaved(str(path), step, prompt))
