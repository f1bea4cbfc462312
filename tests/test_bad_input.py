"""Bad input gets a clear message naming the problem and the fix; nothing half-written is left."""
import pickle
import sys

import pytest
from patience import run

from dreambooth import Concept, train
from dreambooth.config import events as ev
from dreambooth.config.errors import DreamboothError
from dreambooth.model.tiny import write_images

pytestmark = pytest.mark.reliability


def run_cli(config, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(config.to_json())
    return run([sys.executable, "-m", "dreambooth", "train", "--config", str(path)], 30,
               capture_output=True, text=True)


def assert_clear_failure(out, *words):
    assert out.returncode in (1, 2), out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "error:" in out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


def final_files(folder):
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix == ".safetensors"] \
        if folder.exists() else []


@pytest.mark.once  # our checks before any library runs (torch.load: the same torch)
def test_empty_instance_folder(quick_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = quick_config.replace(concepts=(Concept(str(empty), "photo of sks dog"),))
    out = run_cli(cfg, tmp_path)
    assert_clear_failure(out, str(empty), "empty")
    assert final_files(tmp_path / "out") == []


def test_folder_of_non_images(quick_config, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "fake.png").write_bytes(b"this is not a png")
    cfg = quick_config.replace(concepts=(Concept(str(folder), "photo of sks dog"),))
    out = run_cli(cfg, tmp_path)
    assert_clear_failure(out, "none a readable image")
    assert final_files(tmp_path / "out") == []


def test_one_corrupt_image_is_skipped_with_a_warning_naming_it(quick_config, tmp_path):
    folder = tmp_path / "mixed"
    write_images(folder, "checker", 2)
    good = (folder / "checker_000.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])
    seen = []
    result = train(quick_config.replace(concepts=(Concept(str(folder), "photo of sks"),)),
                   seen.append)
    warnings = [e.text for e in seen if isinstance(e, ev.Message) and e.level == "warning"]
    assert any("broken.png" in w for w in warnings), warnings
    assert result.path.exists()
    started = next(e for e in seen if isinstance(e, ev.Started))
    assert started.instance_images == 2


@pytest.mark.once  # our checks before any library runs (torch.load: the same torch)
def test_missing_source_file(quick_config, tmp_path):
    out = run_cli(quick_config.replace(source_checkpoint=str(tmp_path / "nope.safetensors")),
                  tmp_path)
    assert_clear_failure(out, "source_checkpoint", "does not exist")


class Exploit:
    """Unpickling this runs a command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.once  # our checks before any library runs (torch.load: the same torch)
def test_ckpt_whose_pickle_would_run_code_is_refused_and_nothing_runs(quick_config, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as fh:
        pickle.dump({"state_dict": Exploit(marker)}, fh)
    out = run_cli(quick_config.replace(source_checkpoint=str(ckpt)), tmp_path)
    assert_clear_failure(out, "evil.ckpt", "refused")
    assert not marker.exists(), "the pickle's code ran"
    assert final_files(tmp_path / "out") == []


@pytest.mark.once  # our checks before any library runs (torch.load: the same torch)
def test_existing_output_is_never_replaced_unless_asked(quick_config, tmp_path):
    first = train(quick_config.replace(steps_per_image=1))
    before = first.path.read_bytes()
    fresh = quick_config.replace(steps_per_image=1, work_dir=str(tmp_path / "other_runs"))
    out = run_cli(fresh, tmp_path)
    assert_clear_failure(out, "already exists", "overwrite")
    assert first.path.read_bytes() == before


@pytest.fixture(scope="module")
def trained_work_dir(tiny_source, instance_dir, tmp_path_factory):
    """The work folder of a finished one-step run (its working model is what the next run of the
    model goes on from): copy it, never change it."""
    from dreambooth import TrainingConfig
    root = tmp_path_factory.mktemp("trained")
    cfg = TrainingConfig(model_name="quick", source_checkpoint=str(tiny_source),
                         work_dir=str(root / "runs"), output_dir=str(root / "out"),
                         resolution=64, center_crop=True, steps_per_image=1, batch_size=4,
                         concepts=(Concept(str(instance_dir), "photo of sks pattern"),))
    train(cfg)
    return root / "runs"


@pytest.mark.parametrize("damage", ["unet_cut_in_half", "record_is_a_list"])
def test_a_damaged_working_model_is_named_with_the_fix(quick_config, trained_work_dir, tmp_path,
                                                       damage):
    import shutil
    runs = tmp_path / "runs_copy"
    shutil.copytree(trained_work_dir, runs)
    working = runs / "quick" / "working"
    if damage == "unet_cut_in_half":
        weights = working / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (working / "dreambooth_model.json").write_text("[]")
    seen = []
    with pytest.raises(DreamboothError) as e:
        train(quick_config.replace(work_dir=str(runs), batch_size=4, steps_per_image=1),
              seen.append)
    text = str(e.value)
    assert str(working) in text and "damaged" in text and "Delete that folder" in text, text
    assert "bug" not in text and not any(isinstance(x, ev.Step) for x in seen)


@pytest.mark.parametrize("failure", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 34359738368 bytes. Error code 12 (Cannot "
                 "allocate memory)")])
def test_running_out_of_host_memory_while_encoding_says_so_with_the_fix(quick_config,
                                                                        monkeypatch, failure):
    """Resolution 4096 under a memory limit: the VAE's first activations alone are gigabytes."""
    from dreambooth.data.feed import DataFeed

    def exhausted(self, pixels):
        raise failure
    monkeypatch.setattr(DataFeed, "vae_encode", exhausted)
    seen = []
    with pytest.raises(DreamboothError) as e:
        train(quick_config, seen.append)
    text = str(e.value)
    assert "ran out of memory (RAM) while encoding 'checker_000.png' at 64x64" in text, text
    assert "Lower resolution" in text and "bug" not in text
    failed = [x for x in seen if isinstance(x, ev.Failed)]
    assert failed and "ran out of memory" in failed[0].message and "bug" not in failed[0].hint


def test_out_of_host_memory_anywhere_is_said_not_called_a_bug():
    from dreambooth.config.runlog import failure
    err = failure(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate "
                               "8 bytes."))
    assert "ran out of memory (RAM)" in err.message and "bug" not in str(err).lower()
    assert "This is a bug" in failure(RuntimeError("something else")).message


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes only on Linux")
def test_filewords_captions_empty_or_from_a_latin1_name_are_said_once(quick_config, tmp_path):
    """Three of four images would train on an empty caption; a file name in Latin-1 bytes made
    the tokenizer fail ('This is a bug'): it is read as Latin-1, trained, and said once."""
    import os
    from dreambooth.training.trainer import Trainer
    folder = tmp_path / "captioned"
    write_images(folder, "checker", 4)
    for i, name in enumerate([b"caf\xe9 au lait.png", b"001.png", b"002.png"]):
        os.rename(bytes(folder / f"checker_00{i}.png"), bytes(folder) + b"/" + name)
    (folder / "checker_003.png").rename(folder / "004.png")
    (folder / "004.txt").write_text("")
    cfg = quick_config.replace(concepts=(Concept(str(folder), "[filewords]"),), batch_size=4,
                               steps_per_image=1)
    seen = []
    trainer = Trainer(cfg, ev.EventBus(seen.append), ev.CancelToken())
    assert trainer.run().path.exists()
    warnings = [e.text for e in seen if isinstance(e, ev.Message) and e.level == "warning"]
    empty = [w for w in warnings if "empty caption" in w]
    assert len(empty) == 1 and "3 of 4 image(s)" in empty[0], warnings
    assert "001.png (no .txt caption, no line in metadata.jsonl, and no words" in empty[0]
    assert "002.png" in empty[0] and "004.png (its .txt caption is empty)" in empty[0]
    latin = [w for w in warnings if "not UTF-8" in w]
    assert len(latin) == 1 and "café au lait.png" in latin[0], warnings
    assert sorted(it.prompt for it in trainer.feed.items) == ["", "", "", "café au lait"]


def test_a_prompt_past_77_tokens_is_said_with_what_is_dropped(quick_config):
    from dreambooth.training.trainer import Trainer
    long_prompt = "photo of sks pattern, " + "red " * 1996  # 2000 words, 2001 tokens + 2 marks
    seen = []
    trainer = Trainer(quick_config.replace(concepts=(Concept(quick_config.concepts[0]
                                                             .instance_data_dir, long_prompt),),
                                           batch_size=4, steps_per_image=1),
                      ev.EventBus(seen.append), ev.CancelToken())
    assert trainer.run().path.exists()
    warnings = [e.text for e in seen if isinstance(e, ev.Message) and "tokens" in e.text]
    assert len(warnings) == 1, warnings
    assert "(2003 tokens, the last 1926 dropped)" in warnings[0] and "Shorten" in warnings[0]
