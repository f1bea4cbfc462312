"""What the tab's buttons do, as plain functions of widget values (no gradio here, so the tests
can drive them directly). The tab turns the results into component updates."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainingConfig
from ..config.errors import ConfigError
from ..host.confine import checked, model_folder, pick_source, training_now
from ..host.interface import Host, host_defaults, sniff_model_type
from ..host.parts import likely_part, shown_part
from ..host.runner import Progress, RunManager, is_under
from . import fields, render

# what a Save now / Sample now got (RunManager.request's answer), in words
ANSWERS = {"sent": "Asked for {what}: {it} made at the next step.",
           "queued": "Asked for {what}: the run is still starting; {it} made at its first step.",
           "ending": "The run is stopping or has stopped, so it takes no more requests.",
           "unsupported": "Save now and Sample now need POSIX signals, which this system lacks.",
           "idle": "Nothing is training."}
SETTINGS_FILE = "config.json"  # the same file (and format) `python -m dreambooth train --config` reads


@dataclass
class StatusView:
    progress_html: str
    result_html: str
    samples: list
    loss_html: str
    final_path: str
    log: str
    can_use: bool
    active: bool
    checkpoints: list  # every full checkpoint the run saved (intermediate ones too), oldest first
    selected: str  # the one "Use in txt2img" offers first: the final one, else the newest


class TabActions:
    def __init__(self, host: Host, manager: RunManager | None = None) -> None:
        self.host = host
        self.manager = manager or RunManager(host)

    # -- defaults and lists --------------------------------------------------------------------
    def default_config(self) -> TrainingConfig:
        return TrainingConfig(**host_defaults(self.host))

    def checkpoint_titles(self) -> list[str]:
        return [c.title for c in self.host.list_checkpoints()]

    def refresh_checkpoint_titles(self) -> list[str]:
        self.host.refresh_checkpoints()
        return self.checkpoint_titles()

    def model_names(self) -> list[str]:
        root = self.host.paths.work_dir
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / SETTINGS_FILE).is_file())

    def resolve_source(self, value: str) -> str:
        """A dropdown title (the WebUI's 'name.safetensors [hash]') -> its file; a value that is
        not in the host's list stays as it is (confine() refuses it)."""
        try:
            return pick_source(self.host, value)
        except ConfigError:
            return value if isinstance(value, str) else ""

    def detect_type(self, source: str) -> str | None:
        try:
            return sniff_model_type(pick_source(self.host, source))
        except ConfigError:
            return None

    # -- Flux / SD3.5 part files (text encoders, autoencoder) ----------------------------------
    def part_files(self, refresh: bool = False) -> dict[str, str] | None:
        """The host's part files (name -> path; None: it lists none, the fields take paths),
        re-read first when `refresh` or while the list is empty (Forge reads it when it builds
        its top bar, after the extensions' tabs)."""
        listed = self.host.part_files()
        if listed is not None and (refresh or not listed):
            self.host.refresh_part_files()
            listed = self.host.part_files()
        return listed

    def part_value(self, field: str, value, listed: dict[str, str] | None,
                   guess: bool = False) -> str:
        """What the part field's dropdown shows for `value`: a listed path by its file name;
        with `guess`, an empty field as the one listed file its name suggests (the user's pick
        in the host's own picker first)."""
        if guess and value == "" and listed:
            return likely_part(field, listed, self.host.selected_parts())
        return shown_part(listed, value)

    # -- values <-> config ---------------------------------------------------------------------
    def config_from(self, values: dict[str, Any], count: int, **how) -> TrainingConfig:
        """The widgets' config with every path inside the host's folders (confine.py: the page
        may be open to others) and validated (`how`: confine.checked's options), or
        ConfigError naming every problem at once."""
        return checked(fields.values_to_config(dict(values), count), self.host, **how)

    def problems_banner(self, title: str, error: ConfigError) -> str:
        return render.banner("error", title, [str(p) for p in error.problems])

    # -- buttons -------------------------------------------------------------------------------
    def train(self, values: dict[str, Any], count: int) -> str:
        """Validate everything, then start the child; returns the message banner."""
        missing = self.host.missing_dependencies()
        if missing:
            return render.banner("error", "Training needs packages that are not installed: "
                                 + ", ".join(missing), [], "restart the WebUI (install.py "
                                 "installs them), or see the README's troubleshooting")
        try:
            config = self.config_from(values, count)
        except ConfigError as e:
            return self.problems_banner("Please fix these settings first:", e)
        if self.manager.busy():
            return render.banner("warning", "A training run is already in progress.")
        self._write_settings(config)
        self.manager.start(config)
        return render.banner("info", f"Training '{config.model_name}' started.")

    def cancel(self) -> str:
        if self.manager.cancel():
            return render.banner("info", "Cancelling: training stops at the end of the step "
                                 "that is running, then saves a checkpoint and its resume "
                                 "state (Stop now: stop at once without saving).")
        return render.banner("info", "Nothing is training.")

    def stop_now(self) -> str:
        if self.manager.cancel(now=True):
            return render.banner("warning", "Stopping at once: what was trained since the last "
                                 "save is not saved.")
        return render.banner("info", "Nothing is training.")

    def request(self, command: str) -> str:
        answer = self.manager.request(command)
        what, it = ("a checkpoint", "it is") if command == "save" else ("preview images",
                                                                        "they are")
        return render.banner("info", ANSWERS[answer].format(what=what, it=it))

    def save_now(self) -> str:
        return self.request("save")

    def sample_now(self) -> str:
        return self.request("sample")

    def save_settings(self, values: dict[str, Any], count: int) -> str:
        try:
            config = self.config_from(values, count, need_source=False, check_paths=False,
                                      keep=lambda field: not field.startswith("concepts"))
        except ConfigError as e:
            return self.problems_banner("The settings were not saved:", e)
        if (why := training_now(self.manager, config.model_dir, config.model_name)):
            return render.banner("warning", why, ["Wait for the run to end (or cancel it), "
                                                  "then save again."])
        path = self._write_settings(config)
        return render.banner("success", f"Settings saved to {path}")

    def create_model(self, values: dict[str, Any], count: int) -> str:
        """A model is its folder and settings; its working copy is converted from the source
        checkpoint when training starts (in the training process, never here)."""
        wanted = ("model_name", "source_checkpoint", "model_type", "work_dir")
        try:
            config = self.config_from(values, count, keep=wanted.__contains__)
        except ConfigError as e:
            return self.problems_banner("The model was not created:", e)
        if (why := training_now(self.manager, config.model_dir, config.model_name)):
            return render.banner("warning", why, ["Wait for the run to end (or cancel it), "
                                                  "then save again."])
        path = self._write_settings(config)
        return render.banner("success", f"Model '{config.model_name}' created ({path}). Add "
                             "concepts, then press Train.")

    def load_settings(self, model_name: str) -> tuple[dict[str, Any], int, str]:
        path = self.host.paths.work_dir / SETTINGS_FILE
        try:
            path = model_folder(self.host, model_name) / SETTINGS_FILE
            config = TrainingConfig.load(path)
        except ConfigError as e:
            values, count = fields.config_to_values(self.default_config())
            return values, count, self.problems_banner(f"Could not load {path}:", e)
        values, count = fields.config_to_values(config)
        return values, count, render.banner("success", f"Loaded {path}")

    def saved_checkpoints(self, p: Progress | None = None) -> list[str]:
        """The full checkpoints the run saved, a cancelled run's too; a LoRA or an embedding is
        used from the prompt, not selected as the model."""
        p = p or self.manager.status()
        return [s for s in dict.fromkeys(p.saved) if not is_under(s, self.host.paths.lora_dir)
                and not is_under(s, self.host.paths.embeddings_dir)]

    def saved_embedding(self, p: Progress) -> str:
        """The embedding saved with the final file: that file (textual inversion), or the one
        saved just before it (pivotal: named as the LoRA, or the LoRA's name + '_emb' when both
        share a folder); '' when none."""
        stem = Path(p.final_path).stem
        found = [s for s in p.saved[-2:] if is_under(s, self.host.paths.embeddings_dir)
                 and Path(s).stem.startswith(stem)]
        return next((s for s in found if s != p.final_path), found[0]) if found else ""

    def use_in_txt2img(self, path: str) -> str:
        if not path:
            return render.banner("warning", "No trained checkpoint yet.")
        if path not in self.saved_checkpoints():  # the page may be open to others
            return render.banner("warning", f"'{path}' is not a checkpoint this run saved; "
                                 "pick one from the list.")
        try:
            title = self.host.select_checkpoint(path)
        except Exception as e:  # the host's loader failed: tell the user, keep the tab alive
            return render.banner("error", f"Could not load {path}: {e}")
        return render.banner("success", f"txt2img now uses {title}.", checkpoint=title)

    def _write_settings(self, config: TrainingConfig) -> Path:
        folder = Path(config.work_dir) / config.model_name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SETTINGS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(config.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    # -- progress ------------------------------------------------------------------------------
    def status_view(self) -> StatusView:
        p: Progress = self.manager.status()
        if p.state in ("finished", "cancelled", "stopped") and self.manager.busy():
            p = Progress(**{**p.__dict__, "state": "running"})  # refreshing the list still
        embedding = self.saved_embedding(p) if p.state == "finished" else ""
        refresh = " Press Refresh in the {} tab to see its card." \
            if self.host.cards_need_refresh else ""
        if p.state == "finished" and is_under(p.final_path, self.host.paths.lora_dir) \
                and embedding != p.final_path:
            p.messages.append(f"LoRA saved: add <lora:{Path(p.final_path).stem}:1> to a "
                              "prompt." + refresh.format("Lora"))
        if embedding:
            p.messages.append(f"Embedding saved: write {Path(embedding).stem} in a prompt "
                              "where the token was." + refresh.format("Textual Inversion"))
        active = p.active or self.manager.busy()
        saved = self.saved_checkpoints(p)
        selected = p.final_path if p.final_path in saved else (saved or [""])[-1]
        log = "\n".join(p.messages[-30:])
        return StatusView(render.progress_html(p), render.result_html(p) if not p.active else "",
                          list(reversed(p.samples[-8:])), render.loss_svg(p.losses),
                          p.final_path, log, bool(saved) and not active
                          and self.host.can_select_checkpoint, active, saved, selected)

    def status_json(self) -> str:
        return json.dumps(self.manager.status().to_dict())
