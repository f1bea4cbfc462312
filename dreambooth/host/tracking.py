"""Run tracking: a listener of the run's events that reports them through one of accelerate's
trackers (TensorBoard, wandb, MLflow, ...). Nothing in training/ knows of it.

Loss (when read), learning rate, steps/s and memory per step; the preview images at each sample
step; the config as hyperparameters. accelerate and the tracker's package are imported only when
the first event arrives, so a run without tracking never loads them. A tracker that can't start,
or fails later, is said once as a warning and dropped: never a failed run.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Callable

from ..config import events as ev
from ..config.cloud import logging_folder

# what each tracker's package is called on the package index (the fix of a missing one)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def tracker_classes() -> dict:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    return LOGGER_TYPE_TO_CLASS


def hyperparameters(config) -> dict:
    """The config as flat scalars (a tracker's hyperparameter table takes no lists)."""
    out = {}
    for key, value in config.to_dict().items():
        out[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


class Tracking:
    """`Tracking(config, say)(event)`; `classes`: name -> tracker class (accelerate's table)."""

    def __init__(self, config, say: Callable[[str], None],
                 classes: Callable[[], dict] = tracker_classes) -> None:
        self.config, self.say, self.classes = config, say, classes
        self.tracker = None
        self.dead = False
        self.samples_at: dict[int, int] = {}  # step -> previews logged at it

    def __call__(self, event: ev.Event) -> None:
        if self.dead:
            return
        try:
            if isinstance(event, ev.Started):
                self.start(event.resumed_from_step)
            elif self.tracker is None:
                return
            elif isinstance(event, ev.Step):
                self.log_step(event)
            elif isinstance(event, ev.SampleSaved):
                self.log_sample(event)
            elif isinstance(event, (ev.Finished, ev.Failed, ev.Stopped)):
                self.finish()
        except Exception as e:  # the tracker's own failure: the run goes on without it
            self.dead = True
            self.say(f"warning: run tracking with {self.config.log_with} stopped "
                     f"({type(e).__name__}: {e}); the training goes on without it.")

    def start(self, resumed_from_step: int) -> None:
        name = self.config.log_with
        if name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user says
        try:
            cls = self.classes()[name]
            self.tracker = self.make(cls, resumed_from_step)
        except Exception as e:
            self.dead = True
            missing = isinstance(e, ImportError)
            self.say(f"warning: run tracking with {name} could not start "
                     f"({type(e).__name__}: {e}); the training goes on without it."
                     + (f" Install it with `pip install {PACKAGES.get(name, name)}`."
                        if missing else ""))
            return
        self.tracker.store_init_configuration(hyperparameters(self.config))
        self.say(f"Run tracking: {name} in {logging_folder(self.config)}")

    def make(self, cls, resumed_from_step: int):
        folder = logging_folder(self.config)
        os.makedirs(folder, exist_ok=True)
        kwargs = {}
        if "logging_dir" in inspect.signature(cls.__init__).parameters:
            kwargs["logging_dir"] = folder
        if self.config.log_with == "tensorboard" and resumed_from_step:
            # a resumed run: the reader drops what the stopped run logged after its snapshot
            kwargs["purge_step"] = resumed_from_step + 1
        if self.config.log_with == "wandb":
            kwargs["dir"] = folder
        tracker = cls(self.config.model_name, **kwargs)
        if hasattr(tracker, "start"):  # accelerate >= 1.2 starts a tracker in two steps
            tracker.start()
        return tracker

    def log_step(self, event: ev.Step) -> None:
        values = {"lr": event.lr, "steps_per_s": event.it_per_s}
        if event.loss is not None:
            values["loss"] = event.loss
        if event.vram_gb:
            values["vram_gb"] = event.vram_gb
        self.tracker.log(values, step=event.step)

    def log_sample(self, event: ev.SampleSaved) -> None:
        import numpy as np
        from PIL import Image
        with Image.open(event.path) as im:
            pixels = np.asarray(im.convert("RGB"))
        k = self.samples_at.get(event.step, 0)
        self.samples_at[event.step] = k + 1
        if self.config.log_with == "tensorboard":
            self.tracker.log_images({f"samples/{k}": pixels[None]}, step=event.step,
                                    dataformats="NHWC")
        else:
            self.tracker.log_images({f"samples/{k}": [pixels]}, step=event.step)

    def finish(self) -> None:
        tracker, self.tracker = self.tracker, None
        tracker.finish()
