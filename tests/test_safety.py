"""Nothing the user owns is lost (issue 12, part 2) and resume and step arithmetic tell the truth
(part 4): the source is never replaced, folders not ours are never written into, clean-up
deletes by name, files follow the umask, a killed run's temp files go, a save that can't
happen is refused before training, a full or read-only disk keeps the old file and says how
much space is needed; a changed image set is refused on resume; accumulation, the text-encoder
ratio and stale locks do what they say."""
import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from dreambooth import Concept, DreamboothError, train
from dreambooth.config import events as ev
from dreambooth.config.errors import BugError
from dreambooth.config.folders import MARKER
from dreambooth.model.checkpoint import read_checkpoint, write_safetensors, write_text, \
    write_with
from dreambooth.training.state import ModelLock, pid_start_time, snapshots

from tally import tally_fixture  # noqa: E402

# our own writers, locks and checks: nothing version-sensitive (test.sh runs it once)
pytestmark = [pytest.mark.reliability, pytest.mark.once]
TALLY = {"tried": 0, "clear": 0, "handled": 0, "tracebacks": 0, "lost": 0}


report = tally_fixture("safety corpus", TALLY, ("tracebacks", "lost"))


def tree_hash(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
        h.update(str(p).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def refused(cfg, words, on_event=None, cancel=None):
    """train() refuses with a DreamboothError (not a bug) naming every word."""
    TALLY["tried"] += 1
    try:
        train(cfg, on_event, cancel)
    except BugError:
        TALLY["tracebacks"] += 1
        raise
    except DreamboothError as e:
        text = f"{e.message} {e.hint}"
        assert all(w in text for w in words), text
        TALLY["clear"] += 1
        return e
    raise AssertionError("the run was not refused")


# -- the source checkpoint -------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("lora_merge", [False, True])
def test_source_is_never_replaced(overwrite, lora_merge, quick_config, tiny_source, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    # 4 images x 2 steps: a save at step 8 is base_8 (a merged LoRA: base_8_merged)
    name = "base_8_merged.safetensors" if lora_merge else "base_8.safetensors"
    source = folder / name
    shutil.copyfile(tiny_source, source)
    before = source.read_bytes()
    cfg = quick_config.replace(model_name="base", source_checkpoint=str(source),
                               output_dir=str(folder), overwrite=overwrite,
                               use_lora=lora_merge, lora_merge=lora_merge)
    refused(cfg, ["source checkpoint", name])
    if source.read_bytes() != before:
        TALLY["lost"] += 1
    assert sorted(p.name for p in folder.iterdir()) == [name]


def test_source_reached_through_a_symlink_is_never_replaced(quick_config, tiny_source, tmp_path):
    folder, link = tmp_path / "models", tmp_path / "linked"
    folder.mkdir()
    link.symlink_to(folder)
    source = folder / "base_8.safetensors"
    shutil.copyfile(tiny_source, source)
    before = tree_hash(folder)
    refused(quick_config.replace(model_name="base", source_checkpoint=str(source),
                                 output_dir=str(link), overwrite=True), ["source checkpoint"])
    assert tree_hash(folder) == before


# -- whose folder ------------------------------------------------------------------------------
def foreign(t, kind):
    app = t / "projects" / "myapp"
    app.mkdir(parents=True)
    if kind == "a_file":
        (app / "main.py").write_text("print('mine')")
    elif kind == "a_config_json":
        (app / "config.json").write_text('{"name": "my app", "version": 3}')
    elif kind == "a_folder":
        (app / "src").mkdir()
    elif kind == "state_like":
        (app / "state").mkdir()
        (app / "state" / "notes.txt").write_text("mine")
    elif kind == "hidden_file":
        (app / ".env").write_text("SECRET=1")
    elif kind == "samples_folder":
        (app / "samples").mkdir()
        (app / "samples" / "holiday.png").write_bytes(b"png")
    return t / "projects"


@pytest.mark.parametrize("kind", ["a_file", "a_config_json", "a_folder", "state_like",
                                  "hidden_file", "samples_folder"])
def test_foreign_model_folder_is_refused_and_untouched(kind, quick_config, tmp_path):
    work = foreign(tmp_path, kind)
    before = tree_hash(work)
    refused(quick_config.replace(work_dir=str(work), model_name="myapp"),
            ["myapp", "not made by Dreambooth", MARKER])
    assert tree_hash(work) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["empty", "marked"])
def test_empty_or_marked_model_folder_is_used(kind, quick_config, tmp_path):
    folder = Path(quick_config.work_dir) / quick_config.model_name
    folder.mkdir(parents=True)
    if kind == "marked":
        (folder / MARKER).write_text("")
    TALLY["tried"] += 1
    result = train(quick_config.replace(steps_per_image=1))
    assert result.path.is_file() and (folder / MARKER).is_file()
    TALLY["handled"] += 1


def test_clean_up_deletes_only_its_own_files(quick_config, tmp_path):
    model_dir = quick_config.model_dir
    (model_dir / "state").mkdir(parents=True)
    (model_dir / MARKER).write_text("")
    (model_dir / "state" / "my_notes.txt").write_text("mine")
    (model_dir / "state" / "step_notes").mkdir()
    TALLY["tried"] += 1
    train(quick_config.replace(state_every_steps=2))
    assert (model_dir / "state" / "my_notes.txt").read_text() == "mine"
    assert (model_dir / "state" / "step_notes").is_dir()
    assert snapshots(model_dir) == [], "the run's own snapshots are gone"
    TALLY["handled"] += 1


# -- permissions follow the umask ----------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
@pytest.mark.parametrize("writer", ["safetensors", "text", "with"])
def test_files_get_the_umask_permissions(mask, writer, tmp_path):
    old = os.umask(mask)
    try:
        path = tmp_path / "f.bin"
        if writer == "safetensors":
            write_safetensors(path, {"w": torch.ones(2)})
        elif writer == "text":
            write_text(path, "x")
        else:
            write_with(path, lambda p: p.write_bytes(b"x"))
    finally:
        os.umask(old)
    TALLY["tried"] += 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    TALLY["handled"] += 1


def test_trained_outputs_are_readable_by_others(quick_config):
    old = os.umask(0o022)
    try:
        result = train(quick_config.replace(steps_per_image=1))
    finally:
        os.umask(old)
    TALLY["tried"] += 1
    written = [result.path, *result.path.parent.glob("*.yaml"),
               *(quick_config.model_dir / "working").rglob("*.safetensors")]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in written), \
        [(p.name, oct(p.stat().st_mode)) for p in written]
    TALLY["handled"] += 1


# -- temp files of a killed run ------------------------------------------------------------------
def test_temp_files_of_a_killed_run_are_removed_by_name(quick_config, tmp_path):
    out, model_dir = tmp_path / "out", quick_config.model_dir
    class_dir = tmp_path / "classes"
    ours = [out / ".quick_8.safetensors.abcd1234.tmp", out / ".quick_4.yaml.zz_9YY88.tmp",
            class_dir / ".class_000.png.k2j3h4g5.tmp", model_dir / "working" / "unet" /
            ".diffusion_pytorch_model.safetensors.abcdefgh.tmp"]
    theirs = [out / ".other_8.safetensors.abcd1234.tmp", out / "notes.tmp",
              out / ".quick_final.safetensors.abcd1234.tmp", class_dir / "photo.png.tmp",
              out / ".quick_8.safetensors.tmp"]
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    (model_dir / MARKER).write_text("")
    snap_tmp = model_dir / "state" / "step_00000004.tmp12345"
    snap_tmp.mkdir(parents=True)
    (snap_tmp / "model_0.safetensors").write_bytes(b"partial")
    cfg = quick_config.replace(steps_per_image=1, concepts=(Concept(
        quick_config.concepts[0].instance_data_dir, "sks", "a pattern", str(class_dir), 1),))
    TALLY["tried"] += 1
    seen = []
    train(cfg, lambda e: seen.append(e.text) if isinstance(e, ev.Message) else None)
    assert not any(p.exists() for p in ours) and not snap_tmp.exists()
    assert all(p.read_bytes() == b"partial" for p in theirs)
    assert any("temporary file(s) left by an interrupted run" in t for t in seen)
    TALLY["handled"] += 1


# -- refused before training ----------------------------------------------------------------------
def test_name_clash_refused_before_the_first_step(quick_config, tmp_path):
    out = tmp_path / "out"
    write_safetensors(out / "quick_8.safetensors", {"w": torch.ones(1)})
    steps = []
    refused(quick_config, ["quick_8.safetensors", "overwrite"],
            lambda e: steps.append(e) if isinstance(e, ev.Step) else None)
    assert steps == []


def test_too_little_space_refused_before_the_first_step(quick_config, monkeypatch):
    from dreambooth.training import housekeeping
    real = shutil.disk_usage
    monkeypatch.setattr(housekeeping.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1_000_000))
    steps = []
    refused(quick_config, ["Not enough free space", "MB", "free"],
            lambda e: steps.append(e) if isinstance(e, ev.Step) else None)
    assert steps == []


def test_a_networks_files_are_counted_before_the_first_step(quick_config, monkeypatch,
                                                             tmp_path):
    """A LoHa's tensors (not peft's lora_A / lora_B) are its file: with room for half of what
    its save writes, the run is refused before any step (it was counted as nothing)."""
    from dreambooth.training import housekeeping
    cfg = quick_config.replace(use_lora=True, network="loha", steps_per_image=1,
                               save_every_epochs=1, lora_dir=str(tmp_path / "lora"))
    made = train(cfg.replace(model_name="sized")).path  # 4 steps, 1 epoch: one file
    size = made.stat().st_size
    monkeypatch.setattr(housekeeping, "free_bytes", lambda folder: size // 2)
    steps = []
    e = refused(cfg, ["Not enough free space", f"{size // 2 / 2**20:.1f} MB are free"],
                lambda e: steps.append(e) if isinstance(e, ev.Step) else None)
    assert steps == [] and "this run writes" in e.message, e.message


def run_with_free_space(cfg, monkeypatch, free, on_event=None, cancel=None):
    """Train `cfg` with every free-space check told `free(folder)` bytes are free."""
    from dreambooth.training import housekeeping
    monkeypatch.setattr(housekeeping, "free_bytes", free)
    return train(cfg, on_event, cancel)


def test_a_save_now_that_would_take_the_final_saves_room_is_refused(quick_config, monkeypatch,
                                                                     tiny_source):
    """Room for the planned saves and half a checkpoint more: the up-front check passes, Save now
    is refused in a sentence (the run goes on), the final save is made."""
    from dreambooth.model.single_file import load_single_file
    from dreambooth.training.housekeeping import checkpoint_bytes, space_needed
    cfg = quick_config.replace(steps_per_image=1, batch_size=2)  # 2 steps; Save now at step 1
    comp = load_single_file(str(tiny_source), "v1x")
    planned = sum(space_needed(cfg, comp, 1).values())
    free = planned + checkpoint_bytes(comp, cfg.save_precision) // 2
    cancel, said = ev.CancelToken(), []
    cancel.request("save")
    result = run_with_free_space(cfg, monkeypatch, lambda folder: free,
                                 lambda e: said.append(e), cancel)
    assert result.path.exists() and result.saved == [result.path] and result.steps == 2
    refusals = [e.text for e in said if isinstance(e, ev.Message) and "Not saved now" in e.text]
    assert len(refusals) == 1 and "step 1" in refusals[0] and f"{free / 2**20:.1f} MB free" \
        in refusals[0] and "final save keeps its room" in refusals[0], refusals
    assert not (Path(cfg.output_dir) / "quick_1.safetensors").exists()


def test_each_save_checks_its_room_before_writing(quick_config, monkeypatch):
    """The disk filled after the up-front check: the save is refused unwritten, naming the
    folder, what it needs and what is free."""
    from dreambooth.training.saver import Saver
    full = []
    checked = Saver.refuse_no_room

    def then_fill(self):
        checked(self)
        full.append(True)
    monkeypatch.setattr(Saver, "refuse_no_room", then_fill)
    from dreambooth.training import housekeeping
    monkeypatch.setattr(housekeeping, "free_bytes", lambda folder: 1_000 if full else 2**50)
    e = refused(quick_config, ["Not enough free space in", "to save step", "quick_", "MB are free",
                               "nothing was written"])
    assert not list(Path(quick_config.output_dir).glob("*.safetensors*")) if \
        Path(quick_config.output_dir).exists() else True
    assert "0.0 MB are free" in e.message


# -- real faults on a small tmpfs ------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def mount(name, size_mb):
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                               str(folder)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"can't mount a tmpfs here ({done.stderr.strip()}): the real-fault "
                        "tests need root or CAP_SYS_ADMIN")
        mounts.append(folder)
        return folder
    yield mount
    for folder in reversed(mounts):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    free = shutil.disk_usage(folder).free
    with open(folder / "filler.bin", "wb") as fh:
        fh.write(b"\0" * max(free - leave, 0))


def test_disk_fills_during_the_checkpoint_write(quick_config, tmpfs):
    out = tmpfs("out_fs", 60)
    old = out / "quick_8.safetensors"
    write_safetensors(old, {"w": torch.ones(100)})
    before = old.read_bytes()
    cfg = quick_config.replace(output_dir=str(out), overwrite=True)
    # filled once the save has checked its room (a full disk before it is refused unwritten)
    e = refused(cfg, ["quick_8.safetensors", "No space left", "needs about", "MB"],
                lambda e: fill(out, 64 * 1024) if isinstance(e, ev.Saving) else None)
    if old.read_bytes() != before:
        TALLY["lost"] += 1
    assert sorted(p.name for p in out.iterdir()) == ["filler.bin", "quick_8.safetensors"]
    assert Path(e.log).is_file()


def test_disk_fills_during_a_state_snapshot(quick_config, tmpfs):
    work = tmpfs("work_fs", 200)
    cfg = quick_config.replace(work_dir=str(work), state_every_steps=2)
    done = []

    def on_event(e):
        if isinstance(e, ev.Step) and e.step == 1 and not done:
            done.append(1)
            fill(work, 256 * 1024)
    refused(cfg, ["training state", "step 2", "needs about", "MB are free"], on_event)
    assert not list((work / "quick" / "state").glob("step_*")) if (work / "quick" / "state") \
        .exists() else True
    assert not list((work / "quick").rglob("*.tmp*"))


def test_read_only_work_dir(quick_config, tmpfs):
    work = tmpfs("ro_fs", 8)
    (work / "keep.txt").write_text("mine")
    subprocess.run(["mount", "-o", "remount,ro", str(work)], check=True)
    refused(quick_config.replace(work_dir=str(work)), ["model folder", "Read-only"])
    assert (work / "keep.txt").read_text() == "mine"


def test_read_only_output_dir_keeps_the_old_file(quick_config, tmpfs):
    out = tmpfs("ro_out", 64)
    old = out / "quick_8.safetensors"
    write_safetensors(old, {"w": torch.ones(3)})
    before = old.read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
    refused(quick_config.replace(output_dir=str(out), overwrite=True),
            ["ro_out", "can't be written", "read-only"])
    if old.read_bytes() != before:
        TALLY["lost"] += 1


# -- part 4: resume and step arithmetic -------------------------------------------------------------
def stop_after(step):
    cancel = ev.CancelToken()
    return (lambda e: cancel.cancel() if isinstance(e, ev.Step) and e.step == step else None), \
        cancel


def own_images(instance_dir, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(instance_dir, folder)
    return folder


@pytest.mark.parametrize("change", ["added", "removed", "changed", "renamed"])
def test_changed_image_set_is_refused_on_resume(change, quick_config, instance_dir, tmp_path):
    folder = own_images(instance_dir, tmp_path)
    cfg = quick_config.replace(steps_per_image=3, state_every_steps=2,
                               concepts=(Concept(str(folder), "sks"),))
    train(cfg, *stop_after(3))
    assert snapshots(cfg.model_dir)
    first = sorted(folder.iterdir())[0]
    if change == "added":
        shutil.copyfile(first, folder / "zz_new.png")
    elif change == "removed":
        first.unlink()
    elif change == "changed":
        first.write_bytes(first.read_bytes() + b"\0")
    else:
        first.rename(folder / "renamed.png")
    err = refused(cfg, ["instance images changed", change if change != "renamed" else "added",
                        "resume"])
    assert "never" in err.hint


def test_same_image_set_resumes(quick_config, instance_dir, tmp_path):
    folder = own_images(instance_dir, tmp_path)
    cfg = quick_config.replace(steps_per_image=3, state_every_steps=2,
                               concepts=(Concept(str(folder), "sks"),))
    train(cfg, *stop_after(3))
    TALLY["tried"] += 1
    started = []
    result = train(cfg, lambda e: started.append(e) if isinstance(e, ev.Started) else None)
    assert started[0].resumed_from_step >= 2 and result.steps == 12
    TALLY["handled"] += 1


@pytest.mark.parametrize("accumulation,batch", [(9, 1), (100, 1), (5, 2), (1024, 4)])
def test_accumulation_beyond_the_run_is_refused_up_front(accumulation, batch, quick_config):
    cfg = quick_config.replace(gradient_accumulation_steps=accumulation, batch_size=batch)
    refused(cfg, ["gradient_accumulation_steps", str(accumulation)])
    assert not (Path(quick_config.output_dir)).exists()


def test_accumulation_equal_to_the_run_makes_one_update(quick_config):
    TALLY["tried"] += 1
    result = train(quick_config.replace(gradient_accumulation_steps=8))
    assert result.steps == 1 and result.path.is_file()
    TALLY["handled"] += 1


@pytest.mark.parametrize("ratio", [0.0, 0.01])
def test_text_encoder_ratio_zero_leaves_the_text_encoder_alone(ratio, quick_config, tiny_source):
    TALLY["tried"] += 1
    said = []
    result = train(quick_config.replace(train_text_encoder=True, text_encoder_steps_ratio=ratio),
                   lambda e: said.append(e.text) if isinstance(e, ev.Message) else None)
    before, _ = read_checkpoint(tiny_source)
    after, _ = read_checkpoint(result.path)
    te = [k for k in before if k.startswith("cond_stage_model.") and "position_ids" not in k]
    assert te and all(torch.equal(before[k], after[k]) for k in te)
    unet = [k for k in before if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(before[k], after[k]) for k in unet), "the UNet still trains"
    assert any("text encoder is not trained" in t for t in said)
    TALLY["handled"] += 1


def lock_file(quick_config, owner):
    folder = quick_config.model_dir
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("")
    (folder / ".train.lock").write_text(json.dumps(owner))
    return folder / ".train.lock"


def test_lock_of_a_reused_pid_is_cleared_and_named(quick_config):
    import socket
    lock = lock_file(quick_config, {"pid": os.getppid(), "host": socket.gethostname(),
                                    "started": "1"})
    said = []
    TALLY["tried"] += 1
    with ModelLock(quick_config.model_dir, said.append):
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid() and owner["started"] == pid_start_time(os.getpid())
    assert any(str(lock) in t and "stale" in t for t in said)
    TALLY["handled"] += 1


@pytest.mark.parametrize("owner", ["parent", "parent_without_start_time"])
def test_lock_of_a_live_run_is_refused_and_named(owner, quick_config):
    import socket
    pid = os.getppid()
    data = {"pid": pid, "host": socket.gethostname()}
    if owner == "parent":
        data["started"] = pid_start_time(pid)
    lock = lock_file(quick_config, data)
    TALLY["tried"] += 1
    with pytest.raises(DreamboothError) as info:
        with ModelLock(quick_config.model_dir, lambda t: None):
            pass
    assert str(lock) in info.value.message and "already being trained" in info.value.message
    assert lock.exists()
    TALLY["clear"] += 1


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"pid": "x"}', '"text"'])
def test_damaged_lock_file_is_cleared(content, quick_config):
    lock = lock_file(quick_config, {})
    lock.write_text(content)
    TALLY["tried"] += 1
    with ModelLock(quick_config.model_dir, lambda t: None) as held:
        assert held.held
    assert not lock.exists()
    TALLY["handled"] += 1
