"""The checks behind TrainingConfig.validate(): each returns the problems it finds, in words a
user understands, and never raises."""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import Problem
from .levers import check_checkpoint_blocks

_RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                   *(f"lpt{i}" for i in range(1, 10))}
_BAD_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
MAX_NAME_LENGTH = 100
MAX_TEXT_LENGTH = 10_000  # a prompt or a path: CLIP reads 77 tokens, paths end at 4096 bytes
MAX_UNBOUNDED_INT = 10**9  # a count without its own maximum
NAME_MAX_BYTES = 255  # the longest file or folder name ext4, XFS, btrfs, NTFS and APFS take
PATH_MAX_BYTES = 4095  # the longest path Linux takes (a run adds ~80 bytes below the model)
PATH_FIELDS = ("work_dir", "output_dir", "lora_dir", "embedding_dir", "resume",
               "source_checkpoint")


def is_dir(path: str) -> bool:
    """Path(path).is_dir() that answers False for a path the OS can't take (NUL, surrogates)."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _text_problem(value: str) -> str | None:
    if len(value) > MAX_TEXT_LENGTH:
        return f"is {len(value)} characters long (at most {MAX_TEXT_LENGTH})"
    if "\x00" in value:
        return "holds a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "holds characters that are not valid Unicode (a lone surrogate)"
    return None


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def unknown_keys(data: dict, cls, prefix: str) -> list[Problem]:
    problems = []
    for key in data:
        if key in field_names(cls):
            continue
        close = difflib.get_close_matches(str(key), field_names(cls), n=1)
        fix = f"did you mean '{close[0]}'?" if close else "remove it"
        problems.append(Problem(prefix + str(key), data[key], "is not a known setting", fix))
    return problems


def _type_ok(value: Any, annotation: str) -> bool:
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        try:
            return isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value)
        except OverflowError:  # an int too large for a float
            return False
    if annotation == "str":
        return isinstance(value, str)
    return True


def check_fields(obj, prefix: str) -> list[Problem]:
    problems = []
    for f in fields(obj):
        value, meta, name = getattr(obj, f.name), f.metadata, prefix + f.name
        if not _type_ok(value, str(f.type)):
            problems.append(Problem(name, value, f"should be {_type_word(str(f.type))}",
                                    f"give {_type_word(str(f.type))} (default {f.default!r})"))
            continue
        if meta.get("choices") and value not in meta["choices"]:
            problems.append(Problem(name, value, "is not one of the choices",
                                    "choose one of: " + ", ".join(meta["choices"])))
        if isinstance(value, str) and _text_problem(value):
            problems.append(Problem(name, value, _text_problem(value),
                                    "give plain text of reasonable length"))
            continue
        lo, hi = meta.get("minimum"), meta.get("maximum")
        if hi is None and isinstance(value, int) and value > MAX_UNBOUNDED_INT:
            hi = MAX_UNBOUNDED_INT
        if lo is not None and value < lo:
            problems.append(Problem(name, value, f"is below the minimum {lo}", f"use {lo} or more"))
        if hi is not None and value > hi:
            problems.append(Problem(name, value, f"is above the maximum {hi}", f"use {hi} or less"))
    return problems


def _type_word(annotation: str) -> str:
    return {"bool": "true or false", "int": "a whole number", "float": "a number",
            "str": "text"}.get(annotation, annotation)


def check_name(name: Any) -> list[Problem]:
    if not isinstance(name, str):
        return []
    why = None
    if not name.strip():
        why = "is empty"
    elif len(name) > MAX_NAME_LENGTH:
        why = f"is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    elif len(name.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES:
        why = (f"is {len(name.encode('utf-8', 'surrogatepass'))} bytes long in UTF-8, longer "
               f"than a folder name may be ({NAME_MAX_BYTES} bytes)")
    elif _BAD_NAME_CHARS.search(name) or name in (".", "..") or ".." in name:
        why = "contains a path separator, '..' or a reserved character (<>:\"/\\|?*)"
    elif name.split(".")[0].lower() in _RESERVED_NAMES:
        why = "is a reserved device name on Windows"
    elif name != name.strip() or name.endswith("."):
        why = "starts or ends with a space or ends with a dot"
    if why is None:
        return []
    return [Problem("model_name", name, why,
                    "use letters, digits, '-', '_' and '.', e.g. 'my_dog'")]


def path_length_problem(value: str) -> str | None:
    """Why the file system would refuse `value` as a path for its length (ENAMETOOLONG), or
    None."""
    try:
        data = os.fsencode(value)
    except (UnicodeError, ValueError):  # a lone surrogate: _text_problem names it
        return None
    if len(data) > PATH_MAX_BYTES:
        return f"is {len(data)} bytes long, more than a path may be ({PATH_MAX_BYTES} bytes)"
    for sep in (os.sep, os.altsep or os.sep):
        data = data.replace(os.fsencode(sep), b"/")
    longest = max(len(part) for part in data.split(b"/"))
    if longest > NAME_MAX_BYTES:
        return (f"holds a name of {longest} bytes, more than a file or folder name may be "
                f"({NAME_MAX_BYTES} bytes)")
    return None


def check_path_lengths(cfg) -> list[Problem]:
    """Every path field (and the model's folder, work_dir/model_name) short enough for the
    file system, so no mkdir or open fails later with 'File name too long'."""
    values = [(name, getattr(cfg, name, None)) for name in PATH_FIELDS]
    values += [(f"concepts[{i}].{k}", getattr(c, k, None)) for i, c in enumerate(cfg.concepts)
               for k in ("instance_data_dir", "class_data_dir")]
    problems = []
    for name, value in values:
        if isinstance(value, str) and not _text_problem(value) and path_length_problem(value):
            problems.append(Problem(name, value, path_length_problem(value),
                                    "give a shorter path"))
    if isinstance(cfg.work_dir, str) and isinstance(cfg.model_name, str) and not problems:
        longest = os.path.join(cfg.work_dir, cfg.model_name, "x" * 80)
        if not _text_problem(longest) and path_length_problem(longest):
            problems.append(Problem("work_dir", cfg.work_dir, "is so long that the files a run "
                                    f"writes under <work_dir>/{cfg.model_name} would pass the "
                                    f"longest path the system takes ({PATH_MAX_BYTES} bytes)",
                                    "give a shorter work_dir or model_name"))
    return problems


def check_concept(c, i: int, check_paths: bool) -> list[Problem]:
    problems, p = [], f"concepts[{i}]."
    if isinstance(c.instance_prompt, str) and not c.instance_prompt.strip():
        problems.append(Problem(p + "instance_prompt", c.instance_prompt, "is empty",
                                "describe the subject with a rare token, e.g. 'photo of sks dog'"))
    if isinstance(c.instance_data_dir, str):
        if not c.instance_data_dir.strip():
            problems.append(Problem(p + "instance_data_dir", c.instance_data_dir, "is empty",
                                    "give the folder holding your subject's images"))
        elif check_paths and not is_dir(c.instance_data_dir):
            problems.append(Problem(p + "instance_data_dir", c.instance_data_dir,
                                    "is not an existing folder", "check the path"))
    if isinstance(c.class_images_per_instance, int) and c.class_images_per_instance > 0 \
            and isinstance(c.class_prompt, str) and not c.class_prompt.strip():
        problems.append(Problem(p + "class_prompt", c.class_prompt,
                                "is empty while class images are asked for",
                                "give a class prompt such as 'photo of a dog', or set "
                                "class_images_per_instance to 0"))
    return problems


def check_lora_and_buckets(cfg) -> list[Problem]:
    problems = check_memory_levers(cfg) + check_folders(cfg)
    if cfg.use_lora is True and cfg.train_text_encoder is True:
        problems.append(Problem("train_text_encoder", True, "trains the whole text encoder, "
                                "which a LoRA file can't hold",
                                "turn it off and turn on lora_text_encoder instead"))
    if cfg.bucketing is True and isinstance(cfg.resolution, int) and cfg.resolution % 64:
        problems.append(Problem("resolution", cfg.resolution, "is not a multiple of 64, which "
                                "bucketing needs", f"use {max(64, cfg.resolution // 64 * 64)}"))
    return problems


def check_source(source: Any) -> list[Problem]:
    if not isinstance(source, str):
        return []
    if not source.strip():
        return [Problem("source_checkpoint", source, "is empty",
                        "give a .safetensors checkpoint to start from")]
    path = Path(source)
    if not is_file(source):
        return [Problem("source_checkpoint", source, "does not exist",
                        "check the path of the checkpoint file")]
    if path.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        return [Problem("source_checkpoint", source, "is not a .safetensors or .ckpt file",
                        "choose a single-file Stable Diffusion checkpoint")]
    return []


def check_memory_levers(cfg) -> list[Problem]:
    problems = check_checkpoint_blocks(cfg)
    if cfg.fused_optimizer is True and cfg.gradient_accumulation_steps != 1:
        problems.append(Problem("fused_optimizer", True, "updates each weight during backward, "
                                "so gradients can't be accumulated over steps",
                                "set gradient_accumulation_steps to 1 or turn fused_optimizer off"))
    if cfg.fused_optimizer is True and cfg.mixed_precision == "fp16":
        problems.append(Problem("fused_optimizer", True, "can't run with fp16 mixed precision, "
                                "whose loss scaling must see every gradient before any update",
                                "use mixed_precision bf16 or turn fused_optimizer off"))
    if cfg.bf16_weights is True and cfg.mixed_precision not in ("bf16", "auto"):
        problems.append(Problem("bf16_weights", True, f"needs mixed_precision bf16, not "
                                f"'{cfg.mixed_precision}'",
                                "set mixed_precision to bf16 or turn bf16_weights off"))
    if cfg.fp8_base is True and cfg.method == "dreambooth":
        problems.append(Problem("fp8_base", True, "stores the UNet in fp8 for a run that does "
                                "not train it, but a full fine-tune (method dreambooth) trains "
                                "the whole UNet", "set method to 'lora' or 'textual_inversion', "
                                "or turn fp8_base off"))
    return problems


def _inside(inner: str, outer: str) -> bool:
    try:
        a, b = Path(inner).resolve(), Path(outer).resolve()
    except (OSError, ValueError, RuntimeError):
        return False
    return a == b or b in a.parents


def check_folders(cfg) -> list[Problem]:
    """Class images never go into an instance folder (they would be trained on as the subject
    next time); the folders the run writes to are not files."""
    problems = []
    if not all(isinstance(c, object) and isinstance(getattr(c, "class_data_dir", None), str)
               and isinstance(getattr(c, "instance_data_dir", None), str) for c in cfg.concepts):
        return problems
    for i, c in enumerate(cfg.concepts):
        if not c.class_data_dir.strip() or _text_problem(c.class_data_dir):
            continue
        for j, other in enumerate(cfg.concepts):
            if other.instance_data_dir.strip() and not _text_problem(other.instance_data_dir) \
                    and _inside(c.class_data_dir, other.instance_data_dir):
                problems.append(Problem(f"concepts[{i}].class_data_dir", c.class_data_dir,
                                        f"is (inside) the instance folder of concepts[{j}]; "
                                        "generated class images would be trained on as the "
                                        "subject", "choose a separate folder, or leave it empty"))
                break
    for name in ("work_dir", "output_dir", "lora_dir", "embedding_dir"):
        value = getattr(cfg, name)
        if isinstance(value, str) and value and not _text_problem(value) and is_file(value):
            problems.append(Problem(name, value, "is a file, not a folder",
                                    "give a folder (it is created when missing)"))
    return problems


def token_in(token: str, prompt: str) -> bool:
    """`token` stands in `prompt` as a word of its own (not inside a longer word)."""
    return bool(re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", prompt))


def check_embedding(cfg) -> list[Problem]:
    """method / use_lora / pivotal agree; a trained embedding has a token in every instance
    prompt (and in no class prompt) and a one-word initialisation."""
    problems = []
    if cfg.use_lora is True and cfg.method not in ("lora", "dreambooth"):
        problems.append(Problem("use_lora", True, f"asks for a LoRA while method is "
                                f"'{cfg.method}'", "turn use_lora off, or set method to "
                                "'lora' (use_lora is its older spelling)"))
    if cfg.pivotal is True and cfg.method != "lora":
        problems.append(Problem("pivotal", True, f"trains an embedding together with a LoRA, "
                                f"but method is '{cfg.method}'", "set method to 'lora', or use "
                                "method 'textual_inversion' for the embedding alone"))
    if cfg.method == "textual_inversion" and cfg.train_text_encoder is True:
        problems.append(Problem("train_text_encoder", True, "trains the whole text encoder, "
                                "which an embedding file can't hold", "turn it off (textual "
                                "inversion trains only the new token's embedding)"))
    ratio = cfg.text_encoder_steps_ratio
    if cfg.method == "textual_inversion" and isinstance(ratio, (int, float)) and 0 <= ratio < 1:
        problems.append(Problem("text_encoder_steps_ratio", ratio, "stops the embedding after "
                                "that share of the steps, and textual inversion trains nothing "
                                "else, so the steps after it would change nothing", "set it to "
                                "1.0 and lower the number of steps instead"))
    if not cfg.trains_embedding or not isinstance(cfg.embedding_token, str) \
            or not isinstance(cfg.embedding_init_word, str):
        return problems
    token, word = cfg.embedding_token.strip(), cfg.embedding_init_word.strip()
    if not token or re.search(r"\s", token) or "[filewords]" in token:
        problems.append(Problem("embedding_token", cfg.embedding_token,
                                "is not one word" if token else "is empty",
                                "give the one word of the instance prompt the embedding "
                                "learns, e.g. 'sks' in 'photo of sks dog'"))
        token = ""
    if not word or re.search(r"\s", word):
        problems.append(Problem("embedding_init_word", cfg.embedding_init_word,
                                "is not one word" if word else "is empty",
                                "give one word close to the subject, e.g. 'dog', or '*'"))
    for i, c in enumerate(cfg.concepts):
        if not token or not isinstance(getattr(c, "instance_prompt", None), str):
            continue
        if not token_in(token, c.instance_prompt):
            problems.append(Problem(f"concepts[{i}].instance_prompt", c.instance_prompt,
                                    f"does not contain the embedding's token '{token}'",
                                    f"write it in the prompt, e.g. 'photo of {token} dog'"))
        if isinstance(c.class_prompt, str) and token_in(token, c.class_prompt):
            problems.append(Problem(f"concepts[{i}].class_prompt", c.class_prompt,
                                    f"contains the embedding's token '{token}', so the class "
                                    "images would teach it too", "leave the token out of the "
                                    "class prompt"))
    return problems
