"""Which snapshot a run goes on from, and whether it can.

A snapshot is checked against the run before anything is restored: its files as written (their
sizes), its position within this run's plan, its weights' names and shapes against the model,
the base it was trained beside (the source checkpoint's hash, the working model's revision).
A damaged or inconsistent one is named in a warning and the previous one is taken; when none
is left the run is refused (the states stay: a copy may be put back), never silently started
over. A snapshot of another configuration, other images or another base is refused as before:
those are the user's changes to undo, not damage.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..config.errors import DreamboothError
from .sourcehash import source_sha256
from .state import (STATE_DIR, config_differences, load_snapshot, read_info, read_training,
                    refuse_changed_images, snapshots, trained_ids, weights_to_keep)


def refuse_other_base(trainer, folder: Path, info: dict) -> None:
    base = info.get("base")
    if not isinstance(base, dict):
        return  # a snapshot of an older version
    cfg, then = trainer.cfg, base.get("source_sha256")
    then = then if isinstance(then, str) else None
    now = source_sha256(cfg.source_checkpoint) if then else None
    if then and now != then:
        raise DreamboothError(
            f"The source checkpoint '{cfg.source_checkpoint}' is not the file the saved training "
            f"state '{folder}' was trained on (sha256 {str(now)[:10]}, it was {then[:10]}); "
            "resuming would put its trained weights on another base.",
            f"Put back the source file whose sha256 starts with {then[:10]} to resume, or set "
            "resume to 'never' to start over on this one.")
    revision = getattr(trainer, "base_revision", trainer.revision)
    if base.get("revision", revision) != revision:
        raise DreamboothError(
            f"The saved training state '{folder}' was trained on the working model at revision "
            f"{base['revision']}, which is now at revision {revision} (another run of this "
            "model finished since); resuming would not continue the same run.",
            "Set resume to 'never' to start over from the working model as it is now.")


# -- damage: said in words, the snapshot skipped ---------------------------------------------
def file_problem(folder: Path) -> tuple[dict | None, str | None]:
    """(trainer.json, None), or (None, what is wrong) read from the folder alone."""
    try:
        info = read_info(folder)
    except (OSError, ValueError, RecursionError) as e:
        return None, f"its trainer.json can't be read ({type(e).__name__})"
    step, total = info["step"], info.get("total_steps")
    if step < 1 or (isinstance(total, int) and step > total):
        return None, f"it says step {step} of a {total}-step run"
    for key in ("epoch", "batch", "class_cursor", "accelerator_step"):
        if not isinstance(info.get(key), int) or info[key] < 0:
            return None, f"its trainer.json has no valid '{key}'"
    files = info.get("files")
    names = files if isinstance(files, dict) else {"model_0.safetensors": None,
                                                   "training.pt": None}
    for name, size in names.items():
        if not re.fullmatch(r"model_\d+\.safetensors|training\.pt", name) or \
                not isinstance(size, (int, type(None))):
            return None, f"its trainer.json lists '{name}', not a file of a training state"
        path = folder / name
        if not path.is_file():
            return None, f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return None, (f"{name} is {path.stat().st_size} bytes, it was {size} when written: "
                          "cut short or replaced")
    return info, None


def plan_problem(trainer, info: dict) -> str | None:
    """Where the snapshot says the run is, against this run's plan."""
    if info["step"] > trainer.total_steps:
        return f"it says step {info['step']}, past this run's {trainer.total_steps} steps"
    if info["epoch"] >= trainer.epochs or info["batch"] > trainer.batches_per_epoch:
        return (f"its position (epoch {info['epoch'] + 1}, batch {info['batch']}) is outside "
                f"this run's {trainer.epochs} epochs of {trainer.batches_per_epoch} batches")
    order, n = info.get("order"), len(trainer.feed.items)
    if order is not None and (not isinstance(order, list) or not all(
            isinstance(i, int) and 0 <= i < n for i in order)):
        return f"its image order names images this run doesn't have ({n} images)"
    return None


def weights_problem(trainer, folder: Path, info: dict) -> str | None:
    """Each model file's names and shapes against the model's (the trained weights alone
    beside a frozen base)."""
    from ..model.filecheck import read_layout
    trained = trained_ids(trainer) if info.get("trained_only") else None
    for i, model in enumerate(trainer.models):
        name = f"model_{i}.safetensors"
        want = {k: tuple(v.shape) for k, v in weights_to_keep(trainer, model, trained).items()}
        try:
            have = read_layout(folder / name)[0]
        except Exception as e:  # a foreign or damaged file fails in many ways
            return f"{name} can't be read ({type(e).__name__})"
        other = sorted(set(have) ^ set(want)) + sorted(
            k for k in set(have) & set(want) if have[k] != want[k])
        if other:
            return (f"{name} doesn't fit this model: {len(other)} weights' names or shapes "
                    f"differ, e.g. '{other[0]}'")
    return None


# -- choosing and restoring ---------------------------------------------------------------------
def choose_snapshot(cfg, model_dir: Path, warn) -> Path | None:
    """The snapshot `cfg.resume` names: 'never' none, a folder that one, 'auto' the newest whose
    files are whole (a damaged one is said and skipped)."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        folder = Path(cfg.resume)
        if not (folder / "trainer.json").is_file():
            raise DreamboothError(f"'{folder}' is not a saved training state.", "Choose one of "
                                  f"the step_* folders in '{model_dir / STATE_DIR}'.")
        problem = file_problem(folder)[1]
        if problem:
            raise refuse_chosen(cfg, folder, problem)
        return folder
    return next(iter(usable(model_dir, warn, None)), None)


def usable(model_dir: Path, warn, before: Path | None) -> list[Path]:
    """Snapshots whose files are whole, newest first (those older than `before`); each damaged
    one said; several, none usable: refused."""
    found, skipped = [], []
    for folder in reversed(snapshots(model_dir)):
        if before is not None and folder.name >= before.name:
            continue
        problem = file_problem(folder)[1]
        if problem:
            skipped.append((folder, problem))
            warn(skip_text(folder, problem))
        else:
            found.append(folder)
    if skipped and not found and before is None:
        raise refuse_all(model_dir, skipped)
    return found


def skip_text(folder: Path, problem: str) -> str:
    return (f"The saved training state '{folder}' can't be resumed, so an earlier one is used "
            f"if there is one: {problem}.")


def refuse_chosen(cfg, folder: Path, problem: str) -> DreamboothError:
    return DreamboothError(f"The saved training state '{folder}' can't be resumed: {problem}.",
                           f"Choose another step_* folder in '{cfg.model_dir / STATE_DIR}', or "
                           "set resume to 'auto' (the newest usable one) or 'never' (start "
                           "over).")


def refuse_all(model_dir: Path, skipped: list) -> DreamboothError:
    """None of the snapshots can be resumed: refused, not started over (a finished run would
    delete them, and a copy of one may be put back)."""
    names = "; ".join(f"{f.name}: {why}" for f, why in skipped)
    return DreamboothError(
        f"No saved training state in '{model_dir / STATE_DIR}' can be resumed: {names}. They "
        "are left as they are.", "Put back an undamaged copy to go on from it, or set resume to "
        "'never' to start over from step 0 (a finished run then deletes them).")


def resume_position(trainer) -> dict:
    """Restore the chosen snapshot, checked against the run first; a damaged one is said and
    the previous one taken. The position to start from (step 0 without a snapshot)."""
    first, cfg = trainer.resume_from, trainer.cfg
    if first is None:
        return {"step": 0, "epoch": 0, "batch": 0, "order": None}
    chosen, skipped = cfg.resume != "auto", []
    for folder in [first, *([] if chosen else usable(cfg.model_dir, trainer.warn, first))]:
        position, problem = try_restore(trainer, folder)
        if problem is None:
            trainer.say(f"Resuming from step {position['step']} of {trainer.total_steps} "
                        f"({folder.name}).")
            return position
        if chosen:
            raise refuse_chosen(cfg, folder, problem)
        trainer.warn(skip_text(folder, problem))
        skipped.append((folder, problem))
    raise refuse_all(cfg.model_dir, skipped)


def try_restore(trainer, folder: Path) -> tuple[dict | None, str | None]:
    """(position, None) restored from `folder`, or (None, what is wrong with it); a snapshot
    of another configuration, other images or another base is refused."""
    info, problem = file_problem(folder)
    if problem:
        return None, problem
    diffs = config_differences(info["config"], trainer.cfg.to_dict())
    if diffs:
        raise DreamboothError(
            f"The saved training state in '{folder}' belongs to a different configuration; "
            "resuming would not continue the same run. Changed: " + "; ".join(diffs) + ".",
            "Undo these changes to resume, or set resume to 'never' to start over.")
    refuse_changed_images(folder, info, trainer.feed.items)
    refuse_other_base(trainer, folder, info)
    problem = plan_problem(trainer, info) or weights_problem(trainer, folder, info)
    if problem:
        return None, problem
    try:
        data = read_training(folder)
    except Exception as e:  # truncated or foreign files fail in many ways
        return None, f"training.pt can't be read ({type(e).__name__})"
    try:
        return load_snapshot(trainer, folder, info, data), None
    except DreamboothError as e:
        return None, e.message.rstrip(".")
    except Exception as e:  # e.g. an optimizer state of other weights
        return None, f"it does not fit this run ({type(e).__name__}: " \
                     f"{' '.join(str(e).split())[:120]})"
