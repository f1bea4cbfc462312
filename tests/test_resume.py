"""What a snapshot holds and whether a run may go on from it: beside a frozen base (LoRA, textual
inversion) only what trains, the base named by the source's hash; each damage kind named and the
snapshot skipped for the previous one (none left: refused); partial snapshot folders removed by
name at the end of a run; the state written without a second copy of it in memory."""
import json
import shutil
import tracemalloc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth import Concept, DreamboothError, TrainingConfig, train
from dreambooth.config import events as ev
from dreambooth.model.checkpoint import read_checkpoint, write_safetensors
from dreambooth.training import resume
from dreambooth.training.state import end_snapshots, snapshots, write_tensors
from dreambooth.training.trainer import Trainer

pytestmark = pytest.mark.reliability


def stop_at(step, cancel, also=None):
    def on_event(e):
        if isinstance(e, ev.Step) and e.step == step:
            if also:
                also()
            cancel.cancel()
    return on_event


@pytest.mark.parametrize("method", ["lora", "textual_inversion"])
def test_a_frozen_base_snapshot_holds_what_trains_and_resumes_exactly(method, quick_config):
    """A LoRA's (a new token's) snapshot holds its adapter (vectors), their optimizer state and
    the generators, none of the frozen UNet; the run resumed from it ends with the file an
    uninterrupted run writes, bit for bit."""
    cfg = quick_config.replace(method=method, embedding_token="sks", lora_rank=2,
                               lora_learning_rate=1e-2, state_every_steps=2, cpu_threads=1,
                               steps_per_image=1,  # 4 steps; the LoRA saved as its EMA's
                               use_ema=method == "lora")
    straight = train(cfg.replace(model_name="straight"))
    cancel, stopped = ev.CancelToken(), cfg.replace(model_name="stopped")
    leftover = stopped.model_dir / "state" / "step_00000009.tmp4242"  # as a killed writer's
    torch.manual_seed(1234)  # a LoRA's first weights come from the run's seed, not from this
    train(stopped, stop_at(3, cancel, lambda: leftover.mkdir(parents=True)), cancel)
    assert not leftover.exists(), "a partial snapshot folder is removed when the run ends"
    (snap,) = [p for p in snapshots(stopped.model_dir) if p.name.endswith("3")]
    weights = {}
    for f in sorted(snap.glob("model_*.safetensors")):
        weights.update(load_file(str(f)))
    trained = sum(t.numel() * t.element_size() for t in weights.values())
    if method == "lora":
        assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), \
            sorted(weights)[:3]
    else:
        assert weights and all(k.endswith(".vectors") for k in weights), sorted(weights)
    base = sum(v.numel() * v.element_size() for v in read_checkpoint(cfg.source_checkpoint)[0]
               .values())
    total = sum(f.stat().st_size for f in snap.iterdir())
    # the weights, two Adam moments, the EMA's averages of them, the generators and the json
    # (and the records of a tiny adapter's 384 small tensors): a few times the adapter, far
    # below the frozen model's size (measured without EMA: 0.95 MB for a 0.19 MB adapter;
    # before, 10.8 MB: the whole UNet; with EMA: 1.24 MB)
    assert total < (6 + cfg.use_ema) * trained + 100_000 < base / 10, (total, trained, base)
    info = json.loads((snap / "trainer.json").read_text())
    assert info["trained_only"] and len(info["base"]["source_sha256"]) == 64

    seen = []
    resumed = train(stopped, seen.append)
    assert any(isinstance(e, ev.Message) and e.text.startswith("Resuming from step 3 of 4")
               for e in seen)
    a, _ = read_checkpoint(straight.path)
    b, _ = read_checkpoint(resumed.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- damage, checked without training -----------------------------------------------------------
@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_source, instance_dir):
    """A full fine-tune of 4 steps cancelled after step 3 (snapshots at steps 2 and 3), and a trainer set up
    for the same run, as a resume would be, to check snapshots against."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = TrainingConfig(model_name="stop", source_checkpoint=str(tiny_source),
                         work_dir=str(tmp / "runs"), output_dir=str(tmp / "out"), resolution=64,
                         center_crop=True, steps_per_image=1, learning_rate=1e-4,
                         state_every_steps=2, concepts=(Concept(str(instance_dir), "sks"),))
    cancel = ev.CancelToken()
    train(cfg, stop_at(3, cancel), cancel)
    trainer = Trainer(cfg, lambda e: None, ev.CancelToken())
    trainer.setup()
    return cfg, trainer


def edit_json(key, value):
    def edit(folder):
        info = json.loads((folder / "trainer.json").read_text())
        info[key] = value
        (folder / "trainer.json").write_text(json.dumps(info))
    return edit


def resize(name):  # a file replaced by one of the size it had: only its contents tell
    def change(folder):
        write_safetensors(folder / name, {"foo": torch.zeros(2)}, overwrite=True)
        info = json.loads((folder / "trainer.json").read_text())
        info["files"][name] = (folder / name).stat().st_size
        (folder / "trainer.json").write_text(json.dumps(info))
    return change


def cut(name, keep=0.5):
    def change(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:int(len(data) * keep)])
    return change


def foreign_training_pt(folder):
    (folder / "training.pt").write_bytes(b"PK\x03\x04 not a torch file")
    edit_json("files", {**json.loads((folder / "trainer.json").read_text())["files"],
                        "training.pt": (folder / "training.pt").stat().st_size})(folder)


DAMAGE = [  # (name, change, what the problem says)
    ("trainer_json_cut", cut("trainer.json"), "trainer.json can't be read"),
    ("trainer_json_list", lambda f: (f / "trainer.json").write_text("[1]"),
     "trainer.json can't be read"),
    ("step_past_its_plan", edit_json("step", 999), "step 999 of a 4-step run"),
    ("step_past_this_plan", lambda f: (edit_json("step", 999)(f), edit_json("total_steps", 999)(f)),
     "past this run's 4 steps"),
    ("epoch_past_this_plan", edit_json("epoch", 7), "outside this run's"),
    ("order_of_other_images", edit_json("order", [0, 1, 99]), "images this run doesn't have"),
    ("no_position", edit_json("batch", "two"), "no valid 'batch'"),
    ("foreign_file_named", edit_json("files", {"../../x": 1}), "not a file of a training state"),
    ("model_cut", cut("model_0.safetensors"), "model_0.safetensors is"),
    ("model_missing", lambda f: (f / "model_0.safetensors").unlink(), "missing"),
    ("model_other_shapes", resize("model_0.safetensors"), "doesn't fit this model"),
    ("training_pt_cut", cut("training.pt", 0.3), "training.pt is"),
    ("training_pt_foreign", foreign_training_pt, "training.pt can't be read"),
]


@pytest.mark.parametrize("name, change, said", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_each_damage_is_named(name, change, said, stopped, tmp_path):
    cfg, trainer = stopped
    folder = tmp_path / "step_00000003"
    shutil.copytree(snapshots(cfg.model_dir)[-1], folder)
    change(folder)
    position, problem = resume.try_restore(trainer, folder)
    assert position is None and said in problem, problem


@pytest.mark.parametrize("part, said", [("source_sha256", "Put back the source file"),
                                        ("revision", "working model at revision")])
def test_a_snapshot_of_another_base_is_refused(part, said, stopped, tmp_path):
    cfg, trainer = stopped
    folder = tmp_path / "step_00000003"
    shutil.copytree(snapshots(cfg.model_dir)[-1], folder)
    info = json.loads((folder / "trainer.json").read_text())
    info["base"][part] = "0" * 64 if part == "source_sha256" else 5
    edit_json("base", info["base"])(folder)
    with pytest.raises(DreamboothError) as err:
        resume.try_restore(trainer, folder)
    assert said in f"{err.value.message} {err.value.hint}" and "never" in err.value.hint


def test_a_snapshot_of_an_older_version_passes_the_checks(stopped, tmp_path):
    """One written before the sizes and the base were recorded is checked for what it has."""
    cfg, trainer = stopped
    folder = tmp_path / "step_00000003"
    shutil.copytree(snapshots(cfg.model_dir)[-1], folder)
    info = json.loads((folder / "trainer.json").read_text())
    for key in ("format", "files", "base", "trained_only"):
        del info[key]
    (folder / "trainer.json").write_text(json.dumps(info))
    info, problem = resume.file_problem(folder)
    assert problem is None and resume.plan_problem(trainer, info) is None
    assert resume.weights_problem(trainer, folder, info) is None
    resume.refuse_other_base(trainer, folder, info)


def test_the_newest_usable_snapshot_is_chosen_and_none_usable_is_refused(stopped, tmp_path):
    cfg, _ = stopped
    work = tmp_path / "runs"
    shutil.copytree(cfg.work_dir, work)
    cfg = cfg.replace(work_dir=str(work))
    old, new = snapshots(cfg.model_dir)
    warned = []
    edit_json("step", 999)(new)
    assert resume.choose_snapshot(cfg, cfg.model_dir, warned.append) == old
    assert len(warned) == 1 and str(new) in warned[0] and "earlier one" in warned[0]
    with pytest.raises(DreamboothError) as err:  # the one asked for is not replaced by another
        resume.choose_snapshot(cfg.replace(resume=str(new)), cfg.model_dir, warned.append)
    assert "step 999" in err.value.message and "'auto'" in err.value.hint
    cut("training.pt")(old)
    with pytest.raises(DreamboothError) as err:
        resume.choose_snapshot(cfg, cfg.model_dir, warned.append)
    text = err.value.message
    assert "No saved training state" in text and old.name in text and new.name in text
    assert "'never'" in err.value.hint and old.exists() and new.exists()


def test_a_snapshot_damaged_inside_is_skipped_for_the_previous_one(stopped, tmp_path):
    """End to end: the newest snapshot's weights don't fit (its sizes do): said, and the run goes
    on from the one before it and finishes."""
    cfg, _ = stopped
    work = tmp_path / "runs"
    shutil.copytree(cfg.work_dir, work)
    cfg = cfg.replace(work_dir=str(work), output_dir=str(tmp_path / "out"))
    (cfg.model_dir / ".train.lock").unlink(missing_ok=True)
    old, new = snapshots(cfg.model_dir)
    resize("model_0.safetensors")(new)
    seen = []
    result = train(cfg, seen.append)
    texts = [e.text for e in seen if isinstance(e, ev.Message)]
    assert any(str(new) in t and "doesn't fit this model" in t for t in texts), texts
    assert any(t.startswith("Resuming from step 2 of 4") for t in texts), texts
    assert result.steps == 4 and result.path.is_file() and snapshots(cfg.model_dir) == []


# -- files ------------------------------------------------------------------------------------
def test_partial_snapshot_folders_go_by_name_when_a_run_ends(tmp_path):
    state = tmp_path / "state"
    kept, partial = state / "step_00000004", state / "step_00000006.tmp12345"
    theirs = [state / "step_00000006.tmp", state / "step_x.tmp1", state / "notes.tmp3"]
    for folder in (kept, partial, *theirs):
        folder.mkdir(parents=True)
    (kept / "trainer.json").write_text("{}")
    (partial / "model_0.safetensors").write_bytes(b"half")
    (state / "step_00000002.tmp7").mkdir()  # left empty
    end_snapshots(tmp_path, keep=True)  # a cancelled run keeps its snapshots
    assert kept.is_dir() and not partial.exists() and not (state / "step_00000002.tmp7").exists()
    assert all(p.is_dir() for p in theirs)
    end_snapshots(tmp_path, keep=False)
    assert not kept.exists() and all(p.is_dir() for p in theirs)


def test_state_weights_are_written_without_a_copy_in_memory(tmp_path):
    big = {f"w{i}": torch.randn(256, 1024) for i in range(8)}  # 8 MiB
    odd = {"bf16": torch.randn(3, 5).bfloat16(), "int": torch.arange(7), "flag": torch.tensor(True),
           "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "t": torch.randn(4, 6).t()}
    tracemalloc.start()
    try:
        size = write_tensors(tmp_path / "big.safetensors", big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes held while writing 8 MiB"  # save_file: all 8 MiB
    assert size == (tmp_path / "big.safetensors").stat().st_size
    write_tensors(tmp_path / "odd.safetensors", odd)
    for name, tensors in (("big", big), ("odd", odd)):
        back = load_file(str(tmp_path / f"{name}.safetensors"))
        assert back.keys() == tensors.keys()
        assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(str(tmp_path / "odd.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
