"""One sentence, never a traceback (issue 12, part 3): every failure at the CLI, at
`dreambooth.train()` and in the child process becomes the project's error type with a message
naming the field or file and a fix; unexpected ones say "this is a bug" and name the log file
that holds the traceback. Nothing outside the run's folders changes (a tree hash before/after)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from patience import Deadline, deadline

from dreambooth import Concept, DreamboothError, train
from dreambooth.config import events as ev
from dreambooth.config.errors import BugError
from dreambooth.host.cli import main
from dreambooth.model.checkpoint import read_checkpoint, write_safetensors
from dreambooth.model.tiny import write_images

from hostile_configs import config_text_cases, deep  # noqa: E402
from tally import tally_fixture  # noqa: E402

pytestmark = pytest.mark.reliability
TALLY = {"tried": 0, "clear": 0, "handled": 0, "tracebacks": 0, "lost": 0}


report = tally_fixture("error-boundary corpus", TALLY, ("tracebacks", "lost"))


def tree_hash(*folders) -> str:
    """Names, sizes and contents of everything under the folders."""
    h = hashlib.sha256()
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            h.update(str(p).encode("utf-8", "surrogateescape"))
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(argv, capsys):
    TALLY["tried"] += 1
    try:
        code = main(argv)
    except BaseException:
        TALLY["tracebacks"] += 1
        raise
    err = capsys.readouterr().err
    if "Traceback" in err:
        TALLY["tracebacks"] += 1
    return code, err


# -- config files: every one refused (exit 2) with the field named, nothing written --------------
# (the cases live in hostile_configs.py: the HTTP API is held to the same ones, tests/test_api.py)
@pytest.mark.parametrize("case", config_text_cases(), ids=lambda c: c[0])
@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_config_file_refused_in_one_sentence(case, tmp_path, capsys):
    name, data, words = case
    path = tmp_path / "bad.json"
    path.write_bytes(data)
    before = tree_hash(tmp_path)
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2 and err.startswith("error:"), err[:500]
    assert "Traceback" not in err and all(w in err for w in words), err[:500]
    assert len(err) < 5000, "a message never echoes a huge value back"
    assert tree_hash(tmp_path) == before
    TALLY["clear"] += 1


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_config_in_other_unicode_encodings_is_read(encoding, tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_bytes(json.dumps({"model_name": "caf\u00e9_dog"}).encode(encoding))
    code, err = run_cli(["train", "--config", str(path), "--print-config"], capsys)
    assert code == 0 and "Traceback" not in err
    TALLY["handled"] += 1


@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_110_mb_prompt_refused(quick_config, tmp_path, capsys):
    cfg = quick_config.replace(concepts=(Concept(quick_config.concepts[0].instance_data_dir,
                                                 "sks " * 27_500_000),))
    path = tmp_path / "big.json"
    path.write_text(cfg.to_json(indent=0))
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2 and "concepts[0].instance_prompt" in err and "characters long" in err
    assert len(err) < 5000 and not (tmp_path / "runs").exists()
    TALLY["clear"] += 1


# -- folders and files the run writes to -----------------------------------------------------
def folder_cases():
    return [
        ("work_dir_is_file", lambda t, c: c.replace(work_dir=str(_file(t / "wd"))), ["work_dir",
                                                                                     "is a file"]),
        ("output_dir_is_file", lambda t, c: c.replace(output_dir=str(_file(t / "od"))),
         ["output_dir", "is a file"]),
        ("lora_dir_is_file", lambda t, c: c.replace(use_lora=True, lora_dir=str(_file(t / "ld"))),
         ["lora_dir", "is a file"]),
        ("work_dir_under_file", lambda t, c: c.replace(work_dir=str(_file(t / "f") / "sub")),
         ["model folder"]),
        ("model_dir_is_file", lambda t, c: _model_dir_file(t, c), ["is a file"]),
        ("class_dir_is_instance", lambda t, c: c.replace(concepts=(Concept(
            c.concepts[0].instance_data_dir, "sks", "a pattern", c.concepts[0].instance_data_dir,
            1),)), ["class_data_dir", "instance folder"]),
        ("class_dir_inside_instance", lambda t, c: c.replace(concepts=(Concept(
            c.concepts[0].instance_data_dir, "sks", "a pattern",
            str(Path(c.concepts[0].instance_data_dir) / "class"), 1),)),
         ["class_data_dir", "instance folder"]),
        ("class_dir_is_other_instance", lambda t, c: c.replace(concepts=(
            Concept(c.concepts[0].instance_data_dir, "sks"),
            Concept(str(_images(t / "b")), "zwx", "a pattern", c.concepts[0].instance_data_dir,
                    1))), ["concepts[1].class_data_dir", "concepts[0]"]),
        ("class_dir_dotdot", lambda t, c: c.replace(concepts=(Concept(
            c.concepts[0].instance_data_dir, "sks", "a pattern",
            str(Path(c.concepts[0].instance_data_dir) / "x" / ".."), 1),)),
         ["class_data_dir"]),
        ("events_missing_folder", None, ["--events-jsonl"]),
    ]


def _file(path):
    path.write_text("mine")
    return path


def _images(folder):
    write_images(folder, "checker", 1)
    return folder


def _model_dir_file(t, c):
    Path(c.work_dir).mkdir(parents=True)
    _file(Path(c.work_dir) / c.model_name)
    return c


@pytest.mark.parametrize("case", folder_cases(), ids=lambda c: c[0])
def test_folder_refused_in_one_sentence(case, quick_config, instance_dir, tmp_path, capsys):
    name, build, words = case
    cfg = build(tmp_path, quick_config) if build else quick_config
    path = tmp_path / "run.json"
    path.write_text(cfg.to_json())
    extra = ["--events-jsonl", str(tmp_path / "no" / "such" / "e.jsonl")] if build is None else []
    before, images = tree_hash(tmp_path), tree_hash(instance_dir)
    code, err = run_cli(["train", "--config", str(path), *extra], capsys)
    assert code in (1, 2) and err.startswith("error:") and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert tree_hash(tmp_path) == before and tree_hash(instance_dir) == images
    TALLY["clear"] += 1


@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_events_into_dev_full_is_said_and_training_goes_on(quick_config, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(quick_config.replace(steps_per_image=1).to_json())
    code, err = run_cli(["train", "--config", str(path), "--events-jsonl", "/dev/full"], capsys)
    assert code == 0 and "--events-jsonl '/dev/full'" in err and "Traceback" not in err
    assert list((tmp_path / "out").glob("quick_*.safetensors"))
    TALLY["handled"] += 1


# -- sources: damaged metadata, int8, 0-d tensors, a yaml in another encoding --------------------
def source_cases():
    def meta(key, value):
        return lambda state, m: (state, {**m, key: value})

    def int8(state, m):
        k = next(k for k in state if k.startswith("model.diffusion_model.") and
                 k.endswith(".weight"))
        return {**state, k: state[k].to(torch.int8)}, m

    def zero_d(state, m):
        k = next(k for k in state if k.endswith("norm.bias") or k.endswith(".bias"))
        return {**state, k: torch.tensor(0.5)}, m
    return [
        ("components_not_json", meta("dreambooth.components", "{not json"), "error"),
        ("components_a_list", meta("dreambooth.components", "[1, 2]"), "error"),
        ("components_wrong_keys", meta("dreambooth.components", '{"unet": 5}'), "error"),
        ("components_hub_names", meta("dreambooth.components", json.dumps(
            {"unet": "org/unet", "vae": "org/vae", "scheduler": "org/scheduler",
             "text_encoder": {}})), "error"),  # never looked up on a model hub
        ("components_deep", meta("dreambooth.components", deep(50000)), "error"),
        ("model_type_garbage", meta("dreambooth.model_type", "\x00\x01garbage"), "ok"),
        ("config_garbage", meta("dreambooth.config", "{{{"), "ok"),
        ("int8_weight", int8, "error"),
        ("zero_d_bias", zero_d, "error"),
    ]


@pytest.mark.parametrize("case", source_cases(), ids=lambda c: c[0])
def test_damaged_source_in_one_sentence(case, quick_config, tiny_source, tmp_path, capsys):
    name, change, expect = case
    state, meta = read_checkpoint(tiny_source)
    state, meta = change(state, meta)
    source = tmp_path / "src" / f"{name}.safetensors"
    write_safetensors(source, state, meta)
    cfg = quick_config.replace(source_checkpoint=str(source), steps_per_image=1)
    path = tmp_path / "run.json"
    path.write_text(cfg.to_json())
    src_before = tree_hash(tmp_path / "src")
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert "Traceback" not in err and "bug" not in err, err
    if expect == "error":
        assert code == 1 and f"{name}.safetensors" in err and "fix:" in err, err
        TALLY["clear"] += 1
    else:
        assert code == 0, err
        TALLY["handled"] += 1
    assert tree_hash(tmp_path / "src") == src_before


@pytest.mark.parametrize("encoding,expect", [("utf-16", 0), ("utf-8-sig", 0), ("latin-1", 1)])
def test_yaml_beside_source_in_another_encoding(encoding, expect, quick_config, tiny_source,
                                               tmp_path, capsys):
    source = tmp_path / "src" / "m.safetensors"
    source.parent.mkdir()
    source.write_bytes(tiny_source.read_bytes())
    source.with_suffix(".yaml").write_bytes("model:\n  params: {}  # caf\u00e9 \u00e9\n"
                                            .encode(encoding))
    path = tmp_path / "run.json"
    path.write_text(quick_config.replace(source_checkpoint=str(source), steps_per_image=1)
                    .to_json())
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == expect and "Traceback" not in err, err
    if expect:
        assert "m.yaml" in err and "UTF-8" in err
    TALLY["clear" if expect else "handled"] += 1


# -- images that change or are odd ---------------------------------------------------------------
def _copy_images(instance_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in Path(instance_dir).iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def test_image_deleted_mid_run_without_cached_latents(quick_config, instance_dir, tmp_path):
    folder = _copy_images(instance_dir, tmp_path)
    cfg = quick_config.replace(cache_latents=False, concepts=(Concept(str(folder), "sks"),))
    victim = sorted(folder.iterdir())[-1]

    def on_event(event):
        if isinstance(event, ev.Started):
            victim.unlink()
    TALLY["tried"] += 1
    with pytest.raises(DreamboothError) as info:
        train(cfg, on_event)
    assert victim.name in info.value.message and "can't be read any more" in info.value.message
    assert not isinstance(info.value, BugError)
    TALLY["clear"] += 1


def test_latin1_metadata_jsonl_is_read_with_a_warning(quick_config, instance_dir, tmp_path,
                                                      capsys):
    folder = _copy_images(instance_dir, tmp_path)
    lines = [json.dumps({"file_name": p.name, "text": "caf\u00e9"}, ensure_ascii=False)
             for p in sorted(folder.glob("*.png"))]
    (folder / "metadata.jsonl").write_bytes("\n".join(lines).encode("latin-1"))
    path = tmp_path / "run.json"
    path.write_text(quick_config.replace(steps_per_image=1, concepts=(
        Concept(str(folder), "[filewords]"),)).to_json())
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 0 and "metadata.jsonl" in err and "Latin-1" in err and "Traceback" not in err
    TALLY["handled"] += 1


@pytest.mark.parametrize("size", [(8, 8_000_000), (8_000_000, 8), (16, 4000), (3000, 20)])
def test_needle_shaped_png_is_skipped_not_resized(size, quick_config, instance_dir, tmp_path,
                                                  capsys):
    from test_bad_inputs_corpus import png_with_header
    folder = _copy_images(instance_dir, tmp_path)
    (folder / "needle.png").write_bytes(png_with_header(*size))
    path = tmp_path / "run.json"
    path.write_text(quick_config.replace(steps_per_image=1, concepts=(
        Concept(str(folder), "sks"),)).to_json())
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 0 and "needle.png" in err and "Traceback" not in err, err
    TALLY["handled"] += 1


# -- snapshots that are truncated or not ours ---------------------------------------------------
def snapshot_cases():
    return [
        ("trainer_json_truncated", "trainer.json", lambda b: b[: len(b) // 2]),
        ("trainer_json_list", "trainer.json", lambda b: b"[1, 2, 3]"),
        ("trainer_json_latin1", "trainer.json", lambda b: b"\xe9\xe9"),
        ("training_pt_truncated", "training.pt", lambda b: b[: len(b) // 3]),
        ("training_pt_foreign", "training.pt", lambda b: b"PK\x03\x04 not a torch file"),
        ("model_truncated", "model_0.safetensors", lambda b: b[:1000]),
        ("model_foreign", "model_0.safetensors", lambda b: b"\x00" * 64),
        ("model_other_shapes", "model_0.safetensors", None),
    ]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_source, instance_dir):
    """A run cancelled after step 3 with a snapshot at step 2: the state folder to damage."""
    from dreambooth import TrainingConfig
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = TrainingConfig(model_name="stop", source_checkpoint=str(tiny_source),
                         work_dir=str(tmp / "runs"), output_dir=str(tmp / "out"), resolution=64,
                         center_crop=True, steps_per_image=3, learning_rate=1e-4,
                         state_every_steps=2, concepts=(Concept(str(instance_dir), "sks"),))
    cancel = ev.CancelToken()
    train(cfg, lambda e: cancel.cancel() if isinstance(e, ev.Step) and e.step == 3 else None,
          cancel)
    return cfg


@pytest.mark.parametrize("case", snapshot_cases(), ids=lambda c: c[0])
def test_damaged_snapshot_in_one_sentence(case, stopped_run, tmp_path):
    import shutil
    name, filename, damage = case
    work = tmp_path / "runs"
    shutil.copytree(stopped_run.work_dir, work)
    cfg = stopped_run.replace(work_dir=str(work), output_dir=str(tmp_path / "out"))
    (work / "stop" / ".train.lock").unlink(missing_ok=True)
    snaps = sorted((work / "stop" / "state").glob("step_*"))
    for snap in snaps:  # all of them: a damaged one alone is skipped (tests/test_resume.py)
        target = snap / filename
        if damage is None:
            write_safetensors(target, {"foo": torch.zeros(2)}, overwrite=True)
        else:
            target.write_bytes(damage(target.read_bytes()))
    TALLY["tried"] += 1
    with pytest.raises(DreamboothError) as info:
        train(cfg)
    assert not isinstance(info.value, BugError), info.value.message
    assert str(snap.parent) in info.value.message and "resume" in info.value.hint
    assert all(s.name in info.value.message for s in snaps)
    assert target.exists(), "a damaged state is the user's to delete"
    TALLY["clear"] += 1


# -- bugs: said as bugs, with the log -----------------------------------------------------------
@pytest.mark.parametrize("where", ["dreambooth.training.trainer.Trainer.setup",
                                   "dreambooth.training.trainer.Trainer.loop",
                                   "dreambooth.data.feed.DataFeed.cache"])
@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_unexpected_exception_names_its_log(where, quick_config, monkeypatch, capsys):
    import importlib
    module, cls, attr = where.rsplit(".", 2)

    def broken(*a, **k):
        raise ZeroDivisionError("simulated bug %ld")
    monkeypatch.setattr(getattr(importlib.import_module(module), cls), attr, broken)
    path = Path(quick_config.work_dir).parent / "run.json"
    path.write_text(quick_config.to_json())
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 1 and "This is a bug; the log is at" in err and "Traceback" not in err, err
    log = Path(err.split("the log is at '")[1].split("'")[0])
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    TALLY["clear"] += 1


def test_python_train_raises_the_project_error_for_a_bug(quick_config, monkeypatch):
    from dreambooth.training import trainer
    monkeypatch.setattr(trainer.Trainer, "plan_steps", lambda self: [][1])
    TALLY["tried"] += 1
    with pytest.raises(BugError) as info:
        train(quick_config)
    assert "IndexError" in info.value.message and Path(info.value.log).is_file()
    assert Path(info.value.log).parent == quick_config.model_dir / "logs"
    TALLY["clear"] += 1


@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_a_clear_error_also_leaves_a_log(quick_config):
    TALLY["tried"] += 1
    with pytest.raises(DreamboothError) as info:
        train(quick_config.replace(gradient_accumulation_steps=1000))
    assert "gradient_accumulation_steps" in info.value.message
    assert Path(info.value.log).is_file()
    TALLY["clear"] += 1


# -- the child process and Ctrl-C -------------------------------------------------------------
@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_second_ctrl_c_within_50_ms_is_one_sentence(quick_config, tmp_path):
    """The second Ctrl-C comes 20 ms after the first was taken (the run says so). Sent sooner,
    while the process is inside one long kernel, the two would reach Python as one signal
    (its handler flag is one bit) and the run would simply stop cleanly: right, but not what
    this test is about, and a matter of machine load."""
    cfg = quick_config.replace(steps_per_image=200)
    path = tmp_path / "run.json"
    path.write_text(cfg.to_json())
    events, log = tmp_path / "e.jsonl", tmp_path / "stderr.txt"
    TALLY["tried"] += 1
    with open(log, "w") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "dreambooth", "train", "--config",
                                  str(path), "--events-jsonl", str(events)], stderr=stderr)

        def said(text: str, path: Path) -> bool:
            return path.exists() and text in path.read_text(errors="replace")
        limit = Deadline(60)
        while not limit.expired() and not said('"step"', events):
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        limit = Deadline(60)
        while not limit.expired() and not said("Ctrl-C again", log):
            time.sleep(0.01)
        assert said("Ctrl-C again", log)  # the first one was taken: stopping cleanly
        time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        child.wait(timeout=deadline(60))
    err = log.read_text(errors="replace")
    if "Traceback" in err:
        TALLY["tracebacks"] += 1
    assert "Traceback" not in err, err[-3000:]
    assert child.returncode == 130 and "Stopped at once at step" in err, err[-3000:]
    assert "without saving, as asked" in err
    stopped = [json.loads(line) for line in events.read_text().splitlines()
               if '"event": "stopped"' in line]
    assert stopped and "Stopped at once" in stopped[-1]["message"]  # the host reads this
    TALLY["clear"] += 1


@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_runner_child_failure_is_one_sentence(quick_config, tmp_path):
    from dreambooth.host.runner import TrainingRun
    cfg = quick_config.replace(gradient_accumulation_steps=999)
    env_python = os.environ.get("DREAMBOOTH_TEST_TRAIN_PYTHON", sys.executable)
    TALLY["tried"] += 1
    run = TrainingRun(cfg, tmp_path / "run", python=env_python,
                      pythonpath=[str(Path(__file__).resolve().parents[1])]).start()
    p = run.wait(deadline(120))
    assert p.state == "failed" and "gradient_accumulation_steps" in p.error, p
    assert "Traceback" not in (tmp_path / "run" / "train.log").read_text()
    TALLY["clear"] += 1


@pytest.mark.parametrize("resolution,expect", [(8, 1), (16, 1), (24, 1), (32, 1), (40, 0)])
def test_resolution_the_model_cant_take(resolution, expect, quick_config, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(quick_config.replace(resolution=resolution, steps_per_image=1).to_json())
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == expect and "Traceback" not in err and "bug" not in err, err
    if expect:
        assert f"resolution = {resolution}" in err and "at least 40" in err
    TALLY["clear" if expect else "handled"] += 1


@pytest.mark.parametrize("port", ["0", "-1", "70000", "99999999999999999999"])
@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_ui_on_an_invalid_port(port, capsys):
    code, err = run_cli(["ui", "--port", port], capsys)
    assert code == 2 and "--port" in err and "Traceback" not in err, err
    TALLY["clear"] += 1


def python_api_cases():
    return [
        ("model_name", "a\ud800"), ("model_name", "a\x00b"), ("work_dir", "w\x00"),
        ("output_dir", "\udcff"), ("lora_dir", "x" * 20000), ("resume", "\x00"),
        ("lr_warmup_steps", 10**400), ("learning_rate", 10**400), ("seed", -(10**5000)),
        ("save_every_epochs", 2**70), ("steps_per_image", 10**4000),
    ]


@pytest.mark.parametrize("field,value", python_api_cases(),
                         ids=lambda v: v if isinstance(v, str) and v.isidentifier() else "v")
@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_python_train_refuses_absurd_values_by_field(field, value, quick_config, tmp_path):
    from dreambooth import ConfigError
    TALLY["tried"] += 1
    before = tree_hash(tmp_path)
    with pytest.raises(ConfigError) as info:
        train(quick_config.replace(**{field: value}))
    assert field in info.value.message and len(info.value.message) < 2000
    assert tree_hash(tmp_path) == before
    TALLY["clear"] += 1


@pytest.mark.parametrize("field", ["instance_prompt", "class_prompt", "sample_prompt",
                                   "instance_data_dir", "class_data_dir"])
@pytest.mark.parametrize("value", ["\ud83d", "nul\x00", "y" * 10_001])
@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_python_train_refuses_bad_concept_text(field, value, quick_config, tmp_path):
    import dataclasses

    from dreambooth import ConfigError
    concept = dataclasses.replace(quick_config.concepts[0], **{field: value})
    TALLY["tried"] += 1
    before = tree_hash(tmp_path)
    with pytest.raises(ConfigError) as info:
        train(quick_config.replace(concepts=(concept,)))
    assert f"concepts[0].{field}" in info.value.message
    assert tree_hash(tmp_path) == before
    TALLY["clear"] += 1


@pytest.mark.parametrize("kind", ["file", "nul", "surrogate"])
@pytest.mark.once  # our own checks and messages: nothing version-sensitive
def test_demo_out_that_cant_be_a_folder(kind, tmp_path, capsys):
    out = {"file": str(_file(tmp_path / "f")), "nul": str(tmp_path / "a\x00b"),
           "surrogate": str(tmp_path / "a\ud800")}[kind]
    before = tree_hash(tmp_path)
    code, err = run_cli(["demo", "--out", out], capsys)
    assert code == 2 and "--out" in err and "Traceback" not in err, err
    assert tree_hash(tmp_path) == before
    TALLY["clear"] += 1
