"""Settings and words of a run that reaches beyond this machine: run tracking (accelerate's
trackers), object-storage URLs for folders. Standard library only.

The fields are declared in TrainingConfig (schema.py) from the definitions here.
"""
from __future__ import annotations

import re
from dataclasses import field

TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


def _f(default, help: str, choices: tuple = ()):
    return field(default=default, metadata={"help": help, "advanced": True, "choices": choices,
                                            "minimum": None, "maximum": None})


LOG_WITH = _f("none", "Run tracking through accelerate's trackers: loss, learning rate, steps/s, "
                      "memory and the preview images, with the config as hyperparameters. "
                      "'none': off. The tracker's package is an optional install (pip install "
                      "tensorboard, wandb, mlflow ...); wandb runs offline unless WANDB_MODE "
                      "says otherwise; a tracker that can't start is a warning, never a failed "
                      "run.", TRACKERS)
LOGGING_DIR = _f("", "Folder the tracker writes to (TensorBoard's event files: point "
                     "`tensorboard --logdir` here). Empty: <work_dir>/<model_name>/tracking.")

# scheme://... (two letters at least: a Windows drive letter, C:\..., is a path)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+://)[^/@]*@")
_SECRET_QUERY = re.compile(r"([?&][^=&]*(?:sig|signature|token|key|secret|credential)[^=&]*=)"
                           r"[^&]*", re.IGNORECASE)


def is_url(value) -> bool:
    """An fsspec URL (s3://, gs://, az://, file://, ...): not a local path."""
    return isinstance(value, str) and bool(_URL.match(value))


def redact(url: str) -> str:
    """The URL as it may be shown: a user:password@ and signed query values replaced by ***."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", url))


def logging_folder(config) -> str:
    return config.logging_dir or str(config.model_dir / "tracking")
