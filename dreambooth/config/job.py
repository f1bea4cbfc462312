"""A training service's job contract: `python -m dreambooth train --config hyperparameters.json`
where the service (SageMaker's, and those shaped like it) passes every hyperparameter as a
string, the data as channel folders (SM_CHANNEL_<NAME>) and collects the model from
SM_MODEL_DIR. Standard library only.

- A file whose every value is a string is read as hyperparameters: each value is turned into its
  field's type ("2" -> 2, "true" -> True, "1e-4" -> 0.0001, a JSON-quoted string -> the string,
  "concepts": a JSON list). A value that does not convert is left as it is, so the config's own
  validation names it in the usual words ("steps_per_image = 'abc': should be a whole number").
- In a job (a SM_* variable set, or a file of strings) a concept's fields may be given at the
  top level (instance_prompt, class_prompt, ...), as on the command line.
- Without the variables, a config at <root>/input/config/hyperparameters.json finds them from
  the service's folder layout (layout_env).
- Channels fill what the file leaves out: SM_CHANNEL_INSTANCE -> the concept's instance folder,
  SM_CHANNEL_CLASS -> its class folder, SM_CHANNEL_MODEL -> the one checkpoint in that folder,
  SM_MODEL_DIR -> output_dir, lora_dir and embedding_dir, SM_OUTPUT_DATA_DIR -> logging_dir.
"""
from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, Problem
from .schema import Concept, TrainingConfig
from .textfile import parse_json, read_config_text

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def load_config(path: str | os.PathLike, env: Mapping[str, str] = os.environ) -> TrainingConfig:
    """TrainingConfig.load, plus the job contract (hyperparameters of strings, channels)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([Problem("--config", str(p), "does not exist",
                                   "give the path of a JSON config file")])
    data = parse_json(read_config_text(p), "(file)")
    env = {**layout_env(p), **env}
    in_job = any(k.startswith("SM_") for k in env)
    if isinstance(data, dict) and (in_job or is_hyperparameters(data)):
        data = job_dict(data, env)
    return TrainingConfig.from_dict(data)


def layout_env(path: Path) -> dict:
    """The service's variables from its folder layout, for a container started without them
    (SageMaker sets them only through its training toolkit): a config at
    <root>/input/config/hyperparameters.json has its channels in <root>/input/data/<name>, its
    model goes to <root>/model, other output to <root>/output/data."""
    config = path.resolve().parent
    if config.name != "config" or config.parent.name != "input":
        return {}
    root, env = config.parent.parent, {}
    data = config.parent / "data"
    if data.is_dir():
        env.update({f"SM_CHANNEL_{d.name.upper()}": str(d) for d in data.iterdir() if d.is_dir()})
    env["SM_MODEL_DIR"] = str(root / "model")
    env["SM_OUTPUT_DATA_DIR"] = str(root / "output" / "data")
    return env


def is_hyperparameters(data: dict) -> bool:
    return bool(data) and all(isinstance(v, str) for v in data.values())


def job_dict(data: dict, env: Mapping[str, str]) -> dict:
    """The job's file, typed, its flat concept fields gathered and the channels filled in."""
    types = {f.name: str(f.type) for f in fields(TrainingConfig)}
    concept_types = {f.name: str(f.type) for f in fields(Concept)}
    out, flat = {}, {}
    for key, value in data.items():
        if key == "schema_version":  # the file's format, never a hyperparameter: as written
            out[key] = value
        elif key in concept_types and key not in types:
            flat[key] = typed(value, concept_types[key])
        elif key == "concepts" and isinstance(value, str):
            out[key] = _json(value)
        else:
            out[key] = typed(value, types.get(key, "str"))
    channel = {k[len("SM_CHANNEL_"):].lower(): v for k, v in env.items()
               if k.startswith("SM_CHANNEL_")}
    if "instance" in channel:
        flat.setdefault("instance_data_dir", channel["instance"])
    if "class" in channel:
        flat.setdefault("class_data_dir", channel["class"])
    if flat and "concepts" not in out:
        out["concepts"] = [flat]
    elif flat:  # both: the flat fields can't say which concept they belong to
        raise ConfigError([Problem(sorted(flat)[0], flat[sorted(flat)[0]], "is given beside "
                                   "'concepts'", "put it inside the concept it belongs to")])
    if "model" in channel and "source_checkpoint" not in out:
        out["source_checkpoint"] = channel_checkpoint(channel["model"])
    for key in ("output_dir", "lora_dir", "embedding_dir"):
        if env.get("SM_MODEL_DIR") and not out.get(key):
            out[key] = env["SM_MODEL_DIR"]
    if env.get("SM_OUTPUT_DATA_DIR") and not out.get("logging_dir"):
        out["logging_dir"] = str(Path(env["SM_OUTPUT_DATA_DIR"]) / "tracking")
    return out


def typed(value: Any, annotation: str) -> Any:
    """`value` (a string from the service) as `annotation` says; left as is when it won't go."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if annotation == "bool":
        low = text.strip('"').lower()
        return True if low in _TRUE else False if low in _FALSE else value
    if annotation in ("int", "float"):
        try:
            number = float(text.strip('"')) if annotation == "float" else int(text.strip('"'))
        except ValueError:
            return value
        return number
    if text.startswith('"'):  # a JSON-quoted string (a framework estimator json.dumps each value)
        decoded = _json(text)
        return decoded if isinstance(decoded, str) else value
    return value


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # the config's validation names it ("is not a list")


def channel_checkpoint(folder: str) -> str:
    """The one checkpoint file in the model channel's folder."""
    found = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if len(found) != 1:
        why = "holds no .safetensors or .ckpt file" if not found else \
            f"holds {len(found)} checkpoints ({', '.join(p.name for p in found[:3])})"
        raise ConfigError([Problem("SM_CHANNEL_MODEL", folder, why, "put exactly one checkpoint "
                                   "in the model channel, or give source_checkpoint")])
    return str(found[0])
