"""What a remote caller (the HTTP API, the tab's handlers) may name: folders inside the host's
roots, and source checkpoints by their name in the host's list. Standard library only.

A path leaves the roots through `..`, an absolute path elsewhere or a symlink; each is refused
with a Problem naming the field. Flux's and SD3.5's part files may also be named as the host
lists them (Host.part_files: Forge's VAE / Text Encoder list, by file name or path): such a
name is the listed file, wherever the host keeps it. Relative paths count from the field's first root. The CLI and
the Python API don't come through here: they may use any path.
"""
from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from ..config import Problem, TrainingConfig
from ..config.cloud import is_url, redact
from ..config.errors import ConfigError
from ..config.folders import held_here, lock_owner
from .interface import Host
from .parts import PART_FIELDS, listed_part

SHORT = 200  # longest value echoed back in an error
LEAVES = "leaves the folders this host offers"


def short(value, limit: int = SHORT):
    """`value` cut to `limit` characters when it is a long string (errors never echo
    megabytes), with characters UTF-8 can't carry (lone surrogates) written as escapes."""
    if isinstance(value, str):
        if len(value) > limit:
            value = value[:limit] + f"... ({len(value)} characters)"
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def roots_of(host: Host, field: str) -> list[Path]:
    """The folders `field` may point into, its default root first."""
    p = host.paths
    data = getattr(p, "data_dir", None) or p.work_dir
    models = [p.checkpoints_dir.parent, p.work_dir]  # Flux's files: the host's models folder
    shipped = [Path(host.t5_tokenizer_dir)] if getattr(host, "t5_tokenizer_dir", None) else []
    roots = {"flux_clip_l": models, "flux_t5xxl": models, "flux_ae": models,
             "sd35_clip_l": models, "sd35_clip_g": models, "sd35_t5xxl": models,
             "sd35_vae": models,
             "t5_tokenizer_dir": models + shipped, "work_dir": [p.work_dir],
            "output_dir": [p.checkpoints_dir, p.work_dir],
            "lora_dir": [p.lora_dir, p.work_dir],
            "embedding_dir": [p.embeddings_dir, p.work_dir],
            "resume": [p.work_dir],
            "logging_dir": [p.work_dir],
            "instance_data_dir": [data, p.work_dir],
            "class_data_dir": [data, p.work_dir],
            "model_name": [p.work_dir]}[field.rsplit(".", 1)[-1]]
    unique = {os.path.realpath(r): Path(r) for r in reversed(roots)}  # the data dir may be
    return list(reversed(unique.values()))  # the work dir: one folder, named once


def inside(value: str, roots: list[Path], field: str) -> Path:
    """`value` resolved (symlinks followed) when it lies in one of `roots`; else ConfigError."""
    shown = ", ".join(str(r) for r in roots)
    fix = f"give a folder inside {shown}"
    why = "is not text" if not isinstance(value, str) else "holds a NUL character" \
        if "\x00" in value else None if _encodable(value) else \
        "holds characters that are not valid Unicode (a lone surrogate)"
    if why:
        raise ConfigError([Problem(field, short(repr(value)), why, fix)])
    if is_url(value):  # a bucket is the command line's and Python's, never a remote caller's
        raise ConfigError([Problem(field, short(redact(value)), LEAVES + " (a URL: buckets are "
                                   "for the command line and the Python API)", fix)])
    first = Path(os.path.realpath(roots[0]))
    target = Path(os.path.realpath(first / os.path.expanduser(value) if value else first))
    for root in roots:
        real = Path(os.path.realpath(root))
        if target == real or real in target.parents:
            return target
    why = LEAVES
    if ".." in Path(value).parts:
        why += " (through '..')"
    elif Path(os.path.abspath(first / value)) != target:
        why += " (through a symlink)"
    raise ConfigError([Problem(field, short(value), why, fix)])


def _encodable(value: str) -> bool:
    """True when the file system can take `value` as a name (not a lone surrogate that its
    encoding can't write)."""
    try:
        os.fsencode(value)
        return True
    except UnicodeError:
        return False


def regular_file(path: str | os.PathLike, field: str) -> Problem | None:
    """None when `path` is a regular file; a Problem for a FIFO, device, folder or missing file
    (checked with stat, before anything opens it: opening a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return Problem(field, short(str(path)), "does not exist", "choose a checkpoint from the list")
    if not stat.S_ISREG(mode):
        return Problem(field, short(str(path)), "is not a regular file",
                       "choose a checkpoint file from the list")
    return None


def pick_source(host: Host, value) -> str:
    """The file of the checkpoint called `value` in the host's list: by its title ('base.
    safetensors [93316a775d]'), its file's path, its title or path without the hash, its path
    relative to the checkpoints folder, or its file name alone when only one file has it;
    ConfigError listing the names when there is none, or when it is not a regular file. (A miss
    does not rescan: a caller must not make the host walk its folders, or the WebUI reselect
    its --ckpt, at will; the tab's refresh button and the WebUI's refresh-checkpoints do that.)"""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError([Problem("source_checkpoint", short(value), "is empty",
                                   "choose a checkpoint from the list")])
    value = value.strip()
    listed, found = host.list_checkpoints(), []
    for tier in range(3):  # the most exact kind of name that matches wins
        found = found or [c for c in listed if value in _names(c, host.paths.checkpoints_dir,
                                                                tier)]
    if len(found) == 1 or len({c.filename for c in found}) == 1:
        problem = regular_file(found[0].filename, "source_checkpoint")
        if problem:
            raise ConfigError([problem])
        return found[0].filename
    titles = [c.title for c in (found or listed)]
    shown = ", ".join(f"'{t}'" for t in titles[:20]) + (f" and {len(titles) - 20} more"
                                                         if len(titles) > 20 else "")
    why = f"names {len(found)} checkpoints" if found else "is not a checkpoint this host lists"
    fix = (f"choose one of: {shown}" if titles else "put a checkpoint into "
           f"'{host.paths.checkpoints_dir}'") + " (refresh the list if the file is new)"
    raise ConfigError([Problem("source_checkpoint", short(value), why, fix)])


def _names(c, folder: Path, tier: int) -> set[str]:
    """The names a listed checkpoint answers to, most exact first: (0) its title and its file's
    path, (1) its title without the WebUI's ' [hash]' and its path relative to the checkpoints
    folder (either slash), (2) its file name."""
    if tier == 0:
        return {c.title, c.filename}
    if tier == 2:
        return {os.path.basename(c.filename)}
    names = {c.title.rsplit(" [", 1)[0] if c.title.endswith("]") else c.title}
    try:
        relative = os.path.relpath(c.filename, folder)
    except ValueError:  # another drive (Windows)
        relative = ""
    if relative and not relative.startswith(".."):
        names.update({relative, relative.replace(os.sep, "/")})
    return names


def confine(config: TrainingConfig, host: Host, need_source: bool = True) -> TrainingConfig:
    """`config` with every path resolved inside the host's roots and the source picked from the
    host's list (an empty one kept when not `need_source`); ConfigError naming each field that
    leaves them."""
    problems: list[Problem] = []
    changes: dict = {}

    listed = host.part_files() if any(getattr(config, n, "") for n in PART_FIELDS) else None

    def check(field: str, value: str, allow_empty: bool = True):
        if allow_empty and value == "":
            return value
        if field in PART_FIELDS and (path := listed_part(listed, value)) is not None:
            return path  # a file the host lists (Forge: its VAE / Text Encoder list)
        try:
            return str(inside(value, roots_of(host, field), field))
        except ConfigError as e:
            problems.extend(e.problems)
            return value

    changes["work_dir"] = check("work_dir", config.work_dir, allow_empty=False)
    for name in ("output_dir", "lora_dir", "embedding_dir", "logging_dir", "flux_clip_l",
                 "flux_t5xxl", "flux_ae", "t5_tokenizer_dir", "sd35_clip_l", "sd35_clip_g",
                 "sd35_t5xxl", "sd35_vae"):
        if name in {f.name for f in dataclasses.fields(config)}:
            changes[name] = check(name, getattr(config, name))
    if isinstance(config.resume, str) and config.resume.strip() not in ("", "auto", "never"):
        changes["resume"] = check("resume", config.resume)
    if isinstance(config.model_name, str) and config.model_name and not problems:
        try:
            inside(str(Path(changes["work_dir"]) / config.model_name), [Path(changes["work_dir"])],
                   "model_name")
        except ConfigError as e:
            problems.extend(e.problems)
    concepts = []
    for i, c in enumerate(config.concepts):
        if not dataclasses.is_dataclass(c):
            concepts.append(c)  # validate() names it
            continue
        concepts.append(dataclasses.replace(c, **{
            k: check(f"concepts[{i}].{k}", getattr(c, k)) for k in ("instance_data_dir",
                                                                     "class_data_dir")}))
    try:
        if need_source or config.source_checkpoint != "":
            changes["source_checkpoint"] = pick_source(host, config.source_checkpoint)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(config, concepts=tuple(concepts), **changes)


def refused(problems: list[Problem]) -> bool:
    """True when one of `problems` is a path leaving the host's folders (HTTP 403, not 422)."""
    return any(p.why.startswith(LEAVES) for p in problems)


def checked(config: TrainingConfig, host: Host, need_source: bool = True,
            check_paths: bool = True, keep=lambda field: True) -> TrainingConfig:
    """confine(), then validate() (only the fields `keep` accepts): ConfigError with every
    problem at once. Paths are only looked at once they are known to be inside."""
    try:
        config, outside = confine(config, host, need_source), []
    except ConfigError as e:
        outside = e.problems
    named = {p.field for p in outside}
    problems = outside + [p for p in config.validate(check_paths=check_paths and not outside)
                          if p.field not in named and keep(p.field)]
    if problems:
        raise ConfigError(problems)
    return config


def model_folder(host: Host, name, field: str = "model_name") -> Path:
    """The folder of the saved model called `name` inside the work dir (for 'Load settings')."""
    from ..config.checks import check_name
    problems = check_name(name)
    if problems:
        raise ConfigError([dataclasses.replace(p, field=field) for p in problems])
    return inside(name, [host.paths.work_dir], field)


def training_now(manager, folder: Path, name: str) -> str:
    """Why the settings of the model in `folder` must not be written now (a run of it is going
    on, here or from the command line: it writes its settings back when it ends, so an edit
    would be lost without a word), or ''."""
    run = manager.run
    pid = locked_elsewhere(folder)
    here = run is not None and manager.busy() and os.path.realpath(
        Path(run.config.work_dir) / run.config.model_name) == os.path.realpath(folder)
    if pid is None and not here:
        return ""
    return (f"The model '{name}' is being trained now" + (f" (process {pid})" if pid else "")
            + "; the run writes its settings back when it ends, so a change now would be lost.")


def locked_elsewhere(folder: Path) -> int | None:
    """The process id in the model's training lock when a live process of this machine holds
    it (a run from the command line), else None."""
    owner = lock_owner(folder)
    return owner["pid"] if held_here(owner) else None
