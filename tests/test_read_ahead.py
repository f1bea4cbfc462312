"""The source file read ahead (single_file.read_ahead): while the trainer imports and plans, the
file is read on a thread, and the load takes what was read; a file that changed in between, or
a run that stops before loading, leaves nothing behind."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from dreambooth.config import events as ev
from dreambooth.model import single_file
from dreambooth.model.workdir import load_model, read_source_ahead


def _opens(monkeypatch) -> list:
    opened = []
    real = single_file.open_checkpoint
    monkeypatch.setattr(single_file, "open_checkpoint",
                        lambda path: (opened.append(path), real(path))[1])
    return opened


def _same(a, b) -> None:
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_load_takes_what_was_read_ahead(quick_config, monkeypatch):
    plain, _ = load_model(quick_config, lambda *a: None, dtype=None)
    opened = _opens(monkeypatch)
    read_source_ahead(quick_config)
    read_source_ahead(quick_config)  # (twice: the CLI's, then the trainer's) one read
    assert len(opened) == 1 and len(single_file._AHEAD) == 1
    ahead, _ = load_model(quick_config, lambda *a: None, dtype=None)
    assert len(opened) == 1 and not single_file._AHEAD  # taken, not read again
    _same(plain, ahead)


def test_a_file_changed_after_the_read_ahead_is_read_again(quick_config, tmp_path,
                                                           tiny_checkpoints, monkeypatch):
    source = tmp_path / "model.safetensors"
    shutil.copyfile(quick_config.source_checkpoint, source)
    config = quick_config.replace(source_checkpoint=str(source))
    read_source_ahead(config)
    shutil.copyfile(tiny_checkpoints("v1x"), source)  # replaced in between (same bytes here)
    os.utime(source, ns=(1, 1))
    opened = _opens(monkeypatch)
    load_model(config, lambda *a: None, dtype=None)
    assert len(opened) == 1 and not single_file._AHEAD


def test_nothing_is_read_ahead_for_a_working_model_or_a_missing_file(quick_config):
    read_source_ahead(quick_config.replace(source_checkpoint="/nowhere/model.safetensors"))
    assert not single_file._AHEAD
    import json

    from dreambooth.model.workdir import save_working_dir, source_id, working_dir
    comp, _ = load_model(quick_config, lambda *a: None)
    folder = save_working_dir(comp, working_dir(quick_config))  # as a finished run leaves it
    (folder / "dreambooth_model.json").write_text(json.dumps(
        {"model_type": "v1x", "revision": 3, **source_id(quick_config.source_checkpoint)}))
    read_source_ahead(quick_config)  # the run goes on from the working folder: no read
    assert not single_file._AHEAD
    assert load_model(quick_config, lambda *a: None)[1] == 3


def test_a_run_that_stops_before_loading_drops_what_was_read(quick_config, monkeypatch):
    from dreambooth.training import trainer as trainer_module
    from dreambooth.training.trainer import train

    def refuse(*args, **kwargs):
        assert single_file._AHEAD  # read ahead by now
        raise trainer_module.DreamboothError("No.", "Do something else.")
    monkeypatch.setattr(trainer_module, "plan_run", refuse)
    with pytest.raises(trainer_module.DreamboothError):
        train(quick_config, None, ev.CancelToken())
    assert not single_file._AHEAD
